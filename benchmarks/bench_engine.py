"""The paged engine against the slot engine it replaced, same model, same process, interleaved:

  concurrency  100-token chats (100 prompt + 100 completion tokens) at --max-len 2048 under one fixed
               cache size (8 requests of 2048 tokens), 96 requests sent at once: the most decoded together
               in one step, tokens/s, and preemptions (admission is optimistic, as vLLM's).
               The slot engine is the same Engine with one block of max_len tokens per request and no
               prefix cache: exactly what each request reserved before (a contiguous max_len row).
  prefix       time to first token of 16 requests sharing a 1,024-token prefix (16-token tails, all
               sent at once), prefix cache on against off.
  chunking     4 running streams while a 4,096-token prompt arrives: their worst and median gap
               between tokens until that prompt's first token, chunked (--max-prefill-tokens 512)
               against one-shot prefill.
  mtp          (needs --model, a trained model with its MTP module, e.g. `make demo`'s runs/demo) decode
               tokens/s with MTP speculation against plain decoding at batch 1 and 8: greedy, 128 tokens
               after 64-token prompts cut from the standard library's sources; acceptance rate.
  grammar      decode tokens/s with a JSON schema active (structured outputs, llguidance) against none at
               batch 1 and 8: 128 tokens sampled at temperature 1 (seeded, the same in both) after 64-token
               prompts, compact JSON; the schema's records cannot close within 128 tokens, so both runs decode
               the same counts. A byte-level BPE of the preset's vocabulary is trained on the standard library's
               sources first. Also: the grammar's compile time (the tokenizer's llguidance view, built once
               per tokenizer; the schema, once per request) and the mask's time per step.

    python benchmarks/bench_engine.py [--parts concurrency,prefix,chunking,mtp,grammar] [--pairs 3] [--model DIR]

The model is the `tiny` preset at random init (max_position_embeddings raised to 8192 for the 4K
prompt), fp32, greedy, EOS never stops a request, 2 threads (--threads). Prefill FLOPs (2 x activated parameters
per token; attention not counted) are set against a measured fp32 matmul rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from machine import cpu_name

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fewchips import DeepseekV3, ModelConfig  # noqa: E402
from fewchips.inference.engine import Engine, Request  # noqa: E402
from fewchips.inference.sampling import SamplingParams  # noqa: E402



def matmul_rate(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def ids(n, seed):
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_timed(engine, reqs):
    """Step until done; each request's token times (perf_counter) and the wall time."""
    times = {r.id: [] for r in reqs}
    for r in reqs:
        r.on_event = lambda req, kind, payload: times[req.id].append(time.perf_counter()) if kind == "tokens" else None
    t0 = time.perf_counter()
    for r in reqs:
        engine.add(r)
        r.t_add = t0
    while any(r.finish_reason is None for r in reqs):
        engine.step()
    return times, time.perf_counter() - t0


def concurrency(model, pairs, n_requests=96, prompt=100, new=100, max_len=2048, cap_requests=8):
    """n_requests chats (prompt + new tokens) at once under a cache of cap_requests x max_len tokens."""
    cfg = model.config
    per_token = cfg.kv_cache_bytes_per_token(next(model.parameters()).element_size())
    cap = cap_requests * max_len * per_token
    rows = [ids(prompt, i) for i in range(n_requests)]
    out = {"slot": [], "paged": []}
    for _ in range(pairs):
        for name in ("slot", "paged"):
            bs = max_len if name == "slot" else 16
            engine = Engine(model, max_batch=256, max_len=max_len, max_cache_bytes=cap + bs * per_token,
                            block_size=bs, prefix_caching=name == "paged", max_prefill_tokens=max_len)
            reqs = [Request(r, SamplingParams(max_tokens=new)) for r in rows]
            _, wall = run_timed(engine, reqs)
            out[name].append((engine.peak_batch, len(rows) * new / wall, engine.preemptions))
    for name, runs in out.items():
        print(f"  {name:5s}: {runs[0][0]} requests decoded together at most (cache {cap / 2**20:.0f} MiB), "
              f"{statistics.median(r[1] for r in runs):.0f} tokens/s (runs {', '.join(f'{r[1]:.0f}' for r in runs)}), "
              f"preemptions {runs[0][2]}")
    ratio = statistics.median(p[1] / s[1] for p, s in zip(out["paged"], out["slot"]))
    print(f"  => {out['paged'][0][0] / out['slot'][0][0]:.1f}x requests decoded together, "
          f"{ratio:.2f}x tokens/s (median of pairs)")
    return {"requests": n_requests, "prompt": prompt, "new": new, "max_len": max_len, "cache_mib": cap / 2**20,
            **{f"{name}_{k}": v for name, runs in out.items() for k, v in (
                ("peak_batch", runs[0][0]), ("tokens_per_s", statistics.median(r[1] for r in runs)),
                ("preemptions", runs[0][2]))},
            "ratio_tokens_per_s": ratio}


def prefix(model, pairs, rate, active, prefix_len=1024, n=16, tail=16):
    """Time to first token of n requests sharing a prefix_len-token prefix, prefix cache on against off.
    rate: a measured matmul FLOP/s; active: activated parameters (the share of it the prefill reaches)."""
    shared = ids(prefix_len, 99)
    rows = [shared + ids(tail, 200 + i) for i in range(n)]
    out = {"on": [], "off": []}
    for _ in range(pairs):
        for name in ("off", "on"):
            engine = Engine(model, max_batch=n, max_len=prefix_len + tail + 60, prefix_caching=name == "on")
            reqs = [Request(r, SamplingParams(max_tokens=1)) for r in rows]
            times, wall = run_timed(engine, reqs)
            ttft = sorted(times[r.id][0] - r.t_add for r in reqs)
            computed = sum(len(r.prompt_ids) - r.cached_tokens for r in reqs)
            out[name].append((statistics.mean(ttft), ttft[-1], computed, wall))
    res = {"requests": n, "prefix": prefix_len}
    for name, runs in out.items():
        mean = statistics.median(r[0] for r in runs)
        last = statistics.median(r[1] for r in runs)
        wall = statistics.median(r[3] for r in runs)
        util = 2 * active * runs[0][2] / wall / rate
        print(f"  prefix cache {name:3s}: TTFT mean {mean * 1e3:.0f} ms, last {last * 1e3:.0f} ms; "
              f"{runs[0][2]} prompt tokens computed; ~{util:.0%} of the matmul rate (2 x active params / token)")
        res.update({f"{name}_ttft_mean_s": mean, f"{name}_ttft_last_s": last, f"{name}_tokens_computed": runs[0][2],
                    f"{name}_matmul_share": util})
    r_mean = statistics.median(f[0] / n[0] for f, n in zip(out["off"], out["on"]))
    r_last = statistics.median(f[1] / n[1] for f, n in zip(out["off"], out["on"]))
    print(f"  => {r_mean:.1f}x faster mean TTFT, {r_last:.1f}x faster last TTFT (median of pairs)")
    return {**res, "ratio_ttft_mean": r_mean, "ratio_ttft_last": r_last}


def chunking(model, pairs, long=4096, chunk=512, streams=4):
    """`streams` running decodes while a `long`-token prompt arrives: their gaps, chunked against one-shot."""
    out = {"chunked": [], "one-shot": []}
    for _ in range(pairs):
        for name in ("one-shot", "chunked"):
            engine = Engine(model, max_batch=streams + 4, max_len=long + 104,
                            max_prefill_tokens=chunk if name == "chunked" else 2 * long)
            running = [engine.add(Request(ids(8, 300 + i), SamplingParams(max_tokens=long - 96)))
                       for i in range(streams)]
            for _ in range(5):
                engine.step()
            stamp = {r.id: [] for r in running}
            for r in running:
                r.on_event = lambda req, kind, p: (stamp[req.id].append(time.perf_counter())
                                                   if kind == "tokens" else None)
            arriving = engine.add(Request(ids(long, 7), SamplingParams(max_tokens=1)))
            t0 = time.perf_counter()
            while arriving.finish_reason is None:
                engine.step()
            ttft = time.perf_counter() - t0
            gaps = [b - a for r in running for a, b in zip(stamp[r.id], stamp[r.id][1:])]
            out[name].append((max(gaps) if gaps else ttft, statistics.median(gaps) if gaps else ttft, ttft))
            for r in running:
                engine.abort(r)
            engine.step()
    res = {"prompt": long, "chunk": chunk, "streams": streams}
    for name, runs in out.items():
        worst, median, first = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"  {name:8s}: running streams' worst gap {worst * 1e3:.0f} ms, "
              f"median {median * 1e3:.0f} ms; the {long}-token prompt's first token after {first * 1e3:.0f} ms")
        res.update({f"{name}_worst_gap_s": worst, f"{name}_median_gap_s": median, f"{name}_ttft_s": first})
    ratio = statistics.median(o[0] / c[0] for o, c in zip(out["one-shot"], out["chunked"]))
    print(f"  => worst inter-token gap {ratio:.1f}x smaller with chunking (median of pairs)")
    return {**res, "ratio_worst_gap": ratio}


def decode_rate(engine, rows, params, grammar=None):
    """Decode tokens/s of `rows` admitted together (their prefill first, untimed), their outputs and
    their finished Requests. `grammar`: each request gets a matcher of it (structured outputs)."""
    reqs = [Request(r, params, grammar=grammar.start() if grammar is not None else None) for r in rows]
    for r in reqs:
        engine.add(r)
    while any(not r.output_ids for r in reqs):
        engine.step()
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0, n0 = time.perf_counter(), sum(len(r.output_ids) for r in reqs)
    while any(r.finish_reason is None for r in reqs):
        engine.step()
    sync()
    wall = time.perf_counter() - t0
    return (sum(len(r.output_ids) for r in reqs) - n0) / wall, [r.output_ids for r in reqs], reqs


def stdlib_prompts(tok, n, length=64):
    import inspect
    import json as m1, argparse as m2, textwrap as m3, statistics as m4, fractions as m5, calendar as m6, \
        string as m7, heapq as m8  # noqa: E401
    out = []
    for m in (m1, m2, m3, m4, m5, m6, m7, m8)[:n]:
        out.append(tok.encode(inspect.getsource(m)[2000:8000])[:length])
    return out


def mtp(model_dir, pairs, batches=(1, 8)):
    from fewchips.checkpoint import from_pretrained
    from fewchips.inference.tokenizer import Tokenizer
    model = from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(model_dir)
    for B in batches:
        rows = stdlib_prompts(tok, B)
        out = {"plain": [], "mtp": []}
        for _ in range(pairs):
            for name in ("plain", "mtp"):
                engine = Engine(model, max_batch=B, max_len=256, speculative="mtp" if name == "mtp" else None)
                rate, outputs, reqs = decode_rate(engine, rows, SamplingParams(max_tokens=128))
                acc = sum(r.accepted for r in reqs) / max(sum(r.drafted for r in reqs), 1)
                out[name].append((rate, acc, outputs))
        assert all(a[2] == b[2] for a, b in zip(out["plain"], out["mtp"])), "speculative greedy output differs"
        for name, runs in out.items():
            print(f"  batch {B} {name:5s}: {statistics.median(r[0] for r in runs):.0f} tokens/s "
                  f"(runs {', '.join(f'{r[0]:.0f}' for r in runs)})"
                  + (f", acceptance {runs[0][1]:.0%}" if name == "mtp" else ""))
        ratio = statistics.median(m[0] / p[0] for m, p in zip(out["mtp"], out["plain"]))
        print(f"  => batch {B}: {ratio:.2f}x tokens/s with MTP speculation, same tokens (median of pairs)")


# records that cannot close within 128 tokens (16 of them, ~30 tokens each at the least)
RECORD = {"type": "object", "additionalProperties": False, "required": ["id", "name", "score", "tags", "ok"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                         "name": {"type": "string", "maxLength": 24},
                         "score": {"type": "number", "minimum": 0, "maximum": 1}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["results"],
          "properties": {"results": {"type": "array", "minItems": 16, "items": RECORD}}}


def grammar(model, pairs, batches=(1, 8), new=128, compiles=20):
    import inspect
    import fewchips.inference.runner as runner
    from fewchips.inference.grammar import Grammar, ll_tokenizer
    from fewchips.inference.tokenizer import Tokenizer
    from fewchips.train.tokenizer import EOS, train_tokenizer
    import json as m1, argparse as m2, textwrap as m3, statistics as m4, fractions as m5, calendar as m6, \
        string as m7, heapq as m8, typing as m9, dataclasses as m10, pathlib as m11  # noqa: E401
    V = model.config.vocab_size
    texts = [inspect.getsource(m) for m in (m1, m2, m3, m4, m5, m6, m7, m8, inspect, m9, m10, m11)]
    tok = Tokenizer(train_tokenizer(texts, V), {"eos_token": EOS})
    t0 = time.perf_counter()
    ll_tokenizer(tok, V, (tok.eos_token_id,))
    t_tok = time.perf_counter() - t0
    times = []
    for _ in range(compiles):
        t0 = time.perf_counter()
        g = Grammar("json_schema", SCHEMA, tok, V, [tok.eos_token_id], compact=True)
        times.append(time.perf_counter() - t0)
    t_schema = statistics.median(times)
    print(f"  compile: the tokenizer's llguidance view {t_tok * 1e3:.1f} ms (once per tokenizer, {V} tokens); "
          f"the schema {t_schema * 1e3:.2f} ms (median of {compiles}; once per request)")
    res = {"vocab": V, "new": new, "tokenizer_ms": t_tok * 1e3, "schema_compile_ms": t_schema * 1e3}
    mask_s, plain_mask = [], runner.allowed_mask

    def timed_mask(*a):                 # the mask's share of a step: llguidance's fill and the unpacking
        t0 = time.perf_counter()
        out = plain_mask(*a)
        mask_s.append(time.perf_counter() - t0)
        return out
    runner.allowed_mask = timed_mask
    try:
        for B in batches:
            rows = stdlib_prompts(tok, B)
            params = SamplingParams(max_tokens=new, temperature=1.0, seed=0)
            out = {"none": [], "json": []}
            mask_s.clear()
            for _ in range(pairs):
                for name in ("none", "json"):
                    engine = Engine(model, tok, max_batch=B, max_len=256)
                    rate, outputs, reqs = decode_rate(engine, rows, params, g if name == "json" else None)
                    assert all(len(o) == new for o in outputs), "a request stopped early: the batch changed"
                    out[name].append((rate, outputs))
            sample = tok.decode(out["json"][0][1][0])
            for name, runs in out.items():
                print(f"  batch {B} {name:4s}: {statistics.median(r[0] for r in runs):.0f} tokens/s "
                      f"(runs {', '.join(f'{r[0]:.0f}' for r in runs)})")
            ratio = statistics.median(j[0] / n[0] for j, n in zip(out["json"], out["none"]))
            mask_ms = statistics.median(mask_s) * 1e3
            print(f"  => batch {B}: {ratio:.2f}x tokens/s with the schema (median of pairs); the mask "
                  f"{mask_ms:.2f} ms a step (median); output starts {sample[:60]!r}")
            res.update({f"b{B}_none_tokens_per_s": statistics.median(r[0] for r in out["none"]),
                        f"b{B}_json_tokens_per_s": statistics.median(r[0] for r in out["json"]),
                        f"b{B}_ratio": ratio, f"b{B}_mask_ms": mask_ms})
    finally:
        runner.allowed_mask = plain_mask
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="concurrency,prefix,chunking")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--model", default=None, help="a trained model directory (for --parts mtp)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; 1 when another job holds a core (2 threads then wait on each other)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny").replace(max_position_embeddings=8192)
    model = DeepseekV3(cfg).init_weights(0.02).eval()
    rate = matmul_rate()
    active = model.num_parameters()["active"]
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads, fp32; "
          f"tiny preset ({active / 1e6:.1f}M active); fp32 matmul {rate / 1e9:.0f} GFLOP/s")
    with torch.inference_mode():
        for part in args.parts.split(","):
            print(part)
            if part == "concurrency":
                concurrency(model, args.pairs)
            elif part == "prefix":
                prefix(model, args.pairs, rate, active)
            elif part == "chunking":
                chunking(model, args.pairs)
            elif part == "mtp":
                if not args.model:
                    raise SystemExit("--parts mtp needs --model DIR (a trained model, e.g. runs/demo)")
                mtp(args.model, args.pairs)
            elif part == "grammar":
                grammar(model, args.pairs)
            else:
                raise SystemExit(f"unknown part {part!r}")


if __name__ == "__main__":
    main()
