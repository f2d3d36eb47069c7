"""Training throughput - forward + backward + AdamW step - of our trainer's step against
transformers' DeepseekV3ForCausalLM with the same config, weights, batch and sequence length.
Prints tokens/s, the ratio, and model FLOPs as a share of this machine's measured fp32 matmul rate.

Ours runs the trainer's real step (`compute_losses`: CE + α·sequence-wise balance loss, MTP off
because transformers has no MTP; then clip, AdamW, bias update). Transformers runs
`model(ids, labels=ids).loss`, clip, the same AdamW. Both fp32 unless --dtype bf16 (autocast).

    python benchmarks/bench_train.py [--presets small tiny] [--batch 4] [--seq 256] [--repeats 3]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_model import forward_flops  # noqa: E402

from fewchips import DeepseekV3, ModelConfig  # noqa: E402
from fewchips.runtime import keep_freed_memory  # noqa: E402
from fewchips import losses as L  # noqa: E402
from fewchips.train import build as B, config as C  # noqa: E402


def matmul_rate(n=1024, reps=10, clock=time.perf_counter):
    """fp32 GEMM FLOP/s, best of three bursts (the ceiling model FLOPs are compared with)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(3):
        t = clock()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (clock() - t))
    return best


@torch.no_grad()
def balance_routing(model, ids, iters, gamma=0.005):
    """Run the aux-loss-free bias update on forward passes until the loads are near uniform - the
    state training keeps the router in. Returns the worst layer's MaxVio before and after."""
    routers, vio = L.moe_routers(model), []
    for _ in range(iters + 1):
        loads = model.hidden_states(ids, with_stats=True)[1].load
        vio.append(max(L.max_violation(loads)))
        L.update_biases(routers, loads, gamma)
    return vio[0], vio[-1]


def training_steps(ours, hf, opt_ours, opt_hf, tc, amp):
    """One training step of each on a batch of windows [B, T+1]: ours the trainer's (`compute_losses`,
    its clip, AdamW, the bias update), transformers' `model(ids, labels=ids).loss`, clip, the same AdamW."""
    routers = L.moe_routers(ours)

    def step_ours(ids):
        main, _, bal, stats = L.compute_losses(ours, ids, 0.0, amp)
        (main + tc.balance_alpha * bal).backward()
        B.clip_grad_norm(ours, opt_ours, 1.0)        # the trainer's clip
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        L.update_biases(routers, stats.load, 1e-3)

    def step_hf(ids):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = hf(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
    return step_ours, step_hf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["small", "tiny"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (fresh batches, both models)")
    ap.add_argument("--compile", action="store_true",
                    help="ours with `fewchips train --compile` (compile time not timed)")
    ap.add_argument("--balance-iters", type=int, default=30,
                    help="bias-update passes before timing, so routing is as balanced as in training "
                         "(both models get the same biases); 0 keeps random-init routing")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU seconds instead of wall clock: on a machine shared with other "
                         "jobs, with --threads 1, this is close to what an idle machine's wall clock would show")
    args = ap.parse_args()
    keep_freed_memory()   # for both sides alike: big tensors reuse warm pages (fewchips/runtime.py)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    amp = torch.bfloat16 if args.dtype == "bf16" else None
    rate = matmul_rate(clock=clock)
    print(f"fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s (torch {torch.__version__}, {torch.get_num_threads()} threads); "
          f"training step = forward + backward + AdamW, {args.dtype}")
    tc = C.TrainConfig(mtp_lambda=0.0, mtp_lambda_late=0.0)
    for preset in args.presets:
        cfg = ModelConfig.from_preset(preset, num_nextn_predict_layers=0)
        torch.manual_seed(0)
        ours = DeepseekV3(cfg).init_weights()
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
                   for _ in range(args.warmup + args.repeats)]
        v0, v1 = balance_routing(ours, batches[0][:, :-1], args.balance_iters)
        hf = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(cfg.to_dict())).float()
        hf.load_state_dict(ours.state_dict(), strict=True)
        ours.train(), hf.train()
        if args.compile:
            B.compile_layers(ours)
        opt_ours, _ = B.build_optimizer(ours, tc)
        opt_hf, _ = B.build_optimizer(hf, tc)

        # A fresh batch every step (the same sequence for both models): repeating one batch overfits it
        # within a few steps and collapses the routing onto a few experts, which is not what training sees.
        step_ours, step_hf = training_steps(ours, hf, opt_ours, opt_hf, tc, amp)

        for ids in batches[:args.warmup]:   # allocations, optimizer state, compiling; oneDNN's kernels per shape
            step_ours(ids), step_hf(ids)
        t_ours, t_hf, vio = [], [], []
        for ids in batches[args.warmup:]:       # interleaved, so load drift hits both
            for fn, ts in ((step_ours, t_ours), (step_hf, t_hf)):
                t = clock()
                fn(ids)
                ts.append(clock() - t)
            with torch.no_grad():
                loads = ours.hidden_states(ids[:, :-1], with_stats=True)[1].load
                vio.append(max(L.max_violation(loads)))
        a, b = min(t_ours), min(t_hf)
        pair = sorted(h / o for o, h in zip(t_ours, t_hf))     # step by step, same batch, adjacent in time
        tok = args.batch * args.seq
        fl = 3 * forward_flops(ours, args.batch, args.seq)
        print(f"{preset:6s} B={args.batch} T={args.seq}: "
              f"ours {tok / a:7.0f} tok/s ({fl / a / rate:5.1%} of matmul rate)  "
              f"transformers {tok / b:7.0f} tok/s ({fl / b / rate:5.1%})  ratio {b / a:.2f}x (best of each; "
              f"median of step pairs {pair[len(pair) // 2]:.2f}x)  "
              f"(routing MaxVio {v0:.2f} -> {v1:.2f} after {args.balance_iters} bias passes on one batch; "
              f"worst layer during the timed steps {min(vio):.2f}-{max(vio):.2f})", flush=True)


if __name__ == "__main__":
    main()
