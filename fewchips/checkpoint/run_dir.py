"""The run folder OUT: its one-writer lock, metrics.jsonl, the checkpoint (OUT/checkpoint, the one
before it as OUT/checkpoint.old), the tokenizer files beside the weights, and what must match for
`--resume` to continue exactly (configs, data, schedule). Checkpoints are written to a temp folder and
swapped in by renames, so a failed write leaves the previous one as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from .load import CheckpointError, CheckpointReader
from ..config import ConfigError, ModelConfig
from ..files import FolderLock, FolderLockedError, atomic_write_text
from ..inference.tokenizer import ChatTemplate
from ..model import DeepseekV3
from ..train.config import TrainConfig, TrainError
from ..train.schedule import RunSchedule, switch_step
from ..train.tokenizer import load_tokenizer, save_tokenizer, special_ids


# What a run writes in OUT (a folder holding only these is a run, perhaps stopped before its first save)
RUN_FILES = {".lock", "cache", "checkpoint", "checkpoint.old", "metrics.jsonl", "config.json", "generation_config.json",
             "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "loss.png", "expert_load.png", "expert_loads.json", "grpo.png", "ema", "lost+found"}
SHARD = re.compile(r"model-\d+-of-\d+\.safetensors|checkpoint\.tmp|\.tmp-.*|\..*\.tmp-.*|\.part-\d+\.safetensors")


class RunDir:
    """OUT as the trainer sees it. Only the main process (`writer`) takes the lock and writes metrics."""

    def __init__(self, tc: TrainConfig, log=print, writer: bool = True):
        self.tc, self.log, self.writer = tc, log, writer
        self.out = tc.out
        self.ckpt_dir = os.path.join(tc.out, "checkpoint")
        self.metrics_path = os.path.join(tc.out, "metrics.jsonl")
        self.lock = FolderLock(tc.out)
        self.created = False                          # whether open() made OUT (abandon() may remove it)

    def open(self):
        """Refuse to start over a run unless told (--resume, --overwrite), then take the lock."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise TrainError(f"--out {self.out} is a file; it names the run's folder")
        has_ckpt = any(os.path.exists(self.ckpt_dir + s) for s in ("", ".old"))
        if self.tc.resume and not has_ckpt:        # before OUT is made: a mistyped --out leaves nothing behind
            raise TrainError(f"--resume: no checkpoint in {self.ckpt_dir}")
        if has_ckpt and not self.tc.resume and not self.tc.overwrite:
            raise TrainError(f"{self.out} already holds a training run; pass --resume to continue it or "
                             f"--overwrite to start over (the tokenised data cache is kept)")
        foreign = sorted(set(os.listdir(self.out)) - RUN_FILES) if os.path.isdir(self.out) and not has_ckpt else []
        foreign = [f for f in foreign if not SHARD.fullmatch(f)]
        if foreign and not self.tc.overwrite:      # `--out .` or `--out ~` by mistake: write nothing there
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise TrainError(f"--out {self.out} holds files that are not a fewchips run ({shown}); name a new or "
                             f"empty folder, or pass --overwrite to write the run beside them")
        self.created = not os.path.exists(self.out)
        os.makedirs(self.out, exist_ok=True)
        if self.writer:
            try:
                self.lock.acquire()                   # one writer per output folder
            except FolderLockedError as e:
                raise TrainError(str(e)) from None

    def close(self):
        if self.writer:
            self.lock.release()

    def abandon(self):
        """The run failed before its first step: release OUT, and remove it if this run made it and
        nothing was written there (a tokenised-data cache or a log is kept)."""
        self.close()
        if self.writer and self.created:
            try:
                os.rmdir(self.out)
            except OSError:
                pass

    def resume_dir(self) -> str:
        """The newest checkpoint that can be read: OUT/checkpoint, else OUT/checkpoint.old (the one before
        it, kept as a fallback; also what a crash between the two renames of a save leaves)."""
        problems = []
        for d in (self.ckpt_dir, self.ckpt_dir + ".old"):
            if not os.path.exists(os.path.join(d, "train_state.pt")):
                continue
            try:
                read_train_state(d)
                load_tokenizer(os.path.join(d, "tokenizer.json"))
            except (TrainError, ValueError, FileNotFoundError) as e:
                problems.append(str(e))
                self.log(f"warning: {e}")
                continue
            if problems:
                self.log(f"resuming from the previous checkpoint, {d}")
            return d
        if problems:
            raise TrainError(f"--resume: {problems[-1]}; no earlier checkpoint to fall back to. Start over with "
                             f"--overwrite (the tokenised data cache is kept)")
        raise TrainError(f"--resume: no checkpoint in {self.ckpt_dir}")

    def reset(self):
        """A fresh run: with --overwrite the previous run's checkpoints go, only now that the data and the
        model are ready (a bad data file or config has stopped the run before anything was deleted)."""
        if not self.writer:
            return
        if self.tc.overwrite:
            for d in (self.ckpt_dir, self.ckpt_dir + ".old"):
                shutil.rmtree(d, ignore_errors=True)
        open(self.metrics_path, "w").close()

    def write(self, rec: dict):
        if self.writer:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def truncate(self, step: int):
        if self.writer:
            truncate_metrics(self.metrics_path, step, self.log)

    def write_tokenizer(self, tok, folder: str, model_max_length: int | None = None):
        """tokenizer.json and tokenizer_config.json (`model_max_length`: the model's context, so that
        transformers does not warn below it); a run started from a model directory keeps that
        directory's tokenizer_config.json (its own chat template, e.g. a released checkpoint's)."""
        save_tokenizer(tok, folder, model_max_length or self.tc.seq_len)
        source = os.path.join(self.tc.init, "tokenizer_config.json") if self.tc.init else None
        if source and os.path.exists(source):
            with open(source, encoding="utf-8") as f:
                atomic_write_text(os.path.join(folder, "tokenizer_config.json"), f.read())


def check_resume(st: dict, cfg: ModelConfig, tc: TrainConfig, data, path: str, log=print):
    """The saved run's model config, data and (unless allowed) schedule must be this run's."""
    saved_cfg = ModelConfig.from_dict(st["model_config"])
    if saved_cfg.to_dict() != cfg.to_dict():
        a, b = saved_cfg.to_dict(), cfg.to_dict()
        diff = [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        raise TrainError(f"--resume: the model config does not match the checkpoint in {path} ({'; '.join(diff)})")
    check_resume_fields(st["train_config"], tc, log)
    check_same_data(st, data)


def check_resume_fields(saved: dict, tc: TrainConfig, log=print):
    """Refuse to resume with a setting that would change the data of the saved run, or (unless
    --allow-schedule-change) its schedule. A field the checkpoint predates had its default then."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for k in TrainConfig.RESUME_FIELDS:
        was = saved.get(k, fields[k].default)
        if was != getattr(tc, k):
            raise TrainError(f"--resume: {k} is {getattr(tc, k)!r} but the checkpoint was trained with "
                             f"{was!r}; pass the same value to continue exactly")
    changed = {k: saved.get(k, fields[k].default) for k in TrainConfig.SCHEDULE_FIELDS
               if saved.get(k, fields[k].default) != getattr(tc, k)}
    if not changed:
        return
    was = dataclasses.replace(tc, **changed)
    old, new = RunSchedule.of(was), RunSchedule.of(tc)
    what = ", ".join(f"--{k.replace('_', '-')} {v} -> {getattr(tc, k)}" for k, v in changed.items())
    plan = (f"the lr, γ and λ schedules are laid out over the run's tokens "
            f"({old.total_tokens:,} -> {new.total_tokens:,}): "
            f"the cosine would start after step {switch_step(was, old)} instead of step {switch_step(tc, new)}")
    if not tc.allow_schedule_change:
        raise TrainError(f"--resume with {what} changes the run's schedule: {plan}. Pass the checkpoint's values "
                         f"to continue it exactly, or --allow-schedule-change to continue on the new schedule")
    log(f"warning: {what} changes the schedule: {plan} (--allow-schedule-change)")


def check_same_data(state: dict, data):
    """--resume needs the data the checkpoint was trained on (its fingerprint: token counts per split)."""
    saved, now = state["corpus"].get("splits"), data.fingerprint().get("splits")
    if saved != now:
        raise TrainError(f"--resume: the data differs from the checkpoint's (train/val token counts {saved} vs "
                         f"{now}); pass the same --data")


def read_train_state(path) -> dict:
    """A checkpoint's train_state.pt (weights_only: tensors and plain values, no pickled code)."""
    file = os.path.join(path, "train_state.pt")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"{file} is missing") from None
    except Exception as e:            # truncated or corrupt: torch raises RuntimeError, pickle errors, ...
        raise TrainError(f"{file} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"the file is damaged or truncated") from None


def truncate_metrics(path, step: int, log=print):
    """On resume, keep the metrics up to the checkpoint's step (drop an interrupted tail) and any line
    that does not parse (a crash mid-write), saying how many."""
    if not os.path.exists(path):
        return
    keep, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    if bad:
        log(f"warning: {path}: dropped {bad} line(s) that are not JSON (a write cut short?); "
            "the other records are kept")
    atomic_write_text(path, "".join(keep))


def model_tokenizer(folder: str):
    """A model directory's tokenizer.json and its special ids, or one error naming the file."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        tok = load_tokenizer(path)
        return tok, dataclasses.replace(special_ids(tok, path), template=ChatTemplate.of_dir(folder))
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(f"--model: {e}") from None


def init_config(path: str, log=print, changes: dict | None = None, extend_context: int | None = None) -> ModelConfig:
    """The config of a model directory to start from, its MTP layers counted only if their weights are there;
    then `changes` (--set) and a context extension, each refused by name if it would change a weight's shape."""
    try:
        cfg = CheckpointReader(path).cfg
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        raise TrainError(f"--init: {e}") from None
    if not cfg.num_nextn_predict_layers:
        log(f"--init: {path} has no MTP weights; training without the MTP module")
    changes = dict(changes or {})
    if extend_context:
        changes = {**yarn_extension(cfg, extend_context), **changes}
        rs = changes["rope_scaling"]
        log(f"--extend-context: {cfg.max_position_embeddings:,} -> {extend_context:,} positions, YaRN factor "
            f"{rs['factor']:g} over the original {rs['original_max_position_embeddings']:,} "
            f"(beta_fast 32, beta_slow 1; arXiv 2412.19437 §4.3)")
    return with_changes(cfg, changes) if changes else cfg


def yarn_extension(cfg: ModelConfig, length: int) -> dict:
    """The report's YaRN settings for a context of `length` positions: the factor over the original
    pre-training length, beta_fast 32, beta_slow 1, and mscale as V3 sets it (0.1 ln s + 1 on the attention
    scale, from mscale = mscale_all_dim = 1); only the decoupled rope key is rotated, as always."""
    if length <= cfg.max_position_embeddings:
        raise TrainError(f"--extend-context {length}: the model already has {cfg.max_position_embeddings} positions")
    original = (cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.max_position_embeddings
    return {"max_position_embeddings": length,
            "rope_scaling": {"type": "yarn", "factor": length / original, "original_max_position_embeddings": original,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}


def with_changes(cfg: ModelConfig, changes: dict) -> ModelConfig:
    """cfg with `changes`, refused naming the fields that would change the shape of a weight."""

    def shapes(c):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in DeepseekV3(c).state_dict().items()}

    try:
        new = ModelConfig.from_dict({**cfg.to_dict(), **changes}, source="--set")
    except ConfigError as e:
        raise TrainError(f"--init: {e}") from None
    if shapes(new) != shapes(cfg):
        bad = [k for k in changes if shapes(ModelConfig.from_dict({**cfg.to_dict(), k: changes[k]})) != shapes(cfg)]
        raise TrainError(f"--init: --set {', '.join(bad) or ', '.join(changes)} would change the shape of the "
                         f"checkpoint's weights; with --init only shape-preserving fields may change (rope_scaling, "
                         f"max_position_embeddings, routing and balance settings, ...)")
    return new


def rng_state() -> dict:
    """torch, numpy and Python RNG states as tensors and plain values, so the training state loads
    with torch.load(weights_only=True) - no arbitrary pickles."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
