"""Serving a model split over ranks (`torchrun --nproc_per_node=N -m fewchips serve --ep N`): the routed
experts divided over the N ranks, everything else (attention, dense layers, the MLA cache) replicated.

    rank 0              the HTTP server, the scheduler and sampling: the one Engine
    every rank          the same forward of each engine step, in lockstep

Rank 0's engine drives a `LockstepModel`: each call that runs MoE layers (a prefill chunk, a decode
step, the MTP module) is first announced to the other ranks on a control group (the method, and every
tensor argument broadcast from rank 0: token ids, positions, block tables), and each of them makes
the same call on its replica with its own paged cache (`follow`). A step's tokens are therefore on
every rank, and each MoE layer splits them (`experts.ServingExperts`): rank r takes its 1/N of the
step's tokens through expert parallelism's dispatch and combine to the slots holding their experts (its
own E/N and the replicas of hot ones), and an all-gather gives every rank every token's output again.
Each rank reads only the experts it holds (`load_for_ranks`); FP8 weights stay FP8 (`--weights`).

A collective that fails (a rank died or hangs) ends this process with one line (`abort_on_failure`);
torchrun then stops the others. SIGTERM is rank 0's to handle: it drains as a one-process server does,
then tells the other ranks to stop, which ignore the signal themselves.
"""

from __future__ import annotations

import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..checkpoint.load import CheckpointReader, load_weights
from ..checkpoint.fp8 import fill_fp8, fp8_meta_model, stores_fp8
from ..config import ModelConfig
from ..checkpoint.hf_format import disk_name, moe_expert_names
from ..model import DeepseekV3, MoE
from ..parallel.mesh import abort_on_failure, shutdown
from .experts import COUNTERS, Placement, ServingExperts, replica_summary

STOP = "stop"
CACHE = ("cache",)             # the engine's paged cache: each rank passes its own


def load_for_ranks(path: str, par, dtype=None, mtp: bool | None = None, weights: str = "auto", redundant: int = 0,
                   rebalance_every: int = 0, loads: dict | None = None) -> DeepseekV3:
    """The model of a Hugging Face directory with its routed experts split over `par`'s ep ranks: built on
    the meta device, each rank allocating and reading only what it holds (its experts and its replicas'
    rows; every other tensor whole). `loads`: per MoE layer (its `...mlp.experts` name on disk) the expert
    loads the replicas are first placed for (None: no measured loads yet)."""
    ck = CheckpointReader(path, mtp)
    fp8 = stores_fp8(weights, ck.cfg)
    dtype = dtype or ck.stored_dtype()
    if fp8:
        model = fp8_meta_model(ck, dtype, fp8_gemm=par.device.type == "cuda")
    else:
        with torch.device("meta"):
            model = DeepseekV3(ck.cfg)
        model = model.to(dtype)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            m.experts = ServingExperts(ck.cfg, par, dtype, fp8, redundant, rebalance_every)
            layers[disk_name(ck.cfg, name + ".experts")] = m.experts
    if not layers:
        raise ValueError(f"--ep {par.ep} splits the routed experts over ranks, and this model has no MoE layer")
    if loads is not None:
        unknown = sorted(set(loads) - set(moe_expert_names(ModelConfig.from_json(path))))   # MTP too, loaded or not
        wrong = [k for k in set(loads) & set(layers) if len(loads[k]) != ck.cfg.n_routed_experts]
        if unknown or wrong:
            raise ValueError(f"expert loads name layers this model does not have ({unknown[:3]}) or hold other than "
                             f"{ck.cfg.n_routed_experts} loads ({sorted(wrong)[:3]})")
    model.to_empty(device=par.device)
    model.tie_weights()
    for disk, experts in layers.items():
        if loads is not None and disk in loads:
            experts.set_placement(Placement.place(torch.as_tensor(loads[disk], dtype=torch.float64), par.ep, redundant))
    if fp8:
        fill_fp8(model, ck, skip_experts=True)
    else:
        load_weights(model, ck, skip_experts=True)
    for disk, experts in layers.items():
        experts.load(ck, disk)
    return model.eval()


def held_bytes(model) -> int:
    """Bytes of the weights this rank holds (parameters and stored weights; not the load counters)."""
    seen = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.rsplit(".", 1)[-1] not in COUNTERS:
            seen[t.data_ptr() if t.numel() else name] = (t.to_local() if isinstance(t, DTensor) else t).nbytes
    return sum(seen.values())


def control_group():
    """The group step announcements travel on: gloo (host objects), and no timeout an idle server could
    reach (the followers wait on it between requests)."""
    return dist.new_group(backend="gloo", timeout=timedelta(days=365))


def _spec(value, tensors: list):
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", tuple(value.shape), value.dtype)
    if hasattr(value, "address") and hasattr(value, "layer"):         # a latent cache (model.LatentCache's seam)
        return CACHE
    if value is None or isinstance(value, (int, float, bool, str)):
        return ("value", value)
    raise TypeError(f"a lockstep call cannot carry a {type(value).__name__} to the other ranks")


class LockstepModel:
    """Rank 0's model: the calls that run MoE layers are announced to the other ranks first, everything
    else (the head, the MTP head, config, parameters) is the model's own."""

    def __init__(self, model, par, group):
        self._model, self._par, self._group = model, par, group

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kw):
        return self._run("__call__", args, kw)

    def hidden_states(self, *args, **kw):
        return self._run("hidden_states", args, kw)

    def mtp_hidden(self, *args, **kw):
        return self._run("mtp_hidden", args, kw)

    def _run(self, method, args, kw):
        tensors = []
        header = (method, [_spec(a, tensors) for a in args], {k: _spec(v, tensors) for k, v in kw.items()})
        with abort_on_failure(self._par, "serving step"):
            dist.broadcast_object_list([header], src=0, group=self._group)
            for t in tensors:
                dist.broadcast(t.contiguous(), src=0)
            fn = self._model if method == "__call__" else getattr(self._model, method)
            return fn(*args, **kw)

    def stop(self):
        """Tell the other ranks to leave `follow`."""
        with abort_on_failure(self._par, "stopping the other ranks"):
            dist.broadcast_object_list([(STOP, [], {})], src=0, group=self._group)


def follow(model, cache, par, group):
    """The other ranks' loop: receive each announced call, make it on this replica with this rank's cache,
    until rank 0 says stop. SIGTERM and SIGINT are left to rank 0 (it drains, then stops us)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = par.device

    def value(spec):
        if spec == CACHE:
            return cache
        if spec[0] == "value":
            return spec[1]
        t = torch.empty(spec[1], dtype=spec[2], device=device)
        dist.broadcast(t, src=0)
        return t

    with abort_on_failure(par, "serving step"), torch.inference_mode():
        while True:
            header = [None]
            dist.broadcast_object_list(header, src=0, group=group)
            method, specs, kwspecs = header[0]
            if method == STOP:
                return
            args = [value(s) for s in specs]
            kw = {k: value(s) for k, s in kwspecs.items()}
            (model if method == "__call__" else getattr(model, method))(*args, **kw)


class Ranks:
    """A command's ranks: rank 0 drives the engine through `lockstep(model)`, the others `follow`."""

    def __init__(self, par):
        self.par, self.group = par, control_group()
        self.is_main = par.rank == 0
        self._lockstep = None

    def lockstep(self, model) -> LockstepModel:
        self._lockstep = LockstepModel(model, self.par, self.group)
        return self._lockstep

    def follow(self, model, cache):
        follow(model, cache, self.par, self.group)

    def close(self):
        """Rank 0 tells the others to stop; every rank leaves the process group."""
        if self._lockstep is not None:
            self._lockstep.stop()
            summary = replica_summary(self._lockstep._model)
            if summary:
                print(summary, file=sys.stderr, flush=True)
        shutdown()
