"""Which rows of each tensor this process holds, and gathering rows onto one process.

Every placement here shards along dim 0 (FSDP2's chunks, whole experts over ep, then their chunks over
dp), so what a process holds of a tensor is a set of its rows. `held_rows` names them (the global row
ids of the local shard), which is what a layout-free initialisation and a sharded checkpoint read need:
each process fills exactly its rows, as one process would fill them. `RowGather` brings given rows of a
tensor to one process, from whichever processes hold them: a streaming export assembles one tensor (one
expert) at a time and never the whole model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from ..checkpoint.load import row_runs


def held_rows(name: str, t: torch.Tensor):
    """(local tensor, global row ids [n] or None for all rows) of what this process holds of `t`, or None
    when it holds nothing (a meta tensor: a pipeline stage elsewhere). The ids come from scattering
    arange(rows) with the tensor's own mesh and placements, so they follow whatever chunking torch used."""
    if not isinstance(t, DTensor):
        return None if t.is_meta else (t, None)
    local = t.to_local()
    if local.is_meta:
        return None
    if all(isinstance(p, Replicate) for p in t.placements):
        return local, None
    rows = torch.arange(t.shape[0], device=t.device_mesh.device_type)
    ids = distribute_tensor(rows, t.device_mesh, t.placements, src_data_rank=None).to_local()
    return local, ids.cpu()


class RowGather:
    """`fetch(name, tensor, start, stop)` for `checkpoint.hf_state_dict`: rows [start, stop) of a model
    tensor assembled on process `dst` (None on the others) from the processes that hold them, each row
    taken from the lowest rank holding it (replicas are equal). Collective: every process walks the same
    tensors in the same order. One exchange of who holds what, then point-to-point sends per piece."""

    def __init__(self, model: torch.nn.Module, device, dst: int = 0):
        self.device, self.dst, self.rank = torch.device(device), dst, dist.get_rank()
        self.local: dict[str, tuple[torch.Tensor, list]] = {}
        mine = {}
        for name, t in model.state_dict(keep_vars=True).items():
            held = held_rows(name, t)
            if held is not None:
                runs = row_runs(held[1], t.shape[0])
                self.local[name] = (held[0], runs)
                mine[name] = [(a, b) for a, b, _ in runs]
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        self.holders = every                                       # per rank: name -> [(start, stop)]

    def _pieces(self, name: str, start: int, stop: int):
        """(rank, lo, hi): who sends which rows of [start, stop), lowest rank first, each row once."""
        todo, out = [(start, stop)], []
        for rank, held in enumerate(self.holders):
            for a, b in held.get(name, ()):
                left = []
                for lo, hi in todo:
                    x, y = max(lo, a), min(hi, b)
                    if x >= y:
                        left.append((lo, hi))
                        continue
                    out.append((rank, x, y))
                    left += [r for r in ((lo, x), (y, hi)) if r[0] < r[1]]
                todo = left
        if todo:
            raise RuntimeError(f"rows {todo} of {name} are held by no process")
        return out

    def _local_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        local, runs = self.local[name]
        for a, b, at in runs:
            if a <= lo and hi <= b:
                return local[at + lo - a:at + hi - a]
        raise RuntimeError(f"rows [{lo}, {hi}) of {name} are not one local run")

    @torch.no_grad()
    def __call__(self, name: str, t: torch.Tensor, start: int, stop: int):
        pieces = self._pieces(name, start, stop)
        if self.rank != self.dst:
            for rank, lo, hi in pieces:
                if rank == self.rank:
                    dist.send(self._local_rows(name, lo, hi).contiguous(), dst=self.dst)
            return None
        out = torch.empty((stop - start, *t.shape[1:]), dtype=t.dtype, device=self.device)
        for rank, lo, hi in pieces:
            if rank == self.rank:
                out[lo - start:hi - start].copy_(self._local_rows(name, lo, hi))
            else:
                buf = torch.empty((hi - lo, *t.shape[1:]), dtype=t.dtype, device=self.device)
                dist.recv(buf, src=rank)
                out[lo - start:hi - start].copy_(buf)
        return out.cpu()
