"""One rank of a multi-process test (tests/test_parallel*.py start it with torchrun's environment:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Usage: parallel_worker.py SCENARIO OUT_DIR [EP].
Each rank writes OUT_DIR/rank{r}.json with what it measured; the test compares."""

import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: the helpers
from model_utils import lm_loss, random_model, tiny_config, train_step  # noqa: E402

from fewchips.checkpoint import save_pretrained  # noqa: E402
from fewchips.model import Router  # noqa: E402
from fewchips.parallel import (ExpertParallelExperts, abort_on_failure, grad_norm_sq, init_parallel,  # noqa: E402
                               parallelize, shutdown)
from fewchips.checkpoint import sharded as pckpt  # noqa: E402
from fewchips.losses import compute_losses, moe_routers, update_biases  # noqa: E402
from fewchips.train.build import clip_grad_norm  # noqa: E402

torch.set_num_threads(1)
B, T, LR, GAMMA = 8, 12, 1e-2, 1e-2


def batch(step, cfg):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)


def reference_step(ref, opt, ids):
    """The single-process twin of train_step on the whole global batch."""
    opt.zero_grad(set_to_none=True)
    loss, stats = lm_loss(ref, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}     # before clipping
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    update_biases(moe_routers(ref), stats.load, GAMMA)
    return loss.item(), grads


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def biases(model):
    return torch.cat([m.e_score_correction_bias for m in model.modules() if isinstance(m, Router)])


def parity(par, out, save_dir=None):
    """Step 1: loss and gathered gradients against the single-process model; step 2: the loss again
    (so the sharded AdamW step and bias update match too); bias identical on every rank."""
    cfg = tiny_config()
    ref = random_model(cfg).train()
    model = parallelize(copy.deepcopy(ref), par)
    opt, ref_opt = make_optimizer(model), make_optimizer(ref)
    res = {"rank": par.rank}

    ids = batch(1, cfg)
    opt.zero_grad(set_to_none=True)
    loss, stats = lm_loss(model, par.local_batch(ids))
    loss.backward()
    ref_loss, ref_grads = reference_step(ref, ref_opt, ids)
    g = loss.detach().clone()
    dist.all_reduce(g)
    res["loss1"], res["ref_loss1"] = g.item() / par.world_size, ref_loss
    worst = 0.0
    for n, p in model.named_parameters():                           # gathered: FSDP shards, ep shards
        r = ref_grads[n]
        worst = max(worst, ((full(p.grad) - r).abs().max() / (r.abs().max() + 1e-30)).item())
    res["grad_rel_err"] = worst
    loads = stats.load.clone()
    dist.all_reduce(loads)
    clip_grad_norm(model, opt, 1.0, grad_norm_sq(model, par))
    opt.step()
    update_biases(moe_routers(model), loads, GAMMA)
    b = biases(model)
    every = [torch.empty_like(b) for _ in range(par.world_size)]
    dist.all_gather(every, b)
    res["bias_same_on_all_ranks"] = all(torch.equal(e, every[0]) for e in every)
    res["bias_vs_ref"] = (b - biases(ref)).abs().max().item()
    res["bias_moved"] = b.abs().max().item()
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    held = sum(opt.state[p]["exp_avg"].to_local().numel() for p in experts)   # AdamW's first moment
    res["expert_state_share"] = held / sum(p.numel() for p in experts)          # of the full [E, ...] tensors
    if save_dir:
        pckpt.save(save_dir, model, opt, extra={"step": 1})
    ids2 = batch(2, cfg)
    res["loss2"] = train_step(model, opt, ids2, par, GAMMA)
    res["ref_loss2"] = reference_step(ref, ref_opt, ids2)[0]
    res["roundtrip"] = roundtrip(par)
    return res


def roundtrip(par):
    """Dispatch + combine with an exactly checkable expert function: every copy of token t sent to
    expert e comes back as x_t + e, so the combined output is K*x_t + sum(e) exactly (small integers)."""
    E, K, D, M = 4 * par.ep, 3, 5, 7
    L = E // par.ep
    mod = ExpertParallelExperts(E, torch.zeros(L, 2, D), torch.zeros(L, D, 1), par)
    results = {}
    gen = torch.Generator().manual_seed(par.rank)
    cases = {
        "random": torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(M)]),
        "all_to_rank0": torch.stack([torch.randperm(L, generator=gen)[:K] for _ in range(M)]),  # others get none
        "only_to_other_ranks": (torch.stack([torch.randperm(L, generator=gen)[:K] for _ in range(M)])
                            + (0 if par.rank % 2 else L * (par.ep - 1))),
    }
    for name, experts_MK in cases.items():
        x = (torch.arange(M * D, dtype=torch.float32).view(M, D) + 100 * par.rank).requires_grad_(True)
        received = []

        def fn(x_local, counts_L):
            received.append(x_local.shape[0])
            ids = mod.first + torch.repeat_interleave(torch.arange(L), counts_L)
            return x_local + ids[:, None].float()

        flat = experts_MK.reshape(-1)
        order = flat.argsort(stable=True)
        y_sorted = mod.exchange(x[order // K], torch.bincount(flat, minlength=E), fn)
        y = torch.zeros_like(x).index_add_(0, order // K, y_sorted)
        expect = K * x.detach() + experts_MK.sum(1, keepdim=True).float()
        y.sum().backward()
        results[name] = {"exact": torch.equal(y.detach(), expect), "received": received[0],
                         "grad_exact": torch.equal(x.grad, torch.full_like(x, float(K)))}
    return results


def fp8_parity(par, out, pow2=False, dispatch=False):
    """FP8 (emulated) experts split over ep ranks: the split experts still run the FP8 grouped FFN, and
    one step's loss and gathered gradients equal FP8 in one process to FP8's own noise. That noise is
    large: FP8 rounding and expert choices flip on ulp-sized input changes (scaling the embedding by
    1 + 1e-6 moves the gradient by ~1% in L2), and the split computation is not bitwise the single
    one. Plain experts in place of FP8 ones move the loss by ~7e-5 and the gradient by ~12%; with the
    old 1e-4 floor on FP8 scales the split moved it by 5.3% (per-rank gradients are twice as large).
    dispatch: token rows (and the down-projection's gradients) travel in FP8; reports the bytes."""
    from fewchips.fp8 import apply_fp8
    from fewchips.fp8.linear import fp8_expert_swiglu
    from fewchips.parallel import apply_expert_parallel, apply_fsdp
    cfg = tiny_config()
    ref = random_model(cfg).train()
    apply_fp8(ref, backend="emulate", pow2_scales=pow2)
    model = apply_fsdp(apply_expert_parallel(copy.deepcopy(ref), par, fp8_dispatch=dispatch), par)
    split = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    ids = torch.randint(0, cfg.vocab_size, (128 * par.world_size, 4), generator=torch.Generator().manual_seed(5))
    loss, _ = lm_loss(model, par.local_batch(ids))
    loss.backward()
    ref_loss, _ = lm_loss(ref, ids)
    ref_loss.backward()
    g = loss.detach().clone()
    dist.all_reduce(g)
    refp = dict(ref.named_parameters())
    got = torch.cat([full(p.grad).flatten() for _, p in model.named_parameters()])
    want = torch.cat([refp[n].grad.flatten() for n, _ in model.named_parameters()])
    return {"rank": par.rank, "loss": g.item() / par.world_size, "ref_loss": ref_loss.item(),
            "grad_rel_l2": ((got - want).norm() / want.norm()).item(),
            "n_split": len(split), "fp8_ffn": all(getattr(m.swiglu, "func", None) is fp8_expert_swiglu for m in split),
            "dispatch_bytes_per_row": sum(m.dispatch_bytes for m in split) / sum(m.dispatch_rows for m in split),
            "fp8_bytes_sent": sum(m.fp8_bytes_sent for m in split), "hidden": cfg.hidden_size}


def pipeline(schedule, microbatches):
    """Pipeline parallelism over all ranks (pp = world size): one step's loss, the gradients of every
    parameter a rank holds and the balancing biases after the update, against one process."""
    from fewchips.parallel.pipeline import build_pipeline, tie_embeddings
    rank = dist.get_rank()
    cfg = tiny_config(num_hidden_layers=4)
    ref = random_model(cfg).train()
    model = copy.deepcopy(ref)
    ids = batch(1, cfg)                                     # windows [B, T+1]
    sched, mods, tie, _ = build_pipeline(model, dist.group.WORLD, (B // microbatches, T), schedule, microbatches)
    routers_all = moe_routers(model)
    loads = torch.zeros(len(routers_all), cfg.n_routed_experts)
    for m in mods:
        m.loads_LE = loads
    losses = []
    holds_first = any(m.first for m in mods)
    holds_last = any(m.last for m in mods)
    args = (ids,) if holds_first else ()
    counts = torch.full((B,), float(B * (T - 1)))          # every row divided by the batch's target count: a mean
    kwargs = {"target": counts, "losses": losses} if holds_last else {}
    sched.step(*args, **kwargs)
    tie_embeddings(mods, tie)
    main, mtp, bal, stats = compute_losses(ref, ids, 0.3, None)
    ref_loss = main + 0.3 * mtp + 1e-4 * bal
    ref_loss.backward()
    res = {"rank": rank}
    if holds_last:
        res["loss"], res["ref_loss"] = float(sum(t.item() for t in losses)), ref_loss.item()
    refp = dict(ref.named_parameters())
    worst, n = 0.0, 0
    seen = set()
    for m in mods:
        for name, p in m.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            full_name = (next(k for k, q in model.named_parameters() if q is p)
                         if any(q is p for q in model.parameters())
                         else "model.embed_tokens.weight")          # the last stage's own copy of the embedding
            r = refp[full_name].grad
            worst = max(worst, ((p.grad - r).abs().max() / (r.abs().max() + 1e-30)).item())
            n += 1
    res["grad_rel_err"], res["n_params"] = worst, n
    dist.all_reduce(loads)
    update_biases(routers_all, loads, GAMMA)
    update_biases(moe_routers(ref), stats.load, GAMMA)
    local = {id(r) for m in mods for r in m.modules() if isinstance(r, Router)}
    res["bias_vs_ref"] = max((a.e_score_correction_bias - b.e_score_correction_bias).abs().max().item()
                             for a, b in zip(routers_all, moe_routers(ref)) if id(a) in local)
    return res


def pipeline_eval(schedule):
    """`Pipeline` at pp = world size: what a rank holds (its stages; the rest released to meta) and the
    forward-only evaluation through torch's schedule, against one process's per-row cross-entropy."""
    import torch.nn.functional as F

    from fewchips.parallel.pipeline import Pipeline
    par = init_parallel(pp=dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"]))
    cfg = tiny_config(num_hidden_layers=4)
    ref = random_model(cfg).eval()
    model = copy.deepcopy(ref)
    pipe = Pipeline(model, par, rows=2, window=T, schedule=schedule, n_microbatches=4)
    ids = batch(3, cfg)                                    # [8, T]: 4 micro-batches of 2 windows
    got = pipe.evaluate(ids)
    with torch.no_grad():
        logits = ref(ids[:, :-1])
        want = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(B, -1).sum(1)
    held, total = pipe.parameter_counts()
    real = {n for n, p in model.named_parameters() if not p.is_meta}
    return {"rank": par.rank, "row_ce_rel_err": ((got - want).abs().max() / want.abs().max()).item(),
            "held": held, "total": total, "real_are_owned": real <= pipe.owned,
            "meta_have_no_grad": all(not p.requires_grad for p in model.parameters() if p.is_meta)}


def pipeline_overlap(overlap, schedule="dualpipev"):
    """`Pipeline` at pp 2 x ep 2 (FSDP and EP inside the stages) under DualPipeV with the paired forward
    and backward chunks run on two threads (or not), or under another schedule: one step's loss parts
    and every gradient a rank holds against one process."""
    from fewchips.parallel import overlap as O
    from fewchips.parallel.pipeline import Pipeline
    par = init_parallel(pp=2, ep=2)
    cfg = tiny_config(num_hidden_layers=4)
    ref = random_model(cfg).train()
    model = copy.deepcopy(ref)
    pipe = Pipeline(model, par, rows=1, window=T, schedule=schedule, n_microbatches=4, overlap=overlap)
    ids = batch(4, cfg)                                     # [8, T] windows: 4 micro-batches x 2 ep ranks
    loads = torch.zeros(len(moe_routers(model)), cfg.n_routed_experts)
    counts = torch.full((B // par.data_size,), B * (T - 1) / par.data_size)   # one micro-batch of B rows, 1/N each
    main, mtp, bal = pipe.step(par.local_batch(ids), counts, 0.3, 1e-4, loads).tolist()
    r_main, r_mtp, r_bal, _ = compute_losses(ref, ids, 0.3, None)
    (r_main + 0.3 * r_mtp + 1e-4 * r_bal).backward()
    refp = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        if p.is_meta or p.grad is None:
            continue
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        r = refp[name].grad
        worst = max(worst, ((got - r).abs().max() / (r.abs().max() + 1e-30)).item())
    return {"rank": par.rank, "main": main, "ref_main": r_main.item(), "mtp": mtp, "ref_mtp": r_mtp.item(),
            "grad_rel_err": worst, "pairs_on_two_threads": O.PAIRS_RUN[0]}


def placement(out, layout: dict, fp8_dir: str):
    """What the trainer builds at a layout (`--ep/--dp/--pp`), through its own parts: the meta model placed,
    then only this rank's tensors allocated and filled. Rank 0 gathers each tensor (RowGather) and
    compares it bitwise with one process's: the seeded initialisation, and a sharded `--init` read of an
    FP8-layout checkpoint against `from_pretrained`. Each rank reports the share of parameter elements
    it holds; the streamed export of the loaded model is written for the test to compare."""
    from fewchips import DeepseekV3, from_pretrained
    from fewchips.checkpoint import empty_model, hf_state_dict
    from fewchips.checkpoint.sharded import save_hf
    from fewchips.parallel.shards import RowGather
    from fewchips.train.build import build_model
    from fewchips.train.config import TrainConfig
    from fewchips.train.layout import make_layout
    cfg = placement_config()
    tc = TrainConfig(out=out, seed=7, init_std=0.02, batch_size=8, seq_len=12, **layout)
    lay = make_layout(tc)
    res = {"rank": dist.get_rank()}
    for what, tc_ in (("init", tc), ("fp8_load", TrainConfig(**{**tc.__dict__, "init": fp8_dir}))):
        model = lay.place(build_model(cfg, tc_), tc_, None)
        lay.materialise(model)
        lay.fill(model, tc_)
        got = dict(hf_state_dict(model, RowGather(model, lay.device)))
        if what == "init":
            held = sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                       for p in model.parameters() if not p.is_meta)
            res["held_share"] = held / sum(p.numel() for p in model.parameters())
        if dist.get_rank() == 0:
            if what == "init":
                ref = empty_model(cfg).init_weights(0.02, seed=7)
            else:
                ref = from_pretrained(fp8_dir, dtype=torch.float32)
            want = dict(hf_state_dict(ref))
            res[f"{what}_names_equal"] = sorted(got) == sorted(want)
            res[f"{what}_bitwise"] = all(torch.equal(got[k], want[k]) for k in want if k in got)
            if what == "fp8_load":
                save_pretrained(ref, os.path.join(out, "one"), max_shard_bytes=100_000)
        if what == "fp8_load":
            save_hf(model, os.path.join(out, "streamed"), lay.device, max_shard_bytes=100_000)
    assert isinstance(DeepseekV3, type)
    return res


def placement_config():
    """A dense FFN of 320 rows (three 128-row FP8 blocks) so that the rank's FSDP slices cut blocks."""
    return tiny_config(num_hidden_layers=4, intermediate_size=320, vocab_size=384)


def resume(par, out, ckpt):
    """Load a checkpoint written at another world size and take step 2."""
    cfg = tiny_config()
    model = parallelize(random_model(cfg, seed=999).train(), par)      # different weights: must be overwritten
    opt = make_optimizer(model)
    extra = pckpt.load(ckpt, model, opt)
    ids2 = batch(2, cfg)
    return {"rank": par.rank, "step": extra["step"],
            "loss2": train_step(model, opt, ids2, par, GAMMA)}


def fault(par, out, how="die"):
    """Rank 1 dies (or hangs) in the middle of the forward, after the dispatch all-to-all; the
    others must exit with a clear error within the collective timeout, not hang."""
    cfg = tiny_config()
    model = parallelize(random_model(cfg).train(), par)
    opt = make_optimizer(model)
    moe_layer = next(m for m in model.modules() if isinstance(m, ExpertParallelExperts))
    if par.rank == 1:
        def die(*a, **k):
            if how == "hang":
                time.sleep(3600)
            os._exit(3)
        moe_layer.expert_ffn = die
    with abort_on_failure(par, "training step"):
        for step in range(3):
            train_step(model, opt, batch(step, cfg), par)
    return {"rank": par.rank, "finished": True}


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    if scenario == "pipeline":                              # no dp x ep mesh: every rank is a pipeline stage
        dist.init_process_group("gloo")
        res = pipeline(sys.argv[3], int(sys.argv[4]))
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(res, f)
        shutdown()
        return
    if scenario == "pipeline_overlap":
        res = pipeline_overlap(sys.argv[3] == "on", sys.argv[4])
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(res, f)
        shutdown()
        return
    if scenario == "placement":                             # the trainer's own layout: it starts the group
        res = placement(out, json.loads(sys.argv[3]), sys.argv[4])
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(res, f)
        shutdown()
        return
    if scenario == "pipeline_eval":
        res = pipeline_eval(sys.argv[3])
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(res, f)
        shutdown()
        return
    ep = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    par = init_parallel(ep=ep, timeout_s=float(os.environ.get("FEWCHIPS_TEST_TIMEOUT", "60")))
    if scenario == "parity":
        res = parity(par, out)
    elif scenario == "parity_save":
        res = parity(par, out, save_dir=os.path.join(out, "ckpt"))
    elif scenario == "fp8_parity":
        res = fp8_parity(par, out, pow2=sys.argv[4] == "pow2", dispatch=sys.argv[5] == "dispatch")
    elif scenario == "resume":
        res = resume(par, out, sys.argv[4])
    elif scenario in ("fault", "hang"):
        res = fault(par, out, "die" if scenario == "fault" else "hang")
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    with open(os.path.join(out, f"rank{par.rank}.json"), "w") as f:
        json.dump(res, f)
    shutdown()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)     # results are written and the group is closed; gloo's threads at interpreter exit are not under test
