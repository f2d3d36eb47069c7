"""DeepSeek-V3's pre-training recipe (arXiv 2412.19437 §2.1.2, §2.2, §4), scaled to the length of the run:
the training loop, holding its parts.

One optimizer step:
    for each micro-batch:  loss = CE(main) + λ·mean_k CE(MTP depth k) + α·Σ_layers seq_balance
                           backward; add up each MoE layer's expert loads           (`losses`)
    all loads of the step  (summed over the processes that routed them: the layout)
    clip to 1.0, AdamW, schedule; then, outside autograd, per MoE layer:
                           b ← b + γ·sign(mean(load) − load)          (aux-loss-free balancing)

The parts: the schedules on the run's tokens (`schedule`), the model and optimizer (`build`), where the
model lives (`layout`: one process, FSDP + expert parallel, or pipeline stages; the same loop for
each), and the run folder with its checkpoints and metrics (`run_dir`). SFT and GRPO are this trainer
on other data (and, for GRPO, another step).

Checkpoints live in OUT/checkpoint (written to a temp folder, then renamed; a failed write leaves the
previous one as it was): weights and balancing biases, the optimizer and schedule, the sampler
position, RNG states and both configs. The final model is also exported to OUT itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..checkpoint.hf_format import write_expert_loads
from ..fp8.gemm import resolve_backend
from ..losses import max_violation, moe_routers, update_biases
from ..model import DeepseekV3
from .build import autocast_dtype, build_model, build_optimizer, clip_grad_norm
from .config import TrainConfig, TrainError
from .data import TextData
from .ema import ParameterEMA
from .layout import make_layout
from ..checkpoint.run_dir import RunDir, check_resume, init_config, read_train_state, rng_state, set_rng_state
from .schedule import RunSchedule, bias_speed, mtp_weight
from .stopping import StopOnSignal, TrainInterrupted
from .tokenizer import tokenizer_hash


@dataclass
class StepResult:
    loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    loads_LE: torch.Tensor
    skipped: bool
    batch: int                           # sequences in this step (grows during a batch ramp)
    extra: dict = field(default_factory=dict)   # more per-step metrics (GRPO's rewards, KL, ...)
    tokens: int | None = None            # tokens processed, when not batch x seq_len (GRPO's rollouts)


def _quiet(*args, **kwargs):
    pass


class Trainer:
    """The loop, holding a layout (`self.layout`), a schedule, a run folder (`self.run`), the model and
    its optimizer. `make_data` says what it trains on (text here; chats for SFT, prompts for GRPO)."""

    def __init__(self, cfg: ModelConfig | None, tc: TrainConfig, log=print, device="cpu"):
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.layout = make_layout(tc, device)
        if not self.layout.is_main:
            tc, log = dataclasses.replace(tc, progress=False, plots=False), _quiet
        self.tc, self.log, self.device = tc, log, self.layout.device
        self.run = RunDir(tc, log, writer=self.layout.is_main)
        self.ckpt_dir, self.metrics_path = self.run.ckpt_dir, self.run.metrics_path
        if tc.init:
            cfg = init_config(tc.init, log, tc.init_set, tc.extend_context)
        elif tc.init_set or tc.extend_context:
            raise TrainError("init_set and --extend-context change a model being continued: they need --init")
        if cfg is not None and self.positions_span_the_row and tc.seq_len > cfg.max_position_embeddings:
            raise TrainError(f"--seq-len {tc.seq_len} is longer than the model's context "
                             f"(max_position_embeddings {cfg.max_position_embeddings}); lower it, or extend the "
                             "context (--extend-context)")

        def setup():                       # rank 0 first: it checks OUT and takes the lock
            self.run.open()
            return self.run.resume_dir() if tc.resume else None

        resume_from = self.layout.main_first(setup, lambda: self.run.resume_dir() if tc.resume else None)
        try:
            self._start(cfg, resume_from)
        except BaseException:
            self.run.abandon()             # nothing trained: the lock released, an empty OUT made here removed
            raise

    def _start(self, cfg: ModelConfig | None, resume_from: str | None):
        """The data, the model and its optimizer, and a resumed run's state, once OUT is taken."""
        self.data = self.layout.main_first(lambda: self.make_data(cfg, resume_from)) if self.data_first_on_main \
            else self.make_data(cfg, resume_from)
        tc = self.tc                       # the data may have set the run's length (SFT's --epochs)
        self.tok, self.sp = self.data.tok, self.data.sp
        self.sampler = getattr(self.data, "sampler", None)
        self.cfg = cfg = cfg.replace(bos_token_id=self.sp.bos, eos_token_id=self.sp.eos)
        self.amp = autocast_dtype(tc.dtype, self.device)
        torch.manual_seed(tc.seed)
        self.model = self.build(cfg)
        if tc.fp8:                         # say what FP8 means on this device: Hopper's GEMMs, or their twin
            fast = resolve_backend(tc.fp8_backend, str(self.device)) == "scaled_mm"
            how = "cuBLAS block-scaled GEMMs" if fast else "emulated: the same quantised values, FP32 matmuls, slower"
            kept = "FP8" if tc.fp8_activations == "cached" else "full-precision"
            self.log(f"fp8: the recipe's linears and experts compute in E4M3 ({how}); the backward keeps {kept} "
                     "activations")
        self.routers = moe_routers(self.model)
        self.schedule = RunSchedule.of(tc)
        self.opt, self.sched = build_optimizer(self.model, tc, self.schedule)      # once, on the placed model
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps_total = 0
        self.bad_streak = 0
        self.load_accum_LE = torch.zeros(len(self.routers), cfg.n_routed_experts)
        self.ema = ParameterEMA(self.model, tc.ema, self.layout.owned()) if tc.ema else None
        if resume_from:
            self._load(resume_from)
        else:
            self.run.reset()
        self.unigram_entropy = self.data.unigram_entropy
        for line in filter(None, (self.layout.describe(), self.layout.holdings())):
            self.log(line)

    def build(self, cfg: ModelConfig, tc: TrainConfig | None = None, frozen: bool = False) -> DeepseekV3:
        """The model on meta, placed by the layout, then only this process's tensors allocated and filled:
        `--init`'s weights read by slices, or the seeded initialisation (the same weights at any layout).
        `frozen`: no parameter takes a gradient (GRPO's reference)."""
        tc = tc or self.tc
        model = build_model(cfg, tc)
        if frozen:
            model.requires_grad_(False)
        model = self.layout.place(model, tc, self.amp, packed=getattr(self.data, "packed", False))
        self.layout.materialise(model)
        self.layout.fill(model, tc)
        return model

    data_first_on_main = False           # pre-training data: every rank prepares its share together
    positions_span_the_row = True        # a row is one run of positions 0..seq_len-1 (packed chats restart)

    def make_data(self, cfg: ModelConfig, resume_from: str | None):
        """The data this run trains on (pre-training text here; chats for `fewchips sft`)."""
        tokenizer = os.path.join(resume_from, "tokenizer.json") if resume_from else (
            os.path.join(self.tc.init, "tokenizer.json") if self.tc.init else None)
        return TextData(cfg, self.tc, self.log, tokenizer, self.layout.team())

    @property
    def is_main(self) -> bool:
        return self.layout.is_main

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        tc = self.tc
        frac = self.schedule.fraction(self.step)
        n_micro = self.schedule.micro_batches[self.step]
        lam = 0.0 if tc.freeze_mtp else mtp_weight(frac, tc.mtp_lambda, tc.mtp_lambda_late)
        loads_LE = torch.zeros(len(self.routers), self.cfg.n_routed_experts, device=self.device)
        batches = [self.data.next_batch(tc.batch_size) for _ in range(n_micro)]
        main, mtp, bal, finite = self.layout.forward_backward(self.model, batches, lam, tc.balance_alpha, loads_LE,
                                                              self.amp)
        grad_norm = self.finish_step(loads_LE, finite, frac)
        self.tokens_seen += n_micro * tc.batch_size * tc.seq_len
        finite = math.isfinite(grad_norm)
        return StepResult(main if finite else float("nan"), mtp, bal, grad_norm, loads_LE.cpu(), not finite,
                          n_micro * tc.batch_size)

    def finish_step(self, loads_LE, finite: bool, frac: float) -> float:
        """After the backward: the update, then the schedule moves on. Returns the norm (NaN: skipped)."""
        grad_norm = self.update(loads_LE, finite, frac)
        self.sched.step()
        self.step += 1
        return grad_norm

    def update(self, loads_LE, finite: bool, frac: float) -> float:
        """The clip (global norm), AdamW, the bias update from the loads; a non-finite loss or gradient
        skips it. Returns the norm before clipping (NaN: skipped)."""
        grad_norm = float("nan")
        if finite:
            norm = clip_grad_norm(self.model, self.opt, self.tc.grad_clip, self.layout.grad_norm_sq(self.model))
            grad_norm = float(norm)
        if math.isfinite(grad_norm):
            if self.ema is not None:
                self.ema.wait()                         # it reads the parameters the step changes
            self.opt.step()
            if self.ema is not None:
                self.ema.update()
            update_biases(self.routers, self.layout.reduce_loads(loads_LE),
                          bias_speed(frac, self.tc.bias_update_speed))
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    def evaluate(self) -> dict:
        """Validation loss and bits per byte; with several sources, each one's too (val_loss_NAME) and
        the overall figures over all their windows."""
        sets = getattr(self.data, "val_sets", None)
        if not sets or len(sets) == 1:
            return self.layout.evaluate(self.model, self.data, self.tc.batch_size, self.amp)
        out, nats, count, nbytes = {}, 0.0, 0, 0
        for vs in sets:
            ev = self.layout.evaluate(self.model, vs, self.tc.batch_size, self.amp)
            if ev:
                out[f"val_loss_{vs.name}"], out[f"val_bpb_{vs.name}"] = ev["val_loss"], ev["val_bpb"]
                nats, count = nats + ev["val_loss"] * ev["val_tokens"], count + ev["val_tokens"]
                nbytes += vs.val_bytes
        if count:
            out.update(val_loss=nats / count, val_bpb=nats / math.log(2) / max(nbytes, 1), val_tokens=count)
        return out

    def evaluate_ema(self) -> dict:
        """The validation metrics of the EMA's weights (swapped in, then back), as ema_val_*."""
        self.ema.swap(self.model)
        try:
            ev = self.evaluate()
        finally:
            self.ema.swap(self.model)
        return {f"ema_{k}": v for k, v in ev.items() if k != "val_tokens"}

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        with self.layout.guard("training"):
            return self._train()

    def _train(self) -> dict:
        tc = self.tc
        last_step = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
        ramp = (f" (batch ramps from {self.schedule.micro_batches[0] * tc.batch_size} sequences over the first "
                f"{tc.batch_ramp_tokens:,} tokens"
                f"{'; the run ends first' if tc.batch_ramp_tokens > self.schedule.total_tokens else ''})"
                if tc.batch_ramp_tokens else "")
        self.log(self.banner(ramp))
        if self.step >= last_step:
            self.run.close()
            where = f"--stop-at {tc.stop_at}" if tc.stop_at and tc.stop_at < tc.steps else f"--steps {tc.steps}"
            return {"step": self.step, "stopped": f"nothing to do: the checkpoint is at step {self.step}, {where} "
                                                  f"(raise --steps with --allow-schedule-change to train on)"}
        bar = None
        if tc.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=tc.steps, initial=self.step, unit="step", dynamic_ncols=True)
        tok_s, last = None, {}
        self.model.train()
        try:
            with StopOnSignal(self.log) as stop:
                while self.step < last_step:
                    t0 = time.perf_counter()
                    r = self.train_step()
                    dt = time.perf_counter() - t0
                    rate = (r.tokens if r.tokens is not None else r.batch * tc.seq_len) / dt
                    tok_s = rate if tok_s is None else 0.9 * tok_s + 0.1 * rate
                    if r.skipped:
                        self._on_bad_step()
                    else:
                        self.bad_streak = 0
                        self.load_accum_LE += r.loads_LE
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{tok_s:,.0f}")
                    if self.step % tc.log_every == 0 or self.step == last_step:
                        self.run.write({"step": self.step, "tokens": self.tokens_seen, "batch": r.batch, "loss": r.loss,
                                        "mtp_loss": r.mtp_loss, "balance_loss": tc.balance_alpha * r.balance_loss,
                                        "lr": self.sched.get_last_lr()[0], "grad_norm": r.grad_norm, "tok_per_s": tok_s,
                                        "maxvio": max_violation(r.loads_LE), "skipped_steps": self.bad_steps_total,
                                        **getattr(self.data, "progress", dict)(), **r.extra})
                    if self.step % tc.eval_every == 0 or self.step == tc.steps:
                        last = self._eval_and_plot(bar)
                    if self.layout.any_rank(stop.requested is not None) and self.step < last_step:
                        raise TrainInterrupted(stop.requested or "SIGTERM", self.step)
                    if self.step % tc.save_every == 0 and self.step < last_step:
                        self.save_checkpoint()
        except TrainInterrupted:
            if bar is not None:
                bar.close()
            self.save_checkpoint()
            self.export()
            self.log(f"stopped after step {self.step}; checkpoint in {self.ckpt_dir}; continue with --resume")
            raise
        except KeyboardInterrupt:
            where = (f"the checkpoint in {self.ckpt_dir} is as it was" if os.path.exists(self.ckpt_dir)
                     else "no checkpoint was written")
            self.log(f"\naborted during step {self.step + 1}; {where}")
            raise
        finally:
            if bar is not None:
                bar.close()
            if self.step < last_step:
                self.run.close()
        self.save_checkpoint()
        self.export()
        if self.step >= tc.steps and self.layout.is_main:   # the run is done: the fallback's job too
            shutil.rmtree(self.ckpt_dir + ".old", ignore_errors=True)
        if self.tc.plots:
            self.plot()
        self.run.close()
        stopped = (f"--stop-at {tc.stop_at} of {tc.steps} steps; checkpoint in {self.ckpt_dir}, continue with --resume"
                   if self.step < tc.steps else f"all {tc.steps} steps done")
        return {"step": self.step, **last, "unigram_entropy": self.unigram_entropy,
                "skipped_steps": self.bad_steps_total, "stopped": stopped}

    def banner(self, ramp: str = "") -> str:
        tc = self.tc
        return (f"training {self.cfg.num_hidden_layers}-layer model for {tc.steps} steps, "
                f"{self.schedule.total_tokens:,} tokens, {tc.tokens_per_step} per step{ramp}; "
                f"{self.data.describe()}; autocast {self.amp or 'off'}")

    def _on_bad_step(self):
        self.bad_steps_total += 1
        self.bad_streak += 1
        self.log(f"step {self.step}: non-finite loss or gradient; step skipped "
                 f"({self.bad_streak} in a row, {self.bad_steps_total} in all)")
        if self.bad_streak >= self.tc.max_bad_steps:
            where = self.ckpt_dir if os.path.exists(self.ckpt_dir) else "none written yet"
            raise TrainError(f"stopping at step {self.step}: {self.bad_streak} steps in a row had a non-finite "
                             f"loss or gradient ({self.bad_steps_total} skipped in all). Last checkpoint: {where}. "
                             f"Try a lower --lr, a longer --warmup, or --dtype fp32.")

    def _eval_and_plot(self, bar):
        ev = self.evaluate()
        if ev and self.ema is not None:
            ev.update(self.evaluate_ema())
        if ev:
            self.run.write({"step": self.step, "tokens": self.tokens_seen, **ev})
            msg = f"step {self.step}: val loss {ev['val_loss']:.3f} nats ({ev['val_bpb']:.3f} bits/byte)"
            if "ema_val_loss" in ev:
                msg += f", EMA {ev['ema_val_loss']:.3f}"
            if self.unigram_entropy is not None:
                msg += f", unigram entropy {self.unigram_entropy:.3f}"
            (bar.write if bar is not None else self.log)(msg)
        if self.tc.plots:
            self.plot()
        return ev

    def plot(self):
        from .plots import write_plots    # here, not at the top: plots imports matplotlib (~350 ms)
        layers = [f"layer {i}" for i in range(self.cfg.num_hidden_layers) if self.cfg.is_moe_layer(i)]
        layers += [f"MTP {k + 1}" for k in range(self.cfg.num_nextn_predict_layers)]
        write_plots(self.metrics_path, self.load_accum_LE, self.tc.out, self.unigram_entropy, layers)

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint holds besides the weights and the optimizer state (the layout writes those)."""
        par = getattr(self.layout, "par", None)
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "bad_steps_total": self.bad_steps_total,
            "scheduler": self.sched.state_dict(), "sampler": self.data.state_dict(), "load_accum": self.load_accum_LE,
            "rng": rng_state(), "train_config": dataclasses.asdict(self.tc), "model_config": self.cfg.to_dict(),
            "corpus": self.data.fingerprint(), "tokenizer_hash": tokenizer_hash(self.tok),
            **({"parallel": {"pp": par.pp, "dp": par.dp, "ep": par.ep}} if par is not None else {}),
            **({"ema": {"decay": self.ema.decay, "updates": self.ema.updates}} if self.ema is not None else {}),
        }

    def save_checkpoint(self):
        """Every file to a temp folder beside the checkpoint, then swapped in by renames, keeping the one
        before as checkpoint.old (a fallback if this one is later found damaged). Any failure (a full
        disk) leaves the old checkpoints alone."""
        context = self.cfg.max_position_embeddings     # tokenizer_config's model_max_length, not --seq-len
        try:
            self.layout.save_checkpoint(self.ckpt_dir, self.model, self.opt, self.state(),
                                        lambda folder: self.run.write_tokenizer(self.tok, folder, context), self.ema)
        except OSError as e:
            kept = f"the previous checkpoint in {self.ckpt_dir} is intact" if os.path.exists(self.ckpt_dir) \
                else "no earlier checkpoint exists"
            raise TrainError(f"could not write a checkpoint at step {self.step} ({e.strerror or e}); {kept}. "
                             f"Free some disk space and rerun with --resume.") from e

    def export(self):
        """The final model in OUT itself: config.json, model.safetensors, tokenizer files; with
        --export-ema the EMA's weights too, as their own directory OUT/ema."""
        self._export(self.tc.out)
        if self.ema is not None and self.tc.export_ema:
            self.ema.swap(self.model)
            try:
                self._export(os.path.join(self.tc.out, "ema"))
            finally:
                self.ema.swap(self.model)

    def _export(self, out: str):
        def files(folder):
            self.run.write_tokenizer(self.tok, folder, self.cfg.max_position_embeddings)
            write_expert_loads(folder, self.cfg, self.load_accum_LE, self.tokens_seen)
        try:
            self.layout.export(self.model, out, files)
        except OSError as e:
            raise TrainError(f"could not export the model to {out} ({e.strerror or e}); "
                             f"the checkpoint in {self.ckpt_dir} is intact") from e

    def _load(self, path):
        """Continue the run saved in `path`: the same model and data settings are required; weights and
        optimizer state (the layout's), schedule, sampler position, counters, loads and RNG come back."""
        st = read_train_state(path)
        check_resume(st, self.cfg, self.tc, self.data, path, self.log)
        try:
            self.layout.load_checkpoint(path, self.model, self.opt, st)
        except ValueError as e:                          # CheckpointError: a damaged weights file
            raise TrainError(f"--resume: {e}. If {self.ckpt_dir}.old exists, move it to {self.ckpt_dir} to resume "
                             f"from the checkpoint before; otherwise start over with --overwrite") from None
        self.sched.load_state_dict(st["scheduler"])
        for group, lr in zip(self.opt.param_groups, self.sched.get_last_lr()):
            group["lr"] = lr                                   # the schedule's lr at the saved step
        self.data.load_state_dict(st["sampler"])
        self.step, self.tokens_seen, self.bad_steps_total = st["step"], st["tokens_seen"], st["bad_steps_total"]
        self.load_accum_LE = st["load_accum"]
        self._load_ema(path, st.get("ema"))
        set_rng_state(st["rng"])
        self.run.truncate(self.step)
        was = st.get("parallel")
        layout = f" (saved at pp {was.get('pp', 1)} x dp {was['dp']} x ep {was['ep']})" if was else ""
        self.log(f"resumed from {path} at step {self.step}{layout}")


    def _load_ema(self, path, saved: dict | None):
        if saved is not None and self.ema is not None:
            self.layout.load_ema(path, self.ema, saved["updates"])
            if saved["decay"] != self.ema.decay:
                self.log(f"--resume: the EMA continues with decay {self.ema.decay} (it was {saved['decay']})")
        elif saved is not None:
            self.log(f"--resume: the checkpoint's EMA (decay {saved['decay']}) is not carried on: no --ema")
        elif self.ema is not None:
            self.log("--resume: the checkpoint has no EMA; it starts from the resumed weights")


def train(cfg: ModelConfig, tc: TrainConfig, log=print) -> dict:
    """Build everything, train, export. Returns the final metrics."""
    return Trainer(cfg, tc, log).train()
