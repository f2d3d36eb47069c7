"""A bounded load on the OpenAI-compatible server, abuse included: ordinary clients keep sending
completions while others send oversized bodies, prompt floods and requests they hang up on; /health
is polled throughout. Capped in requests and in seconds. Prints what each kind of client got and the
latency /health and ordinary requests saw.

    python benchmarks/load_server.py [--clients 8] [--seconds 30] [--max-requests 400]

The server runs in this process on the `tiny` preset at random init (see bench_server.py), with the
default `ServerLimits` except `--max-waiting` (small, so that floods meet the queue bound).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-requests", type=int, default=400)
    ap.add_argument("--max-waiting", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile

    import httpx
    import uvicorn

    from bench_server import build_model_dir
    from fewchips import from_pretrained
    from fewchips.inference.engine import Engine
    from fewchips.inference.server import create_app
    from fewchips.inference.server_limits import ServerLimits
    from fewchips.inference.tokenizer import Tokenizer

    path = tempfile.mkdtemp(prefix="load_server-")
    build_model_dir("tiny", path)
    model, tok = from_pretrained(path, dtype=torch.float32), Tokenizer.from_dir(path)
    engine = Engine(model, tok, max_batch=8, max_len=512).start()
    limits = ServerLimits(max_waiting=args.max_waiting)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tok, "m", limits=limits), host="127.0.0.1", port=port,
                                           log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.seconds
    budget = threading.Semaphore(args.max_requests)
    lock = threading.Lock()
    outcomes: dict[str, Counter] = {}
    ordinary_s, health_s = [], []

    def record(kind, what, seconds=None):
        with lock:
            outcomes.setdefault(kind, Counter())[what] += 1
            if kind == "ordinary" and seconds is not None and what == 200:
                ordinary_s.append(seconds)

    def ordinary(client, rng):
        t0 = time.time()
        r = client.post(url + "/v1/completions", json={"prompt": f"def f{rng.randint(0, 999)}(x):", "max_tokens": 16,
                                                       "temperature": 0.7, "seed": rng.randint(0, 10**6)})
        record("ordinary", r.status_code, time.time() - t0)

    def oversized(client, rng):
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (30 * 2**20))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sk:
            sk.sendall(head)
            record("oversized body (30 MB announced)", sk.recv(32).split(b" ")[1].decode())

    def flood(client, rng):
        r = client.post(url + "/v1/completions", json={"prompt": ["x"] * 200_000, "max_tokens": 1})
        record("200,000 prompts", r.status_code)

    def queue_flood(client, rng):
        r = client.post(url + "/v1/completions", json={"prompt": ["a b c"] * 8, "n": 2, "max_tokens": 32})
        record("8 prompts x n=2 (queue flood)", r.status_code)

    def hang_up(client, rng):
        try:
            client.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 200}, timeout=0.2)
            record("hangs up after 0.2 s", "finished first")
        except httpx.TimeoutException:
            record("hangs up after 0.2 s", "hung up")

    kinds = [ordinary] * 4 + [oversized, flood, queue_flood, hang_up]

    def client_loop(i):
        rng = random.Random(i)
        with httpx.Client(timeout=120) as client:
            while time.time() < deadline and budget.acquire(blocking=False):
                rng.choice(kinds)(client, rng)

    def health_loop():
        with httpx.Client(timeout=30) as client:
            while time.time() < deadline:
                t0 = time.time()
                client.get(url + "/health")
                health_s.append(time.time() - t0)
                time.sleep(0.1)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=health_loop))
    t_start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t_start
    idle_by = time.time() + 30
    while (engine.running or engine.waiting) and time.time() < idle_by:
        time.sleep(0.1)
    leftover = len(engine.running) + len(engine.waiting)
    server.should_exit = True
    engine.stop()
    n = sum(sum(c.values()) for c in outcomes.values())
    print(f"{n} requests from {args.clients} clients in {elapsed:.1f} s (cap {args.max_requests} requests, "
          f"{args.seconds:.0f} s); tiny, {args.threads} thread(s), max_waiting {args.max_waiting}")
    for kind, c in sorted(outcomes.items()):
        print(f"  {kind:34s} " + ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=str)))
    print(f"  ordinary 200s: median {statistics.median(ordinary_s):.2f} s, p95 {pct(ordinary_s, 0.95):.2f} s"
          if ordinary_s else "  no ordinary request succeeded")
    print(f"  /health ({len(health_s)} polls): median {1000 * statistics.median(health_s):.0f} ms, "
          f"p99 {1000 * pct(health_s, 0.99):.0f} ms, max {1000 * max(health_s):.0f} ms")
    print(f"  generations still queued or running 30 s after the load: {leftover}")


if __name__ == "__main__":
    main()
