"""Inference speed, fewchips against `transformers` on the same weights in one process (CPU).

For each preset: random weights saved with `save_pretrained`, loaded by fewchips (`from_pretrained`)
and by `AutoModelForCausalLM`, both fp32. Both run the same greedy loop by hand - prefill, then one
token per step with their own cache (fewchips: the MLA latent cache with absorbed attention;
transformers: its DynamicCache, which stores the latent and re-expands it every step) - so the numbers
compare forwards, not generation utilities. The two are timed in alternating rounds and the fastest
round of each is kept, which makes the ratio robust to other load on a shared machine.

    python benchmarks/bench_inference.py                          # tiny and small, 2 threads
    python benchmarks/bench_inference.py --presets small --context 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from machine import cpu_name

from fewchips.runtime import keep_freed_memory


class Ours:
    name = "fewchips"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids):
        return self.model(ids)[:, -1]

    def start(self, ids, n_new):
        from fewchips import LatentCache
        B, T = ids.shape
        self.cache = LatentCache(self.model.config, B, T + n_new + 1, n_layers=self.model.config.num_hidden_layers,
                                 dtype=self.model.lm_head.weight.dtype)
        self.pos = T
        tok = self.model(ids, cache=self.cache)[:, -1].argmax(-1)
        return tok

    def step(self, tok):
        B = tok.shape[0]
        logits = self.model(tok[:, None], positions=torch.full((B, 1), self.pos), cache=self.cache)
        self.pos += 1
        return logits[:, 0].argmax(-1)


class OursCompiled(Ours):
    """The same model with each decode step one compiled graph
    (`fewchips.inference.generate(..., compile=True)`); the prefill stays eager."""
    name = "fewchips+compile"

    def start(self, ids, n_new):
        from fewchips.inference.generate import compiled_decode_step
        tok = super().start(ids, n_new)
        self.pos_B, self._step, self.compile_seconds = (torch.full((ids.shape[0],), self.pos),
                                                        compiled_decode_step(), None)
        return tok

    def step(self, tok):
        t0 = time.perf_counter()
        logits = self._step(self.model, tok, self.pos_B, self.cache, None, self.pos + 1)
        if self.compile_seconds is None:                            # the first (warm-up) step compiles
            self.compile_seconds = time.perf_counter() - t0
        self.pos_B, self.pos = self.pos_B + 1, self.pos + 1
        return logits.argmax(-1)


class Reference:
    name = "transformers"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids):
        return self.model(ids, use_cache=False).logits[:, -1]

    def start(self, ids, n_new):
        from transformers import DynamicCache
        out = self.model(ids, past_key_values=DynamicCache(config=self.model.config), use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].argmax(-1)

    def step(self, tok):
        out = self.model(tok[:, None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].argmax(-1)


@torch.inference_mode()
def bench_preset(name, args, log):
    import transformers
    from fewchips import DeepseekV3, ModelConfig
    from fewchips.checkpoint import from_pretrained, save_pretrained
    from fewchips.ops import gathered_experts_fit

    transformers.logging.set_verbosity_error()
    cfg = ModelConfig.from_preset(name)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(DeepseekV3(cfg).init_weights(std=0.02), d)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        ours = from_pretrained(d, dtype=dtype, mtp=False)
        systems = [Ours(ours), Reference(transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval())]
    g = torch.Generator().manual_seed(1)
    res = {"preset": name, "context": args.context}

    # Prefill: one prompt of --prefill-len tokens, best of --rounds alternating rounds.
    ids = torch.randint(3, cfg.vocab_size, (1, args.prefill_len), generator=g)
    best = {s.name: float("inf") for s in systems}
    for s in systems:
        s.prefill(ids[:, :32])                                   # warm-up
    for _ in range(args.rounds):
        for s in systems:
            t0 = time.perf_counter()
            s.prefill(ids)
            best[s.name] = min(best[s.name], time.perf_counter() - t0)
    for s in systems:
        res[f"{s.name}_prefill_tok_s"] = args.prefill_len / best[s.name]
    log(f"  {name} prefill {args.prefill_len} tokens: " +
        ", ".join(f"{s.name} {res[f'{s.name}_prefill_tok_s']:.0f} tok/s" for s in systems))

    # Decode: batch B at --context tokens of context, --steps per round, alternating rounds.
    for B in (1, 8):
        ids = torch.randint(3, cfg.vocab_size, (B, args.context), generator=g)
        toks, outs = {}, {}
        # compiled decoding pays off where the experts' gathered form applies (ops.gathered_swiglu)
        compiled = ([OursCompiled(ours)]
                    if args.compile and gathered_experts_fit(B, cfg.num_experts_per_tok, cfg.n_routed_experts) else [])
        for s in systems + compiled:
            toks[s.name] = s.start(ids, args.rounds * args.steps + 1)
            outs[s.name] = [toks[s.name]]
            toks[s.name] = s.step(toks[s.name])                  # warm-up step
            outs[s.name].append(toks[s.name])
        best = {s.name: float("inf") for s in systems + compiled}
        for _ in range(args.rounds):
            for s in systems + compiled:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    toks[s.name] = s.step(toks[s.name])
                    outs[s.name].append(toks[s.name])
                best[s.name] = min(best[s.name], (time.perf_counter() - t0) / args.steps)
        ref = torch.stack(outs["transformers"], 1)
        for s in systems + compiled:
            res[f"{s.name}_decode_b{B}_tok_s"] = B / best[s.name]
            if s.name != "transformers":
                tag = "" if s.name == "fewchips" else "_compiled"
                res[f"same_greedy_tokens{tag}_b{B}"] = float((torch.stack(outs[s.name], 1) == ref).float().mean())
        for s in compiled:
            res[f"ratio_decode_b{B}_compiled"] = (res[f"{s.name}_decode_b{B}_tok_s"]
                                                  / res[f"transformers_decode_b{B}_tok_s"])
            res[f"compile_seconds_b{B}"] = s.compile_seconds
        log(f"  {name} decode batch {B}: " + ", ".join(f"{s.name} {res[f'{s.name}_decode_b{B}_tok_s']:.1f} tok/s"
                                                     for s in systems + compiled))
    for k in ("prefill", "decode_b1", "decode_b8"):
        res[f"ratio_{k}"] = res[f"fewchips_{k}_tok_s"] / res[f"transformers_{k}_tok_s"]
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    res["cache_bytes_per_token_bf16"] = per_layer * cfg.num_hidden_layers * 2
    res["cache_bytes_per_token_bf16_with_mtp"] = per_layer * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * 2
    # transformers' cache holds the same latent (it re-expands per step instead of storing K/V)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="comma-separated presets")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the targets assume 2)")
    p.add_argument("--prefill-len", type=int, default=256, help="prompt tokens for the prefill measurement")
    p.add_argument("--context", type=int, default=512,
                   help="tokens already in the cache when decoding is timed "
                        "(the reference's per-step cost grows with it)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed round")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per system; the fastest is kept")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights, activations and cache, both systems")
    p.add_argument("--compile", action="store_true",
                   help="also time fewchips with compiled decode steps (batch sizes where they apply)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    keep_freed_memory()   # for both sides alike: big tensors reuse warm pages (fewchips/runtime.py)
    torch.set_num_threads(args.threads)
    import transformers
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "threads": args.threads, "load_average_1m": load, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), **{
                k: getattr(args, k) for k in ("prefill_len", "context", "steps", "rounds", "dtype")}}
    print(json.dumps(meta), flush=True)
    results = []
    for name in args.presets.split(","):
        r = bench_preset(name, args, lambda m: print(m, flush=True))
        results.append(r)
        print(f"{name:6s} prefill {r['ratio_prefill']:.2f}x | decode b1 {r['ratio_decode_b1']:.2f}x | decode b8 "
              f"{r['ratio_decode_b8']:.2f}x | cache {r['cache_bytes_per_token_bf16']} B/token (bf16) | same greedy "
              f"tokens b1 {r['same_greedy_tokens_b1']:.2f} b8 {r['same_greedy_tokens_b8']:.2f}" +
              "".join(f" | compiled decode b{B} {r[f'ratio_decode_b{B}_compiled']:.2f}x "
                      f"(compile {r[f'compile_seconds_b{B}']:.0f} s)"
                      for B in (1, 8) if f"ratio_decode_b{B}_compiled" in r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)



if __name__ == "__main__":
    main()
