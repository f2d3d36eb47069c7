"""What the backward keeps, per decoder layer, with and without FP8 activation caching (arXiv 2412.19437
§3.3.3): one forward of the `small` preset on one sequence, every tensor autograd saves counted once
(by storage, with `torch.autograd.graph.saved_tensors_hooks`) against the layer that saved it;
parameters are not counted, the FP8 copies of the weights that the FP8 GEMMs' backward keeps are
shown apart. Three runs: FP32 (no FP8), `--fp8 --fp8-activations full` (FP8 GEMMs, activations kept
in the activation dtype), `--fp8` (cached: the default).

    python benchmarks/bench_fp8_activations.py [--preset small] [--seq-len 512] [--batch 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def measure(cfg, mode: str, ids):
    import torch
    import torch.nn.functional as F

    from fewchips.fp8 import apply_fp8
    from fewchips.model import DecoderLayer, DeepseekV3

    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    if mode != "fp32":
        apply_fp8(model, backend="emulate", cache_activations=mode == "cached")
    model.to_empty(device="cpu")
    model.init_weights(0.006, seed=0)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    where = ["other"]
    acts, weights = {}, {}

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in params:
            is_weight = t.dtype == torch.float8_e4m3fn and tuple(t.shape) in shapes
            (weights if is_weight else acts).setdefault(key, (where[0], st.nbytes()))
        return t

    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, (i, "norms")))
        layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, "other"))
        for part in ("self_attn", "mlp"):
            sub = getattr(layer, part)
            sub.register_forward_pre_hook(lambda m, a, i=i, part=part: where.__setitem__(0, (i, part)))
            sub.register_forward_hook(lambda m, a, o, i=i: where.__setitem__(0, (i, "norms")))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    del loss

    def per(d):
        out = {}
        for w, n in d.values():
            out[w] = out.get(w, 0) + n
            if isinstance(w, tuple):
                out[w[0]] = out.get(w[0], 0) + n
        return out
    return per(acts), per(weights), [cfg.is_moe_layer(i) if i < cfg.num_hidden_layers else True
                                     for i in range(len(layers))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()

    import torch

    from fewchips import ModelConfig
    torch.set_num_threads(2)
    cfg = ModelConfig.from_preset(args.preset)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq_len
    print(f"machine: {platform.machine()}, torch {torch.__version__}; {args.preset}: hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP, {args.batch} x {args.seq_len} tokens, "
          f"activations fp32")
    rows = {}
    for mode in ("fp32", "full", "cached"):
        acts, weights, moe = measure(cfg, mode, ids)
        rows[mode] = (acts, weights, moe)
    mib = 2 ** 20
    print(f"{'':>22} {'fp32':>10} {'fp8 full':>10} {'fp8 cached':>11}   (MiB saved for the backward)")

    def dense(moe):
        return [i for i, m in enumerate(moe) if not m][:1]

    def sparse(moe):
        return [i for i, m in enumerate(moe) if m]

    for label, pick, part in (("dense layer", dense, None), ("  its MLP", dense, "mlp"),
                              ("MoE layer (mean)", sparse, None), ("  its MoE", sparse, "mlp"),
                              ("  its attention", sparse, "self_attn")):
        vals = []
        for mode in ("fp32", "full", "cached"):
            acts, _, moe = rows[mode]
            idx = pick(moe)
            vals.append(sum(acts.get(i if part is None else (i, part), 0) for i in idx) / max(len(idx), 1) / mib)
        print(f"{label:>22} {vals[0]:>10.1f} {vals[1]:>10.1f} {vals[2]:>11.1f}   "
              f"({vals[2] / vals[1]:.2f}x of full, {vals[2] / vals[0]:.2f}x of fp32; "
              f"{vals[2] * mib / tokens:,.0f} bytes/token)")
    tot = [sum(n for k, n in rows[m][0].items() if not isinstance(k, tuple)) / mib for m in ("fp32", "full", "cached")]
    print(f"{'whole model':>22} {tot[0]:>10.1f} {tot[1]:>10.1f} {tot[2]:>11.1f}   (embedding, head and loss included)")
    wts = [sum(n for k, n in rows[m][1].items() if not isinstance(k, tuple)) / mib for m in ("fp32", "full", "cached")]
    print(f"{'FP8 weight copies':>22} {wts[0]:>10.1f} {wts[1]:>10.1f} {wts[2]:>11.1f}   "
          "(kept by the FP8 GEMMs' backward)")


if __name__ == "__main__":
    main()
