"""How the floor on FP8 scales treats small gradients: FP8 (emulated) against FP32 gradients of the same
model and batch, with the loss scaled by 2^-k to stand in for a loss averaged over 2^k times more tokens
(each token's gradient is ~1/N). A floor on the group max-abs (the inference demo's 1e-4) quantises groups
below it on its own fixed grid; the scale-invariant recipe gives the same error at every batch size.

    python benchmarks/fp8_gradient_floor.py [--preset tiny] [--floors 1e-4 1e-12]
"""

from __future__ import annotations

import argparse
import copy

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--floors", type=float, nargs="+", default=[1e-4, 1e-12])
    ap.add_argument("--log2-scales", type=int, nargs="+", default=[0, -8, -14])
    args = ap.parse_args()
    torch.set_num_threads(2)

    import fewchips.fp8.quant as quant
    from fewchips import DeepseekV3, ModelConfig
    from fewchips.fp8 import apply_fp8
    from fewchips.losses import compute_losses

    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ref = DeepseekV3(cfg).init_weights(0.006).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))

    def grads(model, scale):
        model.zero_grad()
        main, mtp, bal, _ = compute_losses(model, ids, 0.3, None)
        ((main + 0.3 * mtp + 1e-4 * bal) * scale).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double() / scale

    g32 = grads(ref, 1.0)
    tokens = args.batch * args.seq
    default = quant.AMAX_FLOOR
    print(f"{args.preset}, {tokens} tokens, FP8 (emulated) vs FP32 gradient, relative L2 error")
    for k in args.log2_scales:
        row = []
        for floor in args.floors:
            quant.AMAX_FLOOR = floor
            model = copy.deepcopy(ref)
            apply_fp8(model, backend="emulate")
            g8 = grads(model, 2.0 ** k)
            row.append(f"floor {floor:g}: {((g8 - g32).norm() / g32.norm()).item():.4f}")
        print(f"loss x 2^{k} (as if {tokens * 2 ** -k:,.0f} tokens per step)  " + "  ".join(row))
    quant.AMAX_FLOOR = default


if __name__ == "__main__":
    main()
