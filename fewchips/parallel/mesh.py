"""The process mesh: pipeline (pp) x data parallel (dp) x expert parallel (ep) ranks, one process per chip.

    rank = (pp_rank * dp + dp_rank) * ep + ep_rank     (ep innermost: the ep ranks of one replica are
                                                         neighbours, one node; pp outermost, across nodes)

The ranks of one pipeline stage (dp x ep of them) each read their own slice of the global batch. Routed
experts are split over the `ep` dimension (whole experts per rank) and FSDP-sharded again over `dp`;
everything else is FSDP-sharded over all ranks of the stage.
The same code runs for one process (a one-rank group on an in-memory store) and for N under torchrun.
gloo on CPU, NCCL on CUDA; every collective has a timeout, so a dead or stuck peer ends the job
with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger("fewchips")


@dataclass
class Parallel:
    """Who this process is in the pp x dp x ep mesh, and the groups it talks over."""
    mesh: DeviceMesh              # 2-D, dims ("dp", "ep"): this pipeline stage's ranks
    fsdp_mesh: DeviceMesh         # 1-D over the stage's ranks: where non-expert parameters are sharded
    dp: int
    ep: int
    rank: int
    world_size: int
    device: torch.device
    pp: int = 1
    pp_mesh: DeviceMesh | None = None    # 1-D, dim "pp": the ranks that hold the stages of one pipeline
    full_mesh: DeviceMesh | None = None  # 3-D, dims ("pp", "dp", "ep")

    def pipelines(self) -> list[list[int]]:
        """The global ranks of every pipeline (one per dp x ep coordinate), in pipeline-rank order: the
        same list on every rank, for groups that every rank must create together."""
        ranks = self.full_mesh.mesh.reshape(self.pp, -1)
        return [ranks[:, j].tolist() for j in range(ranks.shape[1])]

    @property
    def data_group(self):
        """The dp x ep ranks of this rank's pipeline stage (they hold its replicated weights)."""
        return self.fsdp_mesh.get_group()

    @property
    def pp_group(self):
        return self.pp_mesh.get_group("pp") if self.pp_mesh is not None else None

    @property
    def pp_rank(self) -> int:
        return self.pp_mesh.get_local_rank("pp") if self.pp_mesh is not None else 0

    @property
    def data_rank(self) -> int:
        """This rank's index among the dp x ep ranks that share a pipeline stage (its slice of the batch)."""
        return self.dp_rank * self.ep + self.ep_rank

    @property
    def data_size(self) -> int:
        return self.dp * self.ep

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch_B):
        """This rank's rows of a global batch [B, ...] (B divisible by dp x ep)."""
        B, n_ranks = batch_B.shape[0], self.data_size
        if B % n_ranks:
            raise ValueError(f"global batch {B} is not divisible by dp x ep = {n_ranks}")
        n = B // n_ranks
        return batch_B[self.data_rank * n:(self.data_rank + 1) * n]


def init_parallel(dp: int | None = None, ep: int = 1, backend: str | None = None,
                  timeout_s: float = 300.0, pp: int = 1) -> Parallel:
    """Join (or start) the process group and build the pp x dp x ep mesh. Reads torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it, a one-process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = "; start the processes with torchrun --nproc_per_node=N -m fewchips ..." if world == 1 else ""
    if pp < 1 or world % pp:
        raise ValueError(f"--pp {pp} must divide the number of processes ({world}){launch}")
    if ep < 1 or (world // pp) % ep:
        raise ValueError(f"--ep {ep} must divide the number of processes per pipeline stage ({world // pp}){launch}")
    dp = world // (pp * ep) if dp is None else dp
    if pp * dp * ep != world:
        raise ValueError(f"--pp {pp} x --dp {dp} x --ep {ep} = {pp * dp * ep}, but {world} processes were started "
                         f"(torchrun --nproc_per_node x --nnodes must equal pp x dp x ep)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kw = dict(backend=backend, timeout=timeout)
        if backend == "nccl":
            kw["device_id"] = device
        if "RANK" not in os.environ and world == 1:
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kw)
        else:
            dist.init_process_group(**kw)
    full = init_device_mesh(device.type, (pp, dp, ep), mesh_dim_names=("pp", "dp", "ep"))
    mesh = full["dp", "ep"]
    fsdp_mesh = _stage_mesh(full, device.type)
    return Parallel(mesh=mesh, fsdp_mesh=fsdp_mesh, dp=dp, ep=ep, rank=dist.get_rank(), world_size=world,
                    device=device, pp=pp, pp_mesh=full["pp"] if pp > 1 else None, full_mesh=full)


def _stage_mesh(full: DeviceMesh, device_type: str) -> DeviceMesh:
    """A 1-D mesh over this rank's pipeline stage (its dp x ep ranks), built from a process group per
    stage (every rank creates every stage's group, in the same order)."""
    stages = full.mesh.reshape(full.mesh.shape[0], -1)
    rank, mine = dist.get_rank(), None
    for ranks in stages.tolist():
        group = dist.new_group(ranks) if len(stages) > 1 else dist.group.WORLD
        if rank in ranks:
            mine = DeviceMesh.from_group(group, device_type, mesh=ranks, mesh_dim_names=("dp_ep",))
    return mine


def shutdown():
    """Leave the process group at a normal end: a barrier first, so no rank closes its connections while a
    peer is still in a collective on them (gloo aborts a process whose peer vanishes mid-teardown)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def abort_on_failure(par: Parallel | None = None, what: str = "training step"):
    """Turn a failed collective (a peer died, hung past the timeout, or raised) into one clear line on
    this rank and an immediate exit, instead of a traceback followed by a hang in teardown."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:   # gloo/NCCL errors are RuntimeError subclasses
        rank = par.rank if par is not None else (dist.get_rank() if dist.is_initialized() else 0)
        lines = str(e).strip().splitlines()
        msg = lines[0] if lines else type(e).__name__
        comm = isinstance(e, dist.DistError) or re.search(r"gloo|nccl|connect|timed? ?out|peer|socket", str(e), re.I)
        if not comm:
            raise
        print(f"fewchips: rank {rank}: {what} failed: {msg}\n"
              f"fewchips: rank {rank}: a peer process probably exited or stopped responding; "
              f"aborting (resume from the last checkpoint)", file=sys.stderr, flush=True)
        os._exit(17)   # no destroy_process_group: it would wait on the dead peer
