"""Hugging Face checkpoint I/O: `config.json` + `model.safetensors` (or shards with an index).

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
from safetensors.torch import save_file

from .config import ModelConfig
from .files import atomic_path, atomic_write_text
from .fp8.quant import dequantize
from .model import DeepseekV3

log = logging.getLogger("fewchips")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded as it is; the message names the file and tensor."""


# ---------------------------------------------------------------------------------------------
# Name mapping between memory and disk
# ---------------------------------------------------------------------------------------------

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def disk_name(cfg: ModelConfig, name: str) -> str:
    """mtp.{k}.rest -> model.layers.{N+k}.rest; everything else unchanged."""
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
    return name


def _memory_name(cfg: ModelConfig, name: str) -> str:
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return f"mtp.{int(m.group(1)) - cfg.num_hidden_layers}.{m.group(2)}"
    return name


def hf_state_dict(model: DeepseekV3):
    """Yield (disk name, tensor) in the released layout: experts split, MTP under model.layers."""
    cfg = model.config
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        disk = disk_name(cfg, name)
        fm = _FUSED_RE.match(disk)
        if fm:
            base, kind = fm.groups()
            for e in range(t.shape[0]):
                if kind == "gate_up_proj":
                    gate, up = t[e].chunk(2, dim=0)
                    yield f"{base}.{e}.gate_proj.weight", gate
                    yield f"{base}.{e}.up_proj.weight", up
                else:
                    yield f"{base}.{e}.down_proj.weight", t[e]
            continue
        yield disk, t
    for k in range(cfg.num_nextn_predict_layers):   # the release stores copies of the shared tensors
        base = f"model.layers.{cfg.num_hidden_layers + k}"
        yield f"{base}.embed_tokens.weight", model.model.embed_tokens.weight.detach().clone()
        yield f"{base}.shared_head.head.weight", model.lm_head.weight.detach().clone()


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_pretrained(model: DeepseekV3, path, max_shard_bytes: int = 4 * 2**30, dtype=None,
                    tokenizer_dir: str | None = None):
    """Write config.json and safetensors (sharded past `max_shard_bytes`, with an index).
    Every file is written to a temporary name and renamed, so a crash leaves the old file."""
    os.makedirs(path, exist_ok=True)
    cfg = model.config

    def tensors():
        for name, t in hf_state_dict(model):
            t = t.detach()
            if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
                t = t.to(dtype)
            yield name, t

    write_shards(path, tensors(), max_shard_bytes)
    d = cfg.to_dict()
    d["torch_dtype"] = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(d, indent=2, sort_keys=True) + "\n")
    return path


DeepseekV3.save_pretrained = save_pretrained     # model.save_pretrained(path, ...): the method form


def write_shards(path, named_tensors, max_shard_bytes: int):
    """Safetensors shards (a weight and its `_scale_inv` always share one) plus the index, or a single
    `model.safetensors`; stale shards of an earlier save are removed first."""
    shards, cur, cur_bytes = [], {}, 0
    for name, t in named_tensors:
        t = t.contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes and not name.endswith("_scale_inv"):
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = t.clone() if _shares_storage(t) else t
        cur_bytes += nbytes
    shards.append(cur)
    for old in os.listdir(path):   # stale shards of an earlier save would confuse loaders
        if old.endswith(".safetensors") or old == INDEX_FILE:
            os.remove(os.path.join(path, old))
    if len(shards) == 1:
        write_safetensors(shards[0], os.path.join(path, SINGLE_FILE))
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, os.path.join(path, fname))
        for n, t in shard.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    write_index(path, weight_map, total)


def write_index(path, weight_map: dict[str, str], total_bytes: int):
    """model.safetensors.index.json: which shard holds each tensor."""
    atomic_write_text(os.path.join(path, INDEX_FILE),
                      json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))


def _shares_storage(t):
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def write_safetensors(tensors: dict, dest):
    """One safetensors file, written beside `dest` and renamed into place."""
    with atomic_path(dest, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


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
        file = self.files[name]
        try:
            if file not in self._handles:
                self._handles[file] = safe_open(file, framework="pt")
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e}); is the file truncated?") from None

    def scale(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The `weight_scale_inv` of FP8 tensor `name`, checked against the weight's block grid."""
        sname = name + "_scale_inv"
        if sname not in self.files:
            raise CheckpointError(f"{self.files[name]}: FP8 tensor {name!r} has no {sname!r}")
        s = self.read(sname)
        want = (-(-w.shape[0] // self.block[0]), -(-w.shape[1] // self.block[1]))
        if w.dim() != 2 or tuple(s.shape) != want:
            raise CheckpointError(f"{self.files[sname]}: {sname} has shape {tuple(s.shape)}, expected {want} "
                                  f"for a {tuple(w.shape)} weight in {self.block[0]}x{self.block[1]} blocks")
        return s.float()

    def dequantized(self, name: str) -> torch.Tensor:
        """The tensor in high precision: an FP8 weight times its block scales, anything else as stored."""
        t = self.read(name)
        return dequantize(t, self.scale(name, t), self.block) if t.dtype in FP8_DTYPES else t

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
    """The model allocated once, uninitialised (the loader fills every tensor)."""
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    model = model.to_empty(device=device)
    return model.to(dtype) if dtype is not None else model


def from_pretrained(path, dtype=None, device="cpu", mtp: bool | None = None) -> DeepseekV3:
    """Load a Hugging Face-format DeepSeek-V3 directory (FP8 weights dequantised per block). MTP layers
    load when present; a config that names MTP layers whose weights are absent (what transformers
    writes) loads with MTP off, as does mtp=False. Streams tensor by tensor: peak memory is the model
    plus one tensor."""
    ck = CheckpointReader(path, mtp)
    cfg = ck.cfg
    model = empty_model(cfg, device, dtype or ck.stored_dtype())
    params = dict(model.state_dict(keep_vars=True))
    expected = {}
    for mem, p in params.items():
        if mem == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        fm = _FUSED_RE.match(mem)
        kinds = (("gate_proj", "up_proj") if fm.group(2) == "gate_up_proj" else ("down_proj",)) if fm else ()
        for k in kinds:
            expected[f"{fm.group(1)}.{k}"] = (p.numel() // len(kinds), expert_disk_name(cfg, fm.group(1), k, p.shape[0]))
        if not fm:
            expected[mem] = (p.numel(), disk_name(cfg, mem))
    fill = Fill(ck, expected)
    for e in ck.entries():
        if e.expert is None:
            fill.put(e.memory, params.get(e.memory), ck.dequantized(e.name), e)
            continue
        base, i, kind = e.expert
        stacked = params.get(f"{base}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}")
        dest = None
        if stacked is not None:
            if i >= stacked.shape[0]:
                raise CheckpointError(f"{e.file}: {e.name} names expert {i}, config has {stacked.shape[0]}")
            dest = stacked[i]
            if kind != "down_proj":                          # gate_up_proj rows: [gate; up]
                dest = dest.chunk(2, dim=0)[1 if kind == "up_proj" else 0]
        fill.put(f"{base}.{kind}", dest, ck.dequantized(e.name), e)
    fill.check()
    return model.eval()
