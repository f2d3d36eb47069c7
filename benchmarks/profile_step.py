"""Where a CPU step goes, ours next to transformers: a torch-profiler summary by op of one training step
(forward + backward + AdamW) and of batch-1 greedy decode steps, on the same config and weights in one
process, plus the GEMM FLOPs each implementation actually issues (counted from the shapes of every
mm / bmm / addmm / grouped_mm / attention call, so padded rows count) against the model's FLOPs.

    python benchmarks/profile_step.py                          # small preset, fp32, batch 4 x 256
    python benchmarks/profile_step.py --dtype bf16             # where the CPU has native bf16
    python benchmarks/profile_step.py --preset tiny --top 20

Both sides get the same random weights and the same bias-balanced routing (as bench_train.py), two
untimed warm-up steps, then one profiled step each (ours first, then theirs, each twice; the faster
profile of each is shown). Op times are self CPU time in ms, with their share of the step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
from machine import cpu_name  # noqa: E402
from bench_model import forward_flops  # noqa: E402
from bench_train import balance_routing, training_steps  # noqa: E402

from fewchips import DeepseekV3, ModelConfig  # noqa: E402
from fewchips.runtime import keep_freed_memory  # noqa: E402
from fewchips.train import build as B, config as C  # noqa: E402



def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kw) -> int:
    """aten._grouped_mm(x [N, K], w [G, K, M], offs): every row meets one K x M matrix."""
    return 2 * a_shape[0] * a_shape[-1] * b_shape[-1]


GEMMS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::baddbmm", "aten::linear",
         "aten::matmul", "aten::_scaled_dot_product_flash_attention_for_cpu")


def gemm_flops(fn) -> float:
    """FLOPs of the matrix products `fn()` issues (forward and backward), from their shapes."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with counter:
        fn()
    return float(counter.get_total_flops())


def profiled(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    return rows, sum(rows.values())


def best_profile(fn, n=2):
    best = None
    for _ in range(n):
        rows, total = profiled(fn)
        if best is None or total < best[1]:
            best = (rows, total)
    return best


def table(title, ours, theirs, top):
    (ro, to), (rt, tt) = ours, theirs
    keys = sorted(set(ro) | set(rt), key=lambda k: -(ro.get(k, 0) + rt.get(k, 0)))[:top]
    print(f"\n{title}: op time ours {to:,.0f} ms, transformers {tt:,.0f} ms (self CPU time, ms and % of each step)")
    print(f"  {'op':44s} {'ours':>16s} {'transformers':>16s}")
    for k in keys:
        a, b = ro.get(k, 0.0), rt.get(k, 0.0)
        print(f"  {k[:44]:44s} {a:9.1f} {a / to:6.1%} {b:9.1f} {b / tt:6.1%}")
    ga = sum(v for k, v in ro.items() if k in GEMMS)
    gb = sum(v for k, v in rt.items() if k in GEMMS)
    print(f"  {'GEMMs (mm, bmm, addmm, grouped_mm, sdpa)':44s} {ga:9.1f} {ga / to:6.1%} {gb:9.1f} {gb / tt:6.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=64, help="decode: prompt tokens before the profiled steps")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    transformers.logging.set_verbosity_error()
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    cfg = ModelConfig.from_preset(args.preset, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = DeepseekV3(cfg).init_weights()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(8)]
    balance_routing(ours, batches[0][:, :-1], 30)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(cfg.to_dict())).float()
    hf.load_state_dict(ours.state_dict(), strict=True)
    ours.train(), hf.train()
    tc = C.TrainConfig(mtp_lambda=0.0, mtp_lambda_late=0.0)
    opt_ours, _ = B.build_optimizer(ours, tc)
    opt_hf, _ = B.build_optimizer(hf, tc)
    step_ours, step_hf = training_steps(ours, hf, opt_ours, opt_hf, tc, amp)
    it = iter(batches)

    for _ in range(2):
        ids = next(it)
        step_ours(ids), step_hf(ids)
    ids = next(it)
    fl_model = 3 * forward_flops(ours, args.batch, args.seq)
    fl_ours, fl_hf = gemm_flops(lambda: step_ours(ids)), gemm_flops(lambda: step_hf(ids))
    ids = next(it)
    p_ours, p_hf = best_profile(lambda: step_ours(ids)), best_profile(lambda: step_hf(ids))
    print(f"{args.preset} ({cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts of width "
          f"{cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}), {args.dtype}, "
          f"batch {args.batch} x {args.seq}, {args.threads} threads; {cpu_name()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"GEMM FLOPs per training step issued: ours {fl_ours / 1e9:,.1f} G, transformers {fl_hf / 1e9:,.1f} G; "
          f"the model's 3 x forward: {fl_model / 1e9:,.1f} G (ours {fl_ours / fl_model:.2f}x, transformers "
          f"{fl_hf / fl_model:.2f}x)")
    table("training step (forward + backward + AdamW)", p_ours, p_hf, args.top)

    # Decode: batch 1, greedy, each side with its own cache (bench_inference.py's loops).
    from bench_inference import Ours, Reference
    ours.eval(), hf.eval()
    prompt = torch.randint(3, cfg.vocab_size, (1, args.context), generator=g)
    results = []
    with torch.inference_mode():
        for s in (Ours(ours), Reference(hf)):
            tok = s.start(prompt, 3 * args.decode_steps + 2)
            tok = s.step(tok)

            def steps(s=s):
                nonlocal tok
                for _ in range(args.decode_steps):
                    tok = s.step(tok)
            results.append(best_profile(steps))
    table(f"{args.decode_steps} decode steps at batch 1 (context {args.context})", *results, args.top)


if __name__ == "__main__":
    main()
