"""FP8 quantisation primitives in plain PyTorch (arXiv 2412.19437 §3.3.2).

FP8 E4M3 keeps 3 mantissa bits and a range of +-448, so a tensor is stored as FP8 values q and
FP32 scales s with x ~ q * s. One scale per *group* of elements, computed online from the group's
current max-abs: s = max(amax, floor) / 448, so the largest element lands on 448 exactly. DeepSeek-V3
uses two group shapes:

    activations and activation gradients   1 x 128 tiles   (one scale per token per 128 channels)
    weights                                 128 x 128 blocks

and for the weight-gradient GEMM, whose contraction runs over tokens, activations and gradients are
tiled 128 x 1 (128 tokens, one channel): `retile` turns a cached 1x128 FP8 activation into that.
Edge groups are partial: computed as if zero-padded (the release's `weight_scale_inv` convention).
With `pow2=True` scales are rounded up to a power of two (ue8m0, V3.1's `scale_fmt`), so that
multiplying by a scale is exact.

Shapes: `x [..., R, C]` with groups of `block = (br, bc)` over the last two dims gives scales
`[..., ceil(R/br), ceil(C/bc)]`; 1-D blocks over activations are `(1, 128)`.
"""

from __future__ import annotations

import functools
import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Guards only an all-zero group against a division by zero. Not the demo's 1e-4 (an inference-time
# floor for activations): gradients are far smaller (a loss averaged over N tokens gives each token's
# logits a gradient ~1/N), and a group below the floor is quantised on the floor's grid instead of its
# own, losing most of its bits, or all of them.
AMAX_FLOOR = 1e-12
TILE = (1, 128)
BLOCK = (128, 128)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: the number of groups of b that cover a."""
    return -(-a // b)


def scale_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """s = max(amax, 1e-12) / 448, optionally rounded up to 2^ceil(log2 s); fp32."""
    s = amax.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    return torch.exp2(torch.ceil(torch.log2(s))) if pow2 else s


def _blocked(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[..., R, C] -> zero-padded [..., R/br, br, C/bc, bc]."""
    *lead, R, C = x.shape
    br, bc = block
    pr, pc = cdiv(R, br) * br - R, cdiv(C, bc) * bc - C
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.reshape(*lead, (R + pr) // br, br, (C + pc) // bc, bc)


def _unblocked(xb: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `_blocked`: [..., R/br, br, C/bc, bc] -> [..., R, C] (padding dropped)."""
    R, C = shape[-2:]
    x = xb.reshape(*xb.shape[:-4], xb.shape[-4] * xb.shape[-3], xb.shape[-2] * xb.shape[-1])
    return x[..., :R, :C]


@functools.lru_cache(maxsize=None)
def _fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """The FP32 value of each of the 256 codes of an FP8 dtype."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def to_float(q: torch.Tensor) -> torch.Tensor:
    """FP8 -> FP32, exactly. On CPU a 256-entry table lookup: torch's FP8 casts there are scalar
    loops (measured ~16 ns per element, 6x slower than the lookup)."""
    if q.device.type != "cpu" or q.element_size() != 1:
        return q.float()
    return _fp8_table(q.dtype).index_select(0, q.view(torch.uint8).reshape(-1).int()).view(q.shape)


def quantize(x: torch.Tensor, block: tuple[int, int] = TILE, pow2: bool = False):
    """x [..., R, C] -> (q [..., R, C] E4M3, s [..., ceil(R/br), ceil(C/bc)] fp32) with x ~ q * s."""
    xb = _blocked(x.float(), block)
    s = scale_from_amax(xb.abs().amax(dim=(-3, -1)), pow2)                       # [..., Rb, Cb]
    q = (xb / s[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return _unblocked(q, x.shape).contiguous(), s


def dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = TILE, dtype=torch.float32):
    """q * s per group, in `dtype` (the product is formed in fp32)."""
    xb = _blocked(to_float(q), block) * s.float()[..., :, None, :, None]
    return _unblocked(xb, q.shape).to(dtype)


def retile(q: torch.Tensor, s: torch.Tensor, pow2: bool = False):
    """A 1x128-tiled activation [M, K] -> its transpose [K, M] quantised in 1x128 tiles along M
    (i.e. 128x1 tiles of the original): the operand layout of the weight-gradient GEMM."""
    return quantize(dequantize(q, s, TILE).t(), TILE, pow2)


# E5M6: the report's finer cache format (§3.3.3): 5 exponent bits (bias 15, as FP16), 6 mantissa bits.
# No dtype exists: values are rounded to E5M6 exactly (round-to-nearest-even from fp32) and stored as
# 12-bit codes (FP16 holds every E5M6 value; its low 4 bits are then zero): 1.5 bytes a value, 25% less
# than a bf16 copy.
E5M6_MAX = 65024.0                       # (2 - 2^-6) * 2^15
_E5M6_DROP = 23 - 6                      # fp32 mantissa bits below E5M6's
_E5M6_SUB = 2.0 ** -20                   # the subnormal step: 2^-14 * 2^-6


def round_e5m6(y: torch.Tensor) -> torch.Tensor:
    """fp32 values within E5M6's range -> the nearest E5M6 value (ties to even), still fp32."""
    bits = y.float().contiguous().view(torch.int32)
    lsb = (bits >> _E5M6_DROP) & 1
    normal = ((bits + ((1 << (_E5M6_DROP - 1)) - 1) + lsb) & ~((1 << _E5M6_DROP) - 1)).view(torch.float32)
    sub = torch.round(y.float() / _E5M6_SUB) * _E5M6_SUB                   # exact: a power-of-two step
    return torch.where(y.abs() < 2.0 ** -14, sub, normal)


def pack_e5m6(q: torch.Tensor) -> torch.Tensor:
    """FP16 tensor holding E5M6 values (low 4 mantissa bits zero) -> uint8 [n + ceil(n/2)]: each value's
    high byte, then the low bytes' top nibbles two to a byte (byte ops only; FP16 bytes little-endian)."""
    b = q.contiguous().view(torch.uint8).view(-1, 2)
    lo = b[:, 0]
    if lo.numel() % 2:
        lo = torch.cat((lo, lo.new_zeros(1)))
    return torch.cat((b[:, 1], (lo[0::2] >> 4) | lo[1::2]))


def unpack_e5m6(codes: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `pack_e5m6`: uint8 codes -> fp32 [shape], exactly."""
    n = math.prod(shape)
    b = codes.new_empty(n + n % 2, 2)
    b[0::2, 0] = codes[n:] << 4
    b[1::2, 0] = codes[n:] & 0xF0
    b[:n, 1] = codes[:n]
    return b.view(torch.float16).view(-1)[:n].float().view(shape)


def quantize_e5m6(x: torch.Tensor, block: tuple[int, int] = TILE):
    """x [..., R, C] -> (codes uint8 [1.5 bytes per value], s fp32 per group), x ~ unpack(codes) * s, with
    power-of-two scales (s = 2^ceil(log2(amax / 65024))): dividing by s is exact, so re-tiling the
    cache in the backward adds no error of its own."""
    xb = _blocked(x.float(), block)
    s = torch.exp2(torch.ceil(torch.log2(xb.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR) / E5M6_MAX)))
    q = round_e5m6(xb / s[..., :, None, :, None]).to(torch.float16)        # exact: FP16 holds every E5M6 value
    return pack_e5m6(_unblocked(q, x.shape)), s


def dequantize_e5m6(codes: torch.Tensor, s: torch.Tensor, shape, block: tuple[int, int] = TILE):
    """(codes, s) from `quantize_e5m6` of a tensor of `shape` -> fp32."""
    return dequantize(unpack_e5m6(codes, shape), s, block)


def segment_tiles(offs: torch.Tensor, M: int, tile: int = 128):
    """For rows grouped into consecutive segments ending at `offs` (int, [E]): the tile id and the
    row within the tile of each row, when every segment is cut into `tile`-row tiles starting at its
    own first row; (tile_M, row_in_tile_M, n_tiles)."""
    ends = offs.long()
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))
    n_tiles_E = (ends - starts + tile - 1) // tile
    first_tile_E = torch.cumsum(n_tiles_E, 0) - n_tiles_E
    rows = torch.arange(M, device=offs.device)
    seg_M = torch.searchsorted(ends, rows, right=True)
    local_M = rows - starts[seg_M]
    return first_tile_E[seg_M] + local_M // tile, local_M % tile, int(n_tiles_E.sum())


def quantize_segments(x: torch.Tensor, offs: torch.Tensor, pow2: bool = False):
    """x [M, C] with rows grouped by `offs` (grouped experts) -> (q [M, C], s [n_tiles, C], tile_M):
    128x1 tiles that never cross a segment boundary (each expert's Wgrad GEMM is separate)."""
    M, C = x.shape
    tile_M, row_M, n = segment_tiles(offs, M)
    xf = x.float()
    padded = xf.new_zeros(n * 128, C)
    padded[tile_M * 128 + row_M] = xf.abs()                          # each tile zero-padded to 128 rows
    s = scale_from_amax(padded.view(n, 128, C).amax(1), pow2)
    q = (xf / s[tile_M]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, s, tile_M
