"""The continuous-batching engine: same tokens as `generate`, requests joining and leaving mid-batch,
per-request sampling, block reuse, streaming callbacks, and the cache-memory cap (queueing, clear errors).
The paged cache, prefix cache, chunking and preemption have their own tests (test_inference_paged.py)."""

import threading
import time

import pytest
import torch

import fewchips
from fewchips.inference.engine import Engine, Request
from fewchips.inference.sampling import SamplingParams

from inference_utils import tiny_model


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(torch.randint(1, 12, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_engine_matches_generate_with_joins_and_leaves():
    model = tiny_model(0)
    rows = prompts(10)
    lengths = [3 + (7 * i) % 13 for i in range(10)]          # requests leave at different steps
    want = fewchips.generate(model, rows, max_new_tokens=max(lengths), stop_token_ids=[])
    engine = Engine(model, max_batch=4, max_len=64)          # 10 requests through 4 slots
    reqs = [Request(r, SamplingParams(max_tokens=n)) for r, n in zip(rows, lengths)]
    engine.run(reqs)
    for r, w, n in zip(reqs, want, lengths):
        assert r.finish_reason == "length"
        assert r.prompt_ids + r.output_ids == w[: len(r.prompt_ids) + n]
    assert engine.peak_batch == 4 and engine.pool.n_used == 0        # every block back


def test_background_thread_streams_and_late_arrivals_join():
    model = tiny_model(0)
    rows = prompts(6, seed=1)
    want = fewchips.generate(model, rows, max_new_tokens=15, stop_token_ids=[])
    engine = Engine(model, max_batch=8, max_len=64).start()
    seen = {i: [] for i in range(6)}
    lock = threading.Lock()

    def on_event(req, kind, payload):
        with lock:
            seen[req.tag].append((kind, payload))

    try:
        reqs = []
        for i, r in enumerate(rows):
            req = Request(r, SamplingParams(max_tokens=15), on_event=on_event)
            req.tag = i
            reqs.append(engine.add(req))
            time.sleep(0.02)                                 # arrive while others are decoding
        for r in reqs:
            assert r.done_event.wait(30)
    finally:
        engine.stop()
    for i, (r, w) in enumerate(zip(reqs, want)):
        streamed = [t for kind, p in seen[i] if kind == "tokens" for t in p]
        assert streamed == r.output_ids and r.prompt_ids + r.output_ids == w
        assert seen[i][-1] == ("done", "length")
    assert engine.peak_batch > 1


def test_per_request_sampling_and_stops():
    model = tiny_model(0)
    rows = prompts(3, seed=2)
    greedy = fewchips.generate(model, rows, max_new_tokens=12, stop_token_ids=[])
    stop_tok = greedy[1][len(rows[1]) + 4]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=5)
    alone = Engine(model, max_batch=1, max_len=64).run([Request(rows[0], sampled)])[0].output_ids
    reqs = [Request(rows[0], SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=5)),
            Request(rows[1], SamplingParams(max_tokens=12, stop_token_ids=[stop_tok])),
            Request(rows[2], SamplingParams(max_tokens=12, logprobs=3))]
    Engine(model, max_batch=3, max_len=64).run(reqs)
    assert reqs[0].output_ids == alone                        # its own generator, whatever the batch
    gen1 = greedy[1][len(rows[1]):]
    assert reqs[1].output_ids == gen1[: gen1.index(stop_tok) + 1] and reqs[1].finish_reason == "stop"
    assert reqs[2].prompt_ids + reqs[2].output_ids == greedy[2]
    for lp in reqs[2].logprobs:                               # greedy: the chosen token is the top entry
        assert lp.top[0] == (lp.token, lp.logprob) and len(lp.top) == 3


def test_cache_cap_queues_and_refuses_clearly():
    model = tiny_model(0)
    cfg = model.config
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    # 4 blocks of 16 tokens, one of them the null block: 48 tokens of cache for 16 requests of up to 20
    engine = Engine(model, max_batch=16, max_len=32, max_cache_bytes=4 * 16 * per_token + 100, prefix_caching=False)
    assert engine.pool.n_usable == 3 and engine.cache_bytes == 4 * 16 * per_token
    rows = prompts(5, seed=3)
    want = [Engine(model, max_batch=1, max_len=32).run([Request(r, SamplingParams(max_tokens=8))])[0].output_ids
            for r in rows]
    reqs = engine.run([Request(r, SamplingParams(max_tokens=8)) for r in rows])
    assert all(r.finish_reason == "length" for r in reqs) and [r.output_ids for r in reqs] == want
    assert 1 < engine.peak_running <= 3                        # the rest waited (or were preempted)
    with pytest.raises(ValueError, match="maximum context length is 32"):
        engine.add(Request(list(range(3, 30)), SamplingParams(max_tokens=8)))
    with pytest.raises(ValueError, match="empty"):
        engine.add(Request([], SamplingParams(max_tokens=8)))
    with pytest.raises(ValueError, match="token ids"):
        engine.add(Request([5, 100000], SamplingParams(max_tokens=8)))
    with pytest.raises(ValueError, match="cannot hold one request"):
        Engine(model, max_len=32, max_cache_bytes=2 * 16 * per_token)


def test_abort_frees_the_slot():
    model = tiny_model(0)
    engine = Engine(model, max_batch=1, max_len=64)
    a = engine.add(Request([5, 6, 7], SamplingParams(max_tokens=40)))
    b = engine.add(Request([8, 9], SamplingParams(max_tokens=4)))
    engine.step()
    engine.step()
    assert a in engine.running and b in engine.waiting          # b waits: max_batch 1
    engine.abort(a)
    while b.finish_reason is None:
        engine.step()
    assert a.finish_reason == "abort" and len(a.output_ids) < 40
    assert b.prompt_ids + b.output_ids == fewchips.generate(model, [[8, 9]], max_new_tokens=4, stop_token_ids=[])[0]


@pytest.mark.slow
def test_compiled_engine_matches_eager_one_slot():
    """Engine(compile=True), as `fewchips chat --compile` runs it: requests one after another through one
    slot (the slot reused, the cache length growing every step), the same greedy tokens as eager."""
    model = tiny_model(0)
    rows = prompts(3, seed=4)
    want = [Engine(model, max_batch=1, max_len=64).run([Request(r, SamplingParams(max_tokens=9))])[0].output_ids
            for r in rows]
    engine = Engine(model, max_batch=1, max_len=64, compile=True)
    got = [engine.run([Request(r, SamplingParams(max_tokens=9))])[0].output_ids for r in rows]
    assert got == want


@pytest.mark.slow
def test_compiled_engine_matches_eager_with_joins_and_leaves():
    """Engine(compile=True) with three slots: requests at different positions, joining and leaving,
    slots reused; batch sizes where the compiled step uses gathered experts and where it does not."""
    model = tiny_model(0)
    rows = prompts(5, seed=5)
    lengths = [4, 9, 6, 3, 8]
    out = {}
    for compile in (False, True):
        reqs = [Request(r, SamplingParams(max_tokens=n)) for r, n in zip(rows, lengths)]
        Engine(model, max_batch=3, max_len=64, compile=compile).run(reqs)
        out[compile] = [r.output_ids for r in reqs]
    assert out[True] == out[False]
