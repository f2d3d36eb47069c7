"""What the report keeps in high precision stays fp32 inside a bf16 autocast region: the gate (logits,
scores, selection, weights), the MoE statistics, RMSNorm, the rope angles and the losses."""

import pytest
import torch

from fewchips import ModelConfig
from fewchips.model import MoE, RMSNorm, Rotary, Router

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def small_router(device):
    """The `small` preset's gate with the report's N(0, 0.006) init and a small non-zero bias."""
    cfg = ModelConfig.from_preset("small")
    g = torch.Generator().manual_seed(0)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.006, generator=g)
        router.e_score_correction_bias.normal_(0.0, 1e-3, generator=g)
    return router.to(device), cfg


@pytest.mark.parametrize("device", DEVICES)
def test_router_is_fp32_under_bf16_autocast(device):
    """4,096 tokens: every expert choice, weight and score equals the fp32 router's (13% of the tokens
    chose differently when autocast recast the gate's linear to bf16)."""
    router, cfg = small_router(device)
    x_MD = torch.randn(4096, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)
    want = router(x_MD)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = router(x_MD)
    assert got.weights_MK.dtype == got.scores_ME.dtype == torch.float32
    assert torch.equal(got.experts_MK.sort(-1).values, want.experts_MK.sort(-1).values)
    assert torch.equal(got.scores_ME, want.scores_ME)
    torch.testing.assert_close(got.weights_MK.sort(-1).values, want.weights_MK.sort(-1).values, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_statistics_are_fp32_under_bf16_autocast(device, tiny_cfg):
    torch.manual_seed(0)
    moe = MoE(tiny_cfg).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    x_BTD = torch.randn(2, 16, tiny_cfg.hidden_size, device=device)
    _, w = moe(x_BTD, with_stats=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        _, g = moe(x_BTD, with_stats=True)
    assert g.load.dtype == g.seq_balance.dtype == torch.float32
    assert torch.equal(g.load, w.load) and torch.equal(g.seq_balance, w.seq_balance)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_rope_and_loss_are_fp32_under_bf16_autocast(device, tiny_cfg):
    import torch.nn.functional as F
    norm = RMSNorm(64).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(8, 64, device=device)
    rot = Rotary(tiny_cfg)
    pos = torch.arange(200, device=device)[None]
    logits, tgt = torch.randn(8, 50, device=device), torch.randint(0, 50, (8,), device=device)
    want = norm(x), *rot(pos), F.cross_entropy(logits, tgt)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = norm(x), *rot(pos), F.cross_entropy(logits, tgt)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
