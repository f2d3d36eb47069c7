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
chunks of a V on one rank. It uses torch 2.13's internal names (`fwd_recv_ops`, `bwd_recv_ops`,
`backward_counter`, `_maybe_compute_loss`, `_maybe_get_loss`, `_assert_unsharded`);
`tests/test_parallel*.py` run it against one process.
"""

from __future__ import annotations

import threading

from torch.distributed.pipelining.schedules import OVERLAP_F_B, _wait_batch_p2p


def register(schedule) -> None:
    """Run the schedule's OVERLAP_F_B pairs concurrently."""
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


def _forward(sched, stages, action, ctx) -> None:
    """torch's FORWARD action."""
    s, mb = action.stage_index, action.microbatch_index
    stage = stages[s]
    sched._assert_unsharded(stage)
    if not stage.is_first and s - 1 not in stages:          # input from another rank
        _wait_batch_p2p(sched.fwd_recv_ops.pop((s, mb)))
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
        _wait_batch_p2p(sched.bwd_recv_ops.pop((s, mb)))
    loss = sched._maybe_get_loss(stage, mb)
    sched.backward_counter[s] += 1
    last = sched.backward_counter[s] == sched._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if s - 1 in stages:                                     # the V's previous chunk is on this rank
        stages[s - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)
