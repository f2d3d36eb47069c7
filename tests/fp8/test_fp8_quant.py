"""FP8 quantisation primitives: error bounds per 1x128 tile and 128x128 block, scale rules, re-tiling
and per-expert segment tiles, all agreeing bit for bit with a loop-over-groups reference."""

import math

import pytest
import torch

from fewchips.fp8.quant import (AMAX_FLOOR, BLOCK, E4M3, E4M3_MAX, TILE, dequantize, quantize, quantize_segments,
                                retile)


def _spread(shape, seed=0):
    """Values whose magnitude varies over six decades from row to row and column to column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    rows = 10 ** torch.empty(shape[0], 1).uniform_(-3, 3, generator=g)
    cols = 10 ** torch.empty(1, shape[1]).uniform_(-1, 1, generator=g)
    return x * rows * cols


def _reference(x, block, pow2=False):
    """One group at a time, the way the report describes it."""
    R, C = x.shape
    br, bc = block
    q = torch.empty(R, C, dtype=E4M3)
    s = torch.empty(math.ceil(R / br), math.ceil(C / bc))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            g = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            sc = max(g.abs().max().item(), AMAX_FLOOR) / E4M3_MAX
            if pow2:
                sc = 2.0 ** math.ceil(math.log2(sc))
            sc = torch.tensor(sc, dtype=torch.float32)
            s[i, j] = sc
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (g / sc).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, s


def _check_bound(x, q, s, block):
    """E4M3 keeps 3 mantissa bits: |error| <= 2^-4 |x| for normals, <= 2^-10 s for subnormals."""
    deq = dequantize(q, s, block)
    s_el = s.repeat_interleave(block[0], 0)[: x.shape[0]].repeat_interleave(block[1], 1)[:, : x.shape[1]]
    bound = torch.maximum(x.abs() * 2.0**-4, s_el * 2.0**-10) * (1 + 1e-6)
    assert ((deq - x).abs() <= bound).all()


@pytest.mark.parametrize("block", [TILE, BLOCK, (128, 1)])
@pytest.mark.parametrize("shape", [(256, 384), (300, 200)])      # the second has partial edge groups
def test_error_bound_and_loop_reference(block, shape):
    x = _spread(shape)
    q, s = quantize(x, block)
    assert q.dtype == E4M3 and s.dtype == torch.float32
    assert s.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    _check_bound(x, q, s, block)
    q_ref, s_ref = _reference(x, block)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # the largest element of every group lands on the top of the E4M3 range
    top = dequantize(q.float().abs(), torch.ones_like(s), block)
    amax_q = torch.nn.functional.max_pool2d(top[None], block, ceil_mode=True)[0]
    assert torch.all(amax_q == E4M3_MAX)


def test_block_dequantisation_is_the_release_rule():
    """W[r, c] = q[r, c] * s[r // 128, c // 128], partial edge blocks included, written out block by block
    (the one dequantisation the checkpoint loaders and the FP8 layers share)."""
    x = _spread((300, 200), seed=1)
    q, s = quantize(x, BLOCK)
    want = torch.empty(300, 200)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            want[rows, cols] = q[rows, cols].float() * s[i, j]
    assert torch.equal(dequantize(q, s, BLOCK), want)


def test_power_of_two_scales():
    x = _spread((128, 512), seed=2)
    q, s = quantize(x, TILE, pow2=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)              # exactly powers of two
    amax = x.abs().view(128, 4, 128).amax(-1)
    assert (s >= amax / E4M3_MAX).all() and (s < 2 * amax / E4M3_MAX).all()
    _check_bound(x, q, s, TILE)
    q_ref, s_ref = _reference(x, TILE, pow2=True)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_zero_groups_use_the_floor():
    x = torch.zeros(4, 256)
    x[0, :128] = 1.0
    q, s = quantize(x, TILE)
    assert torch.isfinite(s).all() and (q.float()[1:] == 0).all()
    assert s[1, 0].item() == pytest.approx(AMAX_FLOOR / E4M3_MAX)


def test_batched_blocks_quantise_each_matrix_separately():
    w = _spread((3 * 200, 160)).view(3, 200, 160)
    q, s = quantize(w, BLOCK)
    assert s.shape == (3, 2, 2)
    for e in range(3):
        qe, se = quantize(w[e], BLOCK)
        assert torch.equal(s[e], se) and torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8))


def test_retile_for_wgrad():
    """The cached 1x128 activation, re-tiled to 128x1 (returned transposed, [K, M] in 1x128 tiles)."""
    x = _spread((300, 256), seed=3)
    q, s = quantize(x, TILE)
    qt, st = retile(q, s)
    assert qt.shape == (256, 300) and st.shape == (256, 3)
    q_ref, s_ref = _reference(dequantize(q, s, TILE).t().contiguous(), TILE)
    assert torch.equal(st, s_ref) and torch.equal(qt.view(torch.uint8), q_ref.view(torch.uint8))
    # two roundings: within the sum of both single-rounding bounds (normal and subnormal parts)
    err = (dequantize(qt, st, TILE).t() - x).abs()
    s1 = s.repeat_interleave(128, 1)[:, :256]
    s2 = st.repeat_interleave(128, 1)[:, :300].t()
    assert (err <= (x.abs() * (2.0**-4 + 2.0**-4 * (1 + 2.0**-4)) + (s1 + s2) * 2.0**-10) * (1 + 1e-5)).all()


def test_segment_tiles_restart_at_each_expert():
    x = _spread((400, 192), seed=4)
    counts = [0, 130, 7, 0, 263]                            # empty experts, one longer than a tile
    offs = torch.tensor(counts).cumsum(0)
    q, s, tile_M = quantize_segments(x, offs)
    start, tiles = 0, 0
    for n in counts:
        if n:
            q_ref, s_ref = _reference(x[start:start + n], (128, 1))
            assert torch.equal(q[start:start + n].view(torch.uint8), q_ref.view(torch.uint8))
            assert torch.equal(s[tiles:tiles + s_ref.shape[0]], s_ref)
            tiles += s_ref.shape[0]
        start += n
    assert tiles == s.shape[0] and tile_M.max().item() == tiles - 1


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cpu_table_lookup_equals_torch_cast_for_every_code(dtype):
    from fewchips.fp8.quant import to_float
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    ref = torch.tensor([float(c) for c in codes.float().tolist()])     # torch's own scalar cast
    got = to_float(codes.view(16, 16).t())                              # non-contiguous input too
    assert torch.equal(got.t().reshape(-1).isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert torch.equal(got.t().reshape(-1)[ok], ref[ok])
