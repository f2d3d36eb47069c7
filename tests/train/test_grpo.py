"""GRPO: the loss on a hand-made batch equals the objective computed by hand (group-normalised
advantages, clipped ratio, k3 KL, per-output averaging); one step makes the rewarded completion more
likely and the unrewarded one less; the MTP module follows the policy without steering it; tasks and
prompt files fail with the row or name at fault."""

import json
import math

import pytest
import torch

from fewchips.train.chat import ChatDataError
from fewchips.train.config import TrainError
from fewchips.train.grpo import GRPOTrainer, grpo_config, grpo_loss, group_advantages, load_task, token_logprobs
from train_utils import quiet


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = group_advantages(r, eps=0.0 + 1e-4)
    mean, std = 0.5, 0.5                                  # population std of [1, 0, 0, 1]
    assert a[0].tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in (1, 0, 0, 1)])
    assert a[1].tolist() == [0.0] * 4                      # equal rewards: no signal


def test_grpo_loss_equals_the_objective_by_hand():
    """Two outputs of different lengths; the ratio is pushed outside [1-ε, 1+ε] on some tokens so the
    clip acts (and on one where it does not bind: ρ < 1-ε with A > 0), and the reference differs so the
    KL term is live."""
    eps, beta = 0.2, 0.04
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]], requires_grad=True)
    old = torch.tensor([[-1.5, -0.5, -1.0], [-0.3, -0.9, -0.7]])
    ref = torch.tensor([[-1.2, -0.4, -2.5], [-0.2, -1.0, -0.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])           # output 2 has two tokens
    adv = torch.tensor([0.8, -1.3])
    loss, kl, clip_frac, ratio = grpo_loss(logp, old, ref, mask, adv, eps, beta)
    J, kls, clipped, rhos, n = 0.0, 0.0, 0, 0.0, 0
    for i in range(2):
        per_output = 0.0
        for t in range(3):
            if not mask[i, t]:
                continue
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            surrogate = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            d = math.exp(ref[i, t].item() - logp[i, t].item()) - (ref[i, t].item() - logp[i, t].item()) - 1
            per_output += surrogate - beta * d
            kls += d
            clipped += (rho < 1 - eps and a < 0) or (rho > 1 + eps and a > 0)     # where the clip binds (TRL)
            rhos += rho
            n += 1
        J += per_output / mask[i].sum().item()
    J /= 2
    assert loss.item() == pytest.approx(-J, rel=1e-6)
    assert kl.item() == pytest.approx(kls / n, rel=1e-6) and clip_frac.item() == pytest.approx(clipped / n)
    assert ratio.item() == pytest.approx(rhos / n, rel=1e-6)
    assert 0 < clipped < n
    loss.backward()                                                    # the gradient reaches log π_θ
    assert logp.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from fewchips.train import Trainer
    from train_utils import micro_config, train_config, write_corpus
    root = tmp_path_factory.mktemp("grpo")
    corpus = write_corpus(root / "corpus")
    Trainer(micro_config(), train_config(root / "model", corpus, steps=5), log=quiet).train()
    return str(root / "model")


def test_one_step_moves_probability_toward_the_rewarded_completion(sft_dir, tmp_path, monkeypatch):
    tc = grpo_config(init=sft_dir, out=str(tmp_path / "g"), steps=1, batch_size=1, group_size=2, lr=3e-3,
                     kl_beta=0.0, eval_every=100, plots=False, progress=False, dtype="fp32", threads=1, val_prompts=2)
    tr = GRPOTrainer(tc, quiet)
    good, bad = [10, 11, 12], [20, 21, 22]
    monkeypatch.setattr(tr, "sample", lambda prompts, n, greedy=False, seed=0: [good, bad])
    monkeypatch.setattr(tr.task, "reward", lambda m, c, a: float(c == tr.completion_text(good)))
    prompt = tr.data.encode(tr.data.prompts(0, 1)[0][0])

    def logp(ids):
        with torch.no_grad():
            lp = token_logprobs(tr.model, torch.tensor([prompt + ids]))
        return lp[0, len(prompt) - 1:].sum().item()

    before = logp(good), logp(bad)
    mtp_before = tr.model.mtp[0].eh_proj.weight.detach().clone()
    r = tr.train_step()
    after = logp(good), logp(bad)
    assert after[0] > before[0] and after[1] < before[1], (before, after)
    assert r.extra["reward_mean"] == 0.5 and r.extra["kl"] == pytest.approx(0.0, abs=1e-6)   # π = π_ref at step 0
    assert not torch.equal(tr.model.mtp[0].eh_proj.weight, mtp_before)                      # MTP kept in step
    assert tr.ref is None                                            # β = 0: no reference model is built


def test_the_reference_is_the_starting_model_frozen(sft_dir, tmp_path):
    """β > 0: π_ref holds the --model weights (without MTP), takes no gradient, and stays put."""
    from fewchips import from_pretrained
    tc = grpo_config(init=sft_dir, out=str(tmp_path / "r"), steps=1, batch_size=1, group_size=2, eval_every=100,
                     plots=False, progress=False, dtype="fp32", threads=1, val_prompts=2)
    tr = GRPOTrainer(tc, quiet)
    start = from_pretrained(sft_dir, dtype=torch.float32, mtp=False).state_dict()
    ref = tr.ref.state_dict()
    assert sorted(ref) == sorted(start) and all(torch.equal(ref[k], start[k]) for k in start)
    assert not any(p.requires_grad for p in tr.ref.parameters()) and len(tr.ref.mtp) == 0


def test_mtp_loss_does_not_steer_the_policy(sft_dir, tmp_path, monkeypatch):
    """With every advantage zero (no weight decay, no bias update), a step changes the MTP module and nothing the
    policy computes with."""
    tc = grpo_config(init=sft_dir, out=str(tmp_path / "z"), steps=1, batch_size=1, group_size=2, lr=3e-3,
                     kl_beta=0.0, weight_decay=0.0, bias_update_speed=0.0, eval_every=100, plots=False, progress=False,
                     dtype="fp32", threads=1, val_prompts=2)
    tr = GRPOTrainer(tc, quiet)
    monkeypatch.setattr(tr, "sample", lambda prompts, n, greedy=False, seed=0: [[10, 11, 12], [20, 21, 22]])
    monkeypatch.setattr(tr.task, "reward", lambda m, c, a: 1.0)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train_step()
    changed = {k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("mtp.") for k in changed), sorted(changed)[:5]


def test_tasks_and_prompt_files_fail_clearly(tmp_path):
    with pytest.raises(TrainError, match="arithmetic, format, math, code, code-fraction, or module:function"):
        load_task("nonsense")
    with pytest.raises(TrainError, match="needs --prompts"):
        load_task("json:dumps")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(ChatDataError, match=r"p\.jsonl:2: expected"):
        load_task("json:dumps", str(f))
    f.write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    task = load_task("math:isfinite", str(f))                 # any (prompt, completion) -> float callable works
    rng = __import__("random").Random(0)
    messages, _ = task.sample(rng)
    assert messages == [{"role": "user", "content": "2+2?"}]
    arithmetic = load_task("arithmetic")
    (m, answer) = arithmetic.sample(rng)
    assert "\\boxed{" in m[0]["content"]                                     # the prompt asks for the format
    assert arithmetic.reward(m, f"it is \\boxed{{ {answer} }}", answer) == 1.0
    assert arithmetic.reward(m, f"\\boxed{{{answer}0}}", answer) == 0.0 and arithmetic.reward(m, answer, answer) == 0.0
    assert (load_task("format").reward(m, "\\boxed{-12}", answer) == 1.0
            and load_task("format").reward(m, "\\boxed{12 apples}", answer) == 0.0
            and load_task("format").reward(m, "12", answer) == 0.0)


# ---- the knobs, each honoured (issue 24) ---------------------------------------------------------

def _trainer(sft_dir, tmp_path, monkeypatch, name, completions, reward=None, log=quiet, **kw):
    """A GRPO trainer on one prompt whose rollouts are `completions` (token lists), rewarded by position."""
    base = dict(init=sft_dir, out=str(tmp_path / name), steps=4, batch_size=1, group_size=len(completions), lr=3e-2,
                kl_beta=0.0, eval_every=100, plots=False, progress=False, dtype="fp32", threads=1, val_prompts=2,
                freeze_mtp=True)
    tr = GRPOTrainer(grpo_config(**{**base, **kw}), log)
    monkeypatch.setattr(tr, "sample",
                        lambda prompts, n, greedy=False, seed=0: [list(c) for c in completions] * len(prompts))
    scores = {tr.completion_text(c): float(i == 0) for i, c in enumerate(completions)}
    monkeypatch.setattr(tr.task, "reward", reward or (lambda m, c, a: scores[c]))
    return tr


def test_logprobs_at_the_sampling_temperature_everywhere(sft_dir, tmp_path, monkeypatch):
    import fewchips.train.grpo as grpo_mod
    tr = _trainer(sft_dir, tmp_path, monkeypatch, "t", [[10, 11], [20, 21]], temperature=0.7, kl_beta=0.04,
                  iterations=2)
    seen, orig = [], grpo_mod.token_logprobs
    monkeypatch.setattr(grpo_mod, "token_logprobs",
                        lambda *a, **k: (seen.append(k.get("temperature")), orig(*a, **k))[1])
    tr.train_step()
    assert len(seen) == 4 and set(seen) == {0.7}               # π_old, π_ref, and each of the 2 updates
    ids = torch.tensor([[1, 10, 11, 20]])
    with torch.no_grad():
        logits = tr.model(ids[:, :-1]).float()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(orig(tr.model, ids, temperature=0.7), want)


def test_iterations_update_against_the_rollout_policy(sft_dir, tmp_path, monkeypatch):
    """μ = 2: two optimizer steps per batch of rollouts, the second with the ratio to the rollout policy
    (not 1: π_old is not re-taken), and the lr schedule moves with each."""
    import fewchips.train.grpo as grpo_mod
    tr = _trainer(sft_dir, tmp_path, monkeypatch, "mu", [[10, 11], [20, 21]], iterations=2)
    ratios, orig = [], grpo_mod.grpo_loss
    monkeypatch.setattr(grpo_mod, "grpo_loss", lambda logp, old, *a: (ratios.append((logp - old).abs().max().item()),
                                                                       orig(logp, old, *a))[1])
    steps = []
    tr.opt.register_step_pre_hook(lambda *a: steps.append(1))
    r = tr.train_step()
    assert len(steps) == 2 and tr.step == 1 and tr.sched.last_epoch == 2
    assert ratios[0] == 0.0 and ratios[1] > 1e-4, ratios
    assert r.extra["loss_last_iteration"] != r.loss


def _by_hand(calls, eps):
    """KL (k3), clip share and mean ρ per completion token over recorded (logp, old, ref, mask, adv) lists."""
    kl = clipped = rhos = n = 0.0
    for logp, old, ref, mask, adv in calls:
        for i, row in enumerate(mask):
            for t, m in enumerate(row):
                if not m:
                    continue
                rho, d, a = math.exp(logp[i][t] - old[i][t]), ref[i][t] - logp[i][t], adv[i]
                kl += math.exp(d) - d - 1
                clipped += (rho < 1 - eps and a < 0) or (rho > 1 + eps and a > 0)
                rhos += rho
                n += 1
    return kl / n, clipped / n, rhos / n


def test_logged_figures_cover_every_update_of_the_batch(sft_dir, tmp_path, monkeypatch):
    """μ = 3 (two micro-batches each): the logged KL, clip share and mean ratio are per completion token over
    all three updates, computed here by hand from each update's log-probabilities. The first update alone
    (ρ = 1, π_θ = π_ref) would log a clip share and a KL of 0."""
    import fewchips.train.grpo as grpo_mod
    tr = _trainer(sft_dir, tmp_path, monkeypatch, "fig", [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40]],
                  iterations=3, kl_beta=0.04, grad_accum=2)
    calls, orig = [], grpo_mod.grpo_loss

    def record(logp, old, ref, mask, adv, *a):
        calls.append([x.detach().tolist() for x in (logp, old, ref, mask, adv)])
        return orig(logp, old, ref, mask, adv, *a)

    monkeypatch.setattr(grpo_mod, "grpo_loss", record)
    r = tr.train_step()
    assert len(calls) == 3 * 2
    kl, clip, rho = _by_hand(calls, tr.tc.clip_eps)
    first = _by_hand(calls[:2], tr.tc.clip_eps)
    assert first[0] == pytest.approx(0.0, abs=1e-6) and first[1] == 0.0 and first[2] == pytest.approx(1.0)
    assert clip > 0.1 and kl > 1e-3, (clip, kl)                         # the later updates moved the policy
    assert r.extra["clip_frac"] == pytest.approx(clip, abs=1e-6)
    assert r.extra["kl"] == pytest.approx(kl, rel=1e-4)
    assert r.extra["ratio_mean"] == pytest.approx(rho, rel=1e-5)
    assert r.extra["completion_len"] == 2.5                             # tokens counted once, not per update


def test_the_lr_schedule_steps_with_the_optimizer(sft_dir, tmp_path, monkeypatch, recwarn):
    """μ = 3 over 2 steps: six optimizer steps, each at its own point of a schedule laid over six (warm-up 2,
    then the cosine to 0.1 x the peak), computed here by hand; torch does not warn that the optimizer's step
    was replaced behind the scheduler (the tests count steps with a hook)."""
    tr = _trainer(sft_dir, tmp_path, monkeypatch, "lr", [[10, 11], [20, 21]], iterations=3, steps=2, lr=1e-2,
                  warmup_steps=2, min_lr_ratio=0.1)
    lrs = []
    tr.opt.register_step_pre_hook(lambda opt, *a: lrs.append(opt.param_groups[0]["lr"]))
    tr.train_step()
    tr.train_step()
    want = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(2, 6)]
    assert lrs == pytest.approx([1e-2 * w for w in want], rel=1e-6)
    assert tr.sched.last_epoch == 6 and tr.step == 2
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message) or "optimizer.step" in str(w.message)]


def test_resume_with_iterations_continues_exactly(sft_dir, tmp_path, monkeypatch):
    """μ = 3: 2 steps equal 1 step, --resume, 1 step (every optimizer step's lr, the weights, the schedule's
    count); resuming with another μ, which lays the schedule out over other steps, is refused by name."""
    completions = [[10, 11, 12], [20, 21]]
    kw = dict(iterations=3, steps=2, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1)

    def run(name, **more):
        tr = _trainer(sft_dir, tmp_path, monkeypatch, name, completions, **kw, **more)
        lrs = []
        tr.opt.register_step_pre_hook(lambda opt, *a: lrs.append(opt.param_groups[0]["lr"]))
        tr.train()
        return tr, lrs

    full, lrs = run("full")
    first, lrs1 = run("split", stop_at=1)
    second, lrs2 = run("split", resume=True)
    assert first.step == 1 and len(lrs) == 6 and lrs1 + lrs2 == lrs
    assert second.sched.last_epoch == full.sched.last_epoch == 6
    a, b = full.model.state_dict(), second.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    with pytest.raises(TrainError, match=r"took 6 optimizer steps in its 2 steps, --iterations 2 takes 4"):
        _trainer(sft_dir, tmp_path, monkeypatch, "split", completions, **{**kw, "iterations": 2}, resume=True)


def test_the_mtp_layers_loads_count_completion_tokens(sft_dir, tmp_path, monkeypatch):
    """The MTP module trained beside the policy: its MoE layer's loads count the completion tokens, K copies
    each, as the policy's layers do; not the prompt, not the padding."""
    completions = [[10, 11, 12, 13], [20, 21], [30], [40, 41, 42]]
    tr = _trainer(sft_dir, tmp_path, monkeypatch, "mtpload", completions, freeze_mtp=False)
    cfg = tr.cfg
    assert cfg.is_moe_layer(cfg.num_hidden_layers)                      # the MTP layer routes
    r = tr.train_step()
    assert r.loads_LE.sum(-1).tolist() == [cfg.num_experts_per_tok * sum(map(len, completions))] * len(tr.routers)


def test_grad_accum_gives_the_same_update_and_loads_count_completion_tokens(sft_dir, tmp_path, monkeypatch):
    """--grad-accum 2 over four completions equals one micro-batch (fp32); the expert loads of the bias update
    count the completion tokens only, K copies each (not the prompt, not the padding)."""
    completions = [[10, 11, 12, 13], [20, 21], [30], [40, 41, 42]]
    grads = []

    def step_of(tr):                            # the gradients AdamW gets (its first step amplifies their noise)
        tr.opt.register_step_pre_hook(lambda *a: grads.append(
            {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}))
        return tr.train_step()

    one = _trainer(sft_dir, tmp_path, monkeypatch, "ga1", completions)
    r1 = step_of(one)
    r2 = step_of(_trainer(sft_dir, tmp_path, monkeypatch, "ga2", completions, grad_accum=2))
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-8, msg=k)
    assert r1.loss == pytest.approx(r2.loss, abs=1e-7) and r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-5)
    K, cfg = one.cfg.num_experts_per_tok, one.cfg
    main_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))    # the frozen MTP layer routes none
    assert r1.loads_LE[:main_layers].sum(-1).tolist() == [K * sum(map(len, completions))] * main_layers
    assert torch.equal(r1.loads_LE, r2.loads_LE)


def test_held_out_prompts_are_never_trained_on(sft_dir, tmp_path):
    tc = grpo_config(init=sft_dir, out=str(tmp_path / "h"), steps=1, val_prompts=60, plots=False, progress=False,
                     dtype="fp32", threads=1)
    lines = []
    tr = GRPOTrainer(tc, lines.append)
    from fewchips.train.grpo import _key
    held = tr.data.held_out
    assert 30 < len(held) < 60 and any("never drawn for training" in line for line in lines)
    drawn = {_key(m) for step in range(100) for m, _ in tr.data.prompts(step, 16)}
    assert drawn and not drawn & held
    assert len(drawn | held) == 200                          # the whole arithmetic task: 10 x 10 x {+, -}


def test_a_run_without_reward_spread_says_so(sft_dir, tmp_path, monkeypatch):
    lines = []
    tr = _trainer(sft_dir, tmp_path, monkeypatch, "q", [[10], [20]], reward=lambda m, c, a: 0.0, log=lines.append)
    for _ in range(3):
        tr.train_step()
    assert sum("no gradient" in line for line in lines) == 1 and "--group-size" in lines[-1]



# ---- rewards that see the data (the rules themselves: test_rewards.py) -------------------------------

def test_a_users_reward_sees_the_rows_fields_and_its_errors_name_the_row(tmp_path):
    import sys
    mod = tmp_path / "myreward.py"
    mod.write_text("def score(prompt, completion, answer):\n    return float(completion.strip() == answer)\n"
                   "def broken(prompt, completion, **row):\n    return 1 / 0\n")
    sys.path.insert(0, str(tmp_path))
    try:
        f = tmp_path / "p.jsonl"
        f.write_text(json.dumps({"prompt": "2+2?", "answer": "4", "source": "x"}) + "\n")
        task = load_task("myreward:score", str(f))
        messages, row = task.sample(__import__("random").Random(0))
        assert row.fields == {"answer": "4", "source": "x"}
        assert task.reward(messages, " 4 ", row) == 1.0 and task.reward(messages, "5", row) == 0.0
        with pytest.raises(TrainError, match=r"the reward failed on .*p\.jsonl:1 \(ZeroDivisionError"):
            load_task("myreward:broken", str(f)).reward(messages, "4", row)
        with pytest.raises(ChatDataError, match=r"p\.jsonl:1: the code task needs a 'tests' field"):
            load_task("code", str(f))
        math = load_task("math", str(f))
        pytest.importorskip("math_verify")
        assert math.reward(messages, "It is \\boxed{4}.", row) == 1.0 and math.reward(messages, "It is 4.", row) == 0.0
    finally:
        sys.path.remove(str(tmp_path))


def test_ema_answers_the_held_out_prompts_beside_the_policy(sft_dir, tmp_path):
    """--ema under GRPO: each evaluation also scores the EMA's weights, then the policy is as it was."""
    tc = grpo_config(init=sft_dir, out=str(tmp_path / "e"), steps=1, batch_size=1, group_size=2, eval_every=100,
                     plots=False, progress=False, dtype="fp32", threads=1, val_prompts=2, ema=0.5)
    tr = GRPOTrainer(tc, quiet)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    ev = tr._eval_and_plot(None)
    assert {"val_reward", "ema_val_reward", "ema_val_len"} <= set(ev)
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
