"""FP8 linear layers and grouped experts: the emulation equals a reference computation, gradients
are close to FP32 ones, exactly the recipe's layers run in FP8, and the fast path falls back cleanly."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_utils import random_model, tiny_config
from fewchips.fp8 import FP8Linear, FP8RoutedExperts, apply_fp8, fp8_linear
from fewchips.fp8 import linear as fp8lin
from fewchips.fp8.gemm import fast_path_available, fp8_mm, resolve_backend
from fewchips.fp8.quant import BLOCK, TILE, quantize, retile
from fewchips.model import RoutedExperts


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _data(M=200, K=320, N=272, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.02, torch.randn(M, N, generator=g))


def test_emulated_gemm_equals_blockwise_accumulation():
    """The emulation (dequantise, one FP32 matmul) equals the fast path's arithmetic written out: per
    128-wide K slice, an exact product of FP8 values times the two group scales, summed in float64."""
    x, w, _ = _data()
    (xq, xs), (wq, ws) = quantize(x, TILE), quantize(w, BLOCK)
    out = fp8_mm(xq, xs, wq, ws, BLOCK, torch.float32, "emulate")
    ref = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for kb in range(xs.shape[1]):
        ks = slice(kb * 128, (kb + 1) * 128)
        partial = xq[:, ks].double() @ wq[:, ks].double().t()                      # exact in float64
        ref += partial * xs[:, kb, None].double() * ws[:, kb].repeat_interleave(128)[: w.shape[0]].double()
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6 * ref.abs().max().item())


def fp8_by_hand(x, rows, cols):
    """x quantised to E4M3 in groups of rows x cols and dequantised again, one group at a time, as the
    report describes it (scale = the group's current max |x| over 448; values and scales fp32) -
    written here without fewchips' quantisation helpers."""
    x = x.detach().float()
    out = torch.empty_like(x)
    for r in range(0, x.shape[0], rows):
        for c in range(0, x.shape[1], cols):
            group = x[r:r + rows, c:c + cols]
            scale = group.abs().max() / 448.0
            out[r:r + rows, c:c + cols] = (group / scale).to(torch.float8_e4m3fn).float() * scale
    return out


def test_linear_three_gemms_match_reference():
    """Fprop, Dgrad and Wgrad of `fp8_linear` against float64 GEMMs of operands quantised by hand in the
    report's groups: x and dy in 1x128 tiles, W in 128x128 blocks; for Wgrad dy^T and the cached FP8 x
    re-tiled along tokens (128x1 tiles of the originals)."""
    x, w, dy = _data()
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = fp8_linear(x, w)
    y.backward(dy)
    x8, w8 = fp8_by_hand(x, 1, 128).double(), fp8_by_hand(w, 128, 128).double()
    y_ref = x8 @ w8.t()
    dx_ref = fp8_by_hand(dy, 1, 128).double() @ w8
    dw_ref = fp8_by_hand(dy.t(), 1, 128).double() @ fp8_by_hand(fp8_by_hand(x, 1, 128).t(), 1, 128).double().t()
    for got, ref in ((y, y_ref), (x.grad, dx_ref), (w.grad, dw_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_small_gradients_keep_their_precision():
    """Quantisation follows each group's own max-abs however small: a gradient scaled by 2^-24 (a loss
    averaged over ~16M tokens) gives exactly 2^-24 times the gradients. A fixed floor on the scale (the
    inference demo's 1e-4) put such groups on its own grid and lost most of their bits."""
    x, w, dy = _data(seed=4)
    grads = []
    for scale in (1.0, 2.0 ** -24):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        fp8_linear(xx, ww).backward(dy * scale)
        grads.append((xx.grad / scale, ww.grad / scale))
    for big, small in zip(*grads):
        assert torch.equal(big, small)


def test_linear_gradients_close_to_fp32():
    x, w, dy = _data(M=256, K=512, N=384, seed=1)
    x32, w32 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    (x32 @ w32.t()).backward(dy)
    layer = FP8Linear(512, 384, bias=False, backend="emulate")
    with torch.no_grad():
        layer.weight.copy_(w)
    x8 = x.clone().requires_grad_(True)
    y8 = layer(x8)
    y8.backward(dy)
    assert layer.weight.grad.dtype == torch.float32
    for got, ref in ((y8, x @ w.t()), (x8.grad, x32.grad), (layer.weight.grad, w32.grad)):
        assert _rel(got, ref) < 0.06
        assert F.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0) > 0.998


def test_autocast_sets_the_output_dtype_only():
    """Under bf16 autocast the layer outputs bf16 like nn.Linear, but the FP8 operands are still
    multiplied in FP32 (autocast must not round the dequantised values a second time)."""
    x, w, _ = _data(seed=2)
    layer = FP8Linear(x.shape[1], w.shape[0], bias=False, backend="emulate")
    with torch.no_grad():
        layer.weight.copy_(w)
    y = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac = layer(x)
        assert fp8_linear(x, w).dtype == torch.float32                  # the functional form: input dtype
    assert y_ac.dtype == torch.bfloat16 and torch.equal(y.to(torch.bfloat16), y_ac)


def test_grouped_experts_match_a_loop_of_fp8_linears():
    """The vectorised grouped emulation equals running each expert's rows through `fp8_linear`
    (what the fast path does), forward and backward, with empty experts and experts over 128 rows."""
    g = torch.Generator().manual_seed(3)
    E, N, K = 4, 160, 192
    counts = torch.tensor([0, 150, 9, 41])
    x = torch.randn(int(counts.sum()), K, generator=g, requires_grad=True)
    w = (torch.randn(E, N, K, generator=g) * 0.05).requires_grad_(True)
    dy = torch.randn(x.shape[0], N, generator=g)
    offs = counts.cumsum(0)
    y = fp8lin._FP8GroupedMatmul.apply(x, w, offs, "emulate", False)
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    parts, start = [], 0
    for e, n in enumerate(counts.tolist()):
        parts.append(fp8_linear(x2[start:start + n], w2[e]))
        start += n
    y2 = torch.cat(parts)
    y2.backward(dy)
    for got, ref in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert w.grad[0].abs().max() == 0


def _recipe_names(cfg, model):
    """What the paper puts in FP8, spelled out independently of recipe.py."""
    want = set()
    for prefix, layer in [*[(f"model.layers.{i}", m) for i, m in enumerate(model.model.layers)],
                          *[(f"mtp.{i}", m) for i, m in enumerate(model.mtp)]]:
        attn = ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
        want |= {f"{prefix}.self_attn.{p}" for p in [*attn, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}
        if hasattr(layer.mlp, "experts"):
            want.add(f"{prefix}.mlp.experts")
            want |= {f"{prefix}.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        else:
            want |= {f"{prefix}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    return want


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_apply_fp8_converts_exactly_the_recipe(q_lora_rank, monkeypatch):
    cfg = tiny_config(q_lora_rank=q_lora_rank)
    model = random_model(cfg).train()
    params_before = dict(model.named_parameters())
    converted = apply_fp8(model, backend="emulate")
    want = _recipe_names(cfg, model)
    assert set(converted) == want
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())       # optimiser state stays valid
    for name, m in model.named_modules():
        if name in want:
            assert isinstance(m, (FP8Linear, FP8RoutedExperts))
        else:
            assert not isinstance(m, (FP8Linear, FP8RoutedExperts))
    assert type(model.lm_head) is nn.Linear and type(model.mtp[0].eh_proj) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding

    # run a training forward/backward and record which weights went through an FP8 GEMM
    used = set()
    for fn in (fp8lin._FP8Matmul, fp8lin._FP8GroupedMatmul):
        orig = fn.forward
        def recording(ctx, x, w, *a, _o=orig):
            used.add(id(w))
            return _o(ctx, x, w, *a)
        monkeypatch.setattr(fn, "forward", staticmethod(recording))
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    h = model.hidden_states(ids)
    loss = F.cross_entropy(model.lm_head(h).flatten(0, 1), ids.flatten()) + model.mtp_forward(ids, h)[0].mean()
    loss.backward()
    fp8_params = {n for n, p in model.named_parameters() if id(p) in used}
    want_params = {n for n in params_before if any(n == f"{w}.weight" or n.startswith(f"{w}.") for w in want)}
    assert fp8_params == want_params
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_fp8_model_trains_like_fp32():
    """A few optimiser steps of the tiny model: FP8 and FP32 losses stay within a percent."""
    cfg = tiny_config(hidden_size=128, intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=2,
                      num_nextn_predict_layers=0)
    losses = {}
    for fp8 in (False, True):
        model = random_model(cfg, std=0.02).train()
        if fp8:
            apply_fp8(model, backend="emulate")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
        for _ in range(6):
            loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[fp8] = loss.item()
    assert losses[True] < 4.0                                     # it learned (log 128 = 4.85)
    assert abs(losses[True] - losses[False]) / losses[False] < 0.02


def test_backend_resolution_and_fallback(caplog):
    resolve_backend.cache_clear()
    assert resolve_backend("emulate", "cpu") == "emulate"
    with caplog.at_level(logging.WARNING, logger="fewchips"):
        assert resolve_backend("scaled_mm", "cpu") == "emulate"
        assert resolve_backend("scaled_mm", "cpu") == "emulate"        # cached: logged once
    lines = [r for r in caplog.records if "fast path unavailable" in r.getMessage()]
    assert len(lines) == 1 and "not a CUDA GPU" in lines[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fewchips"):
        assert resolve_backend("auto", "cpu") == "emulate"               # on a CPU, quietly
    assert not caplog.records
    with pytest.raises(ValueError, match="fp8 backend"):
        resolve_backend("fast", "cpu")
    layer = FP8Linear(128, 128, bias=True, backend="scaled_mm")         # requested, unavailable: runs
    assert layer(torch.randn(3, 128)).shape == (3, 128)


@pytest.mark.parametrize("M,K,N", [(256, 512, 384), (200, 320, 272), (1, 512, 384), (3, 320, 272)])
def test_fast_path_layouts_pass_torch_checks(M, K, N):
    """The scaled_mm operands (row-/column-major data, outer-dim-major 1x128 scales, padded 128x128
    scales) satisfy torch's own shape and stride checks for all three GEMMs, run on meta tensors."""
    from fewchips.fp8.gemm import mm_scaled
    x, w, dy = _data(M, K, N)
    meta = lambda *ts: [t.to("meta") for t in ts]                                      # noqa: E731
    (xq, xs), (wq, ws), (gq, gs) = quantize(x, TILE), quantize(w, BLOCK), quantize(dy, TILE)
    (gtq, gts), (xtq, xts) = quantize(dy.t(), TILE), retile(xq, xs)
    assert mm_scaled(*meta(xq, xs, wq, ws), BLOCK, torch.bfloat16).shape == (M, N)                      # Fprop
    assert mm_scaled(*meta(gq, gs, wq.t().contiguous(), ws.t()), BLOCK, torch.float32).shape == (M, K)  # Dgrad
    assert mm_scaled(*meta(gtq, gts, xtq, xts), TILE, torch.float32).shape == (N, K)                    # Wgrad
    with pytest.raises(Exception, match="stride"):                       # and the checks do look at layouts
        torch.nn.functional.scaled_mm(*meta(xq, wq.t().contiguous().t().t()), *meta(xs),
                                      torch.nn.functional.ScalingType.BlockWise1x128, *meta(ws),
                                      torch.nn.functional.ScalingType.BlockWise128x128)


needs_sm90 = pytest.mark.skipif(not fast_path_available("cuda")[0] if torch.cuda.is_available() else True,
                                reason="needs a Hopper (SM90) GPU with block-wise scaled_mm")


@needs_sm90
def test_fast_path_matches_emulation_on_gpu():
    x, w, dy = (t.cuda() for t in _data(M=256, K=512, N=384))
    outs = {}
    for backend in ("emulate", "scaled_mm"):
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fp8_linear(xb, wb, backend)
        y.backward(dy)
        outs[backend] = (y, xb.grad, wb.grad)
    for a, b in zip(outs["scaled_mm"], outs["emulate"]):
        assert _rel(a, b) < 1e-3


@needs_sm90
def test_fast_grouped_experts_match_emulation_on_gpu():
    ex = RoutedExperts(8, 256, 128).cuda()
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    counts = torch.tensor([0, 130, 5, 40, 0, 1, 200, 7], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda")
    ys = [FP8RoutedExperts.from_experts(ex, b).expert_ffn(x, counts) for b in ("emulate", "scaled_mm")]
    assert _rel(ys[1], ys[0]) < 1e-3


def test_adamw_with_bf16_moments_tracks_adamw():
    from fewchips.fp8.optim import AdamWBF16Moments
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(64, 32, generator=g)
    grads = [torch.randn(64, 32, generator=g) for _ in range(20)]
    ws = []
    for cls in (torch.optim.AdamW, AdamWBF16Moments):
        w = nn.Parameter(w0.clone())
        opt = cls([w], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for gr in grads:
            w.grad = gr.clone()
            opt.step()
        ws.append(w.detach())
        if cls is AdamWBF16Moments:
            assert opt.state[w]["exp_avg"].dtype == torch.bfloat16 and w.dtype == torch.float32
    moved = (ws[0] - w0).abs().mean()
    assert (ws[1] - ws[0]).abs().mean() < 0.01 * moved


def test_fp8_model_under_bf16_autocast():
    """What `fewchips train --fp8` does with bf16 autocast: bf16 layer outputs, FP32 gradients."""
    cfg = tiny_config()
    model = random_model(cfg).train()
    apply_fp8(model, backend="emulate")
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    w = model.model.layers[1].mlp.experts.gate_up_proj
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
