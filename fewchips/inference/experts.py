"""Routed experts when serving over ep ranks: each rank's slots (its own experts and replicas of hot
ones), the greedy placement of the replicas from measured loads, and the weights kept as stored
(FP8 with 128x128 scales, or the model dtype).

Shape legend (as in model.py): M tokens, K experts per token, D hidden, F expert width, E experts in the
layer, P ep ranks, L = E / P own experts per rank, S = L + R / P slots per rank (R redundant experts).

    slots of rank r          [r*S, (r+1)*S): slot r*S + i holds expert r*L + i for i < L (its own block,
                             read from the checkpoint), a replica for i >= L
    a token copy of expert e goes to one of e's copies, round-robin by its rank among e's copies
                             in this rank's share of the step: each copy gets an equal share of e's rows

Placement (arXiv 2412.19437 §3.4 duplicates high-load experts, chosen from the observed loads): with
loads l_e, R times give one more copy to the expert with the largest load per copy l_e / c_e (at most
one copy per rank); then place the extra copies, largest l_e / c_e first, each on the rank with the
least load that has a free slot and no copy of that expert yet (when none is left, a placed replica
moves over to make one, or, rarely, a rank takes a second copy). A rank's load is the sum of l_e / c_e
over its slots. The own experts stay where the checkpoint's sharded read put them; only replicas move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoint.load import CheckpointError, CheckpointReader, copy_checked
from ..checkpoint.fp8 import fp8_pair, fp8_stored_swiglu
from ..fp8.quant import BLOCK
from ..ops import expert_swiglu
from ..parallel.expert_parallel import ExpertExchange


@dataclass
class Placement:
    """Which expert each slot holds: `slots_PS[r, i]` (rank r's slot i); the first `own` are rank r's
    own block."""

    slots_PS: torch.Tensor
    own: int

    @classmethod
    def place(cls, loads_E: torch.Tensor, ep: int, redundant: int) -> "Placement":
        """The greedy placement above for per-expert loads `loads_E` (any non-negative counts)."""
        E = loads_E.numel()
        L, extra = E // ep, redundant // ep
        load = loads_E.double().cpu()
        copies = torch.ones(E, dtype=torch.long)
        for _ in range(redundant):
            per_copy = torch.where(copies < ep, load / copies, torch.tensor(-1.0, dtype=torch.double))
            copies[int(per_copy.argmax())] += 1
        slots = [list(range(r * L, (r + 1) * L)) for r in range(ep)]
        rank_load = [float(sum(load[e] / copies[e] for e in s)) for s in slots]
        replicas = sorted((e for e in range(E) for _ in range(int(copies[e]) - 1)),
                          key=lambda e: (-float(load[e] / copies[e]), e))
        share = (load / copies).tolist()
        for e in replicas:
            room = [r for r in range(ep) if len(slots[r]) < L + extra]
            free = [r for r in room if e not in slots[r]]
            if free:
                r = min(free, key=lambda r: (rank_load[r], r))
                slots[r].append(e)
                rank_load[r] += share[e]
            elif not _swap_in(slots, room, e, L, share, rank_load):   # every rank with room holds e already
                r = min(room, key=lambda r: (rank_load[r], r))          # no move frees one: a second copy there
                slots[r].append(e)
                rank_load[r] += share[e]
        return cls(torch.tensor(slots, dtype=torch.long), L)

    def table(self) -> torch.Tensor:
        """[E, C] global slot ids of each expert's copies in slot order (-1 past its count)."""
        P, S = self.slots_PS.shape
        flat = self.slots_PS.reshape(-1)
        E = int(flat.max()) + 1
        copies = torch.bincount(flat, minlength=E)
        out = torch.full((E, int(copies.max())), -1, dtype=torch.long)
        fill = torch.zeros(E, dtype=torch.long)
        for g, e in enumerate(flat.tolist()):
            out[e, fill[e]] = g
            fill[e] += 1
        return out

    def share(self) -> torch.Tensor:
        """[E, P] the fraction of expert e's rows rank p computes (1 / copies for each copy it holds)."""
        P, S = self.slots_PS.shape
        E = int(self.slots_PS.max()) + 1
        out = torch.zeros(E, P, dtype=torch.float64)
        for r in range(P):
            out[:, r] = torch.bincount(self.slots_PS[r], minlength=E).double()
        return out / out.sum(1, keepdim=True)

    def rank_loads(self, loads_E: torch.Tensor) -> torch.Tensor:
        """[P] each rank's share of `loads_E`, every expert's load split evenly over its copies."""
        return loads_E.double().cpu() @ self.share()


def _swap_in(slots, room, e, L, share, rank_load):
    """Place a copy of e when every rank with a free slot holds e already: a replica x on a rank q without
    e moves to a rank r with room and without x, and e takes its slot on q."""
    for r in room:
        for q, row in enumerate(slots):
            if e in row:
                continue
            for j in range(L, len(row)):
                x = row[j]
                if x not in slots[r]:
                    row[j] = e
                    slots[r].append(x)
                    rank_load[q] += share[e] - share[x]
                    rank_load[r] += share[x]
                    return True
    return False


def imbalance(rank_loads_P: torch.Tensor) -> float:
    """max / mean rank load: 1.0 is perfect balance; the step waits for the busiest rank."""
    mean = float(rank_loads_P.mean())
    return float(rank_loads_P.max()) / mean if mean > 0 else 1.0


COUNTERS = ("window_E", "served_P", "unreplicated_P")     # buffers that are not weights


class ServingExperts(ExpertExchange):
    """A MoE layer's routed experts at ep N when every rank holds the step's tokens (attention
    replicated): this rank's 1/N of the tokens go through expert parallelism's dispatch and combine to
    the slots holding their experts, then every rank's outputs are all-gathered. Every rank sees every
    token's routing, so each counts the same loads and, every `rebalance_every` calls, computes the
    same new placement; the replicas that change are copied from their experts' owners."""

    def __init__(self, cfg, par, dtype, fp8: bool = False, redundant: int = 0, rebalance_every: int = 0,
                 device="meta"):
        E, P = cfg.n_routed_experts, par.ep
        if E % P:
            raise ValueError(f"--ep {P} must divide n_routed_experts ({E}): experts are placed whole")
        if redundant % P:
            raise ValueError(f"--redundant-experts {redundant} must be a multiple of --ep {P} (every rank holds "
                             f"the same number of replicas)")
        if redundant > E * (P - 1):
            raise ValueError(f"--redundant-experts {redundant}: at most {E * (P - 1)} (one copy per rank of each of "
                             f"{E} experts)")
        self.n_experts, self.redundant, self.rebalance_every = E, redundant, rebalance_every
        self.own = E // P
        super().__init__(P * (self.own + redundant // P), par)
        self.ep_rank, self.fp8 = par.ep_rank, fp8
        S, D, Fd = self.n_local, cfg.hidden_size, cfg.moe_intermediate_size
        shapes = ({"gate": (S, Fd, D), "up": (S, Fd, D), "down": (S, D, Fd)} if fp8
                  else {"gate_up": (S, 2 * Fd, D), "down": (S, D, Fd)})
        for kind, shape in shapes.items():            # not in the state dict: this module reads them itself
            if fp8:
                self.register_buffer(f"{kind}_q", torch.empty(shape, dtype=torch.float8_e4m3fn, device=device),
                                     persistent=False)
                scales = (S, -(-shape[1] // BLOCK[0]), -(-shape[2] // BLOCK[1]))
                self.register_buffer(f"{kind}_s", torch.empty(scales, dtype=torch.float32, device=device),
                                     persistent=False)
            else:
                self.register_buffer(kind, torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("window_E", torch.zeros(E, dtype=torch.long, device=device), persistent=False)
        # rows each rank computed, and would have without replicas (their max/mean is the imbalance)
        self.register_buffer("served_P", torch.zeros(P, dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("unreplicated_P", torch.zeros(P, dtype=torch.float64, device=device), persistent=False)
        self.calls = self.rebalances = 0
        self.set_placement(Placement.place(torch.zeros(E), P, redundant))

    # ---- placement ---------------------------------------------------------------------------------
    def set_placement(self, placement: Placement):
        self.placement = placement
        self._table = placement.table()                  # moved to the tokens' device on first use
        self._copies = (self._table >= 0).sum(1)
        self._share_EP = placement.share()
        self._own_EP = Placement.place(torch.zeros(self.n_experts), self.ep, 0).share()

    def slots_of(self, flat_N: torch.Tensor) -> torch.Tensor:
        """The global slot of each token copy (expert ids `flat_N`): the j-th copy of expert e in this
        call goes to e's copy j mod c_e."""
        order = flat_N.argsort(stable=True)
        counts = torch.bincount(flat_N, minlength=self.n_experts)
        starts = counts.cumsum(0) - counts
        e_sorted = flat_N[order]
        nth = torch.arange(flat_N.numel(), device=flat_N.device) - starts[e_sorted]
        slot_sorted = self._table[e_sorted, nth % self._copies[e_sorted]]
        return torch.empty_like(flat_N).index_copy_(0, order, slot_sorted)

    def rebalance(self, loads_E: torch.Tensor):
        """Place the replicas for `loads_E` and copy the ones that change from their owners (collective
        over the ep group: every rank calls it with the same loads)."""
        new = Placement.place(loads_E, self.ep, self.redundant)
        old = self.placement.slots_PS
        if torch.equal(new.slots_PS, old):
            return
        ops, local = [], []
        me, L = self.ep_rank, self.own
        for r in range(self.ep):
            for i in range(L, self.n_local):
                e = int(new.slots_PS[r, i])
                if e == int(old[r, i]):
                    continue
                owner = e // L
                for t in self._weights():
                    if r == me and owner == me:
                        local.append((t, i, e % L))
                    elif r == me:
                        ops.append(dist.P2POp(dist.irecv, _wire(t[i]), dist.get_global_rank(self.group, owner),
                                              self.group))
                    elif owner == me:
                        ops.append(dist.P2POp(dist.isend, _wire(t[e % L]), dist.get_global_rank(self.group, r),
                                              self.group))
        for t, i, j in local:
            t[i].copy_(t[j])
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        self.set_placement(new)
        self.rebalances += 1

    def _weights(self):
        return [self.gate_q, self.gate_s, self.up_q, self.up_s, self.down_q, self.down_s] if self.fp8 \
            else [self.gate_up, self.down]

    # ---- the forward -------------------------------------------------------------------------------
    def forward(self, x_MD, experts_MK, weights_MK, shared=None):
        if self.redundant:
            self.count(experts_MK.reshape(-1))
        M, P = x_MD.shape[0], self.ep
        n = -(-M // P)
        pad = n * P - M                   # padding rows go to expert 0 with weight 0: their output is dropped
        if pad:
            x_MD, experts_MK, weights_MK = (F.pad(t, (0, 0, 0, pad)) for t in (x_MD, experts_MK, weights_MK))
        mine = slice(self.ep_rank * n, (self.ep_rank + 1) * n)
        y_nD = self.routed(x_MD[mine], experts_MK[mine], weights_MK[mine], shared).contiguous()
        out = torch.empty(n * P, y_nD.shape[1], dtype=y_nD.dtype, device=y_nD.device)
        dist.all_gather_single(out, y_nD, group=self.group)
        return out[:M]

    def count(self, flat_N: torch.Tensor):
        """Replicas only: the call's loads (every rank sees every token, so all count alike), the
        re-placement every `rebalance_every` calls, and the rows each rank computes with and without them."""
        if self._table.device != flat_N.device:           # the placement's tables, where the tokens are
            self._table, self._copies, self._share_EP, self._own_EP = (
                t.to(flat_N.device) for t in (self._table, self._copies, self._share_EP, self._own_EP))
        counts = torch.bincount(flat_N, minlength=self.n_experts)
        self.window_E += counts
        self.calls += 1
        if self.rebalance_every and self.calls % self.rebalance_every == 0:
            self.rebalance(self.window_E)
            self.window_E.zero_()
        self.served_P += counts.double() @ self._share_EP
        self.unreplicated_P += counts.double() @ self._own_EP

    def routed(self, x_MD, experts_MK, weights_MK, shared=None):
        K = experts_MK.shape[1]
        flat = experts_MK.reshape(-1)
        slot = self.slots_of(flat) if self.redundant else flat     # without replicas slot r*L + i is expert r*L + i
        order = slot.argsort(stable=True)
        token_of = order // K                                               # source token of each copy
        side = {}

        def meanwhile():                                  # the shared experts need no routed row
            side["y"] = shared(x_MD)

        y_sorted = self.exchange(x_MD[token_of], torch.bincount(slot, minlength=self.ep * self.n_local),
                                 self.slot_ffn, meanwhile if shared is not None else None)
        y_sorted = y_sorted * weights_MK.reshape(-1)[order, None].to(y_sorted.dtype)
        y_MD = torch.zeros_like(x_MD).index_add_(0, token_of, y_sorted.to(x_MD.dtype))
        return y_MD if shared is None else y_MD + side["y"]

    def slot_ffn(self, x_sorted, counts_S):
        if self.fp8:
            return fp8_stored_swiglu(x_sorted, counts_S, *self._weights())
        return expert_swiglu(x_sorted, counts_S, self.gate_up.to(x_sorted.dtype), self.down.to(x_sorted.dtype))

    # ---- loading -----------------------------------------------------------------------------------
    def load(self, ck: CheckpointReader, disk_base: str):
        """Read this rank's slots' experts from `ck` (`disk_base`: the layer's `...mlp.experts` on disk):
        its own experts and its replicas, nothing else. FP8 weights stay FP8 (a BF16 checkpoint's are
        block-quantised here); otherwise they are dequantised to the model dtype."""
        for counter in COUNTERS:
            getattr(self, counter).zero_()                          # to_empty left them uninitialised
        for i, e in enumerate(self.placement.slots_PS[self.ep_rank].tolist()):
            names = {k: f"{disk_base}.{e}.{k}_proj.weight" for k in ("gate", "up", "down")}
            missing = [n for n in names.values() if n not in ck.files]
            if missing:
                raise CheckpointError(f"{ck.path}: missing tensors {missing[:5]}")
            with torch.no_grad():
                if self.fp8:
                    for k, name in names.items():
                        q, s = fp8_pair(ck, name, ck.read(name))
                        copy_checked(getattr(self, f"{k}_q")[i], q, name, ck.files[name])
                        copy_checked(getattr(self, f"{k}_s")[i], s, name + "_scale_inv", ck.files[name])
                else:
                    gate, up, down = (ck.dequantized(names[k]) for k in ("gate", "up", "down"))
                    copy_checked(self.gate_up[i], torch.cat([gate, up]), names["gate"], ck.files[names["gate"]])
                    copy_checked(self.down[i], down, names["down"], ck.files[names["down"]])

    def extra_repr(self):
        kind = "fp8 e4m3 (128x128 scales)" if self.fp8 else str(self.down.dtype)
        return (f"experts={self.n_experts}, ep={self.ep}, slots per rank={self.n_local} ({self.own} own + "
                f"{self.n_local - self.own} replicas), {kind}")


def replica_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, ServingExperts) and m.redundant]


def replica_imbalance(layers) -> tuple[float, float]:
    """(without replicas, served): the busiest rank's rows over the mean so far, averaged over `layers`
    (1.0 before any token)."""
    before = sum(imbalance(m.unreplicated_P.cpu()) for m in layers) / len(layers)
    return before, sum(imbalance(m.served_P.cpu()) for m in layers) / len(layers)


def replica_summary(model) -> str | None:
    """One line on what the replicas did over a run (None without replicas): the busiest rank's rows over
    the mean, averaged over the MoE layers, as served and as the own experts alone would have had it."""
    layers = replica_layers(model)
    if not layers or not any(float(m.unreplicated_P.sum()) for m in layers):
        return None
    before, after = replica_imbalance(layers)
    m = layers[0]
    return (f"expert replicas ({m.redundant} per layer over {m.ep} ranks, {m.rebalances} re-placements per layer): "
            f"max/mean rank load {before:.3f} without them, {after:.3f} served (mean over {len(layers)} MoE layers)")


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the collectives carry it (FP8 as its bytes)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t

