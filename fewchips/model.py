"""DeepSeek-V3 in one file, in the paper's order: RMSNorm, RoPE/YaRN, MLA, SwiGLU, the DeepSeekMoE
router and experts, the decoder block, the model, and the Multi-Token Prediction module.

Shape legend (suffixes on tensor names):
    B batch  T tokens in the step  S cache length  H heads  D hidden_size
    C kv_lora_rank (the cached latent)  R qk_rope_head_dim  N qk_nope_head_dim  V v_head_dim
    E routed experts  K experts per token  F expert (or dense FFN) width  M flattened tokens (B*T)

Parameter names are the released Hugging Face checkpoint's, except that routed experts
are stacked into `experts.gate_up_proj [E, 2F, D]` and `experts.down_proj [E, D, F]` (as transformers
does internally) and the MTP layers live in `mtp.{i}` (`model.layers.{num_hidden_layers + i}` on disk);
the checkpoint module maps between the two.

Seams for the rest of the project: every projection is a plain `nn.Linear` (FP8 swaps modules),
`RoutedExperts` is the whole dispatch → expert FFN → combine step (expert parallelism replaces it),
and `LatentCache` is the only inference state (owned by the caller, passed in).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint.hf_format import save_pretrained
from .config import ModelConfig, yarn_mscale
from .ops import (causal_attention, expert_swiglu, gather_rows, gathered_swiglu, positional_attention,
                  use_gathered_experts)


# ---------------------------------------------------------------------------------------------
# Normalisation and rotary embeddings
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype (as transformers does: a bf16 mean of squares
    loses precision at these widths)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in fp32, as one fused op (decode steps are op-count bound)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies of the decoupled rope dims, with YaRN's ramp (arXiv 2309.00071; the report's
    context extension, arXiv 2412.19437 §4.3),
    and the cos/sin amplitude factor (1.0 for the released V3 config)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    y = cfg.yarn
    if y is None:
        return 1.0 / pos_freqs, 1.0
    factor = cfg.yarn_factor
    orig = y["original_max_position_embeddings"]
    beta_fast, beta_slow = y.get("beta_fast") or 32, y.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if y.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp                     # 1: pair untouched (high frequency), 0: fully interpolated by 1/s
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    amp = y.get("attention_factor")
    if amp is None:
        ms, msa = y.get("mscale"), y.get("mscale_all_dim")
        amp = yarn_mscale(factor, ms) / yarn_mscale(factor, msa) if ms and msa else yarn_mscale(factor)
    return inv_freq, float(amp)


class Rotary(nn.Module):
    """cos/sin for given positions, computed on the fly (no table: V3's 163,840 positions need none)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq_cpu, self.amplitude = rope_frequencies(cfg)   # a plain tensor: survives meta init
        self._per_device: dict = {}

    def forward(self, positions):                                   # positions [B, T] (int)
        dev = positions.device
        if dev not in self._per_device:
            self._per_device[dev] = self.inv_freq_cpu.to(dev)
        freqs = positions[..., None].float() * self._per_device[dev]  # [B, T, R/2]
        return freqs.cos() * self.amplitude, freqs.sin() * self.amplitude


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x0,x1),(x2,x3)... - the released weights' layout - and write the result
    half-split ([all evens | all odds]). q and k get the same permutation, so every q.k is unchanged
    and no weight permutation is needed (docs/model.md, RoPE layout). x [..., T, h, R], cos/sin [..., T, R/2]."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------
# Multi-head Latent Attention (arXiv 2412.19437 §2.1.1)
# ---------------------------------------------------------------------------------------------

class LatentCache:
    """The MLA inference cache: per layer, the normalised KV latent c [C] and the rotated shared rope
    key k^R [R] of every token - (C + R) numbers per token per layer, pre-allocated.
    One tensor per layer (`latent_BSC[layer]`, `k_rope_BSR[layer]`), not one stacked tensor: a compiled
    decode step then writes each in place, where a write into a slice of a stacked buffer makes the
    compiler copy the whole buffer.
    `slots` rows of the batch dimension can be reused by different requests over time.
    static=True: every step attends over all max_len positions (the causal mask hides the unwritten
    ones), so shapes never change and nothing syncs with the host - what CUDA-graph capture needs.
    The engine's paged twin (`inference.paged.PagedLatentCache`) has the same two methods the model
    calls: `address` (where this step's tokens go and what they read) and `layer`."""

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, n_layers: int | None = None,
                 dtype=torch.float32, device="cpu", static: bool = False):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if n_layers is None else n_layers
        self.max_len, self.static = max_len, static
        self.latent_BSC = [torch.zeros(n_slots, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
                           for _ in range(n_layers)]
        self.k_rope_BSR = [torch.zeros(n_slots, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
                           for _ in range(n_layers)]

    @property
    def bytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for t in self.latent_BSC + self.k_rope_BSR)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.latent_BSC + self.k_rope_BSR)

    def address(self, positions_BT, slots_B=None, attend_len: int | None = None) -> "CacheStep":
        """New tokens at `positions_BT` of cache rows `slots_B` (None: rows 0..B-1) attend over positions
        [0, attend_len): by default max(positions) + 1 (a host sync), or max_len for a static cache."""
        rows_B = slots_B if slots_B is not None else torch.arange(positions_BT.shape[0], device=positions_BT.device)
        if attend_len is None:
            attend_len = self.max_len if self.static else int(positions_BT.max()) + 1
        return CacheStep(positions_BT, attend_len, (rows_B[:, None] * self.max_len + positions_BT).reshape(-1),
                         slots_B=slots_B)

    def layer(self, i: int):
        return self.latent_BSC[i], self.k_rope_BSR[i]


@dataclass
class CacheStep:
    """Cache addressing for one forward, shared by every layer."""
    positions_BT: torch.Tensor        # absolute position of each new token
    attend_len: int                   # attend over cache positions [0, attend_len)
    write_M: torch.Tensor             # flat cache row of each new token (one index_copy_ per write)
    read_BS: torch.Tensor | None = None   # flat cache row of each attended position (paged); None: contiguous
    slots_B: torch.Tensor | None = None   # contiguous: cache row of each batch row; None: rows 0..B-1 (a view)


@dataclass
class CacheView:
    """What one layer's attention needs to read and write the cache for this step: its buffers (any
    shape whose last dim is C or R; flattened to cache rows) and the step's addressing."""
    latent: torch.Tensor
    k_rope: torch.Tensor
    step: CacheStep

    @property
    def positions_BT(self):
        return self.step.positions_BT

    @property
    def attend_len(self):
        return self.step.attend_len

    def write(self, c_BTC, k_rope_BTR):
        for buf, x in ((self.latent, c_BTC), (self.k_rope, k_rope_BTR)):
            buf.view(-1, buf.shape[-1]).index_copy_(0, self.step.write_M, x.reshape(-1, x.shape[-1]).to(buf.dtype))

    def read(self, dtype):
        """The latent [B, S, C] and rope keys [B, S, R] of this step's rows, S = attend_len."""
        st, S = self.step, self.step.attend_len
        if st.read_BS is not None:        # paged: gather each row's positions through its block table
            return tuple(gather_rows(buf.view(-1, buf.shape[-1]), st.read_BS).to(dtype)
                         for buf in (self.latent, self.k_rope))
        if st.slots_B is None:
            B = st.positions_BT.shape[0]
            return self.latent[:B, :S].to(dtype), self.k_rope[:B, :S].to(dtype)
        return self.latent[st.slots_B, :S].to(dtype), self.k_rope[st.slots_B, :S].to(dtype)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = H = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk = self.nope + self.rope
        D = cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)
        self.softmax_scale = cfg.softmax_scale   # 192^-1/2 * mscale^2; also for the absorbed form
        # Over S cached positions, a query token costs 2C + R multiply-adds per head and position absorbed,
        # N + R + V expanded plus C(N + V) per position to decompress, shared by the step's T tokens:
        # expanded wins once T > C(N + V) / (2C - N - V) (64 for `tiny`, 171 for V3); decoding stays absorbed.
        C, NV = cfg.kv_lora_rank, self.nope + self.v_dim
        self.absorb_max_T = C * NV // (2 * C - NV) if 2 * C > NV else 1 << 62

    def forward(self, x_BTD, cos, sin, cache: CacheView | None = None, segments_BT=None):
        """segments_BT: the packed sample each token belongs to (sample masking: attention stays inside
        a sample); None: one causal sequence per row."""
        B, T, _ = x_BTD.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHk = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope_BTHN, q_rope_BTHR = q_BTHk.split([self.nope, self.rope], dim=-1)
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin)

        kv = self.kv_a_proj_with_mqa(x_BTD)
        c_BTC, k_rope_BTR = kv.split([self.kv_lora_rank, self.rope], dim=-1)
        c_BTC = self.kv_a_layernorm(c_BTC)                              # norm on the latent only
        k_rope_BTR = apply_rope(k_rope_BTR.unsqueeze(2), cos, sin).squeeze(2)  # one key for all heads

        if cache is not None:
            cache.write(c_BTC, k_rope_BTR)
            if cache.attend_len > T or not _starts_at_zero(cache.positions_BT):
                if T > self.absorb_max_T:       # a prefill chunk after cached tokens: decompress them (MHA form)
                    o_BHTV = self._expanded_cached(q_nope_BTHN, q_rope_BTHR, cache)
                    return self.o_proj(o_BHTV.transpose(1, 2).reshape(B, T, -1))
                o_BTHV = self._absorbed(q_nope_BTHN, q_rope_BTHR, cache)
                return self.o_proj(o_BTHV.reshape(B, T, -1))
        # Expanded ("MHA mode") attention over the tokens of this step: training and prefill.
        kv_BTHk = self.kv_b_proj(c_BTC).view(B, T, self.n_heads, self.nope + self.v_dim)
        k_nope_BTHN, v_BTHV = kv_BTHk.split([self.nope, self.v_dim], dim=-1)
        q_BHTk = torch.cat((q_nope_BTHN, q_rope_BTHR), dim=-1).transpose(1, 2)
        k_BHTk = torch.cat((k_nope_BTHN, k_rope_BTR[:, :, None].expand(B, T, self.n_heads, self.rope)),
                           dim=-1).transpose(1, 2)
        o_BHTV = causal_attention(q_BHTk, k_BHTk, v_BTHV.transpose(1, 2), self.softmax_scale, segments_BT)
        return self.o_proj(o_BHTV.transpose(1, 2).reshape(B, T, -1))

    def _expanded_cached(self, q_nope_BTHN, q_rope_BTHR, cache: CacheView):
        """Attend over the cache in the expanded form: the step's S cached latents decompressed by W_UK/W_UV
        (kv_b_proj), each query token seeing positions up to its own (chunked prefill, prefix-cache hits)."""
        B, T, H, _ = q_nope_BTHN.shape
        latent_BSC, k_rope_BSR = cache.read(q_nope_BTHN.dtype)
        S = latent_BSC.shape[1]
        k_nope_BSHN, v_BSHV = self.kv_b_proj(latent_BSC).view(B, S, H, self.nope + self.v_dim).split(
            [self.nope, self.v_dim], dim=-1)
        q_BHTk = torch.cat((q_nope_BTHN, q_rope_BTHR), dim=-1).transpose(1, 2)
        k_BHSk = torch.cat((k_nope_BSHN, k_rope_BSR[:, :, None].expand(B, S, H, self.rope)), dim=-1).transpose(1, 2)
        return positional_attention(q_BHTk, k_BHSk, v_BSHV.transpose(1, 2), self.softmax_scale, cache.positions_BT)

    def _absorbed(self, q_nope_BTHN, q_rope_BTHR, cache: CacheView):
        """Attend over the cached latent directly: W_UK folded into the query, W_UV applied after
        the attention-weighted sum (DeepSeek-V2, arXiv 2405.04434 §2.1.2). Causal by absolute position. Effectively MQA:
        every head of every new token is one query row (Q = T*H) against one 576-wide key per position.
        Written as bmm/matmul rather than einsum: at decode sizes the per-op overhead is the cost."""
        B, T, H, N = q_nope_BTHN.shape
        dtype = q_nope_BTHN.dtype
        latent_BSC, k_rope_BSR = cache.read(dtype)
        w_HkC = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank).to(dtype)
        w_uk_HNC, w_uv_HVC = w_HkC.split([self.nope, self.v_dim], dim=1)
        q_lat_HMC = torch.bmm(q_nope_BTHN.reshape(B * T, H, N).transpose(0, 1), w_uk_HNC)     # M = B*T
        q_lat_BQC = q_lat_HMC.transpose(0, 1).reshape(B, T * H, -1) * self.softmax_scale
        q_rope_BQR = q_rope_BTHR.reshape(B, T * H, self.rope) * self.softmax_scale
        scores_BQS = torch.baddbmm(torch.bmm(q_rope_BQR, k_rope_BSR.transpose(1, 2)), q_lat_BQC,
                                   latent_BSC.transpose(1, 2))
        S = scores_BQS.shape[-1]
        future_BTS = torch.arange(S, device=scores_BQS.device) > cache.positions_BT[..., None]
        scores_BQS = scores_BQS.masked_fill(future_BTS.repeat_interleave(H, dim=1), float("-inf"))
        p_BQS = scores_BQS.softmax(dim=-1, dtype=torch.float32).to(dtype)
        o_lat_HMC = torch.bmm(p_BQS, latent_BSC).view(B * T, H, -1).transpose(0, 1)
        o_HMV = torch.bmm(o_lat_HMC, w_uv_HVC.transpose(1, 2))
        return o_HMV.transpose(0, 1).reshape(B, T, H, self.v_dim)


def _starts_at_zero(positions_BT) -> bool:
    # A prefill from position 0 needs nothing from the cache, so it may use the expanded form.
    return bool((positions_BT[:, 0] == 0).all())


# ---------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU, the router, routed experts, DeepSeekMoE (arXiv 2412.19437 §2.1.2)
# ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RouterOutput:
    weights_MK: torch.Tensor      # gating weights of the selected experts (fp32, routed scale applied)
    experts_MK: torch.Tensor      # selected expert indices
    scores_ME: torch.Tensor       # unbiased affinities s (sigmoid or softmax), fp32


def no_autocast(device_type: str):
    """A region autocast does not reach: what must stay fp32 (the gate, the MoE statistics) stays fp32
    inside a caller's `torch.autocast`, which recasts `linear`/`matmul` to bf16 whatever its inputs."""
    if not torch.amp.is_autocast_available(device_type):      # e.g. meta tensors
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class Router(nn.Module):
    """Affinities in fp32 (also under autocast), selection on s + b under group limits, weights from the
    unbiased s."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # The aux-loss-free balancing bias: selection only, no gradient, always fp32 (in bf16, values near 2-4
        # are 1/64 apart: enough to flip selections).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_MD) -> RouterOutput:
        with no_autocast(x_MD.device.type):   # autocast would recast the fp32 linear to bf16
            return self._route(x_MD.float())

    def _route(self, x_MD) -> RouterOutput:
        logits_ME = F.linear(x_MD, self.weight.float())
        scores_ME = logits_ME.sigmoid() if self.scoring_func == "sigmoid" else logits_ME.softmax(-1)
        choice_ME = scores_ME + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores_ME
        if self.topk_method != "greedy" and self.n_group > 1:
            M = choice_ME.shape[0]
            grouped_MGe = choice_ME.view(M, self.n_group, -1)
            if self.topk_method == "noaux_tc":
                group_score_MG = grouped_MGe.topk(2, dim=-1).values.sum(-1)     # V3: top-2 sum
            else:
                group_score_MG = grouped_MGe.amax(-1)                             # V2: max
            keep_MG = group_score_MG.topk(self.topk_group, dim=-1, sorted=False).indices
            drop_MG = torch.ones_like(group_score_MG, dtype=torch.bool).scatter_(1, keep_MG, False)
            choice_ME = grouped_MGe.masked_fill(drop_MG[..., None], float("-inf")).view(M, -1)  # -inf, not 0
        experts_MK = choice_ME.topk(self.top_k, dim=-1, sorted=False).indices
        weights_MK = scores_ME.gather(1, experts_MK)
        if self.norm_topk_prob and self.top_k > 1:
            weights_MK = weights_MK / (weights_MK.sum(-1, keepdim=True) + 1e-20)
        return RouterOutput(weights_MK * self.routed_scaling_factor, experts_MK, scores_ME)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` of the model must not round the bias: only differences of ~1e-3 between
        # values near 2-4 decide selection. Keep it fp32 on whatever device the model moves to.
        bias = self.e_score_correction_bias
        out = super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if new.dtype != torch.float32:        # a meta bias (or one moved off meta) has no values to keep
            self.e_score_correction_bias = (torch.empty_like(new, dtype=torch.float32) if new.is_meta or bias.is_meta
                                            else bias.to(device=new.device, dtype=torch.float32))
        return out


class ExpertDispatch(nn.Module):
    """Dispatch (sort token copies by expert), `expert_ffn` on each expert's run of rows, combine
    (weighted scatter-add back to the tokens). No Python loop over experts. Subclasses hold the
    experts' weights (`RoutedExperts`; FP8 inference storage in fewchips.fp8) and say how they compute."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts

    def forward(self, x_MD, experts_MK, weights_MK, shared: nn.Module | None = None):
        """sum_k g_k FFN_k(x) over each token's routed experts, plus `shared(x)` when given (the shared
        experts: expert parallelism runs them while the token rows travel)."""
        y_MD = self.routed(x_MD, experts_MK, weights_MK)
        return y_MD if shared is None else y_MD + shared(x_MD)

    def routed(self, x_MD, experts_MK, weights_MK):
        K = experts_MK.shape[1]
        flat = experts_MK.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // K                                             # source token of each copy
        counts_E = flat.new_zeros(self.n_experts).index_add_(0, flat, torch.ones_like(flat))  # bincount syncs on GPU
        y = self.expert_ffn(x_MD.index_select(0, token_of), counts_E)   # backward: index_add, not index_put
        y = y * weights_MK.reshape(-1).index_select(0, order)[:, None].to(y.dtype)
        return torch.zeros_like(x_MD).index_add_(0, token_of, y.to(x_MD.dtype))   # y is bf16 under autocast

    def expert_ffn(self, x_sorted, counts_E):
        raise NotImplementedError


class RoutedExperts(ExpertDispatch):
    """The routed experts' weights, stacked: `gate_up_proj [E, 2F, D]` ([gate; up] rows per expert) and
    `down_proj [E, D, F]`, run as one grouped SwiGLU. Expert parallelism replaces this module with one
    whose dispatch and combine are all-to-alls.

    `swiglu(x_sorted, counts_E, gate_up, down)` is the grouped FFN on given weights: a seam like the
    linear layers (FP8 sets its own; expert parallelism carries it over to the local experts)."""

    swiglu = staticmethod(expert_swiglu)
    gathered_decode = True        # compiled decode steps may read experts by gather (ops.gathered_swiglu)

    def __init__(self, n_experts: int, dim: int, hidden: int, device=None):
        super().__init__(n_experts)
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim, device=device))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden, device=device))

    def routed(self, x_MD, experts_MK, weights_MK):
        M, K = experts_MK.shape
        if use_gathered_experts(M, K, self.n_experts) and self.gathered_decode and self.swiglu is expert_swiglu:
            return gathered_swiglu(x_MD, experts_MK, weights_MK, self.gate_up_proj, self.down_proj)
        return super().routed(x_MD, experts_MK, weights_MK)

    def expert_ffn(self, x_sorted, counts_E):
        """SwiGLU of each expert on its contiguous run of rows (rows sorted by expert)."""
        return self.swiglu(x_sorted, counts_E, self.gate_up_proj, self.down_proj)


class MoEStats(NamedTuple):
    """What training reads off MoE layers in one forward: for one layer `load` [E] (token copies routed
    to each expert, no grad) and `seq_balance` [] (sum_i f_i P_i averaged over sequences, with grad;
    times alpha it is L_Bal); for a whole forward the same stacked over its MoE layers, [L, E] and [L].
    A NamedTuple: a pytree of tensors, which FSDP's hooks, activation checkpointing and torch.compile
    all pass through as outputs."""
    load: torch.Tensor
    seq_balance: torch.Tensor

    @staticmethod
    def stack(per_layer: list["MoEStats"], n_experts: int, device) -> "MoEStats":
        if not per_layer:
            return MoEStats(torch.zeros(0, n_experts, device=device), torch.zeros(0, device=device))
        return MoEStats(torch.stack([s.load for s in per_layer]), torch.stack([s.seq_balance for s in per_layer]))

    def cat(self, other: "MoEStats") -> "MoEStats":
        return MoEStats(torch.cat((self.load, other.load)), torch.cat((self.seq_balance, other.seq_balance)))


class MoE(nn.Module):
    """h' = shared(u) + sum_i g_i FFN_i(u) (§2.1.2, eqs. 12-16); the block adds the residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts

    def forward(self, x_BTD, with_stats: bool = False, load_mask=None):
        """-> (h', MoEStats of this layer when `with_stats`, else None). `load_mask` [B, T]: count only these
        tokens' loads (GRPO: the completion tokens it trains on)."""
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(-1, D)
        r = self.gate(x_MD)
        y_MD = self.experts(x_MD, r.experts_MK, r.weights_MK, self.shared_experts)
        return y_MD.view(B, T, D), (self._stats(r, B, T, load_mask) if with_stats else None)

    def _stats(self, r: RouterOutput, B: int, T: int, load_mask=None) -> MoEStats:
        """Expert loads for the bias update (of the tokens in `load_mask` [B, T], default all), and the
        complementary sequence-wise balance loss (§2.1.2, eqs. 17-20) with the indicator taken on the
        experts actually selected. fp32, like the gate's scores they are made of (no op here is one
        autocast lowers)."""
        E, K = self.n_experts, self.top_k
        onehot_BTE = torch.zeros(B * T, E, device=r.experts_MK.device).scatter_(1, r.experts_MK, 1.0).view(B, T, E)
        f_BE = onehot_BTE.sum(1) * (E / (K * T))
        s_norm_BTE = (r.scores_ME / r.scores_ME.sum(-1, keepdim=True)).view(B, T, E)
        P_BE = s_norm_BTE.mean(1)
        counted_BTE = onehot_BTE if load_mask is None else onehot_BTE * load_mask[..., None].to(onehot_BTE.dtype)
        return MoEStats(load=counted_BTE.sum((0, 1)).detach(), seq_balance=(f_BE * P_BE).sum(-1).mean())


# ---------------------------------------------------------------------------------------------
# Decoder block, model, MTP
# ---------------------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
    """Pre-norm: h = x + MLA(norm(x)); out = h + FFN(norm(h)). FFN is dense or DeepSeekMoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: CacheView | None = None, segments=None, with_stats: bool = False,
                load_mask=None):
        """-> (out, the MoE's MoEStats when `with_stats`; None for a dense FFN or without)."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, segments)
        ffn_in = self.post_attention_layernorm(h)
        y, stats = self.mlp(ffn_in, with_stats, load_mask) if isinstance(self.mlp, MoE) else (self.mlp(ffn_in), None)
        return h + y, stats


class Backbone(nn.Module):
    """`model.*` in the checkpoint: embedding, the decoder layers, the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SharedHead(nn.Module):
    """The MTP module's own final norm; the output head itself is the main model's (shared)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Depth-k MTP module (§2.2, eq. 21): h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]),
    then a full decoder block. Embedding and output head are the main model's."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, emb_BTD, h_BTD, cos, sin, cache: CacheView | None = None, segments=None,
                with_stats: bool = False, load_mask=None):
        x = self.eh_proj(torch.cat((self.enorm(emb_BTD), self.hnorm(h_BTD)), dim=-1))  # [emb; h] order
        return super().forward(x, cos, sin, cache, segments, with_stats, load_mask)


class DeepseekV3(nn.Module):
    """Calling the model on token ids [B, T] returns the main head's logits [B, T, vocab_size]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = Rotary(cfg)

    # ---- forward passes ---------------------------------------------------------------------
    def forward(self, input_ids, positions=None, cache: LatentCache | None = None, slots=None,
                attend_len: int | None = None):
        return self.lm_head(self.hidden_states(input_ids, positions, cache, slots, attend_len))

    def hidden_states(self, input_ids, positions=None, cache: LatentCache | None = None, slots=None,
                      attend_len: int | None = None, segments=None, with_stats: bool = False, load_mask=None):
        """The final-normed hidden states [B, T, D] (what the head and the MTP module read).
        With a cache, new tokens sit at `positions` [B, T] of cache rows `slots` [B] and attend over
        cache positions [0, attend_len): by default max(positions) + 1 (read from the tensor: a host
        sync), or all max_len for a static cache. A caller that knows it passes it (compiled steps).
        Packed samples (SFT): `segments` [B, T] numbers each token's sample, so attention never crosses
        samples (the report's sample masking); `positions` then restart at 0 in each sample.
        `with_stats`: also return the MoE layers' MoEStats, stacked (training reads them), the expert loads
        counted over the tokens of `load_mask` [B, T] (default: all)."""
        B, T = input_ids.shape
        positions = self._positions(input_ids, positions)
        cos, sin = self.rotary(positions)
        h = self.model.embed_tokens(input_ids)
        step = self._cache_step(cache, slots, positions, attend_len)
        stats = []
        for i, layer in enumerate(self.model.layers):
            h, s = layer(h, cos, sin, self._cache_view(cache, i, step), segments, with_stats, load_mask=load_mask)
            if s is not None:
                stats.append(s)
        h = self.model.norm(h)
        return (h, MoEStats.stack(stats, self.config.n_routed_experts, h.device)) if with_stats else h

    def mtp_hidden(self, depth: int, input_ids, h_prev_BTD, positions=None, cache: LatentCache | None = None,
                   slots=None, segments=None, with_stats: bool = False, load_mask=None):
        """MTP module `depth` (0-based) on hidden states h_prev [B, T, D] of positions i and the
        tokens t_{i+depth+1} in `input_ids` [B, T]; returns its hidden states (position i of depth
        k = depth+1 then predicts token i+k+1 through `mtp_logits`); with `with_stats` also its MoEStats
        (None for a dense MTP layer)."""
        positions = self._positions(input_ids, positions)
        cos, sin = self.rotary(positions)
        layer = self.mtp[depth]
        view = self._cache_view(cache, self.config.num_hidden_layers + depth, self._cache_step(cache, slots, positions))
        h, stats = layer(self.model.embed_tokens(input_ids), h_prev_BTD, cos, sin, view, segments, with_stats,
                         load_mask=load_mask)
        return (h, stats) if with_stats else h

    def mtp_logits(self, depth: int, h_BTD):
        return self.lm_head(self.mtp[depth].shared_head.norm(h_BTD))

    def mtp_forward(self, input_ids, h_main_BTD, positions=None, segments=None, with_stats: bool = False,
                    load_mask=None):
        """Training-time MTP (arXiv 2412.19437 §2.2, eqs. 21-23): a list over depths k = 1..D of logits
        [B, T-k, V]; position i of depth k predicts token i+k+1 (its targets are input_ids[:, i+k+1],
        where they exist). Depth k reads what the head before it read: the main model's final-normed
        state for k = 1, depth k-1's output after its `shared_head.norm` beyond (docs/model.md).
        Position i keeps the main model's position and sample (`positions`, `segments` [B, T]).
        `with_stats`: also the MTP layers' MoEStats, stacked."""
        out, stats, h = [], [], h_main_BTD
        T = input_ids.shape[1]
        for d in range(len(self.mtp)):
            k = d + 1
            if T - k <= 0:
                break
            pos_k = None if positions is None else positions[:, : T - k]
            seg_k = None if segments is None else segments[:, : T - k]
            mask_k = None if load_mask is None else load_mask[:, k:]     # position i counts as main position i+k
            h = self.mtp_hidden(d, input_ids[:, k:], h[:, : T - k], pos_k, segments=seg_k, with_stats=with_stats,
                                load_mask=mask_k)
            if with_stats:
                h, s = h
                stats += [s] if s is not None else []
            h = self.mtp[d].shared_head.norm(h)
            out.append(self.lm_head(h))
        return (out, MoEStats.stack(stats, self.config.n_routed_experts, h_main_BTD.device)) if with_stats else out

    @staticmethod
    def _positions(input_ids, positions):
        if positions is None:
            B, T = input_ids.shape
            return torch.arange(T, device=input_ids.device).expand(B, T)
        return positions

    @staticmethod
    def _cache_step(cache, slots, positions, attend_len: int | None = None):
        """Cache addressing for one forward, shared by all layers (the cache's own: contiguous or paged)."""
        return None if cache is None else cache.address(positions, slots, attend_len)

    @staticmethod
    def _cache_view(cache, layer, step):
        if cache is None:
            return None
        return CacheView(*cache.layer(layer), step)

    # ---- weights ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None, seed: int = 0,
                     rows=None):
        """N(0, std) for every matrix (the report's 0.006 by default), ones for norms, zero bias.
        Layout-free: each block of rows of each parameter draws from its own generator seeded by (seed,
        name, block), so a process that holds only some rows of a tensor fills them exactly as one
        process would. `rows(name, tensor)` -> (local tensor, its global row ids [n]) or None (not held
        here); default: the whole tensor. `generator`: instead one stream over all parameters in order."""
        std = self.config.initializer_range if std is None else std
        norms = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for name, p in self.named_parameters():
            held = (p, None) if rows is None else rows(name, p)
            if held is None:
                continue
            if generator is not None:                 # the one stream draws for norms too
                held[0].normal_(0.0, std, generator=generator)
            elif id(p) not in norms:
                _seeded_normal(held[0], held[1], p.shape, std, f"{seed}/{name}")
            if id(p) in norms:
                held[0].fill_(1.0)
        for m in self.modules():
            if isinstance(m, Router) and not m.e_score_correction_bias.is_meta:
                m.e_score_correction_bias.zero_()
        return self

    def tie_weights(self):
        """The head shares the embedding's tensor when the config ties them (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        return self

    def save_pretrained(self, path, **kw):
        """This model as a Hugging Face directory: `hf_format.save_pretrained(self, path, **kw)`."""
        return save_pretrained(self, path, **kw)

    def num_parameters(self) -> dict[str, int]:
        """Total, activated per token, embedding/head and MTP parameter counts, from the module tree."""
        cfg = self.config
        main = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("mtp."))
        mtp = sum(p.numel() for n, p in self.named_parameters() if n.startswith("mtp."))
        embed = self.model.embed_tokens.weight.numel()
        head = 0 if cfg.tie_word_embeddings else self.lm_head.weight.numel()

        def inactive(module_iter):
            n = 0
            for m in module_iter:
                if isinstance(m, RoutedExperts):
                    per_expert = (m.gate_up_proj.numel() + m.down_proj.numel()) // m.n_experts
                    n += per_expert * (m.n_experts - cfg.num_experts_per_tok)
            return n

        active = main - inactive(self.model.modules())
        mtp_active = mtp - inactive(self.mtp.modules())
        return {"total": main, "active": active, "embedding": embed, "head": head,
                "mtp": mtp, "mtp_active": mtp_active}

    # `save_pretrained(path, ...)` (the Hugging Face layout) is attached by fewchips.checkpoint, which
    # knows that layout; the model imports nothing of ours but its config. `import fewchips` and
    # `fewchips.DeepseekV3` attach it.


INIT_BLOCK = 1 << 16        # elements per generator in `init_weights`: shards regenerate at most a block's edge


def _seeded_normal(local, row_ids, shape, std: float, key: str):
    """Fill `local` (rows `row_ids` of a tensor of `shape`; None: all of it) with N(0, std) values that
    depend only on (key, row): rows come in blocks of ~INIT_BLOCK elements, each drawn on the CPU from a
    generator seeded by (key, block)."""
    n_rows = shape[0]
    row_shape = tuple(shape[1:])
    block = max(1, INIT_BLOCK // max(1, math.prod(row_shape)))
    ids = torch.arange(n_rows) if row_ids is None else row_ids.cpu()
    for b in torch.unique(ids // block).tolist():
        block_seed = int.from_bytes(hashlib.sha256(f"{key}/{b}".encode()).digest()[:8], "little") >> 1
        g = torch.Generator().manual_seed(block_seed)
        lo, hi = b * block, min((b + 1) * block, n_rows)
        values = torch.empty((hi - lo, *row_shape)).normal_(0.0, std, generator=g)
        where = ((ids >= lo) & (ids < hi)).nonzero().flatten()
        local.index_copy_(0, where.to(local.device), values[ids[where] - lo].to(local.device, local.dtype))

