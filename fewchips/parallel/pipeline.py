"""Pipeline parallelism with `torch.distributed.pipelining` (DeepSeek-V3 trained with 16-way DualPipe,
arXiv 2412.19437 §3.2.1): the model cut into stages of contiguous decoder layers, one schedule from
torch (DualPipeV by default; 1F1B, interleaved 1F1B, ZBV), no scheduler of our own.

Stages take and return tensors only:

    first stage   window                         -> (h, window, balance)
    middle        (h, window, balance)           -> (h, window, balance)
    last stage    (h, window, balance)           -> per row [mb, 3]: summed main CE, summed MTP CE, balance share

`window` (`Batch.window`: ids [mb, T+1], or every field of packed chats [mb, 4, T+1]: targets, samples,
positions) rides along to the last stage, which needs it for the targets and the MTP module's token
inputs; `balance` accumulates the layers' sequence-wise balance terms, so its gradient flows back
through every stage to every router. The last stage computes the trainer's per-row losses
(`losses.head_row_losses`), and torch's loss function (`PipelineLoss`) divides them by the per-row
counts the schedule hands it as the micro-batch's `target`: next-token CE + λ·MTP + α·balance, so
that a step's sum over micro-batches is one process's loss whatever the rows hold. Expert
loads are not differentiable: each stage adds them to `loads_LE` (a row per MoE layer of the whole
model), and the trainer sums them over pipeline ranks before the bias update, so every rank applies
the update one process would.

Placement. With DualPipeV each rank holds two stages in a V (rank r: stages r and 2·pp−1−r), so the
first stage (embedding) and the last (head, MTP) share a rank and share the embedding module itself:
its gradient from both accumulates in one tensor, as the report places them. With one stage per rank
(1F1B) the first and last stages sit on two ranks, each using its own replica of the embedding for
its inputs (tokens; the MTP module's tokens), and the two replicas' gradients are summed
(`tie_embeddings`) so they take identical steps.

The trainer cuts the model while it is still on the meta device: every rank keeps the parameters of
its own stages and releases the others (new meta tensors: no gradient, no optimizer state), then
materialises only its stages. (A model built for real works too: the released ones are freed.)
`Pipeline.owned` names what this rank keeps up to date and writes to a checkpoint. Inside a stage the
dp x ep ranks shard it as a model without a pipeline is (`shard_stages_over_data_ranks`). Evaluation
runs through the pipeline too (`Pipeline.evaluate`, forward only), and the export streams each tensor
to rank 0 from the rank that holds it, so no rank ever needs the weights of another's stages. Under DualPipeV the paired
forward and backward chunks can run on two threads (`parallel.overlap`).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining as P
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..model import DeepseekV3, MoE, MoEStats
from ..stages import V_SCHEDULES, balanced_split, layer_costs, split_layers, stage_ranks, stages_per_rank
from ..losses import Batch, head_row_losses
from .expert_parallel import apply_expert_parallel, expert_modules
from .fsdp import shard_blocks
from .overlap import register

SCHEDULES = {"dualpipev": "ScheduleDualPipeV", "1f1b": "Schedule1F1B", "interleaved1f1b": "ScheduleInterleaved1F1B",
             "zbv": "ScheduleZBVZeroBubble"}


class Stage(nn.Module):
    """One stage of the model. Holds references to the model's modules (no copies), so parameter
    objects stay shared where the placement shares them."""

    def __init__(self, model: DeepseekV3, layers: range, first: bool, last: bool, router_rows: dict[int, int],
                 amp: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.first, self.last = model.config, first, last
        self.layer_ids = list(layers)
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.rotary = model.rotary
        self.router_rows = router_rows                     # layer index -> row of loads_LE
        self.amp = amp                                      # autocast dtype (None: off)
        if first or last:
            self.embed_tokens = model.model.embed_tokens
        if last:
            self.norm, self.lm_head, self.mtp = model.model.norm, model.lm_head, model.mtp
            # the model itself, for the trainer's loss (`head_row_losses`); not registered as a submodule,
            # which would make every parameter of the model this stage's
            object.__setattr__(self, "whole", model)
        self.loads_LE: torch.Tensor | None = None          # set by the trainer before each step
        self.mtp_lambda = 0.3                               # 0: the MTP module is not run

    def forward(self, *inputs):
        device = inputs[0].device
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self._forward(*inputs)

    def _forward(self, *inputs):
        if self.first:
            (window,) = inputs
            batch = Batch.from_window(window)
            h = self.embed_tokens(batch.ids[:, :-1])
            balance = torch.zeros((), device=window.device)
        else:
            h, window, balance = inputs
            batch = Batch.from_window(window)
        ids = batch.ids
        T = ids.shape[1] - 1
        positions = batch.position[:, :-1] if batch.position is not None else \
            torch.arange(T, device=ids.device).expand(ids.shape[0], T)
        segments = batch.segment[:, :-1] if batch.segment is not None else None
        cos, sin = self.rotary(positions)
        load_mask = batch.load_mask()                  # padding routes but does not count in the loads
        for i, layer in zip(self.layer_ids, self.layers):
            h, stats = layer(h, cos, sin, segments=segments, with_stats=True, load_mask=load_mask)
            balance = self._add_stats(balance, stats, i)
        if not self.last:
            return h, window, balance
        return self._rows(h, batch, balance)

    def _add_stats(self, balance, stats, layer: int):
        """The layer's balance term joins the differentiable sum; its loads (no grad) go to its row."""
        if stats is None:                                   # a dense layer
            return balance
        if self.loads_LE is not None:
            self.loads_LE[self.router_rows[layer]] += stats.load
        return balance + stats.seq_balance.float()

    def _rows(self, h, batch: Batch, balance):
        """[mb, 3] per row: the summed main CE and MTP CE (`head_row_losses` after the final norm, as
        `compute_losses` does) and 1/mb of the micro-batch's balance term; `PipelineLoss` weighs them."""
        h = self.norm(h)
        main_B, mtp_B, stats = head_row_losses(self.whole, h, batch, self.mtp_lambda)
        mtp_moe = [i for i in range(self.cfg.num_hidden_layers, self.cfg.num_hidden_layers + len(self.mtp))
                   if i in self.router_rows]
        for j, layer in enumerate(mtp_moe[:len(stats.load)]):
            balance = self._add_stats(balance, MoEStats(stats.load[j], stats.seq_balance[j]), layer)
        B = main_B.shape[0]
        return torch.stack([main_B, mtp_B, (balance / B).expand(B)], dim=1)


class PipelineLoss:
    """torch's loss function on the last stage: the micro-batch's per-row losses [mb, 3] and the counts
    its rows are divided by [mb] (the schedule splits the step's `target` like its inputs) ->
    Σ main/count + λ·Σ MTP/count + α·balance / n_microbatches. Keeps each micro-batch's three terms."""

    def __init__(self, n_microbatches: int, mtp_lambda: float = 0.3, balance_alpha: float = 1e-4):
        self.n_microbatches, self.mtp_lambda, self.balance_alpha = n_microbatches, mtp_lambda, balance_alpha
        self.parts: list[torch.Tensor] = []

    def __call__(self, rows_B3, count_B):
        main = (rows_B3[:, 0] / count_B).sum()
        mtp = (rows_B3[:, 1] / count_B).sum()
        balance = rows_B3[:, 2].sum() / self.n_microbatches
        self.parts.append(torch.stack([main, mtp, balance]).detach())
        return main + self.mtp_lambda * mtp + self.balance_alpha * balance


def router_rows(model: DeepseekV3) -> dict[int, int]:
    """Layer index (MTP layers after the main ones) -> its row in loads_LE, in the trainer's router order."""
    layers = [*model.model.layers, *model.mtp]
    rows, r = {}, 0
    for i, layer in enumerate(layers):
        if isinstance(layer.mlp, MoE):
            rows[i] = r
            r += 1
    return rows


def build_pipeline(model: DeepseekV3, pp_group, microbatch: tuple, schedule: str = "dualpipev",
                   n_microbatches: int = 4, device="cpu", amp: torch.dtype | None = None,
                   pipelines: list[list[int]] | None = None, balance: bool = True, prepare=None,
                   loss_fn: PipelineLoss | None = None):
    """This rank's stages and torch's schedule over them, for micro-batches of `microbatch` = (rows, *window).
    Returns (schedule, local Stage modules, tie group or None, their torch PipelineStages); the
    arguments are described in docs/parallel.md ("build_pipeline")."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    pp, rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    n_stages = pp * stages_per_rank(schedule)
    if schedule in V_SCHEDULES + ("interleaved1f1b",) and n_microbatches < n_stages:
        raise ValueError(f"--pp-schedule {schedule} needs at least {n_stages} micro-batches (--microbatches), "
                         f"got {n_microbatches}")
    owners = stage_ranks(pp, n_stages, schedule)
    if n_stages > model.config.num_hidden_layers:
        split_layers(model.config.num_hidden_layers, n_stages)          # raises the clear error
    mb, window = microbatch[0], tuple(microbatch[1:])
    T = window[-1] - 1
    runs = balanced_split(*layer_costs(model.config, T), owners) if balance else \
        split_layers(model.config.num_hidden_layers, n_stages)
    rows = router_rows(model)
    dtype = next(model.parameters()).dtype
    ids = torch.zeros(mb, *window, dtype=torch.long, device=device)
    # examples: what requires grad here is what carries a gradient between stages (h, balance; not ids)
    hidden = (torch.zeros(mb, T, model.config.hidden_size, dtype=dtype, device=device, requires_grad=True),
              ids, torch.zeros((), device=device, requires_grad=True))
    per_row = torch.zeros(mb, 3, device=device, requires_grad=True)
    stages = []
    mine = [s for s in range(n_stages) if owners[s] == rank]
    modules = [Stage(model, runs[s], s == 0, s == n_stages - 1, rows, amp) for s in mine]
    for s, mod in zip(mine, modules):
        mod.index = s
    if prepare is not None:
        prepare(modules)
    for s, mod in zip(mine, modules):
        inputs = (ids,) if s == 0 else hidden
        outputs = per_row if s == n_stages - 1 else hidden
        stages.append(P.PipelineStage(mod, s, n_stages, torch.device(device), input_args=inputs, output_args=outputs,
                                      group=pp_group))
    sched = make_schedule(stages, schedule, n_microbatches, loss_fn or PipelineLoss(n_microbatches))
    tie = None
    first_rank, last_rank = owners[0], owners[-1]
    if first_rank != last_rank:
        mine = [dist.get_global_rank(pp_group, r) for r in range(pp)]
        for ranks in pipelines or [mine]:
            group = dist.new_group([ranks[first_rank], ranks[last_rank]])
            if ranks == mine:
                tie = group
    return sched, modules, tie, stages


def shard_stages_over_data_ranks(stages: list[Stage], par, amp: torch.dtype | None = None):
    """Inside each pipeline stage, as without a pipeline (`apply_expert_parallel`, `apply_fsdp`): routed
    experts split over ep and FSDP-sharded over dp; every decoder and MTP layer, the final norm and the
    head FSDP-sharded over the stage's dp x ep ranks. Each Stage module becomes an FSDP root, which is
    how torch's pipeline schedules see it: gradients accumulate unreduced over the micro-batches and are
    reduce-scattered once, after the last backward. The embedding stays whole (its gradient averaged
    by `Pipeline._reduce_grads`): under V schedules it serves two stages, that is two FSDP roots, and
    under 1F1B its two replicas are tied by an all-reduce."""
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # Weights stay gathered from a stage's first forward to the end of the step (ZeRO-2, as torchtitan
    # does under a pipeline): the micro-batches do not all-gather them again, and the split weight
    # backward of the V and zero-bubble schedules finds the gathered parameters it differentiates.
    kw = dict(mesh=par.fsdp_mesh, mp_policy=mp, reshard_after_forward=False)
    for m in stages:
        apply_expert_parallel(m, par)
    for m in stages:
        others = [m.norm] + ([m.lm_head] if m.lm_head.weight is not m.embed_tokens.weight else []) if m.last else []
        shard_blocks(m, m.layers, m.mtp if m.last else [], others, par, kw)
        embed = {m.embed_tokens.weight} if hasattr(m, "embed_tokens") else set()
        fully_shard(m, **kw, ignored_params=embed)


def make_schedule(stages, schedule: str, n_microbatches: int, loss_fn: PipelineLoss):
    """torch's schedule over this rank's PipelineStages (a new one when the number of micro-batches
    changes: the stages are reused)."""
    cls = getattr(P, SCHEDULES[schedule])
    return cls(stages if len(stages) > 1 else stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
               scale_grads=False)


def tie_embeddings(modules: list[Stage], tie_group):
    """Sum the embedding gradient of the first stage (token inputs) and of the last stage's replica (MTP
    inputs) on both ranks, so the two replicas take the same optimizer step and stay equal."""
    if tie_group is None:
        return
    for m in modules:
        if m.first or m.last:
            w = m.embed_tokens.weight
            if w.grad is None:                                  # unused on this rank this step (no MTP loss)
                w.grad = torch.zeros_like(w)
            dist.all_reduce(w.grad, group=tie_group)
            return


class Pipeline:
    """This rank's part of a pipeline-parallel model, as the trainer drives it: one optimizer step's
    forward and backward over all micro-batches, gradients reduced over the stage's dp x ep ranks, the
    loss parts every rank logs, Σ g² over all stages (for the trainer's clip), evaluation through the
    pipeline, and the weights this rank owns (for checkpoints); the other stages' weights are released.

    Inside a stage, with dp x ep > 1, each rank runs its 1/(dp x ep) of every micro-batch, and the stage
    is sharded as a model without a pipeline is (`shard_stages_over_data_ranks`): experts over ep and
    then dp, everything else but the embedding FSDP over the stage's dp x ep ranks."""

    def __init__(self, model: DeepseekV3, par, rows: int, window, schedule: str = "dualpipev",
                 n_microbatches: int = 4, amp: torch.dtype | None = None, overlap: bool = True):
        """window: the shape of one row of `Batch.window` (T + 1, or (4, T + 1) for packed chats).
        overlap: under DualPipeV, run each paired forward and backward chunk concurrently
        (`parallel.overlap`); off with activation checkpointing, whose recomputation would issue
        forward all-to-alls from the backward's thread."""
        self.model, self.par, self.group, self.device = model, par, par.pp_group, par.device
        self.n_microbatches, self.schedule = n_microbatches, schedule

        def shard_stages(stages):
            if par.data_size > 1:
                shard_stages_over_data_ranks(stages, par, amp)

        self.owners = stage_ranks(dist.get_world_size(self.group), dist.get_world_size(self.group) *
                                  stages_per_rank(schedule), schedule)
        self.loss = PipelineLoss(n_microbatches)
        window = (window,) if isinstance(window, int) else tuple(window)
        self.sched, self.stages, self.tie, self.pipeline_stages = build_pipeline(
            model, self.group, (rows, *window), schedule, n_microbatches, par.device, amp, par.pipelines(),
            prepare=shard_stages, loss_fn=self.loss)
        self.holds_first = any(m.first for m in self.stages)
        self.holds_last = any(m.last for m in self.stages)
        local = {id(t) for m in self.stages for t in [*m.parameters(), *m.buffers()]}
        self.owned = {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in local}
        self.release_others(local)
        self.overlapped = overlap and schedule == "dualpipev"
        if self.overlapped:
            self._backward_groups()
            register(self.sched)

    def set_microbatches(self, n: int):
        """Run the next steps with n micro-batches of the same shape (a batch-size ramp): a new torch
        schedule over the same stages."""
        if n == self.n_microbatches:
            return
        self.sched = make_schedule(self.pipeline_stages, self.schedule, n, self.loss)
        if self.overlapped:
            register(self.sched)
        self.n_microbatches = self.loss.n_microbatches = n

    def _backward_groups(self):
        """A second process group per expert-parallel group, for the all-to-alls of the backward, so a
        forward and a backward running on two threads each keep their collectives in one order.
        Collective: every rank creates every group."""
        if self.par.data_size == 1:
            return                                  # no expert exchange inside the stages
        grid = self.par.full_mesh.mesh              # [pp, dp, ep] global ranks
        mine = None
        for ranks in grid.reshape(-1, grid.shape[-1]).tolist():
            g = dist.new_group(ranks)
            if self.par.rank in ranks:
                mine = g
        for m in self.stages:
            for experts in expert_modules(m):
                experts.backward_group = mine

    def step(self, window: torch.Tensor, counts: torch.Tensor, mtp_lambda: float, balance_alpha: float,
             loads_LE: torch.Tensor) -> torch.Tensor:
        """Forward and backward of this rank's rows `window` [rows x n_microbatches, ...] (`Batch.window`;
        the first stage reads them, the last its targets), each row's summed losses divided by `counts`
        [rows x n_microbatches], then the gradient reduction over the stage's ranks. Adds this rank's MoE
        loads to `loads_LE`. Returns [main CE, MTP CE, balance] of the step, the same on every rank."""
        for m in self.stages:
            m.loads_LE, m.mtp_lambda = loads_LE, mtp_lambda
        self.loss.mtp_lambda, self.loss.balance_alpha, self.loss.parts = mtp_lambda, balance_alpha, []
        args = (window,) if self.holds_first else ()
        kwargs = {"target": counts} if self.holds_last else {}
        with warnings.catch_warnings():
            # the split weight backward leaves some gradients transposed (the trainer lays them out
            # like their parameters before the optimizer reads them)
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            self.sched.step(*args, **kwargs)
        tie_embeddings(self.stages, self.tie)
        self._reduce_grads()
        parts = torch.stack(self.loss.parts).sum(0) if self.loss.parts else torch.zeros(3, device=self.device)
        dist.all_reduce(parts)              # only the last stage's ranks add anything, their shares of each term
        return parts / self.par.data_size

    @torch.no_grad()
    def _reduce_grads(self):
        """Gradients of the mean loss over the stage's dp x ep ranks (each rank's loss is its own rows'
        mean). FSDP has reduce-scattered the sharded weights at the last backward (the schedule calls
        its post-backward); the embedding, kept whole, is averaged here."""
        par = self.par
        if par.data_size == 1:
            return
        for p in self.local_params():            # the same order on every rank of the stage
            if isinstance(p, DTensor):
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=par.data_group)
            p.grad.div_(par.data_size)

    def grad_norm_sq(self) -> torch.Tensor:
        """Σ g² over every stage's gradients (each element counted once), the same on every rank. A tied
        embedding counts on the first stage's rank only."""
        skip = () if self.holds_first else (id(self.model.model.embed_tokens.weight),)
        sq = []
        for p in self.local_params():
            if p.grad is None or id(p) in skip:
                continue
            if isinstance(p.grad, DTensor):          # FSDP-sharded over the stage's ranks: each element once
                sq.append(p.grad.to_local().float().pow(2).sum())
            else:                                    # the embedding, whole on the stage's dp x ep ranks
                sq.append(p.grad.float().pow(2).sum() / self.par.data_size)
        total = torch.stack(sq).sum() if sq else torch.zeros((), device=self.device)
        dist.all_reduce(total)
        return total

    def local_params(self) -> list[nn.Parameter]:
        """This rank's parameters, each once."""
        seen, out = set(), []
        for m in self.stages:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    @torch.no_grad()
    def release_others(self, local: set[int]):
        """Every parameter outside this rank's stages becomes a meta tensor of the same shape (the
        module tree and names stay whole): no memory, no gradient, no optimizer state."""
        for module in self.model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) not in local:
                    setattr(module, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    def parameter_counts(self) -> tuple[int, int]:
        """(parameter elements in this rank's memory: its stages, and only its shards of them; elements
        of the whole model)."""
        held = sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                   for p in self.model.parameters() if not p.is_meta)
        return held, sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def evaluate(self, window: torch.Tensor) -> torch.Tensor:
        """Forward only of the windows [N, ...] (`Batch.window`, the same on every rank of this pipeline):
        each row's next-token CE summed over its scored targets [N], the same on every rank of the
        pipeline. The stages run in order, each on the rank that holds it, the hidden states going point
        to point to the next stage's rank; no micro-batches, no backward. (torch's `schedule.eval` cannot
        serve here: DualPipeV's action list has backward steps even in eval.)"""
        me = dist.get_rank(self.group)
        mine = {m.index: m for m in self.stages}
        owners, h, rows = self.owners, None, torch.zeros(window.shape[0], device=self.device)
        T = window.shape[-1] - 1
        zero = torch.zeros((), device=self.device)
        for s, owner in enumerate(owners):
            if owner != me:
                continue
            if s > 0 and owners[s - 1] != me:
                h = torch.empty(window.shape[0], T, self.model.config.hidden_size, device=self.device)
                dist.recv(h, group=self.group, group_src=owners[s - 1])
            m = mine[s]
            m.loads_LE = None
            if m.last:
                lam, m.mtp_lambda = m.mtp_lambda, 0.0                    # the main CE only
                out = m(h, window, zero) if s > 0 else m(window)
                m.mtp_lambda, rows = lam, out[:, 0].float().contiguous()
                break
            h = (m(window) if s == 0 else m(h, window, zero))[0].float()
            if owners[s + 1] != me:
                dist.send(h.contiguous(), group=self.group, group_dst=owners[s + 1])
        dist.all_reduce(rows, group=self.group)               # only the last stage's rank adds anything
        return rows
