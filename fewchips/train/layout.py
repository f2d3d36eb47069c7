"""Where the model lives, as a part the trainer holds: one process (`Layout`), routed experts split over
ep and everything else FSDP2-sharded (`Sharded`), or pipeline stages with both inside (`Pipelined`).
The trainer's loop is the same for all three; a layout decides

    placement      the meta model put on its ranks, then only what this process holds allocated and
                   filled (a layout-free initialisation, or a sharded read of a checkpoint)
    the step       each micro-batch's rows on this process, the loss normalised so that N processes
                   give the gradient of one, gradient sync, Σ g² for the clip, the loads of the bias update
    evaluation     the validation rows split over the processes (or through the pipeline)
    checkpoints    one Hugging Face directory in one process; torch.distributed.checkpoint shards
                   (resumable at any other layout) otherwise, and a streamed export by rank 0

With several processes `--batch-size` stays the global micro-batch: every rank draws the same windows
and trains on its 1/N slice, so a run's data, losses and resume point do not depend on the layout.
Rank 0 prepares the data (tokenizer, shards) and writes logs, metrics and plots.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from datetime import timedelta

import torch
import torch.distributed as dist

from ..checkpoint import sharded as pckpt
from ..checkpoint.hf_format import save_pretrained
from ..checkpoint.load import CheckpointError, CheckpointReader, load_weights
from ..files import swap_dir, temp_dir_beside
from ..losses import FIELDS, Batch, bits_per_byte, compute_losses, evaluate
from ..parallel import abort_on_failure, grad_norm_sq, init_parallel, parallelize
from ..parallel.fsdp import gather_once, set_gradient_sync
from ..parallel.overlap import check_torch
from ..parallel.pipeline import Pipeline
from ..parallel.shards import held_rows
from ..stages import stages_per_rank
from .config import TrainConfig, TrainError
from .prepare import Solo

EMA_FILE = "ema.safetensors"           # a one-process checkpoint's parameter EMA (HF names, fp32)


def make_layout(tc: TrainConfig, device="cpu") -> "Layout":
    """One process unless the run is distributed (a layout flag, or torchrun's WORLD_SIZE > 1)."""
    if tc.pp == 1:
        given = [f for f, v, default in (("--pp-schedule", tc.pp_schedule, "dualpipev"),
                                         ("--microbatches", tc.microbatches, None),
                                         ("--pp-overlap", tc.pp_overlap, "auto"))
                 if v != default]
        if given:
            raise TrainError(f"{', '.join(given)} set the pipeline of --pp N (N > 1), which this run does not have",
                             every_rank=True)
    if not tc.distributed:
        return Layout(device)
    try:
        par = init_parallel(dp=tc.dp, ep=tc.ep, timeout_s=tc.timeout_s, pp=tc.pp)
    except ValueError as e:
        raise TrainError(str(e), every_rank=True) from None
    return Pipelined(par, tc) if tc.pp > 1 else Sharded(par, tc)


class Layout:
    """One process holding the whole model."""

    is_main = True
    data_size = 1                      # processes that split each micro-batch's rows

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def describe(self) -> str | None:
        """One line about the layout for the log (None: nothing to say)."""
        return None

    def holdings(self) -> str | None:
        """What this process holds of the model, for the log, once it is materialised."""
        return None

    def main_first(self, main, rest=None):
        """Setup that rank 0 does first (OUT checks) and the others then repeat or read."""
        return main()

    def team(self):
        """The processes that prepare data together (rank, size, barrier, all_gather)."""
        return Solo()

    # ---- placement -----------------------------------------------------------------------------
    def place(self, model, tc: TrainConfig, amp, packed: bool = False):
        """The meta model on this process's devices and ranks (`packed`: batches carry every Batch field)."""
        return model

    def materialise(self, model):
        """Allocate (uninitialised) what this process holds."""
        model.to_empty(device=self.device)
        model.tie_weights()

    rows = None                        # `init_weights`/`load_weights` hook: None = every row

    def fill(self, model, tc: TrainConfig):
        """Weights for what this process holds: `--init`'s directory read by slices, else the seeded init."""
        if tc.init:
            try:
                load_weights(model, CheckpointReader(tc.init, mtp=model.config.num_nextn_predict_layers > 0), self.rows)
            except CheckpointError as e:
                raise TrainError(f"--init: {e}") from None
        else:
            model.init_weights(tc.init_std, seed=tc.seed, rows=self.rows)

    # ---- the step ------------------------------------------------------------------------------
    def forward_backward(self, model, batches: list[Batch], lam: float, alpha: float, loads_LE, amp):
        """Forward and backward of one optimizer step's micro-batches, gradients accumulated; adds the MoE
        loads to `loads_LE`. Returns the step's (main, MTP, balance) losses and whether the loss was finite
        (a non-finite micro-batch ends the step). CE and MTP are means over every scored target of the
        step (so a micro-batch of short samples weighs by its tokens, not as much as a long one); the
        balance term is the mean over micro-batches of their means over sequences."""
        n, count = len(batches), max(sum(b.target_count() for b in batches), 1)
        tot = [0.0, 0.0, 0.0]
        for i, batch in enumerate(batches):
            self.sync_gradients(model, i == n - 1)
            local, share = self.split(batch, count)
            main, mtp, bal, stats = compute_losses(model, local.to(self.device), lam, amp, share)
            main, mtp, bal = (self.global_value(t) for t in (main, mtp, bal))
            loss = main + lam * mtp + alpha * bal / n
            if not torch.isfinite(loss):
                return (*tot, False)
            loss.backward()
            loads_LE[:len(stats.load)] += stats.load
            for k, t in enumerate((main, mtp, bal / n)):
                tot[k] += t.item()
        return (*tot, True)

    def my_rows(self, n: int) -> slice:
        """This process's rows of n (n divisible by the processes that split a batch)."""
        return slice(0, n)

    def split(self, batch: Batch, count: int):
        """This process's rows of a micro-batch and the count its summed CE is divided by (`count`: the
        step's scored targets)."""
        return batch, count

    def global_value(self, t):
        return t

    def sync_gradients(self, model, last_micro_batch: bool):
        """Before each micro-batch's backward: whether its gradients are reduced over ranks now."""

    def grad_norm_sq(self, model):
        """Σ g² over the whole model when this process holds part of it (None: compute it locally)."""
        return None

    def reduce_loads(self, loads_LE):
        """The expert loads of the whole step, summed over the processes that routed its tokens."""
        return loads_LE

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def any_rank(self, flag: bool) -> bool:
        """Whether any process says so (every rank stops after the same step)."""
        return flag

    def evaluate(self, model, data, batch_size: int, amp) -> dict:
        return evaluate(model, data.val_batches(batch_size), data.val_bytes, amp, self.device)

    # ---- checkpoints ---------------------------------------------------------------------------
    def owned(self) -> set[str] | None:
        """The names this process keeps up to date (None: every tensor it holds)."""
        return None

    def save_checkpoint(self, ckpt_dir: str, model, opt, state: dict, write_files, ema=None):
        """OUT/checkpoint as a Hugging Face directory plus train_state.pt (with the optimizer) and the
        parameter EMA as ema.safetensors; written beside it and swapped in by renames, the one before
        kept as checkpoint.old."""
        from safetensors.torch import save_file
        tmp = temp_dir_beside(ckpt_dir)
        try:
            save_pretrained(model, tmp)
            write_files(tmp)
            if ema is not None:
                save_file(ema.state_dict(), os.path.join(tmp, EMA_FILE))
            torch.save({**state, "optimizer": opt.state_dict()}, os.path.join(tmp, "train_state.pt"))
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_dir(tmp, ckpt_dir, keep_previous=True)

    def load_checkpoint(self, path: str, model, opt, st: dict):
        """Model weights and optimizer state of a one-process checkpoint (a Hugging Face directory)."""
        if os.path.exists(os.path.join(path, ".metadata")):
            raise TrainError(f"--resume: {path} holds a sharded checkpoint from a torchrun run; resume it with "
                             f"torchrun (any number of processes), or in one process with --dp 1")
        load_weights(model, CheckpointReader(path))
        opt.load_state_dict(st["optimizer"])

    def load_ema(self, path: str, ema, updates: int):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            ema.load_state_dict(load_file(os.path.join(path, EMA_FILE)), updates)
        except (OSError, SafetensorError, KeyError) as e:
            raise TrainError(f"--resume: the EMA in {path}/{EMA_FILE} cannot be read ({e})") from None

    def export(self, model, out: str, write_files):
        """The final model in OUT itself: config.json, safetensors, tokenizer files."""
        save_pretrained(model, out)
        write_files(out)

    def guard(self, what: str):
        return contextlib.nullcontext()


class GlooTeam:
    """Every rank preparing data together, meeting on a gloo group with a long timeout (one rank may
    tokenise far longer than a collective's usual wait)."""

    def __init__(self, group):
        self.group, self.rank, self.size = group, dist.get_rank(), dist.get_world_size()
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.size))

    def barrier(self):
        dist.barrier(group=self.group)

    def all_gather(self, obj) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class Sharded(Layout):
    """Routed experts split over --ep ranks (whole experts per rank, FSDP-sharded again over dp),
    everything else FSDP2-sharded over all ranks; losses averaged over ranks (the values logged are the
    global ones), expert loads summed before the bias update, torch.distributed.checkpoint shards."""

    def __init__(self, par, tc: TrainConfig):
        self.par, self.tc = par, tc
        self.device = par.device
        self.data_size = par.data_size
        # data preparation and big checkpoints can keep rank 0 busy far longer than a collective's timeout
        self.slow_group = dist.new_group(backend="gloo", timeout=timedelta(hours=3))
        if tc.pp == 1 and tc.batch_size % par.data_size:
            raise TrainError(f"--batch-size {tc.batch_size} (the global micro-batch) must be divisible by the "
                             f"{par.data_size} processes (dp x ep)", every_rank=True)

    @property
    def is_main(self):
        return self.par.is_main

    def describe(self) -> str:
        par = self.par
        return (f"parallel: {par.world_size} processes, dp {par.dp} x ep {par.ep} "
                f"({self.experts_per_rank} experts per rank), {par.device.type}")

    def main_first(self, main, rest=None):
        err, value = None, None
        if self.par.is_main:
            try:
                value = main()
            except Exception as e:   # noqa: BLE001 - re-raised below, on every rank
                err = e
        msg = [f"{type(err).__name__}: {err}" if err else None]
        dist.broadcast_object_list(msg, src=0, group=self.slow_group)
        if err is not None:
            raise err
        if msg[0]:
            raise TrainError(f"rank 0 could not set up the run: {msg[0]}", every_rank=True)   # rank 0 says it
        return value if self.par.is_main else (rest or main)()

    def team(self):
        return GlooTeam(self.slow_group)

    def place(self, model, tc: TrainConfig, amp, packed: bool = False):
        """Under bf16 autocast FSDP all-gathers the weights in bf16 (half the traffic) while master
        weights, gradient reduction and optimizer state stay fp32."""
        self.experts_per_rank = model.config.n_routed_experts // self.par.ep
        try:
            return parallelize(model, self.par, param_dtype=amp)
        except ValueError as e:
            raise TrainError(str(e), every_rank=True) from None

    def materialise(self, model):
        model.to_empty(device=self.device)            # FSDP swaps in each rank's shards

    @staticmethod
    def rows(name, t):
        return held_rows(name, t)

    def fill(self, model, tc: TrainConfig):
        super().fill(model, tc)
        gather_once(model)

    def split(self, batch: Batch, count: int):
        """Rows [r·B/N, (r+1)·B/N) on rank r; the summed CE divided by 1/N of the step's count, so that
        FSDP's mean over ranks is the gradient of one process's mean over all scored targets (packed
        chats: ranks' slices hold different numbers of targets)."""
        return batch.rows(self.my_rows(batch.ids.shape[0])), count / self.par.data_size

    def my_rows(self, n: int) -> slice:
        size, r = self.par.data_size, self.par.data_rank
        if n % size:
            raise TrainError(f"{n} rows cannot be split over {size} processes")
        return slice(r * (n // size), (r + 1) * (n // size))

    def global_value(self, t):
        """The mean over ranks as the value, this rank's term as the gradient (FSDP and the pipeline
        average the gradients), so logs and the finiteness check agree everywhere."""
        avg = t.detach().clone()
        dist.all_reduce(avg)
        return t + (avg / self.par.world_size - t.detach())

    def sync_gradients(self, model, last_micro_batch: bool):
        """FSDP reduce-scatters only after the last micro-batch of a step (the others accumulate unsharded)."""
        set_gradient_sync(model, last_micro_batch)

    def grad_norm_sq(self, model):
        return grad_norm_sq(model, self.par)

    def reduce_loads(self, loads_LE):
        dist.all_reduce(loads_LE)
        return loads_LE

    def sum(self, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    def any_rank(self, flag: bool) -> bool:
        """torchrun forwards SIGTERM and SIGINT to each rank, not at the same instant."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def evaluate(self, model, data, batch_size: int, amp) -> dict:
        """Each rank scores its slice of every validation batch (all of it when a batch does not split)."""
        batches = data.val_batches(batch_size)
        if not all(b.ids.shape[0] % self.par.data_size == 0 for b in batches):
            return evaluate(model, batches, data.val_bytes, amp, self.device)
        local = [b.rows(self.my_rows(b.ids.shape[0])) for b in batches]
        return evaluate(model, local, data.val_bytes, amp, self.device, reduce=self.sum)

    def save_checkpoint(self, ckpt_dir, model, opt, state, write_files, ema=None):
        def with_state(tmp):
            write_files(tmp)
            torch.save(state, os.path.join(tmp, "train_state.pt"))

        pckpt.save(ckpt_dir, model, opt, extra={"step": state["step"]}, before_commit=with_state,
                   group=self.slow_group, owned=self.owned(),
                   tensors={"ema": ema.sharded_state_dict()} if ema is not None else None)

    def load_checkpoint(self, path, model, opt, st):
        """Each rank reads its shards of the weights and optimizer state (any layout wrote them)."""
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise TrainError(f"--resume: {path} is a single-process checkpoint; resume it without torchrun")
        pckpt.load(path, model, opt, owned=self.owned())

    def load_ema(self, path, ema, updates: int):
        """Each rank reads its shards of the average (saved at any layout) into the host copy."""
        try:
            pckpt.load_tensors(path, "ema", ema.sharded_state_dict())
        except (KeyError, RuntimeError, ValueError) as e:
            raise TrainError(f"--resume: the EMA in {path} cannot be read ({e})", every_rank=True) from None
        ema.updates = updates

    def export(self, model, out, write_files):
        """One Hugging Face directory, streamed by rank 0 from the ranks' shards (no rank holds the model)."""
        pckpt.save_hf(model, out, self.device)
        if self.par.is_main:
            write_files(out)
        dist.barrier(group=self.slow_group)

    def guard(self, what: str):
        return abort_on_failure(self.par, what)


class Pipelined(Sharded):
    """--pp: the decoder layers cut into pipeline stages (`parallel.pipeline`), each rank holding only its
    stages, sharded inside as `Sharded` shards a model. A step's global batch (batch size x grad-accum
    rows) runs through torch's schedule as --microbatches micro-batches; the loss is computed on the last
    stage; each rank's MoE loads join one all-reduce before the bias update. Checkpoints hold each
    tensor once, under its single-process name, whichever rank wrote it."""

    def __init__(self, par, tc: TrainConfig):
        super().__init__(par, tc)
        self.pipe = None
        self.microbatches = self._check_pipeline(tc, par)

    def describe(self) -> str:
        par = self.par
        return (f"parallel: {par.world_size} processes, pp {par.pp} ({self.tc.pp_schedule}, {self.microbatches} "
                f"micro-batches) x dp {par.dp} x ep {par.ep} ({self.experts_per_rank} experts per rank), "
                f"{par.device.type}")

    def place(self, model, tc: TrainConfig, amp, packed: bool = False):
        """Every rank keeps only its stages' parameters (the pipeline releases the others, on meta) and
        splits their experts over the stage's ep ranks. DualPipeV's F&B pairs run on two threads where that
        hides the all-to-alls (GPUs); measured 23% slower on 2 CPU cores (benchmarks/RESULTS.md). Never
        with activation checkpointing, whose recomputation issues forward all-to-alls from the backward's
        thread."""
        par = self.par
        self.experts_per_rank = model.config.n_routed_experts // par.ep
        rows = tc.batch_size * tc.grad_accum // (self.microbatches * par.data_size)
        untested = check_torch()
        if untested and tc.pp_overlap == "on":
            raise TrainError(f"--pp-overlap on: {untested}; use --pp-overlap off", every_rank=True)
        overlap = {"on": True, "off": False, "auto": par.device.type == "cuda" and not untested}[tc.pp_overlap]
        if overlap and tc.activation_checkpointing:
            if tc.pp_overlap == "on":
                raise TrainError("--pp-overlap on with --activation-checkpointing: the recomputation would issue "
                                 "forward all-to-alls from the backward's thread; drop one of the two", every_rank=True)
            overlap = False
        window = (len(FIELDS), tc.seq_len + 1) if packed else (tc.seq_len + 1,)
        try:
            self.pipe = Pipeline(model, par, rows, window, tc.pp_schedule, self.microbatches, amp, overlap=overlap)
        except ValueError as e:
            raise TrainError(str(e), every_rank=True) from None
        return model

    def materialise(self, model):
        for stage in self.pipe.stages:               # the released stages stay on meta
            stage.to_empty(device=self.device)

    def holdings(self) -> str:
        held, total = self.pipe.parameter_counts()
        note = "dualpipev: each paired forward and backward chunk runs on two threads (--pp-overlap)\n" \
            if self.pipe.overlapped else ""
        return (f"{note}pipeline rank {dist.get_rank(self.par.pp_group)} holds {held:,} of the model's {total:,} "
                f"parameters (its stages, sharded over the stage's {self.par.data_size} rank(s); the other stages "
                f"are released)")

    @staticmethod
    def _check_pipeline(tc: TrainConfig, par) -> int:
        """The number of pipeline micro-batches per full step (default: --grad-accum, at least the
        stages). Under a batch-size ramp a step of n trainer micro-batches runs n x (that / --grad-accum)
        pipeline micro-batches of the same shape, so that number must be a multiple of --grad-accum and
        the ramp's first step must still feed every stage."""
        schedule = tc.pp_schedule
        n_stages = par.pp * stages_per_rank(schedule)
        m = tc.microbatches or max(tc.grad_accum, n_stages)
        rows, n = tc.batch_size * tc.grad_accum, par.data_size
        if m < 1 or rows % (m * n):
            each = f" x the {n} processes of a stage (dp x ep)" if n > 1 else ""
            raise TrainError(f"--microbatches {m}{each} must divide the step's {rows} sequences "
                             f"(--batch-size {tc.batch_size} x --grad-accum {tc.grad_accum})", every_rank=True)
        if tc.batch_ramp_tokens:
            if m % tc.grad_accum:
                raise TrainError(f"--batch-ramp-tokens with --pp: --microbatches {m} must be a multiple of "
                                 f"--grad-accum {tc.grad_accum} (each micro-batch of the ramp is "
                                 f"{m // tc.grad_accum or 1}+ pipeline micro-batches of one shape)", every_rank=True)
            start = max(1, (tc.batch_size_start or tc.batch_size) // tc.batch_size)     # trainer micro-batches
            first = start * (m // tc.grad_accum)
            if first < n_stages:                  # torch's schedules need a micro-batch for every stage
                need = -(-n_stages // start) * tc.grad_accum
                raise TrainError(f"--batch-ramp-tokens with --pp: the ramp's first step would run {first} pipeline "
                                 f"micro-batch(es), fewer than the {n_stages} stages of --pp-schedule {schedule}; "
                                 f"use --microbatches {need} or a larger --batch-size-start", every_rank=True)
        return m

    def forward_backward(self, model, batches, lam, alpha, loads_LE, amp):
        """The step's rows through the schedule; every row is divided by C / (dp x ep) (C: the step's
        scored targets), so the pipeline's sum over its micro-batches and FSDP's mean over the stage's
        ranks give one process's mean over the step's targets."""
        n_micro = len(batches)
        step = Batch.cat(batches)
        window = self.par.local_batch(step.window())                   # this rank's rows of the step
        counts = torch.full((window.shape[0],), max(step.target_count(), 1) / self.par.data_size)
        self.pipe.set_microbatches(n_micro * self.microbatches // self.tc.grad_accum)   # fewer during a ramp
        main, mtp, bal = self.pipe.step(window.to(self.device), counts.to(self.device), lam, alpha, loads_LE).tolist()
        return main, mtp, bal, all(map(math.isfinite, (main, mtp, bal)))

    def sync_gradients(self, model, last_micro_batch):
        pass                                         # the schedule reduces once, after its last backward

    def grad_norm_sq(self, model):
        return self.pipe.grad_norm_sq()

    def evaluate(self, model, data, batch_size: int, amp) -> dict:
        """The validation windows through the pipeline in steps of the training shapes (the last step
        padded with filler rows that are not counted); the same numbers as one process."""
        batches = data.val_batches(batch_size)
        if not batches:
            return {}
        val = Batch.cat(batches)
        windows, n, count = val.window(), val.ids.shape[0], val.target_count()
        per_step, size = self.tc.batch_size * self.tc.grad_accum, self.par.data_size
        windows = torch.cat([windows, windows[:1].expand((-n) % per_step, *windows.shape[1:])])
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, windows.shape[0], per_step):
            rows = self.pipe.evaluate(self.par.local_batch(windows[start:start + per_step]).to(self.device))
            first = start + self.par.data_rank * (per_step // size)       # this rank's first row in `val`
            total += rows[torch.arange(first, first + rows.shape[0], device=self.device) < n].double().sum()
        if size > 1:
            dist.all_reduce(total, group=self.par.data_group)
        loss = total.item() / max(count, 1)
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss, data.val_bytes / max(count, 1)), "val_tokens": count}

    def owned(self):
        return self.pipe.owned
