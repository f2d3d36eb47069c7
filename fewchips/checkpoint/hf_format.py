"""The Hugging Face format of a DeepSeek-V3 checkpoint, written: `config.json` + `model.safetensors`
(or shards with an index), in the release's names.

On disk, names are the release's: per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` and MTP
layers at `model.layers.{num_hidden_layers + i}`. In memory the experts are stacked and MTP lives in
`mtp.{i}`. Writing streams: the files are planned from the tensors' shapes, then each tensor goes into
its file as it comes. Below the model (it reads a model only through `config` and `state_dict`), so
`DeepseekV3.save_pretrained` can call it; `fewchips.checkpoint` reads checkpoints back.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..files import atomic_path, atomic_write_text


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

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


def hf_state_dict(model: torch.nn.Module, fetch=None):
    """Yield (disk name, tensor) in the released layout: experts split, MTP under model.layers.
    `fetch(name, tensor, start, stop)` -> rows [start, stop) of memory tensor `name` (default: a view of
    them); a process that holds only shards passes one that gathers them, and experts are fetched one
    at a time, so no more than one tensor of the release's is assembled at once."""
    cfg = model.config
    fetch = fetch or (lambda name, t, start, stop: t[start:stop].detach())
    sd = model.state_dict(keep_vars=True)
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        disk = disk_name(cfg, name)
        fm = _FUSED_RE.match(disk)
        if fm:
            base, kind = fm.groups()
            for e in range(t.shape[0]):
                w = fetch(name, t, e, e + 1)
                if w is None:                                  # gathered on another process
                    continue
                if kind == "gate_up_proj":
                    gate, up = w[0].chunk(2, dim=0)
                    yield f"{base}.{e}.gate_proj.weight", gate
                    yield f"{base}.{e}.up_proj.weight", up
                else:
                    yield f"{base}.{e}.down_proj.weight", w[0]
            continue
        w = fetch(name, t, 0, t.shape[0])
        if w is not None:
            yield disk, w
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    for k in range(cfg.num_nextn_predict_layers):   # the release stores copies of the shared tensors
        base = f"model.layers.{cfg.num_hidden_layers + k}"
        for disk, name in ((f"{base}.embed_tokens.weight", "model.embed_tokens.weight"),
                           (f"{base}.shared_head.head.weight", head)):
            w = fetch(name, sd[name], 0, sd[name].shape[0])
            if w is not None:
                yield disk, w


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_pretrained(model: torch.nn.Module, path, max_shard_bytes: int = 4 * 2**30, dtype=None,
                    tokenizer_dir: str | None = None, fetch=None):
    """Write config.json and safetensors (sharded past `max_shard_bytes`, with an index), streaming: the
    files' layout is planned from the tensors' shapes first, then each tensor is written into its file
    as it comes, so nothing beyond the model and the tensor in hand is held. Every file is written to a
    temporary name and renamed, so a crash leaves the old files. `fetch`: see `hf_state_dict` (a
    sharded model's rows gathered onto this process)."""
    os.makedirs(path, exist_ok=True)
    cfg = model.config

    def tensors(fetch):
        for name, t in hf_state_dict(model, fetch):
            t = t.detach()
            if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
                t = t.to(dtype)
            yield name, t

    shapes = lambda name, t, a, b: torch.empty((b - a, *t.shape[1:]), dtype=t.dtype, device="meta")  # noqa: E731
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors(shapes)]
    write_shards(path, tensors(fetch), max_shard_bytes, plan)
    d = cfg.to_dict()
    d["torch_dtype"] = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(d, indent=2, sort_keys=True) + "\n")
    return path


def write_shards(path, named_tensors, max_shard_bytes: int, plan=None):
    """Safetensors shards (a weight and its `_scale_inv` always share one) plus the index, or a single
    `model.safetensors`. `plan`: [(name, shape, dtype)] of what `named_tensors` yields, in order; then
    each tensor goes straight into its file. Without it a file's tensors are held until it is full.
    Shards are written under hidden names and renamed once all are done. Stale shards of an earlier
    save are removed first."""
    for old in os.listdir(path):   # stale shards of an earlier save would confuse loaders
        if old.endswith(".safetensors") or old == INDEX_FILE:
            os.remove(os.path.join(path, old))

    def nbytes(shape, dtype):
        return math.prod(shape) * dtype.itemsize

    def split(entries):                              # the files, by the size rule
        files, cur, size = [], [], 0
        for e in entries:
            n = nbytes(e[1], e[2])
            if cur and size + n > max_shard_bytes and not e[0].endswith("_scale_inv"):
                files.append(cur)
                cur, size = [], 0
            cur.append(e)
            size += n
        return files + [cur]

    def groups():                                    # (a file's entries, its tensors in that order)
        if plan is not None:
            it = iter(named_tensors)
            for entries in split(plan):
                yield entries, (next(it) for _ in entries)
            return
        cur, size = [], 0
        for name, t in named_tensors:
            if cur and size + nbytes(t.shape, t.dtype) > max_shard_bytes and not name.endswith("_scale_inv"):
                yield [(n, tuple(x.shape), x.dtype) for n, x in cur], iter(cur)
                cur, size = [], 0
            cur.append((name, t))
            size += nbytes(t.shape, t.dtype)
        yield [(n, tuple(x.shape), x.dtype) for n, x in cur], iter(cur)

    written: list[tuple[str, dict[str, int]]] = []          # (hidden file, name -> bytes) per shard
    try:
        for entries, tensors in groups():
            part = os.path.join(path, f".part-{len(written) + 1:05d}.safetensors")
            stream_safetensors(part, entries, tensors)
            written.append((part, {n: nbytes(shape, dt) for n, shape, dt in entries}))
        if len(written) == 1:
            os.replace(written[0][0], os.path.join(path, SINGLE_FILE))
            return
        weight_map, total = {}, 0
        for i, (part, sizes) in enumerate(written):
            fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(part, os.path.join(path, fname))
            for n, size in sizes.items():
                weight_map[n] = fname
                total += size
        write_index(path, weight_map, total)
    finally:
        for part, _ in written:
            if os.path.exists(part):
                os.remove(part)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", **{d: n for d, n in zip(FP8_DTYPES, ("F8_E4M3", "F8_E5M2"))}}


def stream_safetensors(dest, entries, tensors):
    """One safetensors file from its header (`entries`: [(name, shape, dtype)], known before any data)
    and then each tensor's bytes as `tensors` yields (name, tensor) in that order: the format is an
    8-byte header length, the JSON header with each tensor's byte range, the bytes. Written beside
    `dest` and renamed into place."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(dest, ".safetensors") as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), (got, t) in zip(entries, tensors, strict=True):
            if got != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{dest}: expected {name} {shape} {dtype}, got {got} {tuple(t.shape)} {t.dtype}")
            if t.numel():
                f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)


def write_index(path, weight_map: dict[str, str], total_bytes: int):
    """model.safetensors.index.json: which shard holds each tensor."""
    atomic_write_text(os.path.join(path, INDEX_FILE),
                      json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))


def write_safetensors(tensors: dict, dest):
    """One safetensors file, written beside `dest` and renamed into place."""
    with atomic_path(dest, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


EXPERT_LOADS_FILE = "expert_loads.json"


def moe_expert_names(cfg: ModelConfig) -> list[str]:
    """Disk names of the MoE layers' experts (`model.layers.N.mlp.experts`), main layers then MTP: the
    order of the routers' load rows."""
    main = [f"model.layers.{i}.mlp.experts" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    mtp = [f"model.layers.{cfg.num_hidden_layers + k}.mlp.experts" for k in range(cfg.num_nextn_predict_layers)]
    return main + mtp


def write_expert_loads(path, cfg: ModelConfig, loads_LE: torch.Tensor, tokens: int):
    """Beside a saved model, the tokens each routed expert received ([layers, E], rows as `moe_expert_names`):
    what `fewchips serve --redundant-experts` places its replicas from."""
    names = moe_expert_names(cfg)
    rows = loads_LE.tolist()[:len(names)]
    doc = {"layers": dict(zip(names, ([int(x) for x in r] for r in rows))), "tokens": int(tokens),
           "note": "routed-expert loads (token copies per expert) over the training run that wrote this model"}
    atomic_write_text(os.path.join(path, EXPERT_LOADS_FILE), json.dumps(doc) + "\n")

