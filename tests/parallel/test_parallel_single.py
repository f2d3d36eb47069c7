"""The parallel code path in one process (a one-rank group) matches the plain model, and group-limited
routing bounds how many expert-parallel ranks a token reaches."""

import copy

import pytest
import torch

from model_utils import lm_loss, random_model, tiny_config


def test_one_process_path_matches_plain_model():
    import torch.distributed as dist

    from fewchips.parallel import init_parallel, parallelize, shutdown

    assert not dist.is_initialized()
    par = init_parallel()                        # no torchrun environment: a one-rank gloo group
    try:
        assert (par.dp, par.ep, par.world_size) == (1, 1, 1)
        cfg = tiny_config()
        ref = random_model(cfg).train()
        model = parallelize(copy.deepcopy(ref), par)
        ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
        (loss, stats), (ref_loss, ref_stats) = lm_loss(model, ids), lm_loss(ref, ids)
        (loss + 0).backward()
        ref_loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        assert torch.equal(stats.load, ref_stats.load) and stats.load.shape[0] == 3
        refp = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), refp[n].grad, rtol=1e-4, atol=1e-7)
    finally:
        shutdown()


def test_fp8_modules_survive_parallelize_at_ep1():
    """Pure data parallelism (ep 1) keeps every FP8 layer: the linears as FP8Linear, the split experts
    with the FP8 grouped FFN; the loss equals the FP8 model's in one process. FP8 after parallelize is refused."""
    from fewchips.fp8 import FP8Linear, apply_fp8
    from fewchips.fp8.linear import fp8_expert_swiglu
    from fewchips.parallel import ExpertParallelExperts, init_parallel, parallelize, shutdown

    par = init_parallel()
    try:
        cfg = tiny_config()
        ref = random_model(cfg).train()
        n_fp8 = len(apply_fp8(ref, backend="emulate"))
        model = parallelize(copy.deepcopy(ref), par)
        linears = [m for m in model.modules() if isinstance(m, FP8Linear)]
        experts = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
        assert len(linears) + len(experts) == n_fp8 and len(experts) == 3
        assert all(m.swiglu.func is fp8_expert_swiglu for m in experts)
        ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
        assert lm_loss(model, ids)[0].item() == pytest.approx(lm_loss(ref, ids)[0].item(), rel=1e-6)
        with pytest.raises(ValueError, match="before parallelize"):
            apply_fp8(parallelize(random_model(cfg).train(), par))
    finally:
        shutdown()


def test_gradient_reduction_waits_for_the_last_micro_batch():
    """Under gradient accumulation FSDP reduces once per step: after a micro-batch with sync off no
    sharded gradient exists yet; after the last one they equal the plain model's summed gradients."""
    from torch.distributed.tensor import DTensor

    from fewchips.parallel import init_parallel, parallelize, shutdown
    from fewchips.parallel.fsdp import set_gradient_sync

    par = init_parallel()
    try:
        cfg = tiny_config()
        ref = random_model(cfg).train()
        model = parallelize(copy.deepcopy(ref), par)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, cfg.vocab_size, (2, 10), generator=g) for _ in range(2)]
        set_gradient_sync(model, False)
        lm_loss(model, batches[0])[0].backward()
        fsdp_params = [p for n, p in model.named_parameters() if ".experts." not in n]
        assert all(p.grad is None for p in fsdp_params)                 # accumulated unsharded, not reduced
        set_gradient_sync(model, True)
        lm_loss(model, batches[1])[0].backward()
        for b in batches:
            lm_loss(ref, b)[0].backward()
        refp = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            torch.testing.assert_close(got, refp[n].grad, rtol=1e-4, atol=1e-7, msg=n)
    finally:
        shutdown()


def test_shared_experts_run_while_the_dispatch_travels(monkeypatch):
    """With `overlap` (the default) each MoE layer starts its dispatch all-to-all, runs the shared
    experts, and only then waits; without it, it waits first. Both give the same loss and gradients to
    the last bit (fp32). FP8 dispatch, overlapped by default, is checked under ep2 in test_parallel.py."""
    from fewchips.parallel import expert_parallel as ep_mod
    from fewchips.parallel import init_parallel, parallelize, shutdown

    par = init_parallel()
    try:
        cfg = tiny_config()
        ref = random_model(cfg).train()
        events = []
        wait = ep_mod.InFlight.wait
        monkeypatch.setattr(ep_mod.InFlight, "wait",
                            lambda self, timer=None: (events.append("wait"), wait(self, timer))[1])
        ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
        results = {}
        for overlap in (True, False):
            model = parallelize(copy.deepcopy(ref), par)
            split = ep_mod.expert_modules(model)
            for m in split:
                m.overlap = overlap
            for layer in model.model.layers:
                if getattr(layer.mlp, "shared_experts", None) is not None:
                    layer.mlp.shared_experts.register_forward_hook(lambda *a: events.append("shared"))
            events.clear()
            loss, _ = lm_loss(model, ids)
            loss.backward()
            results[overlap] = (loss.detach(), [p.grad.full_tensor().clone() for p in model.parameters()], list(events))
        n_moe = sum(1 for layer in ref.model.layers if hasattr(layer.mlp, "gate"))
        assert results[True][2][:2 * n_moe] == ["shared", "wait"] * n_moe       # shared experts, then the wait
        assert "wait" not in results[False][2]                                  # nothing in flight: synchronous
        assert torch.equal(results[True][0], results[False][0])
        assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))
    finally:
        shutdown()


def test_layout_errors_name_the_flag():
    from fewchips.parallel import init_parallel
    with pytest.raises(ValueError, match="--ep 3"):
        init_parallel(ep=3)
    with pytest.raises(ValueError, match="--dp 2"):
        init_parallel(dp=2, ep=1)


def ranks_per_token(experts_MK: torch.Tensor, n_experts: int, ep: int) -> torch.Tensor:
    """How many distinct ep ranks each token's copies go to [M] (contiguous placement)."""
    owner_MK = experts_MK // (n_experts // ep)
    hit_MP = torch.zeros(experts_MK.shape[0], ep, dtype=torch.bool, device=experts_MK.device)
    hit_MP.scatter_(1, owner_MK, True)
    return hit_MP.sum(1)


@pytest.mark.parametrize("ep", [2, 4])
def test_group_limited_routing_bounds_ranks_per_token(ep):
    """Groups and ranks are both contiguous runs of experts: with n_group a multiple of ep, each rank
    holds whole groups, so a token's copies reach at most topk_group ranks (node-limited routing)."""
    from fewchips.model import Router

    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group={2: 1, 4: 2}[ep], num_experts_per_tok=4)
    free = cfg.replace(n_group=1, topk_group=1)
    x = torch.randn(512, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    for c, bound in ((cfg, cfg.topk_group), (free, None)):
        router = Router(c)
        torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(1))
        n_ranks = ranks_per_token(router(x).experts_MK, c.n_routed_experts, ep)
        if bound is not None:
            assert int(n_ranks.max()) <= bound
        else:
            assert int(n_ranks.max()) > cfg.topk_group      # without groups, tokens spread further


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev", "interleaved1f1b"])
@pytest.mark.parametrize("n_layers,extra", [(8, 4.4), (9, 0.0), (12, 2.5), (7, 9.0)])
def test_balanced_split_is_optimal_on_small_cases(schedule, n_layers, extra):
    """The local search reaches the busiest rank's least possible work (checked against every
    contiguous split), with equal layers and no extra work it is the even split, and it beats the even
    split when the last stage carries the head and MTP."""
    import itertools

    from fewchips.stages import balanced_split, split_layers, stage_ranks, stages_per_rank
    pp = 2 if schedule != "1f1b" else 3
    n_stages = pp * stages_per_rank(schedule)
    owners = stage_ranks(pp, n_stages, schedule)
    costs = [1.2] + [1.0] * (n_layers - 1)                  # a dense first layer, then MoE layers

    def busiest(runs):
        work = [0.0] * pp
        for s, r in enumerate(runs):
            work[owners[s]] += sum(costs[i] for i in r) + (extra if s == n_stages - 1 else 0.0)
        return max(work)

    best = min(busiest([range(a, b) for a, b in zip((0, *cuts), (*cuts, n_layers))])
               for cuts in itertools.combinations(range(1, n_layers), n_stages - 1))
    runs = balanced_split(costs, extra, owners)
    assert [len(r) for r in runs] and all(len(r) >= 1 for r in runs) and runs[-1].stop == n_layers
    assert busiest(runs) == pytest.approx(best)
    if extra >= 2.5:
        assert busiest(runs) < busiest(split_layers(n_layers, n_stages))
    if extra == 0 and n_layers % n_stages == 0:
        assert [len(r) for r in balanced_split([1.0] * n_layers, 0.0, owners)] == [n_layers // n_stages] * n_stages


def test_overlap_refuses_a_torch_it_was_not_tested_with(monkeypatch):
    """parallel.overlap is the one module on torch's private schedule internals: on another torch
    release it refuses to register, and the trainer refuses --pp-overlap on by name."""
    from fewchips.parallel import overlap
    assert overlap.check_torch() is None                      # this torch is a tested one
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert "tested with torch 2.13, not 2.99.0" in overlap.check_torch()
    with pytest.raises(ValueError, match="private schedule internals"):
        overlap.register(object())
