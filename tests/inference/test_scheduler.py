"""The scheduler alone, no model: admission under max_batch and the prefill budget, prefix reuse (and
waiting a step for a block another request is computing), and preemption of the newest request."""

from fewchips.inference.paged import BlockPool
from fewchips.inference.request import Request
from fewchips.inference.sampling import SamplingParams
from fewchips.inference.scheduler import Scheduler


def run_step(s: Scheduler):
    """What the runner and the engine do with a step's work: the tokens are computed, and a request
    with all its tokens computed gets its next one (token 7)."""
    batch = s.schedule()
    for r, n in batch.prefill + [(r, 1) for r in batch.decode]:
        s.computed(r, n)
        if r.pending == 0:
            r.output_ids.append(7)
            if len(r.output_ids) >= r.params.max_tokens:
                s.finish(r)
                r.finish_reason = "length"
    return batch


def req(n, max_tokens=4, start=100):
    return Request(list(range(start, start + n)), SamplingParams(max_tokens=max_tokens))


def test_admission_follows_max_batch_and_the_prefill_budget():
    s = Scheduler(BlockPool(64), block_size=4, max_batch=2, max_prefill_tokens=10)
    a, b, c = req(6), req(7, start=200), req(3, start=300)
    for r in (a, b, c):
        s.add(r)
    batch = run_step(s)
    assert [(r, n) for r, n in batch.prefill] == [(a, 6), (b, 4)] and not batch.decode   # b: a chunk of 4
    assert s.running == [a, b] and list(s.waiting) == [c]                                # max_batch 2
    batch = run_step(s)
    assert batch.decode == [a] and batch.prefill == [(b, 3)]                  # running first, oldest first
    batch = run_step(s)
    assert batch.decode == [a, b] and not batch.prefill and list(s.waiting) == [c]
    while a.finish_reason is None:
        run_step(s)
    batch = run_step(s)
    assert (c, 3) in batch.prefill                                            # a's place is taken
    assert not s.aborted()
    c.aborted = True
    assert s.aborted() == [c]


def test_prefix_reuse_and_waiting_for_a_block_in_flight():
    s = Scheduler(BlockPool(64), block_size=8, max_batch=8, max_prefill_tokens=512)
    a, b = req(37), req(37)                     # one prompt twice (n = 2): b waits for a's blocks
    s.add(a)
    s.add(b)
    batch = run_step(s)
    assert batch.prefill == [(a, 37)] and list(s.waiting) == [b]
    batch = run_step(s)
    assert b.cached_tokens == 32 and (b, 5) in batch.prefill and b.blocks[:4] == a.blocks[:4]
    assert s.pool.refs[a.blocks[0]] == 2
    # a prompt that is all cached blocks still computes its last block: its last token's logits are needed
    c = req(32)
    s.add(c)
    run_step(s)
    assert c.cached_tokens == 24
    off = Scheduler(BlockPool(64, prefix_caching=False), block_size=8, max_batch=8, max_prefill_tokens=512)
    d, e = req(37), req(37)
    off.add(d)
    off.add(e)
    assert [r for r, _ in run_step(off).prefill] == [d, e] and e.cached_tokens == 0   # nothing to wait for


def test_the_newest_request_is_preempted_and_queued_first():
    s = Scheduler(BlockPool(8), block_size=4, max_batch=4, max_prefill_tokens=64)   # 7 usable blocks
    rs = [req(8, max_tokens=20, start=100 * i) for i in range(1, 4)]               # 2 full blocks each
    for r in rs:
        s.add(r)
    run_step(s)
    assert s.running == rs and s.pool.n_available == 1
    run_step(s)                       # each decodes position 8: a third block each, oldest first
    assert s.preemptions >= 1 and rs[2].preemptions == 1 and s.waiting[0] is rs[2]
    assert rs[2].blocks == [] and rs[2].n_computed == 0 and rs[2].draft is None
    assert rs[0].preemptions == 0 and s.running[0] is rs[0]
    while any(r.finish_reason is None for r in rs):
        run_step(s)
    assert all(len(r.output_ids) == 20 for r in rs) and s.pool.n_used == 0
