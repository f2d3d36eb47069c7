"""DualPipe's overlapped forward and backward chunks (arXiv 2412.19437 §3.2.1, Figure 4) on torch's
ScheduleDualPipeV.

In its steady state DualPipeV pairs the forward of one micro-batch on one chunk with the backward of
another micro-batch on the rank's other chunk (an `OVERLAP_F_B` action). torch runs the pair one
after the other unless a function is registered for it. This one runs the forward on a second thread
while the calling thread runs the backward, so that one chunk's expert all-to-alls travel while the
other chunk computes. The two threads' all-to-alls go over two process groups (the experts' forward
group and a backward group, `ExpertParallelExperts.backward_group`), so each group sees its
collectives in the same order on every rank. The forward thread only issues forward collectives and
the backward thread only backward ones. So activation checkpointing, whose recomputation issues
forward all-to-alls inside the backward, keeps the pair sequential.

The function redoes, for the two sub-actions, the bookkeeping torch's runtime does for them: the
waits on received activations and gradients, the last stage's loss, the hand-off between the two
chunks of a V on one rank. torch has no public API for that bookkeeping, so this is the one module
of fewchips that uses torch's private names: the schedule's `_stages`, `fwd_recv_ops`, `bwd_recv_ops`,
`backward_counter`, `_n_microbatches`, `_maybe_compute_loss`, `_maybe_get_loss`, `_assert_unsharded`
and `schedules._wait_batch_p2p`. They are read only on a torch release listed in `TESTED_TORCH`
(`check_torch`); on another one `--pp-overlap on` is refused and `auto` runs the pairs one after the
other (torch's own path). Upgrading torch: compare `ScheduleDualPipeV`'s FORWARD and FULL_BACKWARD
actions in `torch/distributed/pipelining/schedules.py` with `_forward`/`_backward` below, then run
`tests/parallel/test_parallel.py -k dualpipev` and `tests/parallel/test_parallel_train.py -k pipeline` (they check every
loss and gradient against one process, with the pairs on two threads) and add the release here.
"""

from __future__ import annotations

import threading

import torch

TESTED_TORCH = ("2.13",)        # releases whose schedule internals the tests above were run against


def check_torch() -> str | None:
    """None where the overlap may run on this torch, else why it may not."""
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if release in TESTED_TORCH:
        return None
    return (f"DualPipeV's overlapped chunks use torch's private schedule internals, tested with torch "
            f"{', '.join(TESTED_TORCH)}, not {torch.__version__} (see fewchips/parallel/overlap.py)")


def register(schedule) -> None:
    """Run the schedule's OVERLAP_F_B pairs concurrently."""
    why = check_torch()
    if why:
        raise ValueError(why)
    from torch.distributed.pipelining.schedules import OVERLAP_F_B
    schedule.register_custom_function(OVERLAP_F_B, overlap_f_b)


PAIRS_RUN = [0]        # pairs run on two threads in this process (what the tests check)


def overlap_f_b(action, ctx) -> None:
    sched = ctx.schedule_ref
    fwd, bwd = action.sub_actions
    stages = {s.stage_index: s for s in sched._stages}
    if fwd.stage_index == bwd.stage_index:        # one stage's own state: not from two threads
        _forward(sched, stages, fwd, ctx)
        _backward(sched, stages, bwd)
        return
    errors: list[BaseException] = []

    def forward():
        try:
            _forward(sched, stages, fwd, ctx)
        except BaseException as e:              # noqa: BLE001 - re-raised on the calling thread
            errors.append(e)

    thread = threading.Thread(target=forward, name="fewchips-dualpipe-forward")
    thread.start()
    PAIRS_RUN[0] += 1
    try:
        _backward(sched, stages, bwd)
    finally:
        thread.join()
    if errors:
        raise errors[0]


def _wait(ops) -> None:
    from torch.distributed.pipelining.schedules import _wait_batch_p2p
    _wait_batch_p2p(ops)


def _forward(sched, stages, action, ctx) -> None:
    """torch's FORWARD action."""
    s, mb = action.stage_index, action.microbatch_index
    stage = stages[s]
    sched._assert_unsharded(stage)
    if not stage.is_first and s - 1 not in stages:          # input from another rank
        _wait(sched.fwd_recv_ops.pop((s, mb)))
    out = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=True)
    sched._maybe_compute_loss(stage, out, ctx.target_mbs, mb)
    if s + 1 in stages:                                     # the V's next chunk is on this rank
        stages[s + 1].set_local_fwd_input(out, mb)


def _backward(sched, stages, action) -> None:
    """torch's FULL_BACKWARD action."""
    s, mb = action.stage_index, action.microbatch_index
    stage = stages[s]
    sched._assert_unsharded(stage)
    if not stage.is_last and s + 1 not in stages:           # gradient from another rank
        _wait(sched.bwd_recv_ops.pop((s, mb)))
    loss = sched._maybe_get_loss(stage, mb)
    sched.backward_counter[s] += 1
    last = sched.backward_counter[s] == sched._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if s - 1 in stages:                                     # the V's previous chunk is on this rank
        stages[s - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)
