"""Hugging Face checkpoint I/O: `config.json` + `model.safetensors` (or shards with an index), read
into a model (writing, and the names on disk, are `hf_format`'s; re-exported here).

On disk, names are the release's: per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`
and MTP layers at `model.layers.{num_hidden_layers + i}`. In memory the experts are stacked and MTP
lives in `mtp.{i}`. FP8 e4m3 weights with a `weight_scale_inv` are dequantised per 128x128 block on
load, in plain PyTorch. Loading streams tensor by tensor into a model allocated once, so peak memory
is the model plus one tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..fp8.quant import dequantize
from .hf_format import (_EXPERT_RE, _FUSED_RE, FP8_DTYPES, INDEX_FILE, SINGLE_FILE, _memory_name,  # noqa: F401
                        disk_name, hf_state_dict, save_pretrained, stream_safetensors, write_index,
                        write_safetensors, write_shards)
from ..model import DeepseekV3

log = logging.getLogger("fewchips")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded as it is; the message names the file and tensor."""


# ---------------------------------------------------------------------------------------------
# Loading: one walk over a checkpoint; the loaders only decide where each tensor goes
# ---------------------------------------------------------------------------------------------

def weight_files(path) -> dict[str, str]:
    """disk tensor name -> safetensors file, from the index or the single file."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        for fname in set(wm.values()):
            if not os.path.exists(os.path.join(path, fname)):
                raise CheckpointError(f"{index}: names shard {fname!r}, which is missing")
        return {n: os.path.join(path, f) for n, f in wm.items()}
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        try:
            with safe_open(single, framework="pt") as f:
                return {n: single for n in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from None
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


@dataclass
class Entry:
    """One tensor of a checkpoint, as the loaders see it."""
    name: str                     # on disk: model.layers.3.mlp.experts.7.up_proj.weight
    file: str
    memory: str                   # in memory: mtp.{k}.* for MTP layers (experts still one per name)
    expert: tuple[str, int, str] | None = None   # (stacked module, expert index, gate_proj|up_proj|down_proj)


_MTP_COPY_RE = re.compile(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")


class CheckpointReader:
    """A Hugging Face-format directory, read one tensor at a time: its config (MTP resolved against the
    weights present), disk names and their files, each shard opened once."""

    def __init__(self, path, mtp: bool | None = None):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path}: not a directory")
        cfg = ModelConfig.from_json(self.path)
        self.files = weight_files(self.path)
        self.block = tuple((cfg.quantization_config or {}).get("weight_block_size", (128, 128)))
        N = cfg.num_hidden_layers
        has_mtp = any(re.match(rf"^model\.layers\.{N + k}\.", n) and not _MTP_COPY_RE.match(n)
                      for n in self.files for k in range(cfg.num_nextn_predict_layers))
        if cfg.num_nextn_predict_layers and not has_mtp:
            log.warning("%s: config names %d MTP layer(s) but the checkpoint has no MTP weights; loading with MTP off",
                        self.path, cfg.num_nextn_predict_layers)
            cfg = cfg.replace(num_nextn_predict_layers=0)
        elif mtp is False:
            cfg = cfg.replace(num_nextn_predict_layers=0)
        self.cfg = cfg
        self._handles: dict = {}

    def entries(self):
        """The tensors to load, shard by shard: weights (their `_scale_inv` go with them), not the MTP
        layers' copies of the shared embedding and head, no MTP layer when MTP is off."""
        for name in sorted(self.files, key=lambda n: (self.files[n], n)):
            if name.endswith("_scale_inv") or _MTP_COPY_RE.match(name):
                continue
            mem = _memory_name(self.cfg, name)
            if mem.startswith("mtp.") and not self.cfg.num_nextn_predict_layers:
                continue
            em = _EXPERT_RE.match(mem)
            yield Entry(name, self.files[name], mem, (em.group(1), int(em.group(2)), em.group(3)) if em else None)

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({e}); "
                                  "is the file truncated?") from None

    def scale(self, name: str, w, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The `weight_scale_inv` of FP8 tensor `name` (its block rows `rows`, default all), checked
        against the weight's block grid (`w`: the weight or its shape)."""
        sname = name + "_scale_inv"
        if sname not in self.files:
            raise CheckpointError(f"{self.files[name]}: FP8 tensor {name!r} has no {sname!r}")
        w_shape = tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(w)
        s_shape = self.shape(sname)
        want = (-(-w_shape[0] // self.block[0]), -(-w_shape[1] // self.block[1])) if len(w_shape) == 2 else None
        if s_shape != want:
            raise CheckpointError(f"{self.files[sname]}: {sname} has shape {s_shape}, expected {want} "
                                  f"for a {w_shape} weight in {self.block[0]}x{self.block[1]} blocks")
        if rows is None:
            return self.read(sname).float()
        try:
            return self._handle(sname).get_slice(sname)[rows[0]:rows[1]].float()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.files[sname]}: cannot read tensor {sname!r} ({e})") from None

    def dequantized(self, name: str) -> torch.Tensor:
        """The tensor in high precision: an FP8 weight times its block scales, anything else as stored."""
        t = self.read(name)
        return dequantize(t, self.scale(name, t), self.block) if t.dtype in FP8_DTYPES else t

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._handle(name).get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({e}); "
                                  "is the file truncated?") from None

    def _handle(self, name: str):
        """The open file holding `name`; the others are closed (a mapped file's pages count as this
        process's memory once read)."""
        file = self.files[name]
        if file not in self._handles:
            self._handles.clear()
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor in high precision, reading only those rows from the file. An FP8
        weight is read in whole 128-row blocks with their scales and dequantised there, which gives
        exactly the rows of the dequantised whole."""
        try:
            sl = self._handle(name).get_slice(name)
            fp8 = sl.get_dtype() in ("F8_E4M3", "F8_E5M2")
            if not fp8:
                return sl[start:stop]
            w_shape = tuple(sl.get_shape())
            bs = self.block[0]
            lo, hi = start // bs * bs, min(-(-stop // bs) * bs, w_shape[0])
            w = sl[lo:hi]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({e}); "
                                  "is the file truncated?") from None
        s = self.scale(name, w_shape, rows=(lo // bs, -(-hi // bs)))
        return dequantize(w, s, self.block)[start - lo:stop - lo]

    def release(self, file: str):
        self._handles.pop(file, None)

    def stored_dtype(self) -> torch.dtype:
        """The float dtype most stored (non-FP8) weights use; FP8 checkpoints load as bfloat16."""
        counts = defaultdict(int)
        for file in set(self.files.values()):
            try:
                with safe_open(file, framework="pt") as f:
                    for n in f.keys():
                        if not (n.endswith("_scale_inv") or n.endswith("e_score_correction_bias")):
                            counts[f.get_slice(n).get_dtype()] += 1
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        known = [(c, k) for k, c in counts.items() if k in names]
        return names[max(known)[1]] if known else torch.bfloat16


class Fill:
    """Where a checkpoint's tensors went: each in-memory target is filled completely or the load fails,
    and every tensor on disk has a target. One error style for both loaders, naming disk tensors."""

    def __init__(self, reader: CheckpointReader, expected: dict[str, tuple[int, str]]):
        self.reader, self.expected = reader, expected          # target key -> (elements, its disk name)
        self.filled: dict[str, int] = defaultdict(int)
        self.unexpected: list[str] = []

    def put(self, key: str, dest: torch.Tensor | None, value: torch.Tensor, entry: Entry):
        if dest is None:
            self.unexpected.append(entry.name)
            return
        copy_checked(dest, value, entry.name, entry.file)
        self.filled[key] += value.numel()

    def check(self):
        path = self.reader.path
        if self.unexpected:
            more = f" (and {len(self.unexpected) - 5} more)" if len(self.unexpected) > 5 else ""
            raise CheckpointError(f"{path}: tensors that do not belong to this config: {self.unexpected[:5]}{more}")
        missing = [disk for key, (n, disk) in self.expected.items() if self.filled[key] != n]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{path}: missing tensors {missing[:5]}{more}")


def copy_checked(dest: torch.Tensor, value: torch.Tensor, name: str, file: str):
    """dest <- value, refusing a shape the config does not expect with the tensor's name and file."""
    if tuple(value.shape) != tuple(dest.shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(value.shape)}, "
                              f"the config expects {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(value.to(dest.dtype))


def expert_disk_name(cfg: ModelConfig, stacked: str, kind: str, n_experts: int) -> str:
    """How a stacked expert tensor's per-expert pieces are named on disk (for messages)."""
    return f"{disk_name(cfg, stacked)}.{{0..{n_experts - 1}}}.{kind}.weight"


def empty_model(cfg: ModelConfig, device="cpu", dtype=None) -> DeepseekV3:
    """The model allocated once, directly in `dtype`, uninitialised (the loader fills every tensor)."""
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    if dtype is not None:
        model = model.to(dtype)                   # on meta: nothing is allocated in fp32 first
    return model.to_empty(device=device).tie_weights()


def load_weights(model: DeepseekV3, ck: CheckpointReader, rows=None, skip_experts: bool = False) -> DeepseekV3:
    """Fill `model` from a Hugging Face directory. Walks the model's tensors and reads, for each, only
    the rows this process holds: `rows(name, tensor)` -> (local tensor, global row ids [n]) or None (not
    held here); default: every row (see `DeepseekV3.init_weights`). Experts are stacked rows, so a
    process reads only its experts' files' tensors; an FP8 weight is dequantised block by block on the
    rows read. Every tensor on disk must belong to the config, and every held row must be on disk.
    skip_experts: routed experts are neither expected on disk nor filled here (their module reads them)."""
    cfg = model.config
    disk = set(n for n in ck.files if not (n.endswith("_scale_inv") or _MTP_COPY_RE.match(n)))
    if skip_experts:                          # read by their own module (serving over ranks)
        disk = {n for n in disk if not _EXPERT_RE.match(_memory_name(cfg, n))}
    if not cfg.num_nextn_predict_layers:
        disk = {n for n in disk if not _memory_name(cfg, n).startswith("mtp.")}
    expected, missing = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        fm = _FUSED_RE.match(name)
        kinds = (("gate_proj", "up_proj") if fm.group(2) == "gate_up_proj" else ("down_proj",)) if fm else ()
        names = [f"{disk_name(cfg, fm.group(1))}.{e}.{k}.weight" for e in range(t.shape[0]) for k in kinds] if fm \
            else [disk_name(cfg, name)]
        expected.update(names)
        held = (t, None) if rows is None else rows(name, t)
        if held is None:
            continue
        local, ids = held
        if any(n not in ck.files for n in names):
            missing += [n for n in names if n not in ck.files]
            continue
        with torch.no_grad():
            if fm:
                for i, e in enumerate(range(t.shape[0]) if ids is None else ids.tolist()):
                    parts = [f"{disk_name(cfg, fm.group(1))}.{e}.{k}.weight" for k in kinds]
                    value = torch.cat([_read_checked(ck, n, None, (t.shape[1] // len(kinds), *t.shape[2:]))
                                       for n in parts])
                    local[i].copy_(value.to(local.dtype))
            else:
                for start, stop, at in row_runs(ids, t.shape[0]):
                    value = _read_checked(ck, names[0], (start, stop), tuple(t.shape))
                    local[at:at + stop - start].copy_(value.to(local.dtype))
    unexpected = sorted(disk - expected)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{ck.path}: tensors that do not belong to this config: {unexpected[:5]}{more}")
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{ck.path}: missing tensors {missing[:5]}{more}")
    return model


def row_runs(ids, n_rows: int) -> list[tuple[int, int, int]]:
    """(global start, global stop, local offset) of each run of consecutive rows in `ids` (None: all)."""
    if ids is None:
        return [(0, n_rows, 0)] if n_rows else []
    ids = ids.tolist()
    runs, at = [], 0
    while at < len(ids):
        end = at
        while end + 1 < len(ids) and ids[end + 1] == ids[end] + 1:
            end += 1
        runs.append((ids[at], ids[end] + 1, at))
        at = end + 1
    return runs


def _read_checked(ck: CheckpointReader, name: str, rows: tuple[int, int] | None, want: tuple[int, ...]):
    """Rows of a disk tensor (all of it with rows None) whose whole shape must be `want`."""
    shape = ck.shape(name)
    if shape != want:
        raise CheckpointError(f"{ck.files[name]}: tensor {name!r} has shape {shape}, the config expects {want}")
    return ck.read_rows(name, *(rows or (0, shape[0])))


def from_pretrained(path, dtype=None, device="cpu", mtp: bool | None = None) -> DeepseekV3:
    """Load a Hugging Face-format DeepSeek-V3 directory (FP8 weights dequantised per block). MTP layers
    load when present; a config that names MTP layers whose weights are absent (what transformers
    writes) loads with MTP off, as does mtp=False. The model is allocated once in `dtype` and filled
    tensor by tensor: peak memory is the model plus one tensor."""
    ck = CheckpointReader(path, mtp)
    model = empty_model(ck.cfg, device, dtype or ck.stored_dtype())
    return load_weights(model, ck).eval()
