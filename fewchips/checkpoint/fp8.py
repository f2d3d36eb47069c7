"""FP8 checkpoints in the released layout (the DeepSeek-V3 repository's README_WEIGHTS.md): E4M3 weights with an FP32
`weight_scale_inv` per 128x128 block (a dequantisation *multiplier*), `quantization_config` in
config.json, everything outside the recipe (recipe.py) in BF16.

    save_fp8(model, dir)            quantise the FP8 weights from the master weights and write
    load_fp8(dir)                   a model whose FP8 weights stay FP8 in memory (1 byte per element),
                                    dequantised per block on the fly (or run through the FP8 GEMM)
    convert(src, dst, to)           a whole checkpoint FP8 <-> BF16, one shard at a time

Loading a dequantised model is `fewchips.checkpoint.from_pretrained`, which reads these files too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from .load import (FP8_DTYPES, INDEX_FILE, CheckpointError, CheckpointReader, Fill, disk_name,
                          expert_disk_name, hf_state_dict, write_index, write_safetensors, write_shards)
from ..config import ModelConfig
from ..files import atomic_write_text
from ..model import DeepseekV3, ExpertDispatch, RoutedExperts, Router
from ..fp8.gemm import fp8_mm, resolve_backend
from ..fp8.quant import BLOCK, TILE, dequantize, quantize
from ..fp8.recipe import FP8_EXPERTS_RE, is_fp8_linear, is_fp8_weight

QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [128, 128]}


def quantization_config(pow2_scales: bool = False) -> dict:
    return {**QUANTIZATION_CONFIG, **({"scale_fmt": "ue8m0"} if pow2_scales else {})}


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def fp8_tensors(named_tensors, dtype=torch.bfloat16, pow2_scales: bool = False):
    """(disk name, tensor) -> the release's FP8 form: recipe weights become an E4M3 tensor followed
    by its `_scale_inv`; other float tensors are cast to `dtype` (the FP32 router bias stays FP32)."""
    for name, t in named_tensors:
        t = t.detach()
        if is_fp8_weight(name) and t.dtype not in FP8_DTYPES:
            q, s = quantize(t.float(), BLOCK, pow2_scales)
            yield name, q
            yield name + "_scale_inv", s
        elif t.is_floating_point() and t.dtype not in FP8_DTYPES and not name.endswith("e_score_correction_bias") \
                and not name.endswith("_scale_inv"):
            yield name, t.to(dtype)
        else:
            yield name, t


def save_fp8(model: DeepseekV3, path, dtype=torch.bfloat16, pow2_scales: bool = False,
             max_shard_bytes: int = 4 * 2**30):
    """Write `model` as an FP8 checkpoint in the released layout (weights quantised from the master
    weights, once, here)."""
    os.makedirs(path, exist_ok=True)
    write_shards(path, fp8_tensors(hf_state_dict(model), dtype, pow2_scales), max_shard_bytes)
    d = model.config.replace(quantization_config=quantization_config(pow2_scales)).to_dict()
    d["torch_dtype"] = str(dtype).replace("torch.", "")
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(d, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# FP8 inference modules: weights held in FP8, dequantised per 128x128 block when used
# ---------------------------------------------------------------------------------------------

class FP8StoredLinear(nn.Module):
    """A bias-free linear layer holding an E4M3 weight and its block scales. `weight` (a property)
    is the dequantised weight, so code that reads it (absorbed MLA) sees ordinary values. With
    `fp8_gemm=True` activations are quantised in 1x128 tiles and the product runs as an FP8 GEMM."""

    def __init__(self, in_features, out_features, dtype=torch.bfloat16, fp8_gemm: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.dtype, self.fp8_gemm = in_features, out_features, dtype, fp8_gemm
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                    device=device))
        self.register_buffer("weight_scale_inv", torch.empty(-(-out_features // 128), -(-in_features // 128),
                                                             dtype=torch.float32, device=device))

    @property
    def weight(self):
        return dequantize(self.qweight, self.weight_scale_inv, BLOCK, self.dtype)

    def forward(self, x):
        if self.fp8_gemm:
            x_MK = x.reshape(-1, self.in_features)
            xq, xs = quantize(x_MK, TILE)
            backend = resolve_backend("auto", str(x.device))
            y = fp8_mm(xq, xs, self.qweight, self.weight_scale_inv, BLOCK, x.dtype, backend)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 (128x128 scales)"


class FP8StoredExperts(ExpertDispatch):
    """Routed experts holding E4M3 `gate`, `up` [E, F, D] and `down` [E, D, F] with per-expert block
    scales; each expert that received tokens is dequantised just before its SwiGLU (bounded memory)."""

    def __init__(self, n_experts, dim, hidden, dtype=torch.bfloat16, device=None):
        super().__init__(n_experts)
        self.dtype = dtype
        for kind, (r, c) in (("gate", (hidden, dim)), ("up", (hidden, dim)), ("down", (dim, hidden))):
            self.register_buffer(f"{kind}_q", torch.empty(n_experts, r, c, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer(f"{kind}_s", torch.empty(n_experts, -(-r // 128), -(-c // 128),
                                                          dtype=torch.float32, device=device))

    def expert_ffn(self, x_sorted, counts_E):
        return fp8_stored_swiglu(x_sorted, counts_E, *(getattr(self, f"{k}_{t}") for k in ("gate", "up", "down")
                                                        for t in ("q", "s")))


def fp8_stored_swiglu(x_sorted, counts_E, gate_q, gate_s, up_q, up_s, down_q, down_s):
    """The grouped SwiGLU on E4M3 expert weights [E, ...] with their 128x128 block scales: rows sorted by
    expert, each expert that received rows dequantised just before use (one expert's weights at a time)."""
    def w(q, s, e, dtype):
        return dequantize(q[e], s[e], BLOCK, dtype)

    y = x_sorted.new_zeros(x_sorted.shape[0], down_q.shape[1])
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            x = x_sorted[start:start + n]
            h = F.silu(F.linear(x, w(gate_q, gate_s, e, x.dtype))) * F.linear(x, w(up_q, up_s, e, x.dtype))
            y[start:start + n] = F.linear(h, w(down_q, down_s, e, x.dtype))
        start += n
    return y


def _swap_in_fp8_storage(model: DeepseekV3, dtype, fp8_gemm: bool):
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and is_fp8_linear(name):
            new = FP8StoredLinear(m.in_features, m.out_features, dtype, fp8_gemm, device="meta")
        elif type(m) is RoutedExperts and FP8_EXPERTS_RE.search(name):
            E, D, Fd = m.down_proj.shape
            new = FP8StoredExperts(E, D, Fd, dtype, device="meta")
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def stores_fp8(weights: str, cfg: ModelConfig) -> bool:
    """--weights: `fp8` keeps the recipe's weights in E4M3 with their block scales (a BF16 checkpoint is
    block-quantised on load); `dense` holds them in the model dtype; `auto` is fp8 for a checkpoint in
    the released FP8 layout."""
    if weights not in ("auto", "fp8", "dense"):
        raise ValueError(f"--weights {weights}: one of auto, fp8, dense")
    return weights == "fp8" or (weights == "auto" and (cfg.quantization_config or {}).get("quant_method") == "fp8")


def fp8_pair(ck: CheckpointReader, name: str, t: torch.Tensor):
    """(E4M3 tensor, block scales) for a recipe weight: an FP8 tensor's own scales, or a high-precision
    tensor quantised here."""
    if t.dtype in FP8_DTYPES:
        return t.to(torch.float8_e4m3fn), ck.scale(name, t)
    return quantize(t.float(), BLOCK)


def load_fp8(path, dtype=torch.bfloat16, device="cpu", fp8_gemm: bool = False, mtp: bool | None = None) -> DeepseekV3:
    """Load a checkpoint for inference with the recipe's weights kept in FP8 (an FP8 checkpoint's
    tensors are used as stored; a BF16 checkpoint's are quantised on load). Other weights: `dtype`.
    The same walk and checks as `fewchips.from_pretrained`; only where each tensor goes differs."""
    ck = CheckpointReader(path, mtp)
    model = fp8_meta_model(ck, dtype, fp8_gemm).to_empty(device=device)
    return fill_fp8(model, ck).eval()


def fp8_meta_model(ck: CheckpointReader, dtype=torch.bfloat16, fp8_gemm: bool = False) -> DeepseekV3:
    """The model of `ck` on the meta device with the recipe's weights held in FP8 storage."""
    if ck.block != BLOCK:
        raise CheckpointError(f"{ck.path}: weight_block_size {list(ck.block)} is not supported (only [128, 128])")
    with torch.device("meta"):
        model = DeepseekV3(ck.cfg).to(dtype)
        for m in model.modules():                  # the balancing bias is FP32 whatever `dtype` is
            if isinstance(m, Router):
                m.e_score_correction_bias = torch.empty(ck.cfg.n_routed_experts, dtype=torch.float32)
    _swap_in_fp8_storage(model, dtype, fp8_gemm)
    return model


def fill_fp8(model: DeepseekV3, ck: CheckpointReader, skip_experts: bool = False) -> DeepseekV3:
    """Fill an FP8-storage model (`fp8_meta_model`, materialised) from `ck`. skip_experts: the routed
    experts are read by their own module (serving over ranks reads only the experts a rank holds)."""
    cfg = ck.cfg
    targets = dict(model.state_dict(keep_vars=True))
    fill = Fill(ck, {k: (v.numel(), _fp8_disk_name(cfg, k, v)) for k, v in targets.items()
                     if not (k == "lm_head.weight" and cfg.tie_word_embeddings)})
    for e in ck.entries():
        if e.expert is not None and skip_experts:
            continue
        if e.expert is not None:
            base, i, kind = e.expert
            kind = kind.removesuffix("_proj")
            if f"{base}.{kind}_q" not in targets:
                fill.unexpected.append(e.name)
                continue
            if i >= cfg.n_routed_experts:
                raise CheckpointError(f"{e.file}: {e.name} names expert {i}, config has {cfg.n_routed_experts}")
            for key, value in zip((f"{base}.{kind}_q", f"{base}.{kind}_s"), fp8_pair(ck, e.name, ck.read(e.name))):
                fill.put(key, targets[key][i], value, e)
            continue
        mod = e.memory.removesuffix(".weight")
        if f"{mod}.qweight" in targets:
            q, s = fp8_pair(ck, e.name, ck.read(e.name))
            fill.put(f"{mod}.qweight", targets[f"{mod}.qweight"], q, e)
            fill.put(f"{mod}.weight_scale_inv", targets[f"{mod}.weight_scale_inv"], s, e)
        else:
            fill.put(e.memory, targets.get(e.memory), ck.dequantized(e.name), e)
    fill.check()
    return model


def _fp8_disk_name(cfg: ModelConfig, key: str, t: torch.Tensor) -> str:
    """The disk tensor an FP8-storage target is filled from (for error messages)."""
    m = re.match(r"^(.*\.mlp\.experts)\.(gate|up|down)_([qs])$", key)
    if m:
        name = expert_disk_name(cfg, m.group(1), f"{m.group(2)}_proj", t.shape[0])
        return name if m.group(3) == "q" else name + "_scale_inv"
    name = key.replace(".qweight", ".weight")
    return disk_name(cfg, name)


# ---------------------------------------------------------------------------------------------
# Whole-checkpoint conversion, shard by shard
# ---------------------------------------------------------------------------------------------

def convert(src, dst, to: str, pow2_scales: bool = False, progress=None) -> dict:
    """Convert a Hugging Face-format checkpoint directory to `to` = "fp8" (recipe weights quantised to
    E4M3 with 128x128 scales) or "bf16" (FP8 weights dequantised). Each output shard is built from the
    matching input shard and written before the next is read, so memory stays at about one shard.
    Other files (tokenizer, generation config) are copied. Returns counts of what was done."""
    if to not in ("fp8", "bf16"):
        raise ValueError(f"--to must be fp8 or bf16, got {to!r}")
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a directory")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("--in and --out must be different directories")
    if os.path.isdir(dst) and os.listdir(dst):     # another model's shards or index would mix with these
        raise ValueError(f"--out {dst} is not empty; the converted checkpoint goes to a new or empty folder")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"--out {dst} is a file; it names the converted checkpoint's folder")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    ck = CheckpointReader(src)
    os.makedirs(dst, exist_ok=True)
    by_shard = defaultdict(list)
    for name, file in ck.files.items():
        by_shard[file].append(name)
    weight_map, total, stats = {}, 0, defaultdict(int)
    for file in sorted(by_shard):
        out = {}
        for name in sorted(by_shard[file]):
            if name.endswith("_scale_inv"):
                continue                                 # written beside its weight (or dropped)
            t = ck.read(name)
            if t.dtype in FP8_DTYPES:
                q, s = fp8_pair(ck, name, t)
                if to == "bf16":
                    out[name] = dequantize(q, s, ck.block, torch.bfloat16)
                    stats["dequantised"] += 1
                else:
                    out[name], out[name + "_scale_inv"] = q, s
                    stats["kept"] += 1
            elif to == "fp8" and is_fp8_weight(name):
                out[name], out[name + "_scale_inv"] = quantize(t.float(), BLOCK, pow2_scales)
                stats["quantised"] += 1
            else:
                out[name] = t
                stats["copied"] += 1
        fname = os.path.basename(file)
        write_safetensors(out, os.path.join(dst, fname))
        for n, t in out.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        ck.release(file)                                 # release the input shard's mapping
        del out
        if progress:
            progress(fname)
    for old in os.listdir(dst):                          # stale files of an earlier conversion
        if old.endswith(".safetensors") and old not in set(weight_map.values()):
            os.remove(os.path.join(dst, old))
    if os.path.exists(os.path.join(src, INDEX_FILE)):
        write_index(dst, weight_map, total)
    elif os.path.exists(os.path.join(dst, INDEX_FILE)):
        os.remove(os.path.join(dst, INDEX_FILE))
    if to == "fp8":
        config["quantization_config"] = quantization_config(pow2_scales)
    else:
        config.pop("quantization_config", None)
    config["torch_dtype"] = "bfloat16"
    atomic_write_text(os.path.join(dst, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in os.listdir(src):                        # tokenizer files and the like
        p = os.path.join(src, extra)
        if os.path.isfile(p) and not extra.endswith(".safetensors") and extra not in (INDEX_FILE, "config.json"):
            shutil.copy2(p, os.path.join(dst, extra))
    return dict(stats)
