"""The training recipe works: loss falls, the balancing bias evens out a skewed router (and γ=0 does
not), the sequence-wise balance loss equals a hand computation, MTP targets are shifted right and
the MTP loss falls, and the schedules have the report's shape."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fewchips.model import MoE, RMSNorm, RouterOutput
from fewchips.train import Trainer
from fewchips import losses as L
from fewchips.train import build as B, config as C, schedule as S
from train_utils import micro_config, quiet, train_config, write_corpus


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_loss_and_mtp_loss_fall(tmp_path, corpus):
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=30), log=quiet)
    result = tr.train()
    recs = [r for r in records(tr.metrics_path) if "loss" in r]
    first, last = recs[0], recs[-1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["mtp_loss"]) for r in recs)
    assert last["loss"] < first["loss"] - 1.5, (first["loss"], last["loss"])
    assert last["mtp_loss"] < first["mtp_loss"] - 1.0, (first["mtp_loss"], last["mtp_loss"])
    assert result["val_loss"] < result["unigram_entropy"]
    assert result["skipped_steps"] == 0
    assert all(r["balance_loss"] > 0 for r in recs)            # α·Σ seq_balance is never silently zero


def _skew_routers(tr):
    """Point experts 0 and 1 of every router along the mean router input: they win for every token."""
    captured = []
    hooks = [r.register_forward_hook(lambda m, args, out: captured.append((m, args[0].detach())))
             for r in tr.routers]
    ids = torch.from_numpy(tr.sampler.next_batch(4)[0])
    tr.sampler.load_state_dict({**tr.sampler.state_dict(), "epoch": 0, "cursor": 0})
    with torch.no_grad():
        h = tr.model.hidden_states(ids[:, :-1])
        tr.model.mtp_forward(ids[:, :-1], h)
    for hk in hooks:
        hk.remove()
    with torch.no_grad():
        for router, x in captured:
            m = x.float().mean(0)
            router.weight[:2] = 4 * m / m.pow(2).sum()


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.01, 0.0])
def test_bias_update_balances_a_skewed_router(tmp_path, corpus, gamma):
    tc = train_config(tmp_path / "run", corpus, steps=60, lr=1e-5, bias_update_speed=gamma, eval_every=1000)
    tr = Trainer(micro_config(), tc, log=quiet)
    _skew_routers(tr)
    loads = [tr.train_step().loads_LE for _ in range(tc.steps)]
    # MaxVio (worst layer) of the loads of the first and of the last 10 steps
    start = max(L.max_violation(sum(loads[:10])))
    end = max(L.max_violation(sum(loads[-10:])))
    assert start > 2.0                      # 2 of 8 experts take (nearly) every token: MaxVio -> 3
    if gamma:
        # the sign update's ±γ steps leave MaxVio oscillating, at 0.17-0.52 of the start over init seeds 0-3
        assert end < 0.6 * start, (start, end)
        assert all(float(r.e_score_correction_bias[:2].max()) < 0 for r in tr.routers)
    else:
        assert end > 0.8 * start, (start, end)
        assert all(float(r.e_score_correction_bias.abs().max()) == 0 for r in tr.routers)


def test_bias_update_rule():
    class R:
        e_score_correction_bias = torch.zeros(4)
    r = R()
    L.update_biases([r], torch.tensor([[10.0, 2.0, 4.0, 4.0]]), 0.5)     # mean 5
    assert r.e_score_correction_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert L.max_violation(torch.tensor([[10.0, 2.0, 4.0, 4.0]]))[0] == pytest.approx(1.0)


def test_sequence_balance_loss_matches_hand_computation():
    cfg = micro_config(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    moe = MoE(cfg)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.6, 0.4], [0.5, 0.5, 0.5, 0.5]])  # rows sum to 2
    experts = torch.tensor([[0, 2], [1, 2], [0, 3]])
    st = moe._stats(RouterOutput(torch.ones(3, 2), experts, scores), B=1, T=3)
    # counts (2,1,2,1); f_i = N_r/(K_r T)·count = (2/3)·count = (4/3, 2/3, 4/3, 2/3)
    # P_i = mean_t s_it/2 = (0.8/3, 0.7/3, 0.8/3, 0.7/3);  Σ f_i P_i = (3.2+1.4+3.2+1.4)/9 = 9.2/9
    assert st.seq_balance.item() == pytest.approx(9.2 / 9, rel=1e-6)
    assert st.load.tolist() == [2, 1, 2, 1]
    # two sequences: the mean of the per-sequence values
    scores2 = torch.cat([scores, torch.full((3, 4), 0.5)])
    experts2 = torch.cat([experts, torch.tensor([[0, 1]] * 3)])
    st2 = moe._stats(RouterOutput(torch.ones(6, 2), experts2, scores2), B=2, T=3)
    # second sequence: f = (2, 2, 0, 0), P = 1/4 each → Σ f P = 1
    assert st2.seq_balance.item() == pytest.approx((9.2 / 9 + 1.0) / 2, rel=1e-6)


def test_balance_loss_reaches_router_weights_and_is_summed_over_layers(corpus, tmp_path):
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus), log=quiet)
    ids = torch.from_numpy(tr.sampler.next_batch(2)[0])
    seen = []                                     # each router's (experts, scores), in call order
    hooks = [r.register_forward_hook(lambda m, a, out: seen.append((out.experts_MK, out.scores_ME)))
             for r in tr.routers]
    main, mtp, bal, stats = L.compute_losses(tr.model, ids, 0.3, None)
    for h in hooks:
        h.remove()
    assert stats.load.shape == (len(tr.routers), tr.cfg.n_routed_experts) and len(tr.routers) == 3  # 2 main + MTP
    # eqs. 17-20 per layer from the routers' own choices, written out: f_i = E/(K·T)·count_i per row,
    # P_i = mean_t s_i,t / Σ_j s_j,t; the layer's term is Σ_i f_i P_i averaged over rows; bal sums the layers
    E, K, B = tr.cfg.n_routed_experts, tr.cfg.num_experts_per_tok, ids.shape[0]
    want = 0.0
    for experts, scores in seen:
        T = experts.shape[0] // B
        for b in range(B):
            rows = slice(b * T, (b + 1) * T)
            count = torch.bincount(experts[rows].flatten(), minlength=E).double()
            P = (scores[rows] / scores[rows].sum(-1, keepdim=True)).detach().double().mean(0)
            want += float((E / (K * T) * count * P).sum()) / B
    assert len(seen) == 3 and bal.item() == pytest.approx(want, rel=1e-6)
    # every layer routed each of its tokens to K experts (the MTP layer has T-1 positions per row)
    rows, n = ids[:, :-1].shape
    assert stats.load.sum(-1).tolist() == [m * tr.cfg.num_experts_per_tok for m in (rows * n, rows * n, rows * (n - 1))]
    bal.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in tr.routers)


def mtp_losses_from_the_report(model, ids_BT1):
    """The MTP losses from the report's equations: eqs. 21-23 per depth (conftest), then
        L^k = -1/T sum_{i=2+k}^{T+1} log P^k_i[t_i]                     (eq. 24)
    with h^0 the main model's final-normed state and depth k+1 reading depth k's normed output (the
    form fewchips documents, Megatron-Core's). Returns the list of L^k (eq. 25 averages them, times λ)."""
    from model_utils import mtp_depth_from_the_report
    inp = ids_BT1[:, :-1]
    B, T = inp.shape
    h = model.hidden_states(inp)                                         # h^0, checked against transformers elsewhere
    losses = []
    for k, mtp in enumerate(model.mtp, start=1):
        h, logits = mtp_depth_from_the_report(model, mtp, inp[:, k:], h[:, :T - k])
        logp = logits.log_softmax(-1)                                    # [B, T-k, V]
        targets = ids_BT1[:, k + 1:]                                     # t_{i+k+1}
        losses.append(-logp.gather(-1, targets[..., None]).sum() / (B * T))
    return losses


def test_mtp_losses_follow_the_report_equations_at_depth_2():
    """Two MTP depths with live hidden paths (random eh_proj, both halves): the trainer's MTP loss is
    eq. 25's average of eq. 24 computed from the equations; the main loss is plain next-token CE."""
    from model_utils import random_model, tiny_config
    model = random_model(tiny_config(num_nextn_predict_layers=2), std=0.1).train()
    with torch.no_grad():              # norms with their own weights: RMSNorm(RMSNorm(h)) = RMSNorm(h) at weight 1
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(m.weight)))
    assert model.mtp[1].eh_proj.weight[:, 64:].abs().min() > 0          # the hidden half is live
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    main, mtp, _, _ = L.compute_losses(model, ids, 0.3, None)
    with torch.no_grad():
        want = mtp_losses_from_the_report(model, ids)
        main_want = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert len(want) == 2
    assert mtp.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    assert main.item() == pytest.approx(main_want.item(), rel=1e-6)


def test_schedules_follow_the_report():
    total, warm = 1000, 20
    lr = [S.lr_factor(s, warm, s / total) for s in range(total)]
    assert lr[0] == pytest.approx(1 / warm) and lr[warm - 1] == 1.0
    assert lr[600] == 1.0                                         # constant until 67.6% of the tokens
    assert 0.1 < lr[800] < 1.0 and lr[800] > lr[900]              # cosine
    assert lr[970] == pytest.approx(0.1) and lr[995] == pytest.approx(7.3 / 220)
    assert S.bias_speed(0.96, 1e-3) == 1e-3 and S.bias_speed(0.97, 1e-3) == 0.0   # γ off after 14.3T / 14.8T
    assert S.mtp_weight(0.6, 0.3, 0.1) == 0.3 and S.mtp_weight(0.7, 0.3, 0.1) == 0.1   # λ 0.3 → 0.1 at 10T


def test_batch_ramp_grows_in_whole_micro_batches_and_keys_schedules_on_tokens():
    """The global batch grows linearly in tokens (rounded down to whole micro-batches) from the start
    size to the full batch, reached once the ramp's tokens are seen; lr/γ/λ switch on token fractions,
    which then run behind step fractions."""
    tc = C.TrainConfig(steps=400, batch_size=4, grad_accum=6, seq_len=32, batch_ramp_tokens=100_000,
                       batch_size_start=8, warmup_steps=1)
    s = S.RunSchedule.of(tc)
    per_micro = 4 * 32
    assert s.micro_batches[0] == 2 and s.micro_batches[-1] == 6
    assert set(s.micro_batches) == {2, 3, 4, 5, 6}                 # every whole micro-batch count on the way
    assert list(s.micro_batches) == sorted(s.micro_batches)
    for step, n in enumerate(s.micro_batches):
        seen = s.tokens_before[step]
        assert s.tokens_before[step + 1] - seen == n * per_micro
        linear = 2 + 4 * min(seen / 100_000, 1.0)                  # micro-batches on the straight line
        assert n <= linear < n + 1
    assert s.total_tokens == sum(s.micro_batches) * per_micro
    ramp_end = next(i for i, n in enumerate(s.micro_batches) if n == 6)
    assert s.tokens_before[ramp_end - 1] < 100_000 <= s.tokens_before[ramp_end]
    # the schedules key on tokens: the first step past 67.6% of the tokens lowers λ and starts the cosine
    switch = next(i for i in range(tc.steps) if s.fraction(i) >= S.CONSTANT_END)
    assert switch / tc.steps > S.CONSTANT_END + 0.02               # steps run ahead of tokens under a ramp
    assert s.lr_factor(switch - 1, 1) == 1.0 and s.lr_factor(switch, 1) < 1.0
    assert S.mtp_weight(s.fraction(switch - 1), 0.3, 0.1) == 0.3 and S.mtp_weight(s.fraction(switch), 0.3, 0.1) == 0.1
    no_ramp = S.RunSchedule.of(C.TrainConfig(steps=10, batch_size=4, grad_accum=3, seq_len=32))
    assert no_ramp.micro_batches == (3,) * 10 and no_ramp.fraction(5) == 0.5


@pytest.mark.parametrize("bad,match", [(dict(batch_size_start=6), "multiple of --batch-size"),
                                       (dict(batch_size_start=40), "between 4 and"),
                                       (dict(batch_ramp_tokens=-1), "--batch-ramp-tokens")])
def test_bad_ramp_settings_name_the_flag(bad, match):
    with pytest.raises(C.TrainError, match=match):
        C.TrainConfig(batch_size=4, grad_accum=6, **{"batch_ramp_tokens": 1000, **bad})


def test_ramped_run_logs_the_batch_and_resumes_mid_ramp_exactly(tmp_path, corpus):
    """Ramp over the first third of the run's tokens: metrics log the batch growing in whole
    micro-batches; stopping mid-ramp and resuming gives the same per-step losses."""
    kw = dict(steps=10, batch_size=2, grad_accum=3, seq_len=32, batch_ramp_tokens=400)
    full = Trainer(micro_config(), train_config(tmp_path / "full", corpus, **kw), log=quiet)
    assert full.schedule.tokens_before[full.schedule.micro_batches.index(3)] <= full.schedule.total_tokens / 2
    full.train()
    want = [r for r in records(full.metrics_path) if "loss" in r]
    batches = [r["batch"] for r in want]
    assert batches[0] == 2 and batches[-1] == 6 and set(batches) == {2, 4, 6} and batches == sorted(batches)
    assert all(b - a == r["batch"] * 32
               for (a, b, r) in zip([0] + [r["tokens"] for r in want], [r["tokens"] for r in want], want))
    stop = 2
    assert full.schedule.micro_batches[stop] < 3                   # the split lands inside the ramp
    Trainer(micro_config(), train_config(tmp_path / "split", corpus, stop_at=stop, **kw), log=quiet).train()
    Trainer(micro_config(), train_config(tmp_path / "split", corpus, resume=True, **kw), log=quiet).train()
    got = [r for r in records(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert (g["batch"], g["tokens"]) == (w["batch"], w["tokens"])
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), g["step"]


def test_no_weight_decay_on_norms_and_biases(corpus, tmp_path):
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus), log=quiet)
    no_decay = {id(p) for g in tr.opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, p in tr.model.named_parameters():
        assert (id(p) in no_decay) == (p.dim() < 2), name


def test_activation_checkpointing_gives_the_same_gradients(corpus, tmp_path):
    grads = []
    for ac in (False, True):
        tr = Trainer(micro_config(), train_config(tmp_path / f"run{ac}", corpus, activation_checkpointing=ac),
                     log=quiet)
        ids = torch.from_numpy(tr.sampler.next_batch(2)[0])
        main, mtp, bal, stats = L.compute_losses(tr.model, ids, 0.3, None)
        assert stats.load.shape[0] == 3
        (main + 0.3 * mtp + 1e-4 * bal).backward()
        grads.append(torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_layers_give_the_same_losses_and_follow_bias_updates(corpus, tmp_path):
    """--compile: compiled attention/norm/MLP/router pieces match eager for two optimizer steps, and
    the router still reads the bias buffer the trainer moves in place (no stale constant)."""
    losses = []
    for comp in (False, True):
        tr = Trainer(micro_config(), train_config(tmp_path / f"run{comp}", corpus, compile=comp, steps=2,
                                                  eval_every=10**6), log=quiet)
        out = []
        for _ in range(2):
            ids = torch.from_numpy(tr.sampler.next_batch(2)[0])
            main, mtp, bal, stats = L.compute_losses(tr.model, ids, 0.3, None)
            (main + 0.3 * mtp + 1e-4 * bal).backward()
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)
            L.update_biases(tr.routers, stats.load, 1e-3)
            out.append(main.item())
        losses.append(out)
        router = tr.routers[0]
        with torch.no_grad():
            router.e_score_correction_bias[3] += 100.0                 # expert 3 must now win every token
            r = router(torch.randn(5, tr.cfg.hidden_size))
            router.e_score_correction_bias[3] -= 100.0
        assert (r.experts_MK == 3).any(-1).all()
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("grad_mult", [1e-4, 1e3])          # nothing clipped, clipped
@pytest.mark.parametrize("transposed", [False, True])
def test_clip_matches_torch_clip_then_adamw(fused, grad_mult, transposed):
    """The trainer's clip (skipped when nothing is clipped) gives the same update as torch's
    clip_grad_norm_ followed by AdamW, fused or not.
    Also when a gradient's layout is not its parameter's (transposed, as the pipeline schedules' split
    weight backward leaves some): torch 2.13's fused CPU AdamW would apply it scrambled."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    model, ref_model = torch.nn.ParameterList(params), torch.nn.ParameterList(ref)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=fused)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, fused=fused)
    for _ in range(3):
        grads = [torch.randn_like(p) * grad_mult for p in params]
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = (g.t().contiguous().t() if transposed else g.clone()), g.clone()
        norm = B.clip_grad_norm(model, opt, 1.0)
        assert torch.allclose(norm, torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0))
        opt.step()
        opt_ref.step()
    for p, q in zip(params, ref):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off():
    """The CLI's allocator setting takes effect on Linux/glibc and FEWCHIPS_KEEP_FREED_MEMORY=0 skips it
    (run in fresh interpreters: the setting is process-wide)."""
    import os
    import platform
    import subprocess
    import sys

    code = "from fewchips.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = {v: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "FEWCHIPS_KEEP_FREED_MEMORY": v}).stdout.strip() for v in ("0", "1")}
    assert out["0"] == "False"
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert out["1"] == "True"
