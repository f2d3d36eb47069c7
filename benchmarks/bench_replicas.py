"""Redundant experts: how much the greedy placement of `fewchips serve --redundant-experts R` evens the
ranks' loads, on a trained model's own routing of real text.

    python benchmarks/bench_replicas.py --model runs/demo --ep 4 --redundant 0,4,8,16

The model routes Python source (the standard library's files, on every machine) in one process; each MoE
layer's token copies per expert are counted. The first half of the files places the replicas, the
second half measures them (out of sample, as a server placing from yesterday's traffic would): per layer
the busiest rank's rows over the mean (1.0 = perfect balance; a step waits for the busiest rank), for
the whole half and per serving step of --step-tokens tokens, averaged over the MoE layers. With
`expert_loads.json` beside the model (fewchips train writes it) placement from the training's loads is
shown too. Placement is a pure function of the loads, so no ranks are needed to measure it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig

import torch

from machine import cpu_name

from fewchips import from_pretrained
from fewchips.checkpoint.hf_format import moe_expert_names
from fewchips.inference.experts import Placement, imbalance
from fewchips.inference.tokenizer import Tokenizer
from fewchips.model import MoE



def route(model, tok, files, seq, max_tokens):
    """[layers, tokens, K] expert ids the model chose for the text of `files` (main MoE layers)."""
    layers = [m for m in model.model.layers if isinstance(m.mlp, MoE)]
    picked = [[] for _ in layers]
    hooks = [layer.mlp.experts.register_forward_pre_hook(lambda mod, args, i=i: picked[i].append(args[1].clone()))
             for i, layer in enumerate(layers)]
    ids = []
    for f in files:
        ids += tok.encode(open(f, encoding="utf-8", errors="replace").read())
        if len(ids) >= max_tokens:
            break
    ids = torch.tensor(ids[:max_tokens - max_tokens % seq]).view(-1, seq)
    with torch.inference_mode():
        for row in ids.split(8):
            model(row)
    for h in hooks:
        h.remove()
    return [torch.cat(p) for p in picked]


def loads(picked_NK, E):
    return torch.bincount(picked_NK.reshape(-1), minlength=E).double()


def step_imbalance(picked_NK, placement, E, step_tokens):
    vals = [imbalance(placement.rank_loads(loads(chunk, E))) for chunk in picked_NK.split(step_tokens)
            if chunk.shape[0] == step_tokens]
    return sum(vals) / len(vals)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo", help="a trained model directory (make demo writes runs/demo)")
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--redundant", default="0,4,8,16", help="replica counts to try (multiples of --ep)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per half")
    ap.add_argument("--step-tokens", type=int, default=64, help="tokens per serving step for the per-step figure")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = from_pretrained(args.model, dtype=torch.float32, mtp=False).eval()
    tok = Tokenizer.from_dir(args.model)
    E = model.config.n_routed_experts
    stdlib = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    half_a, half_b = stdlib[::2], stdlib[1::2]
    fit = route(model, tok, half_a, args.seq, args.tokens)
    test = route(model, tok, half_b, args.seq, args.tokens)
    trained = None
    path = os.path.join(args.model, "expert_loads.json")
    if os.path.exists(path):
        doc = json.load(open(path))["layers"]
        names = moe_expert_names(model.config)
        trained = [torch.tensor(doc[n], dtype=torch.double) for n in names[:len(fit)]]
    print(f"{args.model}: {E} experts, top-{model.config.num_experts_per_tok}, {len(fit)} MoE layers; "
          f"ep {args.ep}; {fit[0].shape[0]:,} tokens place, {test[0].shape[0]:,} other tokens measure; {cpu_name()}")
    print(f"{'R':>4} {'placed from':>14} {'max/mean (half)':>16} {'per step of ' + str(args.step_tokens):>18}")
    for R in (int(r) for r in args.redundant.split(",")):
        sources = [("first half", [loads(p, E) for p in fit])] + ([("training", trained)] if trained and R else [])
        for what, placing in (sources if R else sources[:1]):
            ps = [Placement.place(lo, args.ep, R) for lo in placing]
            whole = sum(imbalance(p.rank_loads(loads(t, E))) for p, t in zip(ps, test)) / len(ps)
            step = sum(step_imbalance(t, p, E, args.step_tokens) for p, t in zip(ps, test)) / len(ps)
            print(f"{R:>4} {what if R else '-':>14} {whole:>16.3f} {step:>18.3f}")


if __name__ == "__main__":
    main()
