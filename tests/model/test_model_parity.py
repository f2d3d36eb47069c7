"""Our DeepseekV3 equals transformers' DeepseekV3ForCausalLM (logits and gradients, fp32) across configs."""

import math

import pytest
import torch

from model_utils import random_model, tiny_config

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

CONFIGS = {
    "q_lora+groups": dict(),
    "no_q_lora+one_group+no_norm+2_shared": dict(q_lora_rank=None, n_group=1, topk_group=1,
                                                 norm_topk_prob=False, n_shared_experts=2),
    "yarn_beyond_original": dict(rope_scaling=YARN, max_position_embeddings=128),
    "yarn_amplitude": dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}, max_position_embeddings=128),
    "two_dense_first+top3": dict(num_hidden_layers=4, first_k_dense_replace=2, num_experts_per_tok=3,
                                 n_group=2, topk_group=1, routed_scaling_factor=1.7),
}


def hf_twin(model):
    """The transformers model with exactly our weights (MTP excluded: transformers has none)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hcfg = DeepseekV3Config.from_dict(model.config.to_dict())
    hcfg._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(hcfg).float().eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    hf.load_state_dict(sd, strict=True)
    return hf


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg = tiny_config(**CONFIGS[name])
    model = random_model(cfg, seed=hash(name) % 1000)
    hf = hf_twin(model)
    T = 100 if cfg.rope_scaling else 24     # YaRN: positions well beyond the original 32
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (2, T, cfg.vocab_size)
    assert rel_err(ours, ref) <= 1e-5, name


def test_gradients_match_transformers():
    cfg = tiny_config(rope_scaling=YARN, max_position_embeddings=128)
    model = random_model(cfg, seed=3).train()
    hf = hf_twin(model).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    proj = torch.randn(2, 40, cfg.vocab_size, generator=torch.Generator().manual_seed(4))
    (model(ids) * proj).sum().backward()
    (hf(ids).logits * proj).sum().backward()
    ref = dict(hf.named_parameters())
    checked = 0
    for n, p in model.named_parameters():
        if n.startswith("mtp."):
            continue
        g_ref = ref[n].grad
        assert p.grad is not None and g_ref is not None, n
        assert rel_err(p.grad, g_ref) <= 1e-4, n
        checked += 1
    assert checked == len([n for n in ref])


def test_softmax_gate_matches_hand_computation():
    """V2-style softmax scoring without renormalisation, checked against the formula directly."""
    from fewchips.model import MoE

    cfg = tiny_config(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                      norm_topk_prob=False, routed_scaling_factor=1.5, n_shared_experts=0)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1, generator=g)
    x = torch.randn(1, 5, cfg.hidden_size, generator=g)
    out, _ = moe(x)
    ref = torch.zeros_like(x)
    for t in range(5):
        u = x[0, t]
        s = (moe.gate.weight @ u).softmax(-1)
        top = s.topk(cfg.num_experts_per_tok).indices
        for e in top:
            gu = moe.experts.gate_up_proj[e] @ u
            gate, up = gu.chunk(2)
            ref[0, t] += 1.5 * s[e] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)


def test_bias_only_affects_selection():
    """A huge bias on one expert forces its selection, but its gating weight stays the unbiased score."""
    cfg = tiny_config(n_group=1, topk_group=1)
    model = random_model(cfg, bias_std=0.0)
    router = model.model.layers[1].mlp.gate
    x = torch.randn(6, cfg.hidden_size)
    router.e_score_correction_bias[5] = 100.0
    r = router(x)
    assert (r.experts_MK == 5).any(-1).all()
    s = torch.sigmoid(x @ router.weight.T)
    sel = s.gather(1, r.experts_MK)
    assert torch.allclose(r.weights_MK, sel / sel.sum(-1, keepdim=True) * cfg.routed_scaling_factor, atol=1e-6)


def test_group_limit_masks_with_minus_infinity():
    """Experts outside the topk_group best groups are never chosen, even with negative biased scores."""
    cfg = tiny_config(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    model = random_model(cfg, bias_std=0.0)
    router = model.model.layers[1].mlp.gate
    router.e_score_correction_bias.fill_(-5.0)           # every biased score negative: a 0-mask would leak
    router.e_score_correction_bias[2:4] = -4.0           # group 1 best
    r = router(torch.randn(16, cfg.hidden_size))
    assert set(r.experts_MK.flatten().tolist()) <= {2, 3}


def test_yarn_softmax_scale_of_the_release():
    from fewchips import ModelConfig

    cfg = ModelConfig.from_preset("v3")
    assert math.isclose(cfg.softmax_scale, 0.135234, rel_tol=1e-5)
    from fewchips.model import rope_frequencies
    inv, amp = rope_frequencies(cfg)
    base = 10000.0 ** (-torch.arange(0, 64, 2).float() / 64)
    assert amp == 1.0
    assert torch.allclose(inv[:10], base[:10]) and torch.allclose(inv[23:], base[23:] / 40)


def test_bias_stays_fp32_under_dtype_casts():
    cfg = tiny_config()
    model = random_model(cfg)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    model.to(torch.bfloat16)
    after = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert after.dtype == torch.float32 and torch.equal(after, bias)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_meta_device_counts():
    from fewchips import DeepseekV3, ModelConfig

    with torch.device("meta"):
        v3 = DeepseekV3(ModelConfig.from_preset("v3")).num_parameters()
        lite = DeepseekV3(ModelConfig.from_preset("v2-lite")).num_parameters()
        small = DeepseekV3(ModelConfig.from_preset("small")).num_parameters()
        tiny = DeepseekV3(ModelConfig.from_preset("tiny")).num_parameters()
    assert abs(v3["total"] - 671e9) / 671e9 < 0.005
    assert 36e9 < v3["active"] < 38e9
    assert 11e9 < v3["mtp"] < 12e9            # the report's 11.5B unique MTP parameters
    assert abs(lite["total"] - 15.7e9) / 15.7e9 < 0.01
    assert 150e6 <= small["total"] <= 200e6 and 40e6 <= small["active"] <= 60e6
    assert 5e6 <= tiny["total"] + tiny["mtp"] <= 20e6


def test_mtp_shapes_and_gradient_flow():
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = random_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    h, stats = model.hidden_states(ids, with_stats=True)
    outs, mtp_stats = model.mtp_forward(ids, h, with_stats=True)
    assert [o.shape for o in outs] == [(2, 9, cfg.vocab_size), (2, 8, cfg.vocab_size)]
    assert stats.load.shape == (cfg.num_hidden_layers - cfg.first_k_dense_replace, cfg.n_routed_experts)
    assert mtp_stats.load.shape == (2, cfg.n_routed_experts)
    # depth k routes its T-k positions to K experts each
    assert mtp_stats.load.sum(-1).tolist() == [2 * 9 * cfg.num_experts_per_tok, 2 * 8 * cfg.num_experts_per_tok]
    outs[1].sum().backward()
    assert model.mtp[0].eh_proj.weight.grad is not None and model.mtp[1].eh_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("counts,dims", [([3, 0, 5, 4], (6, 5)), ([3, 0, 5, 4], (8, 4)), ([12, 0, 0, 0], (8, 4)),
                                         ([12, 0, 0, 0], (6, 5)), ([0, 0, 0, 0], (8, 4)), ([1, 0, 1, 0], (8, 4))])
def test_expert_swiglu_paths_match_reference(counts, dims):
    """The padded-bmm CPU path and the grouped_mm path both equal a per-expert reference (values and grads)."""
    from fewchips.ops import expert_swiglu, swiglu_reference

    g = torch.Generator().manual_seed(0)
    counts_E = torch.tensor(counts)
    D, Fd = dims     # (8, 4): 16-byte rows, grouped_mm allowed when padding would waste; (6, 5): never
    x = torch.randn(int(counts_E.sum()), D, generator=g, requires_grad=True)
    w1 = torch.randn(4, 2 * Fd, D, generator=g, requires_grad=True)
    w2 = torch.randn(4, D, Fd, generator=g, requires_grad=True)
    out = expert_swiglu(x, counts_E, w1, w2)
    ref = swiglu_reference(x, counts_E, w1, w2)
    assert torch.allclose(out, ref, atol=1e-5)
    if len(ref):
        proj = torch.randn(ref.shape, generator=g)
        grads = torch.autograd.grad((out * proj).sum(), (x, w1, w2))
        grads_ref = torch.autograd.grad((ref * proj).sum(), (x, w1, w2))
        for a, b in zip(grads, grads_ref):
            assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("counts,bits", [([60, 2, 0, 2], 8), ([60, 2, 0, 2], 1), ([16, 16, 16, 16], 4)])
def test_expert_swiglu_under_autocast(counts, bits, monkeypatch):
    """Under bf16 autocast all three CPU expert paths (grouped_mm; grouped_mm on runs rounded up to
    fewer significant bits, here to powers of two; padded bmm) compute in bf16, match a
    per-expert reference on the same bf16-rounded operands, and give the fp32 master weights fp32 gradients."""
    import fewchips.ops as M

    monkeypatch.setattr(M, "CPU_GEMM_ROW_BITS", bits)
    g = torch.Generator().manual_seed(0)
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 64, generator=g, requires_grad=True)
    w1 = torch.randn(4, 2 * 32, 64, generator=g, requires_grad=True)
    w2 = torch.randn(4, 64, 32, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = M.expert_swiglu(x, counts_E, w1, w2)
    assert out.dtype == torch.bfloat16
    ref, s = [], 0

    def r(t):
        # the operands the bf16 GEMMs see; accumulation is fp32 in both
        return t.bfloat16().float()

    for e, c in enumerate(counts):
        gate, up = (r(x[s:s + c]) @ r(w1[e]).T).chunk(2, dim=-1)
        ref.append(r(r(torch.nn.functional.silu(gate)) * r(up)) @ r(w2[e]).T)
        s += c
    ref = torch.cat(ref)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    proj = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out.float() * proj).sum(), (x, w1, w2))
    grads_ref = torch.autograd.grad((ref * proj).sum(), (x, w1, w2))
    for a, b in zip(grads, grads_ref):
        assert a.dtype == torch.float32 and ((a - b).norm() / b.norm()).item() < 2e-2


def test_causal_attention_paths_agree(monkeypatch):
    """The explicit short-sequence path and torch's fused kernel (V padded to the q/k head dim) give the
    same outputs and gradients, and are causal: a later token never changes an earlier output."""
    import fewchips.ops as M

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 20, 12, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, 20, 8, generator=g, requires_grad=True)
    proj = torch.randn(2, 3, 20, 8, generator=g)
    outs = []
    for max_t in (512, 0):        # explicit, then fused
        monkeypatch.setattr(M, "CPU_EXPLICIT_ATTENTION_MAX_T", max_t)
        o = M.causal_attention(q, k, v, 0.3)
        outs.append((o, torch.autograd.grad((o * proj).sum(), (q, k, v))))
        k2 = k.detach().clone()
        k2[:, :, -1] += 5.0
        assert torch.allclose(M.causal_attention(q, k2, v, 0.3)[:, :, :-1], o[:, :, :-1], atol=1e-6)
    (a, ga), (b, gb) = outs
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, M.attention_reference(q, k, v, 0.3), atol=1e-5)          # and the plain twin
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5)
