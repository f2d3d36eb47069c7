"""`fewchips convert`: a whole checkpoint between BF16 and the released FP8 layout, shard by shard."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations


def register(sub):
    p = sub.add_parser("convert", help="convert a checkpoint between BF16 and FP8 (E4M3, 128x128 block scales)")
    p.add_argument("--in", dest="src", required=True, help="a Hugging Face-format checkpoint directory")
    p.add_argument("--out", dest="dst", required=True, help="output directory (created; must differ from --in)")
    p.add_argument("--to", choices=("bf16", "fp8"), required=True,
                   help="fp8: quantise the recipe's weights (attention, MLPs, experts) as the release does; "
                        "bf16: dequantise every FP8 weight (what non-Hopper tools need)")
    p.add_argument("--pow2-scales", action="store_true",
                   help="with --to fp8: round scales up to powers of two (ue8m0, as DeepSeek-V3.1)")
    p.set_defaults(func=run)


def run(args):
    from fewchips.checkpoint.fp8 import convert

    stats = convert(args.src, args.dst, args.to, pow2_scales=args.pow2_scales,
                    progress=lambda f: print(f"  wrote {f}", flush=True))
    done = ", ".join(f"{v} {k}" for k, v in sorted(stats.items()))
    print(f"{args.dst}: {args.to} checkpoint written ({done} tensors)")
    return 0
