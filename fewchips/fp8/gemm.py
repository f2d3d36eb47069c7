"""One FP8 GEMM, two backends: `out = A @ B^T` on quantised operands with FP32 accumulation.

A [M, K] is always in 1x128 tiles along K (scales [M, ceil(K/128)]); B [N, K] is either a weight in
128x128 blocks (scales [ceil(N/128), ceil(K/128)]) or another 1x128-tiled operand (scales
[N, ceil(K/128)]): Fprop and Dgrad use the first form, Wgrad the second (both operands re-tiled along
tokens). These are exactly the three block-wise cases cuBLAS runs on Hopper.

    "scaled_mm"  torch.nn.functional.scaled_mm with BlockWise1x128 / BlockWise128x128 scaling
                 (cuBLAS, SM90, CUDA >= 12.9): the per-128-K partial sums are scaled and accumulated
                 in FP32, which is the report's increased-precision accumulation (§3.3.2).
    "emulate"    dequantise both operands to FP32 and multiply in FP32. Same quantised values, same
                 scales, so it is the fast path's twin up to FP32 summation order; runs anywhere.

`resolve_backend("auto" | "scaled_mm" | "emulate", device)` picks one; asking for the fast path where
it is missing falls back to emulation with one log line (per device), never an exception.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .quant import BLOCK, TILE, cdiv, dequantize, quantize, quantize_segments, retile, to_float

log = logging.getLogger("fewchips")

BACKENDS = ("auto", "scaled_mm", "emulate")


def mm_emulated(a_q, a_s, b_q, b_s, b_block, out_dtype):
    """A @ B^T with both operands dequantised to FP32 (the plain-PyTorch twin). Autocast is off here:
    an enclosing bf16 autocast would otherwise round the dequantised operands again."""
    with torch.autocast(a_q.device.type, enabled=False):
        return (dequantize(a_q, a_s, TILE) @ dequantize(b_q, b_s, b_block).t()).to(out_dtype)


def _pad_fp8(q, rows, cols):
    R, C = q.shape
    if (R, C) == (rows, cols):
        return q.contiguous()
    return F.pad(q.view(torch.uint8), (0, cols - C, 0, rows - R)).view(q.dtype)


def _outer_major_scales(s, rows):
    """1x128 scales [R, Kb] padded with ones to [rows, Kb], stored outer-dim-major (stride [1, rows]),
    the layout torch's block-wise check wants; one allocation, no transposing copy."""
    out = torch.ones(s.shape[1], rows, device=s.device, dtype=torch.float32).t()
    out[: s.shape[0]] = s
    return out


def mm_scaled(a_q, a_s, b_q, b_s, b_block, out_dtype):
    """A @ B^T through cuBLAS block-wise scaled GEMM. K and N are zero-padded to multiples of 128
    (padding changes no scale: partial groups are already computed as if zero-padded), M to a
    multiple of 16: torch's 1x128 check wants A's scales strided [1, M], which a single row (an expert
    with one token) cannot give, and cuBLAS's row-count rules for this scaling are undocumented."""
    M, K = a_q.shape
    N = b_q.shape[0]
    Mp, Kp, Np = cdiv(M, 16) * 16, cdiv(K, 128) * 128, cdiv(N, 128) * 128
    Kb = Kp // 128
    a = _pad_fp8(a_q, Mp, Kp)
    b = _pad_fp8(b_q, Np, Kp)
    scale_a = _outer_major_scales(a_s, Mp)                                   # [Mp, Kb], stride [1, Mp]
    if b_block == TILE:
        scale_b, recipe_b = _outer_major_scales(b_s, Np), F.ScalingType.BlockWise1x128   # [Np, Kb], stride [1, Np]
    else:
        L4 = cdiv(Kb, 4) * 4
        sb = torch.ones(Np // 128, L4, device=b_s.device, dtype=torch.float32)
        sb[:, :Kb] = b_s
        scale_b, recipe_b = sb.t(), F.ScalingType.BlockWise128x128              # [L4, Nb], stride [1, L4]
    out = F.scaled_mm(a, b.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b, recipe_b,
                      output_dtype=out_dtype)
    return out[:M, :N] if (Mp, Np) != (M, N) else out


def fp8_mm(a_q, a_s, b_q, b_s, b_block=BLOCK, out_dtype=torch.float32, backend: str = "emulate"):
    """A [M, K] (1x128) @ B [N, K] (`b_block`: 128x128 or 1x128)^T -> [M, N] in `out_dtype`."""
    if backend == "scaled_mm":
        return mm_scaled(a_q, a_s, b_q, b_s, b_block, out_dtype)
    return mm_emulated(a_q, a_s, b_q, b_s, b_block, out_dtype)


def fast_path_available(device) -> tuple[bool, str]:
    """(available, reason): Hopper (SM90) CUDA with block-wise `scaled_mm`, checked by a probe GEMM."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"device {device} is not a CUDA GPU"
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return False, f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return False, f"block-wise FP8 scaled_mm needs SM90 (Hopper); this GPU is SM{cap[0]}{cap[1]}"
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(128, 256, device=device, generator=g)
        b = torch.randn(256, 256, device=device, generator=g)
        (aq, as_), (bq, bs) = quantize(a, TILE), quantize(b, BLOCK)
        fast = mm_scaled(aq, as_, bq, bs, BLOCK, torch.float32)
        ref = mm_emulated(aq, as_, bq, bs, BLOCK, torch.float32)
        err = ((fast - ref).norm() / ref.norm()).item()
        if not err < 1e-2:                 # a layout mistake gives O(1) errors
            return False, f"the probe GEMM disagrees with emulation (relative error {err:.2e})"
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: use emulation
        return False, f"block-wise scaled_mm failed on this build ({type(e).__name__}: {str(e)[:200]})"
    return True, "SM90 block-wise scaled_mm"


@functools.lru_cache(maxsize=None)
def resolve_backend(requested: str, device: str) -> str:
    """'auto' | 'scaled_mm' | 'emulate' -> the backend used on `device` (logged once per device)."""
    if requested not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "emulate":
        return "emulate"
    ok, why = fast_path_available(device)
    if ok:
        log.info("fp8: using the fast path on %s (%s)", device, why)
        return "scaled_mm"
    if requested == "scaled_mm" or torch.device(device).type == "cuda":
        log.warning("fp8: fast path unavailable (%s); falling back to emulation "
                    "(same numerics, FP32 matmuls, slower)", why)
    return "emulate"


def out_dtype_for(x):
    """The output dtype a linear layer would have here: autocast's if it is on, else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# Grouped experts: rows of x sorted by expert, segment e is rows [offs[e-1], offs[e])

def segments(offs_E):
    ends = offs_E.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_fp8_mm(xq, xs, wq_ENK, ws_ENK, offs_E, out_dtype, backend):
    """y[rows of e] = x[rows of e] @ W_e^T for every expert e; x in 1x128 tiles, W_e in 128x128 blocks."""
    if backend == "scaled_mm":          # no block-wise grouped GEMM in torch yet: one GEMM per expert
        y = xq.new_zeros(xq.shape[0], wq_ENK.shape[1], dtype=out_dtype)
        for e, (a, b) in enumerate(segments(offs_E)):
            if b > a:
                y[a:b] = fp8_mm(xq[a:b], xs[a:b], wq_ENK[e], ws_ENK[e], BLOCK, out_dtype, backend)
        return y
    w_ENK = dequantize(wq_ENK, ws_ENK, BLOCK)
    with torch.autocast(xq.device.type, enabled=False):
        return F.grouped_mm(dequantize(xq, xs, TILE), w_ENK.transpose(-2, -1), offs=offs_E.int()).to(out_dtype)


def grouped_wgrad(g_MN, xq, xs, offs_E, shape_ENK, backend, pow2):
    """dW_e = g_e^T x_e with both operands in 128x1 tiles along each expert's own tokens."""
    dw = torch.zeros(shape_ENK, dtype=torch.float32, device=g_MN.device)
    if backend == "scaled_mm":
        for e, (a, b) in enumerate(segments(offs_E)):
            if b > a:
                gtq, gts = quantize(g_MN[a:b].t(), TILE, pow2)
                xtq, xts = retile(xq[a:b], xs[a:b], pow2)
                dw[e] = fp8_mm(gtq, gts, xtq, xts, TILE, torch.float32, backend)
        return dw
    gq, gs, tile_M = quantize_segments(g_MN, offs_E, pow2)
    x2q, x2s, _ = quantize_segments(dequantize(xq, xs, TILE), offs_E, pow2)
    g = to_float(gq) * gs[tile_M]
    x = to_float(x2q) * x2s[tile_M]
    with torch.autocast(g.device.type, enabled=False):
        for e, (a, b) in enumerate(segments(offs_E)):
            if b > a:
                dw[e] = g[a:b].t() @ x[a:b]
    return dw
