"""`fewchips train` on N processes (torchrun): the same Trainer, with the model parallelized
(routed experts split over --ep ranks, everything else FSDP2-sharded over all ranks) and sharded
checkpoints.

    torchrun --nproc_per_node=4 -m fewchips train --preset tiny --out runs/ep --ep 2   # dp = 4 / 2
    torchrun --nproc_per_node=2 -m fewchips train --preset tiny --out runs/pp --pp 2   # DualPipeV

What changes against one process:
  - --batch-size stays the *global* micro-batch: every rank draws the same windows and trains on
    its 1/N slice, so a run's data, loss and resume point do not depend on the number of processes
  - losses are averaged over ranks (the values logged are the global ones), expert gradients are
    reduced over dp, and the gradient norm is the global one
  - the expert loads of the whole step are summed over ranks before the bias update (`step_loads`)
  - OUT/checkpoint holds torch.distributed.checkpoint shards (resumable at another world size) plus
    train_state.pt and the tokenizer; the final model is still exported to OUT as one HF directory
  - rank 0 prepares the data (tokenizer, shards) and writes logs, metrics and plots

With --pp the decoder layers are cut into pipeline stages (`parallel.pipeline`): a step's global batch
(batch size x grad-accum sequences) runs through torch's schedule as --microbatches micro-batches, the
loss is computed on the last stage, and each rank's MoE loads join the same all-reduce before the bias
update. A checkpoint holds each tensor once, under its single-process name, whichever rank wrote it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..checkpoint import save_pretrained
from ..config import ModelConfig
from ..parallel import abort_on_failure, grad_norm_sq, init_parallel, parallelize
from ..parallel import checkpoint as pckpt
from ..parallel.fsdp import set_gradient_sync
from ..parallel.pipeline import Pipeline
from ..stages import stages_per_rank
from .data import bits_per_byte
from .trainer import TrainConfig, Trainer, TrainError, clip_grad_norm, compute_losses


class DistributedTrainer(Trainer):
    def __init__(self, cfg: ModelConfig, tc: TrainConfig, log=print, dp: int | None = None, ep: int = 1,
                 timeout_s: float = 600.0, pp: int = 1, pp_schedule: str = "dualpipev",
                 microbatches: int | None = None, pp_overlap: str = "auto"):
        try:
            self.par = par = init_parallel(dp=dp, ep=ep, timeout_s=timeout_s, pp=pp)
        except ValueError as e:
            raise TrainError(str(e), every_rank=True) from None
        # Data preparation and big checkpoints can keep rank 0 busy far longer than a collective's timeout.
        self.slow_group = dist.new_group(backend="gloo", timeout=timedelta(hours=3))
        if pp == 1 and tc.batch_size % par.data_size:
            raise TrainError(f"--batch-size {tc.batch_size} (the global micro-batch) must be divisible by the "
                             f"{par.data_size} processes of a pipeline stage (dp x ep)", every_rank=True)
        self.pipe, self.microbatches, self.pp_schedule = None, None, pp_schedule
        self.pp_overlap = pp_overlap
        if pp > 1:
            self.microbatches = self._check_pipeline(tc, par, pp_schedule, microbatches)
        if not par.is_main:
            tc = dataclasses.replace(tc, progress=False, plots=False)
            log = _quiet
        super().__init__(cfg, tc, log, device=par.device)      # calls the overrides below
        layout = f"pp {par.pp} ({pp_schedule}, {self.microbatches} micro-batches) x " if pp > 1 else ""
        log(f"parallel: {par.world_size} processes, {layout}dp {par.dp} x ep {par.ep} "
            f"({self.cfg.n_routed_experts // par.ep} experts per rank), {par.device.type}")

    @property
    def is_main(self):
        return self.par.is_main

    def place(self, model):
        """With --pp: every rank keeps only its stages' parameters (the pipeline releases the others)
        and splits their experts over the stage's ep ranks. Without: experts split
        over ep, everything else FSDP2 over all ranks; under bf16 autocast FSDP all-gathers the weights
        in bf16 (half the traffic) while master weights, gradient reduction and optimizer state stay fp32."""
        par, tc = self.par, self.tc
        if par.pp == 1:
            return parallelize(model, par, param_dtype=self.amp)
        rows = tc.batch_size * tc.grad_accum // (self.microbatches * par.data_size)
        # DualPipeV's F&B pairs on two threads: what hides the all-to-alls on GPUs; measured 23% slower on
        # 2 CPU cores (benchmarks/RESULTS.md). Never with activation checkpointing, whose recomputation
        # issues forward all-to-alls from the backward's thread.
        overlap = {"on": True, "off": False, "auto": par.device.type == "cuda"}[self.pp_overlap]
        if overlap and tc.activation_checkpointing:
            if self.pp_overlap == "on":
                raise TrainError("--pp-overlap on with --activation-checkpointing: the recomputation would issue "
                                 "forward all-to-alls from the backward's thread; drop one of the two", every_rank=True)
            overlap = False
        self.pipe = Pipeline(model, par, rows, tc.seq_len + 1, self.pp_schedule, self.microbatches, self.amp,
                             overlap=overlap)
        if self.pipe.overlapped:
            self.log("dualpipev: each paired forward and backward chunk runs on two threads (--pp-overlap)")
        held, total = self.pipe.parameter_counts()
        self.log(f"pipeline rank {dist.get_rank(par.pp_group)} holds {held:,} of the model's {total:,} parameters "
                 f"(its stages, sharded over the stage's {par.data_size} rank(s); the other stages are released)")
        return model

    @staticmethod
    def _check_pipeline(tc: TrainConfig, par, schedule: str, microbatches: int | None) -> int:
        """The number of pipeline micro-batches per full step (default: --grad-accum, at least the
        stages). Under a batch-size ramp a step of n trainer micro-batches runs n x (that / --grad-accum)
        pipeline micro-batches of the same shape, so that number must be a multiple of --grad-accum and
        the ramp's first step must still feed every stage."""
        n_stages = par.pp * stages_per_rank(schedule)
        m = microbatches or max(tc.grad_accum, n_stages)
        rows, n = tc.batch_size * tc.grad_accum, par.data_size
        if m < 1 or rows % (m * n):
            each = f" x the {n} processes of a stage (dp x ep)" if n > 1 else ""
            raise TrainError(f"--microbatches {m}{each} must divide the step's {rows} sequences "
                             f"(--batch-size {tc.batch_size} x --grad-accum {tc.grad_accum})", every_rank=True)
        if tc.batch_ramp_tokens:
            if m % tc.grad_accum:
                raise TrainError(f"--batch-ramp-tokens with --pp: --microbatches {m} must be a multiple of --grad-accum "
                                 f"{tc.grad_accum} (each micro-batch of the ramp is {m // tc.grad_accum or 1}+ pipeline "
                                 f"micro-batches of one shape)", every_rank=True)
            start = max(1, (tc.batch_size_start or tc.batch_size) // tc.batch_size)     # trainer micro-batches
            first = start * (m // tc.grad_accum)
            if first < n_stages:                  # torch's schedules need a micro-batch for every stage
                need = -(-n_stages // start) * tc.grad_accum
                raise TrainError(f"--batch-ramp-tokens with --pp: the ramp's first step would run {first} pipeline "
                                 f"micro-batch(es), fewer than the {n_stages} stages of --pp-schedule {schedule}; "
                                 f"use --microbatches {need} or a larger --batch-size-start", every_rank=True)
        return m

    # ---- setup: rank 0 checks OUT and prepares the data; the others then read its cache ------
    def _check_out_dir(self):
        err = None
        if self.par.is_main:
            try:
                super()._check_out_dir()
                resume = self._resume_dir() if self.tc.resume else None
                self._prepared = self.make_data(self.cfg, resume)          # the others then read its caches
            except Exception as e:   # noqa: BLE001 - re-raised below, on every rank
                err = e
        msg = [f"{type(err).__name__}: {err}" if err else None]
        dist.broadcast_object_list(msg, src=0, group=self.slow_group)
        if err is not None:
            raise err
        if msg[0]:
            raise TrainError(f"rank 0 could not set up the run: {msg[0]}", every_rank=True)   # rank 0 says it

    def make_data(self, cfg, resume_from):
        prepared, self._prepared = getattr(self, "_prepared", None), None
        if prepared is not None and not self.tc.init:        # rank 0's, from _check_out_dir: not twice
            return prepared
        return super().make_data(cfg, resume_from)

    def _reset_metrics(self):
        if self.par.is_main:
            super()._reset_metrics()

    def _write(self, rec: dict):
        if self.par.is_main:
            super()._write(rec)

    # ---- the step hooks ----------------------------------------------------------------------
    def forward_backward(self, n_micro, lam, loads_LE):
        if self.pipe is None:
            return super().forward_backward(n_micro, lam, loads_LE)
        ids = torch.cat([self.data.next_batch(self.tc.batch_size).ids for _ in range(n_micro)]).to(self.device)
        ids = self.par.local_batch(ids)                    # this rank's rows of the step (dp x ep slice)
        self.pipe.set_microbatches(n_micro * self.microbatches // self.tc.grad_accum)   # fewer during a ramp
        main, mtp, bal = self.pipe.step(ids, lam, self.tc.balance_alpha, loads_LE).tolist()
        finite = all(map(math.isfinite, (main, mtp, bal)))
        return main, mtp, bal, finite

    def compute_losses(self, batch, lam):
        B, n, r = batch.ids.shape[0], self.par.data_size, self.par.data_rank
        if B % n:
            raise TrainError(f"a micro-batch of {B} rows cannot be split over {n} processes")
        local = batch.rows(slice(r * (B // n), (r + 1) * (B // n)))
        main, mtp, bal, stats = compute_losses(self.model, local, lam, self.amp)
        return self._global_value(main), self._global_value(mtp), self._global_value(bal), stats

    def _global_value(self, t):
        """The mean over ranks as the value, this rank's term as the gradient (FSDP and
        the pipeline average the gradients), so logs and the finiteness check agree everywhere."""
        avg = t.detach().clone()
        dist.all_reduce(avg)
        return t + (avg / self.par.world_size - t.detach())

    def sync_gradients(self, last_micro_batch: bool):
        """FSDP reduce-scatters the non-expert gradients only after the last micro-batch of a step (the
        others accumulate unsharded), the routed experts' over dp included."""
        set_gradient_sync(self.model, last_micro_batch)

    def clip_grad_norm(self):
        """The trainer's clip with the norm of the whole model: every rank scales its own part."""
        if self.pipe is not None:
            norm_sq = self.pipe.grad_norm_sq()
        else:
            norm_sq = grad_norm_sq(self.model, self.par)
        return clip_grad_norm(self.model, self.opt, self.tc.grad_clip, norm_sq)

    def step_loads(self, loads_LE):
        dist.all_reduce(loads_LE)
        return loads_LE

    def stop_requested(self, signal_name):
        """Every rank stops after the same step: a signal seen by any rank (torchrun forwards SIGTERM and
        SIGINT to each, not at the same instant) stops them all."""
        flag = torch.tensor([0.0 if signal_name is None else 1.0], device=self.par.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def evaluate(self) -> dict:
        """With --pp the validation windows go through the pipeline in steps of the training shapes
        (the last step padded with filler rows that are not counted); the same numbers as one process."""
        if self.pipe is None:
            return super().evaluate()
        batches = self.data.val_batches(self.tc.batch_size)
        if not batches:
            return {}
        val = torch.cat([b.ids for b in batches])
        n, T = val.shape[0], val.shape[1] - 1
        per_step, size = self.tc.batch_size * self.tc.grad_accum, self.par.data_size
        val = torch.cat([val, val[:1].expand((-n) % per_step, -1)])
        total = torch.zeros((), device=self.device)
        for start in range(0, val.shape[0], per_step):
            rows = self.pipe.evaluate(self.par.local_batch(val[start:start + per_step]).to(self.device))
            first = start + self.par.data_rank * (per_step // size)       # this rank's first row in `val`
            total += rows[torch.arange(first, first + rows.shape[0], device=self.device) < n].sum()
        if size > 1:
            dist.all_reduce(total, group=self.par.data_group)
        loss = total.item() / (n * T)
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss, self.data.val_bytes / (n * T)), "val_tokens": n * T}

    def train(self) -> dict:
        with abort_on_failure(self.par, "training"):
            return super().train()

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self):
        state = {k: v for k, v in self.state().items() if k not in ("optimizer", "biases")}
        state["parallel"] = {"pp": self.par.pp, "dp": self.par.dp, "ep": self.par.ep}

        def with_state(tmp):
            self.write_tokenizer(tmp)
            torch.save(state, os.path.join(tmp, "train_state.pt"))

        try:
            pckpt.save(self.ckpt_dir, self.model, self.opt, extra={"step": self.step}, before_commit=with_state,
                       group=self.slow_group, owned=self.pipe.owned if self.pipe is not None else None)
        except OSError as e:
            raise TrainError(f"could not write a checkpoint at step {self.step} ({e.strerror or e}); "
                             f"the previous one in {self.ckpt_dir} is intact unless this was during its rename") from e

    def load_weights(self, path, st):
        """Each rank reads its shards of the weights and optimizer state (any layout wrote them)."""
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise TrainError(f"--resume: {path} is a single-process checkpoint; resume it without torchrun")
        pckpt.load(path, self.model, self.opt, owned=self.pipe.owned if self.pipe is not None else None)

    def export(self):
        """The final model as one Hugging Face directory, written by rank 0. With --pp no rank holds the
        whole model: rank 0 reassembles it from the checkpoint just saved (layout-free shards)."""
        plain = pckpt.full_model(self.model) if self.pipe is None else None
        if self.par.is_main:
            try:
                if self.pipe is None:
                    save_pretrained(plain, self.tc.out)
                else:
                    pckpt.export_hf(self.ckpt_dir, self.tc.out, config=self.cfg)
                self.write_tokenizer(self.tc.out)
            except OSError as e:
                raise TrainError(f"could not export the model to {self.tc.out} ({e.strerror or e}); "
                                 f"the checkpoint in {self.ckpt_dir} is intact") from e
        dist.barrier(group=self.slow_group)


def _quiet(*args, **kwargs):
    pass


def train_distributed(cfg: ModelConfig, tc: TrainConfig, dp: int | None, ep: int, log=print, pp: int = 1,
                      pp_schedule: str = "dualpipev", microbatches: int | None = None, pp_overlap: str = "auto") -> dict:
    return DistributedTrainer(cfg, tc, log, dp=dp, ep=ep, pp=pp, pp_schedule=pp_schedule,
                              microbatches=microbatches, pp_overlap=pp_overlap).train()
