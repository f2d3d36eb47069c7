"""The paged latent cache and what the engine builds on it: logits through block tables equal the
contiguous cache's; prefix-cache hits equal cold prefills; chunked prefill and preemption give the same
tokens; n requests of one prompt prefill it once; the block pool's reference counts and LRU order."""

import pytest
import torch

from fewchips import LatentCache
from fewchips.inference.engine import Engine, Request
from fewchips.inference.paged import BlockPool, PagedLatentCache, block_hashes
from fewchips.inference.sampling import SamplingParams
from fewchips.ops import attention_reference, gather_rows, gather_rows_reference, positional_attention

from inference_utils import YARN, tiny_model


def ids_of(n, seed):
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tables_for(lengths, block_size, n_blocks, seed=0):
    """Scattered block tables (not 1, 2, 3, ...): each row's blocks drawn from a shuffled pool."""
    perm = torch.randperm(n_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    out, i = [], 0
    for n in lengths:
        k = -(-n // block_size)
        out.append(perm[i:i + k].tolist())
        i += k
    return out


def padded(tables, K):
    return torch.tensor([t[:K] + [0] * (K - len(t[:K])) for t in tables])


@pytest.mark.parametrize("block_size", [5, 7, 16])
@pytest.mark.parametrize("rope", ["plain", "yarn"])
def test_paged_logits_equal_contiguous(block_size, rope):
    """Ragged prompts (13 and 22 tokens) prefilled right-padded, then 64 decode steps, every row at its own
    position, through scattered block tables: the logits equal the contiguous cache's (fp32, 1e-5)."""
    model = tiny_model(1, **({"rope_scaling": YARN} if rope == "yarn" else {}))
    cfg = model.config
    lens, steps = [13, 22], 64
    seqs = [ids_of(n + steps, s) for n, s in zip(lens, (1, 2))]
    total = [n + steps for n in lens]
    n_blocks = sum(-(-t // block_size) for t in total) + 3
    tables = tables_for(total, block_size, n_blocks)
    paged = PagedLatentCache(cfg, n_blocks, block_size, cfg.num_hidden_layers + 1)
    flat = LatentCache(cfg, 2, max(total))
    T = max(lens)
    prompt = torch.tensor([s[:n] + [0] * (T - n) for s, n in zip(seqs, lens)])
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        got = [model(prompt, positions=pos, cache=paged, slots=padded(tables, -(-T // block_size)))
               [torch.arange(2), torch.tensor(lens) - 1]]
        want = [model(prompt, cache=flat)[torch.arange(2), torch.tensor(lens) - 1]]
        for t in range(steps):
            p = torch.tensor(lens) + t - 1 + 1                    # each row's next position
            tok = torch.tensor([[s[int(q)]] for s, q in zip(seqs, p)])
            K = -(-(int(p.max()) + 1) // block_size)
            got.append(model(tok, positions=p[:, None], cache=paged, slots=padded(tables, K))[:, 0])
            want.append(model(tok, positions=p[:, None], cache=flat)[:, 0])
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=0, atol=1e-5)


def test_positional_attention_equals_its_twin():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 12, generator=g), torch.randn(2, 3, 9, 12, generator=g),
               torch.randn(2, 3, 9, 8, generator=g))
    pos = torch.tensor([[4, 5, 6, 7, 8], [0, 1, 2, 3, 4]])
    torch.testing.assert_close(positional_attention(q, k, v, 0.3, pos),
                               attention_reference(q, k, v, 0.3, positions_BT=pos), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [7, 40])
def test_chunked_prefill_logits_equal_one_shot(chunk):
    """A 100-token prompt in chunks of 7 (absorbed attention over the cache) or 40 (beyond the model's
    absorb_max_T of 32: the cached latents decompressed, MHA form): the logits of its 16 tokens equal a
    one-shot prefill's (fp32, 1e-5)."""
    model = tiny_model(0)
    assert model.model.layers[0].self_attn.absorb_max_T == 32
    p = ids_of(100, 12)
    out = []
    for budget in (512, chunk):
        engine = Engine(model, max_batch=2, max_len=128, max_prefill_tokens=budget)
        seen = record_logits(engine)
        r = engine.run([Request(p, SamplingParams(max_tokens=16))])[0]
        out.append(torch.stack(seen[r.id]))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-5)


def test_gather_rows_equals_its_twin():
    pool = torch.randn(40, 6)
    idx = torch.randint(0, 40, (3, 11))
    assert torch.equal(gather_rows(pool, idx), gather_rows_reference(pool, idx))


# ---- the engine over the pool --------------------------------------------------------------------

def record_logits(engine):
    """Capture the logits each request's tokens were sampled from."""
    seen = {}
    real = engine._record

    def record(outs):
        for o in outs:
            seen.setdefault(o.request.id, []).extend(row.clone() for row in o.logits)
        return real(outs)
    engine._record = record
    return seen


def test_prefix_hit_logits_equal_cold_ones():
    """A second request sharing 40 of its 45 prompt tokens (block size 8: 5 blocks cached) prefills only
    the rest; its logits over 12 tokens equal those of the same request on a fresh engine."""
    model = tiny_model(0)
    shared = ids_of(40, 5)
    a, b = shared + ids_of(3, 6), shared + ids_of(5, 7)
    cold = Engine(model, max_batch=2, max_len=96, block_size=8)
    cold_logits = record_logits(cold)
    rb_cold = cold.run([Request(b, SamplingParams(max_tokens=12))])[0]
    warm = Engine(model, max_batch=2, max_len=96, block_size=8)
    warm.run([Request(a, SamplingParams(max_tokens=4))])
    warm_logits = record_logits(warm)
    rb = warm.run([Request(b, SamplingParams(max_tokens=12))])[0]
    assert rb.cached_tokens == 40 and rb_cold.cached_tokens == 0
    assert rb.output_ids == rb_cold.output_ids
    torch.testing.assert_close(torch.stack(warm_logits[rb.id]), torch.stack(cold_logits[rb_cold.id]),
                               rtol=0, atol=1e-5)
    # a prompt that is all cached blocks still computes its last block: its last token's logits are needed
    again = warm.run([Request(shared, SamplingParams(max_tokens=3))])[0]
    assert again.cached_tokens == 32
    assert again.output_ids == cold.run([Request(shared, SamplingParams(max_tokens=3))])[0].output_ids
    off = Engine(model, max_batch=2, max_len=96, block_size=8, prefix_caching=False)
    off.run([Request(a, SamplingParams(max_tokens=4))])
    assert off.run([Request(b, SamplingParams(max_tokens=2))])[0].cached_tokens == 0


def test_n_requests_of_one_prompt_prefill_it_once():
    """Four requests of one 37-token prompt added together (n = 4, or GRPO's G): the first computes it,
    the others wait one step and reuse its 4 full blocks of 8, computing only the 5-token tail."""
    model = tiny_model(0)
    p = ids_of(37, 8)
    engine = Engine(model, max_batch=8, max_len=64, block_size=8)
    computed = []
    real = engine.runner.prefill
    engine.runner.prefill = lambda work: (computed.extend(n for _, n in work), real(work))[1]
    reqs = engine.run([Request(p, SamplingParams(max_tokens=6, temperature=1.0, seed=i)) for i in range(4)])
    assert [r.cached_tokens for r in reqs] == [0, 32, 32, 32]
    assert sum(computed) == 37 + 3 * 5
    samples = {s.name: s.value for m in engine.metrics.registry.collect() for s in m.samples}
    assert samples["fewchips:prefix_cache_queries_total"] == 4 * 37        # each counted once, waits included
    assert samples["fewchips:prefix_cache_hits_total"] == 3 * 32
    off = Engine(model, max_batch=8, max_len=64, block_size=8, prefix_caching=False)
    off.run([Request(p, SamplingParams(max_tokens=2)) for _ in range(4)])
    assert off.steps == 2                                  # no waiting for blocks it will not share
    alone = Engine(model, max_batch=1, max_len=64, block_size=8)
    assert [alone.run([Request(p, SamplingParams(max_tokens=6, temperature=1.0, seed=i))])[0].output_ids
            for i in range(4)] == [r.output_ids for r in reqs]


def test_chunked_prefill_gives_the_same_tokens_and_decodes_keep_going():
    """Prompts of 30-60 tokens in chunks of at most 7 prompt tokens a step: the same greedy tokens as
    unchunked; while a 60-token prompt is being prefilled, the running request gets a token every step."""
    model = tiny_model(0)
    rows = [ids_of(n, 20 + n) for n in (30, 45, 60)]
    want = [Engine(model, max_batch=4, max_len=128).run([Request(r, SamplingParams(max_tokens=10))])[0].output_ids
            for r in rows]
    engine = Engine(model, max_batch=4, max_len=128, max_prefill_tokens=7)
    running = engine.add(Request(ids_of(5, 3), SamplingParams(max_tokens=40)))
    for _ in range(3):
        engine.step()
    chunks = []
    real = engine.runner.prefill
    engine.runner.prefill = lambda work: (chunks.append(sum(n for _, n in work)), real(work))[1]
    reqs = [engine.add(Request(r, SamplingParams(max_tokens=10))) for r in rows]
    before = len(running.output_ids)
    for _ in range(10):                                    # 10 steps: 70 prompt tokens at most
        engine.step()
    assert len(running.output_ids) == before + 10          # one token every step
    assert max(chunks) <= 7
    while engine.has_work():
        engine.step()
    assert [r.output_ids for r in reqs] == want


def test_preemption_recomputes_the_same_greedy_tokens():
    """A pool of 9 blocks of 4 (32 tokens) for six requests that grow to 25 tokens each: the newest is
    preempted when blocks run out and recomputes prompt + output when readmitted; tokens unchanged."""
    model = tiny_model(0)
    rows = [ids_of(n, 40 + n) for n in (5, 9, 3, 12, 7, 4)]
    want = [Engine(model, max_batch=1, max_len=64).run([Request(r, SamplingParams(max_tokens=25 - len(r)))])[0]
            .output_ids for r in rows]
    cfg = model.config
    block_bytes = cfg.kv_cache_bytes_per_token(4) * 4
    for prefix_caching in (True, False):
        engine = Engine(model, max_batch=6, max_len=32, block_size=4, max_cache_bytes=9 * block_bytes,
                        prefix_caching=prefix_caching)
        reqs = engine.run([Request(r, SamplingParams(max_tokens=25 - len(r))) for r in rows])
        assert engine.preemptions > 0 and any(r.preemptions for r in reqs)
        assert [r.output_ids for r in reqs] == want
        assert engine.pool.n_used == 0


def test_reset_prefix_cache_after_new_weights():
    """GRPO keeps one engine across steps: after the weights change, a cached prefix is not reused."""
    model = tiny_model(0)
    p = ids_of(20, 9)
    engine = Engine(model, max_batch=2, max_len=64, block_size=4)
    engine.run([Request(p, SamplingParams(max_tokens=2))])
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(1.01)
    engine.reset_prefix_cache()
    r = engine.run([Request(p, SamplingParams(max_tokens=5))])[0]
    assert r.cached_tokens == 0
    fresh = Engine(model, max_batch=2, max_len=64, block_size=4).run([Request(p, SamplingParams(max_tokens=5))])[0]
    assert r.output_ids == fresh.output_ids


def test_echo_scoring_through_chunks_equals_one_forward():
    """prompt_logprobs (echo scoring) computed chunk by chunk equal one full forward's log-softmax."""
    model = tiny_model(0)
    p = ids_of(30, 11)
    engine = Engine(model, max_batch=2, max_len=64, max_prefill_tokens=8)
    r = engine.run([Request(p, SamplingParams(max_tokens=0), prompt_logprobs=2)])[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p]))[0], -1)
    assert r.prompt_logprob_list[0] is None and len(r.prompt_logprob_list) == 30
    got = torch.tensor([x.logprob for x in r.prompt_logprob_list[1:]])
    torch.testing.assert_close(got, lp[torch.arange(29), torch.tensor(p[1:])], rtol=0, atol=1e-5)


# ---- the block pool --------------------------------------------------------------------------------

def test_block_pool_refcounts_hashes_and_lru():
    pool = BlockPool(6)                                      # blocks 1..5 (0 is the null block)
    toks = list(range(12))
    h = block_hashes(toks, 4)
    assert len(h) == 3 and block_hashes(toks[:8], 4) == h[:2]
    assert block_hashes([9] + toks[1:], 4)[1] != h[1]      # chained: a changed first block changes the rest
    a = pool.allocate(3)
    for b, x in zip(a, h):
        pool.register(b, x)
    assert pool.match(h) == a and pool.refs[a[0]] == 2      # a second holder
    pool.release(a)
    pool.release(a)                                          # both gone: cached, evictable
    assert pool.n_used == 0 and pool.n_available == 5 and list(pool.lru) == a[::-1]   # tail first
    b = pool.allocate(3)                                    # 2 free ones, then the LRU's first: a's tail
    assert not pool.cached(h[2]) and pool.cached(h[0]) and pool.match(h) == a[:2]
    assert pool.allocate(1) is None                         # all 5 held: nothing to take or evict
    pool.reset()
    assert pool.match(h) == [] and pool.n_used == 5


# ---- MTP speculation inside the engine ----------------------------------------------------------------

def test_speculative_greedy_equals_plain_greedy_in_a_batch():
    """Requests of different lengths (1 to 41 prompt tokens), joining through 3 places, prefilled in chunks
    of at most 16, two sharing a prefix, one stopping inside an accepted pair: speculative greedy output is
    plain greedy's token for token; drafts are both kept and rejected."""
    from inference_utils import copy_drafter_model
    model = copy_drafter_model(0.05)
    rows = [ids_of(n, 60 + n) for n in (3, 17, 30, 9, 41, 1)]
    rows.append(rows[4][:33] + ids_of(4, 1))
    lens = [20, 33, 12, 25, 18, 30, 15]
    plain = Engine(model, max_batch=3, max_len=96, block_size=8).run(
        [Request(r, SamplingParams(max_tokens=n)) for r, n in zip(rows, lens)])
    stop_tok = plain[0].output_ids[7]
    engine = Engine(model, max_batch=3, max_len=96, block_size=8, speculative="mtp", max_prefill_tokens=16)
    spec = engine.run([Request(r, SamplingParams(max_tokens=n, stop_token_ids=[stop_tok] if i == 0 else []))
                       for i, (r, n) in enumerate(zip(rows, lens))])
    want0 = plain[0].output_ids[: plain[0].output_ids.index(stop_tok) + 1]
    assert spec[0].output_ids == want0 and spec[0].finish_reason == "stop"
    assert [r.output_ids for r in spec[1:]] == [r.output_ids for r in plain[1:]]
    drafted, accepted = sum(r.drafted for r in spec), sum(r.accepted for r in spec)
    assert 0 < accepted < drafted
    assert spec[-1].cached_tokens == 32
    chunked = Engine(model, max_batch=3, max_len=96, block_size=8, max_prefill_tokens=16)
    chunked.run([Request(r, SamplingParams(max_tokens=n)) for r, n in zip(rows, lens)])
    assert engine.steps < chunked.steps                     # one or two tokens per request per step


def test_speculative_greedy_and_sampled_requests_verify_together():
    """A greedy request drafts alone (its drafts' q one-hot, not stored), then a sampled one joins the
    decode batch: both are verified in one step by the general rule; the greedy output is still plain
    greedy's."""
    from inference_utils import copy_drafter_model
    model = copy_drafter_model(0.05)
    want = Engine(model, max_batch=2, max_len=64).run([Request([5, 6, 7, 8, 9], SamplingParams(max_tokens=20))])[0]
    engine = Engine(model, max_batch=4, max_len=64, speculative="mtp")
    greedy = engine.add(Request([5, 6, 7, 8, 9], SamplingParams(max_tokens=20)))
    for _ in range(3):
        engine.step()
    sampled = engine.add(Request([11, 12, 13], SamplingParams(max_tokens=20, temperature=0.9, seed=1)))
    while engine.has_work():
        engine.step()
    assert greedy.error is None and sampled.error is None
    assert greedy.output_ids == want.output_ids and len(sampled.output_ids) == 20


def test_speculative_pool_stays_within_the_cap():
    """With MTP speculation the pool holds one more layer per token: --cache-gb still bounds it."""
    model = tiny_model(0)
    cap = 40 * 16 * model.config.kv_cache_bytes_per_token(4)
    plain, spec = (Engine(model, max_len=64, max_cache_bytes=cap, speculative=s) for s in (None, "mtp"))
    assert spec.cache_bytes <= cap and plain.cache_bytes <= cap and spec.pool.n_blocks < plain.pool.n_blocks


def test_speculative_refusals():
    model = tiny_model(0, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="MTP module"):
        Engine(model, speculative="mtp")
    with pytest.raises(ValueError, match="cannot be combined"):
        Engine(tiny_model(0), speculative="mtp", compile=True)
    from fewchips.inference.engine import speculation_for
    with_mtp = tiny_model(0)
    assert speculation_for(with_mtp, "auto", 1) == "mtp"          # chat: one request at a time
    assert speculation_for(with_mtp, "auto", 8) is None           # a CPU server: it does not pay
    assert speculation_for(model, "auto", 1) is None and speculation_for(with_mtp, "none") is None
    assert speculation_for(with_mtp, "mtp", 8) == "mtp"
    with pytest.raises(ValueError, match="auto, mtp or none"):
        speculation_for(with_mtp, "eagle")


def test_preempted_echo_request_scores_its_prompt_once():
    """A prompt_logprobs request preempted mid-prefill recomputes from position 0: its prompt logprobs
    are the prompt's, once (not appended to the first attempt's), and equal an unpreempted run's."""
    model = tiny_model(0)
    bb = model.config.kv_cache_bytes_per_token(4) * 4
    engine = Engine(model, max_batch=4, max_len=16, block_size=4, max_cache_bytes=6 * bb, prefix_caching=False)
    older = engine.add(Request([5, 6, 7, 8], SamplingParams(max_tokens=12)))
    engine.step()
    echo = engine.add(Request(list(range(9, 17)), SamplingParams(max_tokens=8), prompt_logprobs=1))
    while engine.has_work():
        engine.step()
    assert echo.preemptions + older.preemptions > 0
    alone = Engine(model, max_batch=1, max_len=16, block_size=4).run(
        [Request(list(range(9, 17)), SamplingParams(max_tokens=8), prompt_logprobs=1)])[0]
    assert len(echo.prompt_logprob_list) == 8 and echo.prompt_logprob_list[0] is None
    assert [x.token for x in echo.prompt_logprob_list[1:]] == list(range(10, 17))
    torch.testing.assert_close(torch.tensor([x.logprob for x in echo.prompt_logprob_list[1:]]),
                               torch.tensor([x.logprob for x in alone.prompt_logprob_list[1:]]), rtol=0, atol=1e-5)


def test_max_tokens_zero_never_samples():
    """max_tokens 0 computes the prompt and returns no token, also when only its last token is left to
    compute (a one-token prompt, or a prompt the prefix cache holds but for its last token)."""
    model = tiny_model(0)
    engine = Engine(model, max_batch=2, max_len=64, block_size=4)
    p = ids_of(9, 31)
    engine.run([Request(p, SamplingParams(max_tokens=2))])
    for prompt in ([7], p):
        r = engine.run([Request(prompt, SamplingParams(max_tokens=0))])[0]
        assert r.output_ids == [] and r.finish_reason == "length"
    assert r.cached_tokens == 8
