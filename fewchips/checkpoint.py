"""Hugging Face checkpoint I/O: `config.json` + `model.safetensors` (or shards with an index).

On disk, names are the release's (reference 8.1): per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`
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

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .files import atomic_path, atomic_write_text
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


def _disk_layer_prefix(cfg: ModelConfig, name: str) -> str:
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
        disk = _disk_layer_prefix(cfg, name)
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
    atomic_write_text(os.path.join(path, INDEX_FILE),
                       json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _shares_storage(t):
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def write_safetensors(tensors: dict, dest):
    """One safetensors file, written beside `dest` and renamed into place."""
    with atomic_path(dest, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Loading
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
        return {n: single for n in _keys(single)}
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _keys(file):
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


class _Reader:
    """Opens each shard once, lazily, and reads single tensors from it."""

    def __init__(self):
        self.handles = {}

    def get(self, file, name):
        try:
            if file not in self.handles:
                self.handles[file] = safe_open(file, framework="pt")
            return self.handles[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e}); is the file truncated?") from None


def dequantize_fp8_blocks(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                          out_dtype=torch.float32) -> torch.Tensor:
    """W[r, c] = W_fp8[r, c] * S[r // 128, c // 128]; edge blocks are partial (reference 5.6)."""
    M, N = w_fp8.shape
    br, bc = block
    s = scale_inv.float().repeat_interleave(br, 0)[:M].repeat_interleave(bc, 1)[:, :N]
    return (w_fp8.float() * s).to(out_dtype)


def _check_scale(name, file, w, s, block):
    want = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
    if w.dim() != 2 or tuple(s.shape) != want:
        raise CheckpointError(f"{file}: {name}_scale_inv has shape {tuple(s.shape)}, expected {want} "
                              f"for a {tuple(w.shape)} weight in {block[0]}x{block[1]} blocks")


def copy_checked(dest: torch.Tensor, value: torch.Tensor, name: str, file: str):
    """dest <- value, refusing a shape the config does not expect with the tensor's name and file."""
    if tuple(value.shape) != tuple(dest.shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(value.shape)}, "
                              f"the config expects {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(value.to(dest.dtype))


def read_scale(name, w, files, reader: _Reader, block) -> torch.Tensor:
    """The `weight_scale_inv` of FP8 tensor `name`, checked against the weight's block grid."""
    sname = name + "_scale_inv"
    if sname not in files:
        raise CheckpointError(f"{files[name]}: FP8 tensor {name!r} has no {sname!r}")
    s = reader.get(files[sname], sname)
    _check_scale(name, files[sname], w, s, block)
    return s


def from_pretrained(path, dtype=None, device="cpu", mtp: bool | None = None) -> DeepseekV3:
    """Load a Hugging Face-format DeepSeek-V3 directory. MTP layers load when present; a config that
    names MTP layers whose weights are absent (what transformers writes) loads with MTP off."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    cfg = ModelConfig.from_json(path)
    files = weight_files(path)
    block = tuple((cfg.quantization_config or {}).get("weight_block_size", (128, 128)))

    N = cfg.num_hidden_layers
    has_mtp = any(re.match(rf"^model\.layers\.{N + k}\.", n) and "embed_tokens" not in n and "shared_head.head" not in n
                  for n in files for k in range(cfg.num_nextn_predict_layers))
    if cfg.num_nextn_predict_layers and not has_mtp:
        log.warning("%s: config names %d MTP layer(s) but the checkpoint has no MTP weights; loading with MTP off",
                    path, cfg.num_nextn_predict_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    elif mtp is False:
        cfg = cfg.replace(num_nextn_predict_layers=0)

    if dtype is None:
        dtype = _stored_dtype(files)
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    model = model.to_empty(device=device).to(dtype)
    params = dict(model.state_dict(keep_vars=True))
    filled = defaultdict(int)      # memory name -> number of elements written
    reader = _Reader()
    unexpected = []

    for name in sorted(files, key=lambda n: (files[n], n)):
        if name.endswith("_scale_inv"):
            continue
        if re.match(r"^model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$", name):
            continue   # MTP copies of the shared embedding and head
        mem = _memory_name(cfg, name)
        if mem.startswith("mtp.") and not cfg.num_nextn_predict_layers:
            continue
        t = reader.get(files[name], name)
        if t.dtype in FP8_DTYPES:
            t = dequantize_fp8_blocks(t, read_scale(name, t, files, reader, block), block)
        em = _EXPERT_RE.match(mem)
        if em:
            base, e, kind = em.group(1), int(em.group(2)), em.group(3)
            target = params.get(f"{base}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}")
            if target is None:
                unexpected.append(name)
                continue
            if e >= target.shape[0]:
                raise CheckpointError(f"{files[name]}: {name} names expert {e}, config has {target.shape[0]}")
            dest = target[e]
            if kind != "down_proj":
                half = dest.shape[0] // 2
                dest = dest[:half] if kind == "gate_proj" else dest[half:]
            key = f"{base}.{kind}"
        else:
            if mem not in params:
                unexpected.append(name)
                continue
            dest, key = params[mem], mem
        copy_checked(dest, t, name, files[name])
        filled[key] += t.numel()

    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: tensors that do not belong to this config: {unexpected[:5]}{more}")
    missing = []
    for mem, p in params.items():
        if mem == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        fm = _FUSED_RE.match(mem)
        if fm:
            E = p.shape[0]
            kinds = ("gate_proj", "up_proj") if fm.group(2) == "gate_up_proj" else ("down_proj",)
            for k in kinds:
                if filled[f"{fm.group(1)}.{k}"] != p.numel() // len(kinds):
                    missing.append(f"{_disk_layer_prefix(cfg, fm.group(1))}.{{0..{E - 1}}}.{k}.weight")
        elif filled[mem] != p.numel():
            missing.append(_disk_layer_prefix(cfg, mem))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{more}")
    model.eval()
    return model


def _stored_dtype(files) -> torch.dtype:
    """The float dtype most of the stored (non-FP8) weights use; FP8 checkpoints load as bfloat16."""
    counts = defaultdict(int)
    for file in set(files.values()):
        try:
            with safe_open(file, framework="pt") as f:
                for n in f.keys():
                    if n.endswith("_scale_inv") or n.endswith("e_score_correction_bias"):
                        continue
                    sl = f.get_slice(n)
                    counts[sl.get_dtype()] += 1
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    best = max((c, k) for k, c in counts.items() if k in names) if any(k in names for k in counts) else None
    return names[best[1]] if best else torch.bfloat16
