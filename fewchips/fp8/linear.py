"""FP8 training layers: a linear layer and the grouped routed experts, each running Fprop, Dgrad
and Wgrad as FP8 GEMMs (arXiv 2412.19437 §3.3); `recipe.apply_fp8` swaps them into a model.

Per linear layer y = x W^T (x [M, K] tokens by inputs, W [N, K]):

    Fprop  y  = x W^T      x: 1x128 tiles          W: 128x128 blocks
    Dgrad  dx = dy W       dy: 1x128 tiles         W^T: the same 128x128 blocks, transposed
    Wgrad  dW = dy^T x     dy^T, x^T: 1x128 tiles along tokens (x re-tiled from its cached FP8 copy)

The activation is cached for backward in FP8 (1 byte per element, plus scales), the weight's FP8
copy too; the master weight and its gradient stay in the parameter's dtype (FP32 for training).
Everything here is plain PyTorch around `fp8_mm`, whose backend (cuBLAS on Hopper, emulation
elsewhere) is resolved per device at the first call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..model import RoutedExperts
from .cached import e5m6_cached_linear, fp8_cached_expert_swiglu
from .gemm import fp8_mm, grouped_fp8_mm, grouped_wgrad, out_dtype_for, resolve_backend
from .quant import BLOCK, TILE, quantize, retile


class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, backend: str, pow2: bool, out_dtype=None):
        x_MK = x.reshape(-1, x.shape[-1])
        xq, xs = quantize(x_MK, TILE, pow2)
        wq, ws = quantize(weight.detach(), BLOCK, pow2)
        y_MN = fp8_mm(xq, xs, wq, ws, BLOCK, out_dtype or x.dtype, backend)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.meta = (backend, pow2, x.shape, x.dtype, weight.dtype)
        return y_MN.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        backend, pow2, x_shape, x_dtype, w_dtype = ctx.meta
        g_MN = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:                                   # Dgrad: dy [M, N] @ (W^T [K, N])^T
            gq, gs = quantize(g_MN, TILE, pow2)
            dx = fp8_mm(gq, gs, wq.t().contiguous(), ws.t(), BLOCK, x_dtype, backend).view(x_shape)
        if ctx.needs_input_grad[1]:                                   # Wgrad: dy^T [N, M] @ (x^T [K, M])^T
            gtq, gts = quantize(g_MN.t(), TILE, pow2)
            xtq, xts = retile(xq, xs, pow2)
            dw = fp8_mm(gtq, gts, xtq, xts, TILE, torch.float32, backend).to(w_dtype)
        return dx, dw, None, None, None


def fp8_linear(x, weight, backend: str = "emulate", pow2: bool = False, out_dtype=None):
    """y = x W^T with all three GEMMs in FP8 (`backend` already resolved); y in `out_dtype`
    (default: the input's), dx in the input's dtype, dW in the weight's."""
    return _FP8Matmul.apply(x, weight, backend, pow2, out_dtype)


class FP8Linear(nn.Linear):
    """nn.Linear whose matmuls run in FP8; the parameter (the master weight) is unchanged, so state
    dicts, checkpoints and optimisers see an ordinary linear layer."""

    def __init__(self, in_features, out_features, bias=True, backend: str = "auto", pow2_scales: bool = False,
                 device=None, dtype=None, cache_e5m6: bool = False):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend, self.pow2_scales = backend, pow2_scales
        self.cache_e5m6 = cache_e5m6           # the input cached in E5M6 for the backward (fp8.cached)

    @classmethod
    def from_linear(cls, lin: nn.Linear, backend: str = "auto", pow2_scales: bool = False,
                    cache_e5m6: bool = False) -> "FP8Linear":
        new = cls(lin.in_features, lin.out_features, bias=False, backend=backend, pow2_scales=pow2_scales,
                  device="meta", cache_e5m6=cache_e5m6)
        new.weight, new.bias = lin.weight, lin.bias                  # the same Parameter objects
        return new

    def forward(self, x):
        backend = resolve_backend(self.backend, str(x.device))
        if self.cache_e5m6:
            y = e5m6_cached_linear(x, self.weight, backend, self.pow2_scales, out_dtype_for(x))
        else:
            y = fp8_linear(x, self.weight, backend, self.pow2_scales, out_dtype_for(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return (super().extra_repr() + f", fp8 backend={self.backend}, pow2_scales={self.pow2_scales}"
                + (", input cached in e5m6" if self.cache_e5m6 else ""))


# ---------------------------------------------------------------------------------------------
# Grouped routed experts: rows of x sorted by expert, segment e is rows [offs[e-1], offs[e])
# ---------------------------------------------------------------------------------------------

class _FP8GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_ENK, offs_E, backend: str, pow2: bool, out_dtype=None, x_fp8=None):
        xq, xs = x_fp8 if x_fp8 is not None else quantize(x_MK, TILE, pow2)   # x_fp8: as dispatched
        wq, ws = quantize(w_ENK.detach(), BLOCK, pow2)
        y = grouped_fp8_mm(xq, xs, wq, ws, offs_E, out_dtype or x_MK.dtype, backend)
        ctx.save_for_backward(xq, xs, wq, ws, offs_E)
        ctx.meta = (backend, pow2, x_MK.dtype, w_ENK.dtype)
        return y

    @staticmethod
    def backward(ctx, dy_MN):
        xq, xs, wq, ws, offs_E = ctx.saved_tensors
        backend, pow2, x_dtype, w_dtype = ctx.meta
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gq, gs = quantize(dy_MN, TILE, pow2)
            dx = grouped_fp8_mm(gq, gs, wq.transpose(-2, -1).contiguous(), ws.transpose(-2, -1), offs_E,
                                x_dtype, backend)
        if ctx.needs_input_grad[1]:
            dw = grouped_wgrad(dy_MN, xq, xs, offs_E, wq.shape, backend, pow2).to(w_dtype)
        return dx, dw, None, None, None, None, None


@torch.compiler.disable   # like expert_swiglu: data-dependent row counts, grouped_mm's meta kernel is bf16-only
def fp8_expert_swiglu(x_sorted, counts_E, gate_up_EfD, down_EDF, backend: str = "auto", pow2_scales: bool = False,
                      x_fp8=None):
    """`ops.expert_swiglu` with both grouped GEMMs (gate_up and down) in FP8, quantised from the weights
    given (the master weights); the SwiGLU itself stays in the activation dtype. `x_fp8`: x_sorted's
    own FP8 codes and 1x128 scales when it arrived in FP8 (expert parallelism's FP8 dispatch): the
    up-projection uses them as they are."""
    backend = resolve_backend(backend, str(x_sorted.device))
    offs_E = counts_E.cumsum(0)
    out_dtype = out_dtype_for(x_sorted)
    h = _FP8GroupedMatmul.apply(x_sorted, gate_up_EfD, offs_E, backend, pow2_scales, out_dtype, x_fp8)
    gate, up = h.chunk(2, dim=-1)
    return _FP8GroupedMatmul.apply((F.silu(gate) * up).contiguous(), down_EDF, offs_E, backend, pow2_scales, out_dtype)


def fp8_swiglu(backend: str = "auto", pow2_scales: bool = False, cache_activations: bool = False):
    """The FP8 grouped FFN as a plain function of (x_sorted, counts_E, gate_up, down): what an expert
    module's `swiglu` seam holds under the FP8 recipe (expert parallelism carries it to the local experts).
    `cache_activations`: the backward keeps FP8 copies and recomputes the SwiGLU (fp8.cached)."""
    if cache_activations:
        return functools.partial(fp8_cached_expert_swiglu, backend=backend, pow2_scales=pow2_scales)
    return functools.partial(fp8_expert_swiglu, backend=backend, pow2_scales=pow2_scales)


class FP8RoutedExperts(RoutedExperts):
    """The routed experts with both grouped GEMMs in FP8 (`fp8_expert_swiglu`); dispatch, SwiGLU and
    the weighted combine stay in the activation dtype."""

    gathered_decode = False       # the gathered decode form would read the full-precision weights

    def __init__(self, n_experts: int, dim: int, hidden: int, backend: str = "auto", pow2_scales: bool = False,
                 device=None, cache_activations: bool = False):
        super().__init__(n_experts, dim, hidden, device)
        self.backend, self.pow2_scales, self.cache_activations = backend, pow2_scales, cache_activations
        self.swiglu = fp8_swiglu(backend, pow2_scales, cache_activations)

    @classmethod
    def from_experts(cls, ex: RoutedExperts, backend: str = "auto", pow2_scales: bool = False,
                     cache_activations: bool = False):
        E, D, Fd = ex.down_proj.shape
        new = cls(E, D, Fd, backend, pow2_scales, device="meta", cache_activations=cache_activations)
        new.gate_up_proj, new.down_proj = ex.gate_up_proj, ex.down_proj   # the same Parameter objects
        return new

    def extra_repr(self):
        return (f"fp8 backend={self.backend}, pow2_scales={self.pow2_scales}"
                + (", activations cached in fp8" if self.cache_activations else ""))
