"""FP8-cached activations (arXiv 2412.19437 §3.3.3): what the backward keeps of each FP8 layer is
8 or 12 bits a value too, so the activation memory the recipe saves is saved.

    linear inputs            E4M3, 1x128 tiles (the Fprop operand itself; `linear._FP8Matmul`)
    post-attention Linear    its input (o_proj's) cached in E5M6 (12-bit codes, 1.5 bytes) with
                             power-of-two 1x128 scales: a finer format for an activation the report
                             found sensitive; the Wgrad re-tiles it to 128x1 with no error of its own
    SwiGLU                   one function from x to down(silu(g)·u): it caches x in E4M3 and the
                             SwiGLU's input h = [g, u] in E5M6 (1x128 tiles, pow2 scales) and
                             recomputes silu(g)·u in the backward, instead of autograd's g, u and
                             silu(g) in the activation dtype and the down input beside them

h is E5M6, not the report's E4M3: read with 3 mantissa bits in the backward, g and u moved the SwiGLU
weights' gradients 2-5% from the uncached FP8 ones, up to 1.5x as far from bf16 as theirs
(`benchmarks/fp8_cached_grads.py`); in E5M6 they are as close as the uncached ones.
Per token of a SwiGLU of width F on input width D (fp32 activations): 2·D + 13·F bytes before
(x twice, h, silu(g), the down input), D + 3·F after (plus the 1x128 scales). Dense MLPs, shared
experts and the grouped routed experts all take this path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import MLP
from .gemm import fp8_mm, grouped_fp8_mm, grouped_wgrad, out_dtype_for, resolve_backend
from .quant import BLOCK, TILE, dequantize_e5m6, quantize, quantize_e5m6, retile


def _wgrad(g_MN, xt, pow2, backend):
    """dW = g^T x with both operands in 128x1 tiles (along tokens); `xt` = retile(x's 1x128 FP8 cache)."""
    gtq, gts = quantize(g_MN.t(), TILE, pow2)
    return fp8_mm(gtq, gts, *xt, TILE, torch.float32, backend)


def _dgrad(g_MN, wq, ws, pow2, backend, dtype):
    """dx = g W: g in 1x128 tiles, W's 128x128 blocks transposed."""
    gq, gs = quantize(g_MN, TILE, pow2)
    return fp8_mm(gq, gs, wq.t().contiguous(), ws.t(), BLOCK, dtype, backend)


def _swiglu_grads(dA, g, u):
    """d silu(g)·u → (dg, du), in fp32."""
    sig = torch.sigmoid(g)
    return dA * u * sig * (1 + g * (1 - sig)), dA * g * sig


class _E5M6CachedMatmul(torch.autograd.Function):
    """y = x W^T in FP8 (E4M3 operands), x cached for the Wgrad in E5M6 (power-of-two scales)."""

    @staticmethod
    def forward(ctx, x, weight, backend: str, pow2: bool, out_dtype=None):
        x_MK = x.reshape(-1, x.shape[-1])
        xq, xs = quantize(x_MK, TILE, pow2)
        wq, ws = quantize(weight.detach(), BLOCK, pow2)
        y = fp8_mm(xq, xs, wq, ws, BLOCK, out_dtype or x.dtype, backend)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(*quantize_e5m6(x_MK), wq, ws)
        else:
            ctx.save_for_backward(None, None, wq, ws)
        ctx.meta = (backend, pow2, x.shape, x.dtype, weight.dtype)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xe, xes, wq, ws = ctx.saved_tensors
        backend, pow2, x_shape, x_dtype, w_dtype = ctx.meta
        g = dy.reshape(-1, dy.shape[-1])
        dx = _dgrad(g, wq, ws, pow2, backend, x_dtype).view(x_shape) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            xtq, xts = quantize(dequantize_e5m6(xe, xes, (g.shape[0], x_shape[-1])).t(), TILE, True)   # -> 128x1, pow2
            gtq, gts = quantize(g.t(), TILE, pow2)
            dw = fp8_mm(gtq, gts, xtq, xts, TILE, torch.float32, backend).to(w_dtype)
        return dx, dw, None, None, None


class _FP8SwiGLU(torch.autograd.Function):
    """down(silu(x W_g^T) · x W_u^T) with every GEMM in FP8; caches x in E4M3 and h = [g, u] in E5M6
    and recomputes the SwiGLU in the backward."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, backend: str, pow2: bool, out_dtype=None):
        dt = out_dtype or x.dtype
        x_MD = x.reshape(-1, x.shape[-1])
        xq, xs = quantize(x_MD, TILE, pow2)
        wg, wu, wd = (quantize(w.detach(), BLOCK, pow2) for w in (w_gate, w_up, w_down))
        g, u = fp8_mm(xq, xs, *wg, BLOCK, dt, backend), fp8_mm(xq, xs, *wu, BLOCK, dt, backend)
        a = F.silu(g) * u
        y = fp8_mm(*quantize(a, TILE, pow2), *wd, BLOCK, dt, backend)
        ctx.save_for_backward(xq, xs, *quantize_e5m6(torch.cat((g, u), -1)), *wg, *wu, *wd)
        ctx.meta = (backend, pow2, x.shape, x.dtype, w_gate.dtype, g.shape[-1])
        return y.view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, xs, hq, hs, wgq, wgs, wuq, wus, wdq, wds = ctx.saved_tensors
        backend, pow2, x_shape, x_dtype, w_dtype, Fw = ctx.meta
        dy_MD = dy.reshape(-1, dy.shape[-1])
        g, u = dequantize_e5m6(hq, hs, (dy_MD.shape[0], 2 * Fw)).split(Fw, dim=-1)
        a = F.silu(g) * u                                              # recomputed from the E5M6 cache
        dw_down = _wgrad(dy_MD, retile(*quantize(a, TILE, pow2), pow2), pow2, backend)
        dA = _dgrad(dy_MD, wdq, wds, pow2, backend, torch.float32)
        dg, du = _swiglu_grads(dA, g, u)
        dx = (_dgrad(dg, wgq, wgs, pow2, backend, torch.float32)
              + _dgrad(du, wuq, wus, pow2, backend, torch.float32)).to(x_dtype).view(x_shape)
        xt = retile(xq, xs, pow2)                                     # once, for both weight gradients
        dw_gate, dw_up = _wgrad(dg, xt, pow2, backend), _wgrad(du, xt, pow2, backend)
        return dx, dw_gate.to(w_dtype), dw_up.to(w_dtype), dw_down.to(w_dtype), None, None, None


class FP8CachedMLP(MLP):
    """The SwiGLU MLP (dense layers, shared experts) as one FP8 function with its activations cached in
    FP8 (`_FP8SwiGLU`); its three Linear children keep their parameters and names."""

    def __init__(self, dim: int, hidden: int, backend: str = "auto", pow2_scales: bool = False):
        super().__init__(dim, hidden)
        self.backend, self.pow2_scales = backend, pow2_scales

    @classmethod
    def from_mlp(cls, mlp: MLP, backend: str = "auto", pow2_scales: bool = False) -> "FP8CachedMLP":
        with torch.device("meta"):
            new = cls(mlp.gate_proj.in_features, mlp.gate_proj.out_features, backend, pow2_scales)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        return new

    def forward(self, x):
        return _FP8SwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                                resolve_backend(self.backend, str(x.device)), self.pow2_scales, out_dtype_for(x))

    def extra_repr(self):
        return f"fp8 backend={self.backend}, pow2_scales={self.pow2_scales}, activations cached in fp8"


class _FP8GroupedSwiGLU(torch.autograd.Function):
    """The routed experts' grouped FFN (rows sorted by expert, segment e = rows [offs[e-1], offs[e]))
    with the same caching: x (or its FP8 codes as dispatched) in E4M3, h in E5M6, the SwiGLU recomputed."""

    @staticmethod
    def forward(ctx, x_MK, w_gu, w_down, offs_E, backend: str, pow2: bool, out_dtype=None, x_fp8=None):
        dt = out_dtype or x_MK.dtype
        xq, xs = x_fp8 if x_fp8 is not None else quantize(x_MK, TILE, pow2)
        wgu, wd = quantize(w_gu.detach(), BLOCK, pow2), quantize(w_down.detach(), BLOCK, pow2)
        h = grouped_fp8_mm(xq, xs, *wgu, offs_E, dt, backend)
        g, u = h.chunk(2, dim=-1)
        y = grouped_fp8_mm(*quantize((F.silu(g) * u).contiguous(), TILE, pow2), *wd, offs_E, dt, backend)
        ctx.save_for_backward(xq, xs, *quantize_e5m6(h), *wgu, *wd, offs_E)
        ctx.meta = (backend, pow2, x_MK.dtype, w_gu.dtype, h.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, hq, hs, wguq, wgus, wdq, wds, offs_E = ctx.saved_tensors
        backend, pow2, x_dtype, w_dtype, h_shape = ctx.meta
        g, u = dequantize_e5m6(hq, hs, h_shape).chunk(2, dim=-1)
        a = (F.silu(g) * u).contiguous()                               # recomputed from the E5M6 cache
        aq, as_ = quantize(a, TILE, pow2)
        dw_down = grouped_wgrad(dy, aq, as_, offs_E, wdq.shape, backend, pow2)
        gq, gs = quantize(dy, TILE, pow2)
        dA = grouped_fp8_mm(gq, gs, wdq.transpose(-2, -1).contiguous(), wds.transpose(-2, -1), offs_E,
                            torch.float32, backend)
        dh = torch.cat(_swiglu_grads(dA, g, u), dim=-1)
        dx = None
        if ctx.needs_input_grad[0]:
            hq_, hs_ = quantize(dh, TILE, pow2)
            dx = grouped_fp8_mm(hq_, hs_, wguq.transpose(-2, -1).contiguous(), wgus.transpose(-2, -1), offs_E,
                                x_dtype, backend)
        dw_gu = grouped_wgrad(dh, xq, xs, offs_E, wguq.shape, backend, pow2)
        return dx, dw_gu.to(w_dtype), dw_down.to(w_dtype), None, None, None, None, None


@torch.compiler.disable   # as fp8_expert_swiglu: data-dependent row counts
def fp8_cached_expert_swiglu(x_sorted, counts_E, gate_up_EfD, down_EDF, backend: str = "auto",
                             pow2_scales: bool = False, x_fp8=None):
    """`linear.fp8_expert_swiglu` with the activations cached in FP8 (`_FP8GroupedSwiGLU`)."""
    backend = resolve_backend(backend, str(x_sorted.device))
    return _FP8GroupedSwiGLU.apply(x_sorted, gate_up_EfD, down_EDF, counts_E.cumsum(0), backend, pow2_scales,
                                   out_dtype_for(x_sorted), x_fp8)


def e5m6_cached_linear(x, weight, backend: str, pow2: bool = False, out_dtype=None):
    return _E5M6CachedMatmul.apply(x, weight, backend, pow2, out_dtype)
