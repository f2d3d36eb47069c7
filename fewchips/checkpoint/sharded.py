"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards in
parallel, and a checkpoint loads at any other dp x ep layout (resharding), or into one process.

A checkpoint directory holds the DCP files (`.metadata`, `__*_*.distcp`) for
    {"model": FQN -> tensor, "optim": FQN-keyed optimizer state, "extra": a dict of plain values}
plus `config.json`. FSDP parameters are DTensors sharded over all ranks and routed experts are
DTensors sharded over ep; DCP stores both as their global tensors, so the names and shapes are the
single-process model's. Saves go to `DIR.tmp` and are renamed once every rank has finished, so a
crash mid-save leaves the previous checkpoint.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..config import ModelConfig
from ..files import swap_dir
from ..model import DeepseekV3
from ..parallel.fsdp import fsdp_modules
from ..parallel.shards import RowGather
from .hf_format import hf_state_dict, save_pretrained


def save(path: str, model, optimizer=None, extra: dict | None = None, before_commit=None, group=None,
         owned: set[str] | None = None, tensors: dict[str, dict] | None = None):
    """Collective: every rank calls it. `extra` (step, data position, ...) must be the same on all ranks.
    `before_commit(tmp_dir)` runs on rank 0 before the rename (other files that belong with it);
    `group` is used for the barriers (a group with a long timeout for big models). `owned`: the names
    this rank keeps up to date (a pipeline rank's stages); it writes only those, so each tensor of the
    checkpoint comes from a rank that trains it. `tensors`: more named groups of tensors (DTensors
    laid out like the parameters: the parameter EMA), each a key beside "model"."""
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    rank = dist.get_rank()
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier(group=group)
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    if owned is not None:
        state["model"] = {k: v for k, v in state["model"].items() if k in owned}
        if optimizer is not None:
            state["optim"]["state"] = {k: v for k, v in state["optim"]["state"].items() if k in owned}
    state["extra"] = dict(extra or {})
    for key, group_state in (tensors or {}).items():
        state[key] = group_state
    dcp.save(state, checkpoint_id=tmp)
    if rank == 0:
        model.config.save(os.path.join(tmp, "config.json"))
        if before_commit is not None:
            before_commit(tmp)
        swap_dir(tmp, path)
    dist.barrier(group=group)
    return path


def load(path: str, model, optimizer=None, owned: set[str] | None = None) -> dict:
    """Collective: fill `model` (and `optimizer`) in place from a checkpoint written at any layout;
    returns its `extra` dict. With `owned` (a pipeline rank's names) only those tensors are read (the
    rank holds no others), and the optimizer keeps state only for what this rank trains."""
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path}: not a fewchips sharded checkpoint (no .metadata)")
    state = {"model": get_model_state_dict(model), "extra": _saved_extra(path)}
    if owned is not None:
        state["model"] = {k: v for k, v in state["model"].items() if k in owned}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
        # the hyperparameters stay this optimizer's own: under a pipeline every rank's groups hold other
        # parameters, and the saved groups are one rank's (the lr comes back with the scheduler's state)
        groups = copy.deepcopy(state["optim"]["param_groups"])
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=owned is None))
    if optimizer is not None:
        state["optim"]["param_groups"] = groups
        set_optimizer_state_dict(model, optimizer, state["optim"])
        if owned is not None:
            for name, p in model.named_parameters():
                if name not in owned:
                    optimizer.state.pop(p, None)
    return state["extra"]


def load_tensors(path: str, key: str, template: dict) -> None:
    """Collective: fill `template` (name → tensor or DTensor, this rank's part) in place from the group
    `key` that `save(..., tensors=...)` wrote, at any layout. KeyError if the checkpoint has no such group
    or lacks a name."""
    md = dcp.FileSystemReader(path).read_metadata()
    saved = {k.split(".", 1)[1] for k in md.state_dict_metadata if k.startswith(key + ".")}
    missing = [n for n in template if n not in saved]
    if missing:
        raise KeyError(f"no {key!r} entry for {len(missing)} tensor(s), e.g. {missing[0]}")
    dcp.load({key: template}, checkpoint_id=path)


def _saved_extra(path) -> dict:
    """A template for the `extra` entries the checkpoint holds (DCP loads into existing keys)."""
    md = dcp.FileSystemReader(path).read_metadata()
    return {k.split(".", 1)[1]: None for k in md.state_dict_metadata if k.startswith("extra.")}


def save_hf(model, out_dir: str, device, dtype=None, max_shard_bytes: int = 4 * 2**30):
    """Collective: a model sharded over the processes in any layout (FSDP, experts over ep, pipeline
    stages) written by rank 0 as one Hugging Face directory, streamed: rank 0 assembles one tensor (one
    expert) at a time from the ranks that hold it and writes each safetensors file as soon as it fills."""

    for m in fsdp_modules(model):          # shards, not gathered weights a forward left behind
        m.reshard()
    gather = RowGather(model, device)
    if dist.get_rank() == 0:
        save_pretrained(model, out_dir, max_shard_bytes, dtype=dtype, fetch=gather)
    else:
        for _ in hf_state_dict(model, gather):
            pass


def export_hf(path: str, out_dir: str, dtype=None, config: ModelConfig | None = None):
    """A sharded checkpoint → one Hugging Face directory (config.json + safetensors), in this one
    process with no process group: DCP reassembles every tensor from the shards."""

    if config is None:
        config = ModelConfig.from_json(os.path.join(path, "config.json"))
    with torch.device("meta"):
        model = DeepseekV3(config)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    with warnings.catch_warnings():     # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=path, no_dist=True)
    model.load_state_dict(sd)
    return save_pretrained(model, out_dir, dtype=dtype)
