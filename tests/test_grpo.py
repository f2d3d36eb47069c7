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
from train_utils import _restore_threads, quiet  # noqa: F401


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = group_advantages(r, eps=0.0 + 1e-4)
    mean, std = 0.5, 0.5                                  # population std of [1, 0, 0, 1]
    assert a[0].tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in (1, 0, 0, 1)])
    assert a[1].tolist() == [0.0] * 4                      # equal rewards: no signal


def test_grpo_loss_equals_the_objective_by_hand():
    """Two outputs of different lengths; the ratio is pushed outside [1-ε, 1+ε] on some tokens so the
    clip acts, and the reference differs so the KL term is live."""
    eps, beta = 0.2, 0.04
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]], requires_grad=True)
    old = torch.tensor([[-1.5, -0.5, -1.0], [-0.3, -0.9, -0.7]])
    ref = torch.tensor([[-1.2, -0.4, -2.5], [-0.2, -1.0, -0.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])           # output 2 has two tokens
    adv = torch.tensor([0.8, -1.3])
    loss, kl, clip_frac = grpo_loss(logp, old, ref, mask, adv, eps, beta)
    J, kls, clipped, n = 0.0, 0.0, 0, 0
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
            clipped += not (1 - eps <= rho <= 1 + eps)
            n += 1
        J += per_output / mask[i].sum().item()
    J /= 2
    assert loss.item() == pytest.approx(-J, rel=1e-6)
    assert kl.item() == pytest.approx(kls / n, rel=1e-6) and clip_frac.item() == pytest.approx(clipped / n)
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
                     kl_beta=0.0, weight_decay=0.0, bias_update_speed=0.0, eval_every=100, plots=False, progress=False, dtype="fp32", threads=1, val_prompts=2)
    tr = GRPOTrainer(tc, quiet)
    monkeypatch.setattr(tr, "sample", lambda prompts, n, greedy=False, seed=0: [[10, 11, 12], [20, 21, 22]])
    monkeypatch.setattr(tr.task, "reward", lambda m, c, a: 1.0)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train_step()
    changed = {k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("mtp.") for k in changed), sorted(changed)[:5]


def test_tasks_and_prompt_files_fail_clearly(tmp_path):
    with pytest.raises(TrainError, match="arithmetic, format, or module:function"):
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
    assert arithmetic.reward(m, f" {answer} ", answer) == 1.0 and arithmetic.reward(m, answer + "0", answer) == 0.0
    assert load_task("format").reward(m, "-12", answer) == 1.0 and load_task("format").reward(m, "12 apples", answer) == 0.0
