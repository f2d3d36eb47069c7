"""GPU inference benchmark: fewchips against `transformers` on the same weights, one process, one GPU.

Self-contained (random weights, nothing downloaded), a few minutes on one GPU; exits 0 with a message
when no CUDA device is present. For each preset, in bf16: prefill tok/s, and decode tok/s at batch 1
and 8 with --context tokens already cached, for
    transformers  its DynamicCache (stores the latent, re-expands it through kv_b_proj every step)
    fewchips      eager: latent cache, absorbed MLA
    fewchips+graph the same decode step captured once in a CUDA graph over a static cache
                  (LatentCache(static=True): fixed shapes, no host syncs), replayed per token.
Issue target: fewchips batch-1 decode >= 10x the reference's (which is launch-bound).

    python benchmarks/device_inference.py --json $OUT/inference_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]   # the device machine has no installed fewchips: import it from the tree
from bench_inference import Reference  # noqa: E402  (the same transformers decode loop as the CPU benchmark)

DEVICE, DTYPE = "cuda", torch.bfloat16


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, n):
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


class Ours:
    def __init__(self, model, graph: bool):
        self.model, self.graph = model, graph
        self.name = "fewchips+graph" if graph else "fewchips"

    def prefill(self, ids):
        return self.model(ids)[:, -1]

    def start(self, ids, n_new):
        from fewchips import LatentCache
        cfg = self.model.config
        B, T = ids.shape
        dtype = next(self.model.parameters()).dtype
        self.cache = LatentCache(cfg, B, T + n_new + 8, n_layers=cfg.num_hidden_layers, dtype=dtype,
                                 device=ids.device, static=self.graph)
        tok = self.model(ids, cache=self.cache)[:, -1].argmax(-1)
        self.pos = torch.full((B, 1), T, device=ids.device)
        self.replay = self.graph and ids.device.type == "cuda"     # on CPU: the static cache, no graph
        if self.replay:
            self._capture(B)
        return tok

    def _capture(self, B):
        self.tok_in = torch.zeros(B, 1, dtype=torch.long, device=self.pos.device)
        self.pos_in = self.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):                     # warm-up (allocations, lazy init) off the capture
                self.model(self.tok_in, positions=self.pos_in, cache=self.cache)
        torch.cuda.current_stream().wait_stream(s)
        self.g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.g):
            self.logits_out = self.model(self.tok_in, positions=self.pos_in, cache=self.cache)

    def step(self, tok):
        if self.replay:
            self.tok_in.copy_(tok[:, None])
            self.pos_in.copy_(self.pos)
            self.g.replay()
            logits = self.logits_out
        else:
            logits = self.model(tok[:, None], positions=self.pos, cache=self.cache)
        self.pos += 1
        return logits[:, 0].argmax(-1)


@torch.inference_mode()
def bench(preset, args):
    import transformers
    from fewchips import DeepseekV3, ModelConfig
    from fewchips.checkpoint import from_pretrained, save_pretrained

    transformers.logging.set_verbosity_error()
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(DeepseekV3(cfg).init_weights(std=0.02), d)
        ours = from_pretrained(d, dtype=DTYPE, device=DEVICE, mtp=False)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=DTYPE).to(DEVICE).eval()
    # on a CPU dry run: static cache, no graph
    systems = [Reference(ref), Ours(ours, graph=False), Ours(ours, graph=True)]
    res = {"preset": preset, "context": args.context}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, args.prefill_len), generator=g).to(DEVICE)
    for s in systems[:2]:
        try:
            s.prefill(ids)
            res[f"{s.name}_prefill_tok_s"] = args.prefill_len / timed(lambda: s.prefill(ids), 5)
        except Exception as e:             # report, keep measuring the others
            res[f"{s.name}_prefill_error"] = f"{type(e).__name__}: {e}"[:300]
    for B in (1, 8):
        ids = torch.randint(3, cfg.vocab_size, (B, args.context), generator=g).to(DEVICE)
        outs = {}
        for s in systems:
            try:
                tok = s.start(ids, args.steps + 8)
                seq = [tok]
                for _ in range(3):
                    tok = s.step(tok)
                    seq.append(tok)
                box = [tok]

                def one():
                    box[0] = s.step(box[0])
                    seq.append(box[0])
                res[f"{s.name}_decode_b{B}_tok_s"] = B / timed(one, args.steps)
                outs[s.name] = torch.stack(seq, 1)
            except Exception as e:         # report, keep measuring the others
                res[f"{s.name}_decode_b{B}_error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                s.cache = None
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
        if "fewchips" in outs and "transformers" in outs:
            n = min(outs["fewchips"].shape[1], outs["transformers"].shape[1])
            res[f"same_greedy_tokens_b{B}"] = float((outs["fewchips"][:, :n]
                                                     == outs["transformers"][:, :n]).float().mean())
        for who in ("fewchips", "fewchips+graph"):
            k = f"{who}_decode_b{B}_tok_s"
            if k in res and f"transformers_decode_b{B}_tok_s" in res:
                res[f"ratio_{who}_decode_b{B}"] = res[k] / res[f"transformers_decode_b{B}_tok_s"]
        print(json.dumps({k: v for k, v in res.items() if f"b{B}" in k}), flush=True)
    if "transformers_prefill_tok_s" in res and "fewchips_prefill_tok_s" in res:
        res["ratio_prefill"] = res["fewchips_prefill_tok_s"] / res["transformers_prefill_tok_s"]
    res["cache_bytes_per_token_bf16"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="comma-separated presets")
    p.add_argument("--context", type=int, default=512, help="tokens in the cache when decode is timed")
    p.add_argument("--prefill-len", type=int, default=2048, help="prompt tokens for the prefill measurement")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed")
    p.add_argument("--json", default=None, help="write results here (default: $OUT/inference_gpu.json if $OUT is set)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the script's logic on CPU in fp32 at toy sizes (no graphs), to check it before a GPU run")
    args = p.parse_args()
    global DEVICE, DTYPE
    if args.cpu_dry_run:
        DEVICE, DTYPE = "cpu", torch.float32
    elif not torch.cuda.is_available():
        print("device_inference: no CUDA device here; nothing to measure (skipped)")
        return 0
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "context": args.context, "prefill_len": args.prefill_len, "steps": args.steps}
    print(json.dumps(meta), flush=True)
    results = []
    path = args.json or (os.path.join(os.environ["OUT"], "inference_gpu.json") if os.environ.get("OUT") else None)
    for preset in args.presets.split(","):
        try:
            results.append(bench(preset, args))
        except Exception as e:
            results.append({"preset": preset, "error": f"{type(e).__name__}: {e}"[:500]})
        print(json.dumps(results[-1]), flush=True)
        if path:                           # after every preset: a timeout keeps what was measured
            with open(path, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
