"""Checkpoint I/O: round trips with transformers, sharding, the released FP8 layout, and clear errors on bad input."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fewchips
from fewchips import CheckpointError, ConfigError, save_pretrained
from fewchips.checkpoint.fp8 import load_fp8
from fewchips.fp8.quant import BLOCK, dequantize

from model_utils import random_model, tiny_config

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


# The MTP module's own tensors in the release (model.layers.61.* for V3), and where each lives in memory.
MTP_KEYS = {"enorm.weight": "mtp.0.enorm.weight", "hnorm.weight": "mtp.0.hnorm.weight",
            "eh_proj.weight": "mtp.0.eh_proj.weight", "shared_head.norm.weight": "mtp.0.shared_head.norm.weight",
            "embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def test_save_load_roundtrip_keeps_mtp(tmp_path):
    model = random_model(tiny_config())
    with torch.no_grad():                                  # distinct values, so a swapped name cannot pass
        for i, p in enumerate(model.parameters()):
            p.add_(i)
    save_pretrained(model, tmp_path)
    disk = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in disk       # released per-expert names
    mem = dict(model.state_dict())
    for key, where in MTP_KEYS.items():                                  # MTP at layer num_hidden_layers
        assert torch.equal(disk[f"model.layers.3.{key}"], mem[where]), key
    assert torch.equal(disk["model.layers.3.self_attn.kv_b_proj.weight"], mem["mtp.0.self_attn.kv_b_proj.weight"])
    assert torch.equal(disk["model.layers.3.mlp.gate.e_score_correction_bias"],
                       mem["mtp.0.mlp.gate.e_score_correction_bias"])
    back = fewchips.from_pretrained(tmp_path)
    for key, where in MTP_KEYS.items():
        assert torch.equal(back.state_dict()[where], disk[f"model.layers.3.{key}"]), key
    assert back.config.num_nextn_predict_layers == 1
    for (n, a), (m, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b), n


def test_ours_to_transformers_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_model(tiny_config())
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    a, b = logits(model), logits(hf)
    assert ((a - b).abs().max() / b.abs().max()) <= 1e-5


def test_transformers_to_ours_same_logits(tmp_path, caplog):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = tiny_config()
    hcfg = DeepseekV3Config.from_dict(cfg.to_dict())
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hcfg).float().eval()
    with torch.no_grad():
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fewchips"):
        ours = fewchips.from_pretrained(tmp_path)
    # transformers keeps num_mtp_layers in its config but writes no MTP weights: MTP off, one warning
    assert ours.config.num_nextn_predict_layers == 0
    assert sum("MTP" in r.message for r in caplog.records) == 1
    a, b = logits(ours), logits(hf)
    assert ((a - b).abs().max() / b.abs().max()) <= 1e-5


def test_sharded_save_writes_index_and_loads(tmp_path):
    model = random_model(tiny_config())
    save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / s).exists() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(logits(fewchips.from_pretrained(tmp_path)), logits(model))


def test_bf16_load_keeps_router_bias_fp32(tmp_path):
    model = random_model(tiny_config())
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    back = fewchips.from_pretrained(tmp_path)
    assert back.lm_head.weight.dtype == torch.bfloat16
    bias = back.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, model.model.layers[1].mlp.gate.e_score_correction_bias)


# ---- the released FP8 layout --------------------------------------------------------------

def quantize_blocks(w, block=128):
    """128x128 block quantisation written out: scale = amax/448 per block, weight / scale in e4m3."""
    M, N = w.shape
    s = torch.zeros(-(-M // block), -(-N // block))
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


FP8_CFG = dict(hidden_size=200, intermediate_size=300, moe_intermediate_size=136, q_lora_rank=144,
               kv_lora_rank=72, num_attention_heads=3, qk_nope_head_dim=40, v_head_dim=24)


def dequantize_by_hand(q, s, block=128):
    """W[r, c] = q[r, c] * s[r // 128, c // 128], one block at a time (the release's weight_scale_inv)."""
    w = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            w[rows, cols] = q[rows, cols].float() * s[i, j]
    return w


def write_fp8_checkpoint(path, model):
    """A checkpoint in the released layout: projections and experts in e4m3 with fp32 weight_scale_inv;
    embeddings, head, norms, router and eh_proj in high precision. Returns the dequantised reference."""
    from fewchips.checkpoint import hf_state_dict

    tensors, reference = {}, {}
    for name, t in hf_state_dict(model):
        t = t.detach().clone().contiguous()
        fp8 = (t.dim() == 2 and "proj" in name and "eh_proj" not in name)
        if fp8:
            q, s = quantize_blocks(t)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            reference[name] = dequantize_by_hand(q, s)
        else:
            tensors[name] = t
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    d = model.config.to_dict()
    d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    return tensors, reference


def test_fp8_checkpoint_loads_to_dequantised_reference(tmp_path):
    model = random_model(tiny_config(**FP8_CFG))
    tensors, reference = write_fp8_checkpoint(tmp_path, model)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)    # 300x200: partial blocks
    back = fewchips.from_pretrained(tmp_path, dtype=torch.float32)
    from fewchips.checkpoint import hf_state_dict
    loaded = dict(hf_state_dict(back))
    for name, ref in reference.items():
        assert torch.equal(loaded[name], ref), name
        # and the dequantised weight is close to the original (e4m3 has a 3-bit mantissa)
    orig = dict(hf_state_dict(model))
    w, r = orig["model.layers.0.self_attn.q_b_proj.weight"], reference["model.layers.0.self_attn.q_b_proj.weight"]
    assert ((w - r).abs() <= w.abs() * 2 ** -3 + 1e-3 * w.abs().max()).all()


def test_dequantize_partial_edge_blocks():
    q = torch.ones(130, 257).to(torch.float8_e4m3fn)
    s = torch.arange(1, 7, dtype=torch.float32).view(2, 3)
    w = dequantize(q, s, BLOCK)
    assert w[0, 0] == 1 and w[0, 128] == 2 and w[0, 256] == 3 and w[129, 0] == 4 and w[129, 256] == 6


def test_fp8_missing_or_misshaped_scale_is_refused(tmp_path):
    model = random_model(tiny_config(**FP8_CFG))
    tensors, _ = write_fp8_checkpoint(tmp_path, model)
    name = "model.layers.1.self_attn.o_proj.weight"
    bad = dict(tensors)
    bad[name + "_scale_inv"] = torch.ones(5, 5)
    save_file(bad, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv has shape \(5, 5\)"):
        fewchips.from_pretrained(tmp_path)
    del bad[name + "_scale_inv"]
    save_file(bad, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*no .*weight_scale_inv"):
        fewchips.from_pretrained(tmp_path)


# ---- bad input ------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    save_pretrained(random_model(tiny_config()), tmp_path)
    return tmp_path


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        fewchips.from_pretrained(tmp_path)


def test_malformed_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: malformed JSON"):
        fewchips.from_pretrained(saved)


def test_unknown_scoring_func_and_typo_fields(saved):
    d = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**d, "scoring_func": "relu"}))
    with pytest.raises(ConfigError, match=r"scoring_func: unknown value 'relu'; allowed: sigmoid, softmax"):
        fewchips.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**d, "n_routed_expert": 8}))
    with pytest.raises(ConfigError, match=r"'n_routed_expert' \(did you mean 'n_routed_experts'\?\)"):
        fewchips.from_pretrained(saved)


def test_shape_mismatch_names_tensor(saved):
    d = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**d, "kv_lora_rank": 24}))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.kv_a_\w+\.weight' "
                                              r"has shape \(\d+,?( \d+)?\), the config expects"):
        fewchips.from_pretrained(saved)


LOADERS = {"from_pretrained": lambda p: fewchips.from_pretrained(p), "load_fp8": lambda p: load_fp8(p)}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_missing_tensor_is_an_error_not_a_partial_load(saved, loader):
    """Both loaders name what is missing by its disk name (from_pretrained the very expert, load_fp8 the
    expert tensor's pattern)."""
    sd = load_file(saved / "model.safetensors")
    del sd["model.layers.2.mlp.experts.3.up_proj.weight"]
    del sd["model.norm.weight"]
    save_file(sd, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError,
                       match=r"missing tensors.*model\.layers\.2\.mlp\.experts\.(3|\{0\.\.7\})\.up_proj"):
        LOADERS[loader](saved)
    with pytest.raises(CheckpointError, match=r"missing tensors.*'model\.norm\.weight'"):
        sd["model.layers.2.mlp.experts.3.up_proj.weight"] = torch.zeros(24, 64)
        save_file(sd, saved / "model.safetensors", metadata={"format": "pt"})
        LOADERS[loader](saved)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_both_loaders_refuse_strangers_and_warn_about_missing_mtp(saved, loader, caplog):
    sd = load_file(saved / "model.safetensors")
    save_file({**sd, "model.layers.1.mlp.surprise.weight": torch.zeros(2)}, saved / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"do not belong to this config: \['model\.layers\.1\.mlp\.surprise"):
        LOADERS[loader](saved)
    save_file({k: v for k, v in sd.items() if not k.startswith("model.layers.3.")}, saved / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="fewchips"):
        model = LOADERS[loader](saved)
    assert model.config.num_nextn_predict_layers == 0 and "no MTP weights" in caplog.text


def test_truncated_safetensors_names_the_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        fewchips.from_pretrained(saved)


def test_unexpected_tensor_is_refused(saved):
    sd = load_file(saved / "model.safetensors")
    sd["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(24, 64)   # layer 0 is dense
    save_file(sd, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="do not belong"):
        fewchips.from_pretrained(saved)


def test_config_validation_names_the_field():
    for kw, msg in [(dict(n_routed_experts=9, n_group=4), "n_routed_experts: 9 is not divisible by n_group=4"),
                    (dict(topk_group=5), "topk_group: must be between 1 and n_group=4"),
                    (dict(num_experts_per_tok=5, topk_group=2), "num_experts_per_tok: 5 experts cannot be chosen"),
                    (dict(topk_method="aux"), "topk_method: unknown value"),
                    (dict(qk_rope_head_dim=7), "qk_rope_head_dim: must be even")]:
        with pytest.raises(ConfigError, match=msg):
            tiny_config(**kw)


def test_config_json_roundtrip_and_new_spellings(tmp_path):
    from fewchips import ModelConfig

    cfg = ModelConfig.from_preset("v3")
    cfg.save(tmp_path)
    assert ModelConfig.from_json(tmp_path) == cfg
    d = cfg.to_dict()
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in rs.items() if k != "type"}}
    d["num_mtp_layers"] = d.pop("num_nextn_predict_layers")
    assert ModelConfig.from_dict(d) == cfg
