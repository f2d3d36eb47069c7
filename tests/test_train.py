"""The training recipe works: loss falls, the balancing bias evens out a skewed router (and γ=0 does
not), the sequence-wise balance loss equals a hand computation, MTP targets are shifted right and
the MTP loss falls, and the schedules have the report's shape."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fewchips.model import MoE, RouterOutput
from fewchips.train import Trainer
from fewchips.train import trainer as T
from train_utils import _restore_threads, micro_config, quiet, train_config, write_corpus  # noqa: F401


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


@pytest.mark.parametrize("gamma", [0.01, 0.0])
def test_bias_update_balances_a_skewed_router(tmp_path, corpus, gamma):
    tc = train_config(tmp_path / "run", corpus, steps=60, lr=1e-5, bias_update_speed=gamma, eval_every=1000)
    tr = Trainer(micro_config(), tc, log=quiet)
    _skew_routers(tr)
    loads = [tr.train_step().loads_LE for _ in range(tc.steps)]
    # MaxVio (worst layer) of the loads of the first and of the last 10 steps
    start = max(T.max_violation(sum(loads[:10])))
    end = max(T.max_violation(sum(loads[-10:])))
    assert start > 2.0                      # 2 of 8 experts take (nearly) every token: MaxVio -> 3
    if gamma:
        assert end < 0.3 * start, (start, end)
        assert all(float(r.e_score_correction_bias[:2].max()) < 0 for r in tr.routers)
    else:
        assert end > 0.8 * start, (start, end)
        assert all(float(r.e_score_correction_bias.abs().max()) == 0 for r in tr.routers)


def test_bias_update_rule():
    class R:
        e_score_correction_bias = torch.zeros(4)
    r = R()
    T.update_biases([r], torch.tensor([[10.0, 2.0, 4.0, 4.0]]), 0.5)     # mean 5
    assert r.e_score_correction_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert T.max_violation(torch.tensor([[10.0, 2.0, 4.0, 4.0]]))[0] == pytest.approx(1.0)


def test_sequence_balance_loss_matches_hand_computation():
    cfg = micro_config(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    moe = MoE(cfg)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.6, 0.4], [0.5, 0.5, 0.5, 0.5]])  # rows sum to 2
    experts = torch.tensor([[0, 2], [1, 2], [0, 3]])
    st = moe._stats(RouterOutput(torch.ones(3, 2), experts, scores), B=1, T=3)
    # counts (2,1,2,1); f_i = N_r/(K_r T)·count = (2/3)·count = (4/3, 2/3, 4/3, 2/3)
    # P_i = mean_t s_it/2 = (0.8/3, 0.7/3, 0.8/3, 0.7/3);  Σ f_i P_i = (3.2+1.4+3.2+1.4)/9 = 9.2/9
    assert st.seq_balance.item() == pytest.approx(9.2 / 9, rel=1e-6)
    assert st.load_E.tolist() == [2, 1, 2, 1]
    # two sequences: the mean of the per-sequence values
    scores2 = torch.cat([scores, torch.full((3, 4), 0.5)])
    experts2 = torch.cat([experts, torch.tensor([[0, 1]] * 3)])
    st2 = moe._stats(RouterOutput(torch.ones(6, 2), experts2, scores2), B=2, T=3)
    # second sequence: f = (2, 2, 0, 0), P = 1/4 each → Σ f P = 1
    assert st2.seq_balance.item() == pytest.approx((9.2 / 9 + 1.0) / 2, rel=1e-6)


def test_balance_loss_reaches_router_weights_and_is_summed_over_layers(corpus, tmp_path):
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus), log=quiet)
    ids = torch.from_numpy(tr.sampler.next_batch(2)[0])
    main, mtp, bal, stats = T.compute_losses(tr.model, ids, 0.3, None)
    assert len(stats) == len(tr.routers) == 3                     # 2 main MoE layers + the MTP layer
    assert bal.item() == pytest.approx(sum(s.seq_balance.item() for s in stats), rel=1e-6)
    bal.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in tr.routers)


def test_mtp_targets_are_shifted(corpus, tmp_path):
    """Position i of depth k is scored against token i+k+1 of the window."""
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus), log=quiet)
    ids = torch.from_numpy(tr.sampler.next_batch(2)[0])          # [B, T+1]
    main, mtp, _, _ = T.compute_losses(tr.model, ids, 0.3, None)
    inp = ids[:, :-1]
    with torch.no_grad():
        h = tr.model.hidden_states(inp)
        (logits1,) = tr.model.mtp_forward(inp, h)
        Tn = inp.shape[1]
        assert logits1.shape[1] == Tn - 1
        nll = [F.cross_entropy(logits1[:, i], ids[:, i + 2], reduction="none") for i in range(Tn - 1)]
        manual = torch.stack(nll).mean()
        main_manual = torch.stack([F.cross_entropy(tr.model(inp)[:, i], ids[:, i + 1]) for i in range(Tn)]).mean()
    assert mtp.item() == pytest.approx(manual.item(), rel=1e-5)
    assert main.item() == pytest.approx(main_manual.item(), rel=1e-5)


def test_schedules_follow_the_report():
    total, warm = 1000, 20
    lr = [T.lr_factor(s, total, warm) for s in range(total)]
    assert lr[0] == pytest.approx(1 / warm) and lr[warm - 1] == 1.0
    assert lr[600] == 1.0                                         # constant until 67.6%
    assert 0.1 < lr[800] < 1.0 and lr[800] > lr[900]              # cosine
    assert lr[970] == pytest.approx(0.1) and lr[995] == pytest.approx(7.3 / 220)
    assert T.bias_speed(960, total, 1e-3) == 1e-3 and T.bias_speed(970, total, 1e-3) == 0.0
    assert T.mtp_weight(600, total, 0.3, 0.1) == 0.3 and T.mtp_weight(700, total, 0.3, 0.1) == 0.1


def test_no_weight_decay_on_norms_and_biases(corpus, tmp_path):
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus), log=quiet)
    no_decay = {id(p) for g in tr.opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, p in tr.model.named_parameters():
        assert (id(p) in no_decay) == (p.dim() < 2), name


def test_activation_checkpointing_gives_the_same_gradients(corpus, tmp_path):
    grads = []
    for ac in (False, True):
        tr = Trainer(micro_config(), train_config(tmp_path / f"run{ac}", corpus, activation_checkpointing=ac), log=quiet)
        ids = torch.from_numpy(tr.sampler.next_batch(2)[0])
        main, mtp, bal, stats = T.compute_losses(tr.model, ids, 0.3, None)
        assert len(stats) == 3
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
            main, mtp, bal, stats = T.compute_losses(tr.model, ids, 0.3, None)
            (main + 0.3 * mtp + 1e-4 * bal).backward()
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)
            T.update_biases(tr.routers, torch.stack([s.load_E for s in stats]), 1e-3)
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
def test_clip_matches_torch_clip_then_adamw(fused, grad_mult):
    """The trainer's clip (folded into fused AdamW's grad_scale, or skipped when nothing is clipped)
    gives the same update as torch's clip_grad_norm_ followed by AdamW, and leaves no scale behind."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    model, ref_model = torch.nn.ParameterList(params), torch.nn.ParameterList(ref)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=fused)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, fused=fused)
    for _ in range(3):
        grads = [torch.randn_like(p) * grad_mult for p in params]
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = T.clip_grad_norm(model, opt, 1.0)
        assert torch.allclose(norm, torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0))
        assert hasattr(opt, "grad_scale") == (fused and grad_mult > 1)
        opt.step()
        opt.__dict__.pop("grad_scale", None)
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
