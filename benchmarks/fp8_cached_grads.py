"""Where `--fp8-activations cached` moves the gradient: the same model, weights and batch, one backward each
with no FP8 (the reference, same autocast), FP8 with `full` activations, and FP8 with the cache, then every
FP8 parameter's gradient compared (relative L2 error, cosine). Two ablations say which cached tensor does it:
`h e4m3` caches the SwiGLU's input h = [g, u] in E4M3 as before issue 37 (o_proj uncached), `o_proj e5m6`
caches only o_proj's input.

    python benchmarks/fp8_cached_grads.py [--model RUN_DIR] [--tokens PART.val.bin]   # the gradient table
    python benchmarks/fp8_cached_grads.py --peak-rss cached                           # one training step's RSS

--model: a Hugging Face directory (e.g. a `fewchips train` OUT; default: tiny at init); --tokens: a uint16
token file from a prepared cache (`OUT/cache/tokens-*/parts/*.val.bin`; default: random ids).
"""

from __future__ import annotations

import argparse
import copy
import resource

import numpy as np
import torch


def load(args):
    from fewchips import DeepseekV3, ModelConfig
    if args.model:
        from fewchips.checkpoint import from_pretrained
        model = from_pretrained(args.model)
    else:
        model = DeepseekV3(ModelConfig.from_preset("tiny")).init_weights(0.006, seed=args.seed)
    V = model.config.vocab_size
    if args.tokens:
        tok = np.fromfile(args.tokens, dtype=np.uint16).astype(np.int64)
        starts = np.random.default_rng(args.seed).integers(0, len(tok) - args.seq - 1, args.batch)
        ids = torch.from_numpy(np.stack([tok[s:s + args.seq + 1] for s in starts]))
    else:
        ids = torch.randint(0, V, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(args.seed))
    return model.train(), ids


def fp8_variant(model, name):
    """A copy of `model` under the FP8 recipe: full, cached, `h e4m3` or `o_proj e5m6`."""
    from fewchips.fp8 import apply_fp8
    m = copy.deepcopy(model)
    apply_fp8(m, backend="emulate", cache_activations=name in ("cached", "h e4m3"))
    for n, mod in m.named_modules():
        if n.endswith("self_attn.o_proj"):
            mod.cache_e5m6 = name in ("cached", "o_proj e5m6")
    return m


class E4M3Cache:
    """Within the block, the SwiGLU caches h in E4M3 1x128 tiles (the code before issue 37)."""

    def __enter__(self):
        import fewchips.fp8.cached as cached
        from fewchips.fp8.quant import TILE, dequantize, quantize
        self.saved = cached.quantize_e5m6, cached.dequantize_e5m6
        cached.quantize_e5m6 = lambda x: quantize(x, TILE)
        cached.dequantize_e5m6 = lambda q, s, shape: dequantize(q, s, TILE)

    def __exit__(self, *exc):
        import fewchips.fp8.cached as cached
        cached.quantize_e5m6, cached.dequantize_e5m6 = self.saved


def loss_of(model, ids, amp):
    from fewchips.losses import compute_losses
    main, mtp, bal, _ = compute_losses(model, ids, 0.3, amp)
    return main + 0.3 * mtp + 1e-4 * bal


def grads(model, ids, amp):
    model.zero_grad()
    loss_of(model, ids, amp).backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def cos(a, b):
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp(min=1e-30))


def table(args, amp):
    model, ids = load(args)
    G = {"ref": grads(model, ids, amp)}
    for name in ("full", "cached", "o_proj e5m6"):
        G[name] = grads(fp8_variant(model, name), ids, amp)
    with E4M3Cache():
        G["h e4m3"] = grads(fp8_variant(model, "h e4m3"), ids, amp)
    fp8 = [n for n in G["ref"] if any(k in n for k in ("mlp.", "self_attn.")) and "norm" not in n
           and not n.endswith("mlp.gate.weight")]
    cols = ("full", "cached", "h e4m3", "o_proj e5m6")
    print(f"{args.model or 'tiny at init'}, {ids.shape[0]} x {ids.shape[1] - 1} tokens, autocast {amp or 'off'}; "
          "relative L2 error of each gradient against the reference (no FP8), then against FP8 full")
    print(f"| parameter | {' | '.join(f'{c} vs ref' for c in cols)} | cached vs full | h e4m3 vs full "
          "| cos(cached, full) |")
    print("|---" * 8 + "|")
    for n in fp8 + ["(whole model)"]:
        if n == "(whole model)":
            g = {k: torch.cat([v.flatten() for v in d.values()]) for k, d in G.items()}
        else:
            g = {k: d[n] for k, d in G.items()}
        print(f"| {n} | " + " | ".join(f"{rel(g[c], g['ref']):.4f}" for c in cols)
              + f" | {rel(g['cached'], g['full']):.4f} | {rel(g['h e4m3'], g['full']):.4f}"
              + f" | {cos(g['cached'], g['full']):.5f} |")


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss(args, amp):
    """One AdamW training step (forward, backward, optimizer) at the trainer's batch; peak RSS of the process
    and its rise over the RSS before the step (model and batch already built)."""
    model, ids = load(args)
    if args.peak_rss != "none":
        model = fp8_variant(model, args.peak_rss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = rss_mib()
    loss = loss_of(model, ids, amp)
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.peak_rss}: peak RSS {peak:.0f} MiB, step's rise {peak - before:.0f} MiB "
          f"({ids.shape[0]} x {ids.shape[1] - 1} tokens, autocast {amp or 'off'})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face model directory (default: tiny at init)")
    ap.add_argument("--tokens", help="uint16 token file (default: random ids)")
    ap.add_argument("--batch", type=int, help="sequences (default: 8 for the table, the trainer's 16 for --peak-rss)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="autocast of every arm (bf16: what `fewchips train` picks on CPUs with native bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peak-rss", choices=["none", "full", "cached"],
                    help="instead of the table: one training step of this arm and its peak RSS")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    if args.peak_rss:
        args.batch = args.batch or 16
        peak_rss(args, amp)
    else:
        args.batch = args.batch or 8
        table(args, amp)


if __name__ == "__main__":
    main()
