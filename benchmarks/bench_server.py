"""One request through the OpenAI-compatible server against in-process `generate`, same model, same
process: decode tokens/s of each and their ratio (the server's overhead: HTTP, the engine thread, the
event loop, incremental detokenisation). Interleaved pairs; the headline is the median ratio.

    python benchmarks/bench_server.py [--preset tiny] [--tokens 128] [--pairs 7]

The model is the preset at random init with a byte-level BPE trained on a slice of the standard
library (nothing downloaded). EOS is banned (logit_bias -100 / no stop ids) so every run decodes
exactly --tokens tokens. fp32, greedy, batch 1, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def build_model_dir(preset: str, path: str):
    from fewchips import DeepseekV3, ModelConfig, save_pretrained
    from fewchips.train import data as D
    from fewchips.train.tokenizer import save_tokenizer, special_ids, train_tokenizer

    cfg = ModelConfig.from_preset(preset)
    docs = D.read_documents(None, 2 * 2**20)
    tok = train_tokenizer((t for _, t in docs), cfg.vocab_size, len(docs))
    sp = special_ids(tok)
    cfg = cfg.replace(bos_token_id=sp.bos, eos_token_id=sp.eos)
    torch.manual_seed(0)
    save_pretrained(DeepseekV3(cfg).init_weights(0.02), path)
    save_tokenizer(tok, path)
    return sp.eos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import httpx
    import uvicorn

    from fewchips import from_pretrained, generate
    from fewchips.inference.engine import Engine
    from fewchips.inference.server import create_app
    from fewchips.inference.tokenizer import Tokenizer
    from fewchips.runtime import keep_freed_memory

    keep_freed_memory()
    path = tempfile.mkdtemp(prefix="bench_server-")
    eos = build_model_dir(args.preset, path)
    model = from_pretrained(path, dtype=torch.float32)
    tok = Tokenizer.from_dir(path)
    prompt = "def fibonacci(n):\n    "
    ids = tok.encode(prompt)
    engine = Engine(model, tok, max_batch=4, max_len=len(ids) + args.tokens + 8).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tok, "m"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "logit_bias": {str(eos): -100}}
    client = httpx.Client(timeout=600)

    def in_process():
        t0 = time.perf_counter()
        out = generate(model, [ids], max_new_tokens=args.tokens, stop_token_ids=[])[0]
        return (len(out) - len(ids)) / (time.perf_counter() - t0)

    def via_server(stream: bool):
        t0 = time.perf_counter()
        if stream:
            with client.stream("POST", url,
                               json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
            n = json.loads(lines[-1][6:])["usage"]["completion_tokens"]
        else:
            n = client.post(url, json=body).json()["usage"]["completion_tokens"]
        assert n == args.tokens, n
        return n / (time.perf_counter() - t0)

    in_process(), via_server(False), via_server(True)          # warm-up
    rows = []
    for _ in range(args.pairs):
        rows.append((in_process(), via_server(False), via_server(True)))
    server.should_exit = True
    engine.stop()
    ratio_plain = statistics.median(g / s for g, s, _ in rows)
    ratio_stream = statistics.median(g / s for g, _, s in rows)
    print(f"{args.preset}, batch 1, {args.tokens} tokens, fp32 greedy, {args.threads} threads, "
          f"{args.pairs} interleaved pairs")
    print(f"in-process generate: median {statistics.median(r[0] for r in rows):.1f} tok/s")
    print(f"server, non-streaming: median {statistics.median(r[1] for r in rows):.1f} tok/s; "
          f"generate / server = {ratio_plain:.2f}x (median of pairs)")
    print(f"server, streaming: median {statistics.median(r[2] for r in rows):.1f} tok/s; "
          f"generate / server = {ratio_stream:.2f}x (median of pairs)")


if __name__ == "__main__":
    main()
