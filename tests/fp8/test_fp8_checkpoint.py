"""FP8 checkpoints: the released layout, save -> load round trips (dequantised and FP8-resident),
`fewchips convert` bf16 -> fp8 -> bf16 shard by shard, and bad scales refused by tensor name."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_utils import random_model, tiny_config
from fewchips import CheckpointError
from fewchips.checkpoint import from_pretrained, save_pretrained
from fewchips.cli import main as cli
from fewchips.checkpoint.fp8 import FP8StoredExperts, FP8StoredLinear, convert, load_fp8, save_fp8
from fewchips.fp8.quant import BLOCK, dequantize

# widths past 128 so that every weight has full and partial 128x128 blocks
CFG = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=144, kv_lora_rank=128)
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(**CFG))


@pytest.fixture(scope="module")
def fp8_dir(model, tmp_path_factory):
    return save_fp8(model, tmp_path_factory.mktemp("fp8"))


def _tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def test_released_layout(fp8_dir):
    t = _tensors(fp8_dir)
    cfg = json.load(open(os.path.join(fp8_dir, "config.json")))
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    fp8 = {n for n, v in t.items() if v.dtype == torch.float8_e4m3fn}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8           # 128+8 rows: a partial block
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in fp8
    assert "model.layers.3.mlp.shared_experts.up_proj.weight" in fp8             # the MTP layer too
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight", "model.norm.weight"):
        assert t[n].dtype == torch.bfloat16, n
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for n in fp8:
        s = t[n + "_scale_inv"]
        assert s.dtype == torch.float32 and s.shape == tuple(-(-d // 128) for d in t[n].shape), n
    assert {n[: -len("_scale_inv")] for n in t if n.endswith("_scale_inv")} == fp8


def test_load_dequantised_is_close_to_the_original(model, fp8_dir):
    back = from_pretrained(fp8_dir, dtype=torch.float32)
    t = _tensors(fp8_dir)
    for name, p in model.state_dict().items():
        q = back.state_dict()[name]
        if name.endswith(("_proj.weight", "_proj_with_mqa.weight", "experts.gate_up_proj", "experts.down_proj")) \
                and "eh_proj" not in name:
            bound = p.abs() * 2.0**-4 + 1e-6                                     # one E4M3 rounding
        else:
            bound = p.abs() * 2.0**-8 + 1e-30                                    # one BF16 rounding
        assert ((q - p).abs() <= bound).all(), name
    # exactly the stored values, dequantised per block
    w = back.model.layers[0].self_attn.kv_a_proj_with_mqa.weight
    n = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert torch.equal(w, dequantize(t[n], t[n + "_scale_inv"], BLOCK))


def test_load_fp8_keeps_weights_in_fp8(fp8_dir):
    m8 = load_fp8(fp8_dir, dtype=torch.float32)
    attn = m8.model.layers[0].self_attn
    assert isinstance(attn.q_b_proj, FP8StoredLinear) and attn.q_b_proj.qweight.dtype == torch.float8_e4m3fn
    assert isinstance(m8.model.layers[1].mlp.experts, FP8StoredExperts)
    assert type(m8.lm_head) is torch.nn.Linear and m8.lm_head.weight.dtype == torch.float32
    assert m8.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ref = from_pretrained(fp8_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(m8(IDS), ref(IDS), rtol=1e-5, atol=1e-5)
        # absorbed attention reads kv_b_proj.weight directly: the property dequantises it
        torch.testing.assert_close(attn.kv_b_proj.weight, ref.model.layers[0].self_attn.kv_b_proj.weight)
    stored = sum(b.numel() for n, b in m8.named_buffers() if b.dtype == torch.float8_e4m3fn)
    assert stored > 0.7 * sum(p.numel() for p in ref.parameters() if p.dim() > 1) - 2 * ref.lm_head.weight.numel()


def test_load_fp8_with_fp8_gemms(fp8_dir):
    """Inference through the FP8 GEMM (activations quantised per 1x128 tile, as the demo's fp8 path)."""
    ref = from_pretrained(fp8_dir, dtype=torch.float32)
    m8 = load_fp8(fp8_dir, dtype=torch.float32, fp8_gemm=True)
    with torch.no_grad():
        a, b = m8.model.layers[0].self_attn.q_a_proj, ref.model.layers[0].self_attn.q_a_proj
        x = torch.randn(3, 5, CFG["hidden_size"])
        y, y_ref = a(x), b(x)
        assert y.shape == y_ref.shape and ((y - y_ref).norm() / y_ref.norm()) < 0.05
        assert torch.isfinite(m8(IDS)).all()


def test_load_fp8_quantises_a_bf16_checkpoint(model, tmp_path):
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    m8 = load_fp8(tmp_path, dtype=torch.float32)
    assert m8.model.layers[0].mlp.down_proj.qweight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert torch.isfinite(m8(IDS)).all()


def test_convert_bf16_fp8_bf16(model, tmp_path):
    src, fp8, back = tmp_path / "bf16", tmp_path / "fp8", tmp_path / "back"
    save_pretrained(model, src, dtype=torch.bfloat16, max_shard_bytes=200_000)   # several shards
    (src / "tokenizer.json").write_text("{}")
    assert cli(["convert", "--in", str(src), "--out", str(fp8), "--to", "fp8"]) == 0
    assert cli(["convert", "--in", str(fp8), "--out", str(back), "--to", "bf16"]) == 0
    idx = json.load(open(fp8 / "model.safetensors.index.json"))["weight_map"]
    assert len({f for f in idx.values()}) > 1
    for n, f in idx.items():                                                   # the index says where each is
        with safe_open(fp8 / f, "pt") as h:
            assert n in h.keys()
        if n.endswith("_scale_inv"):
            assert idx[n[: -len("_scale_inv")]] == f                           # scale beside its weight
    assert (back / "tokenizer.json").exists()
    assert "quantization_config" in json.load(open(fp8 / "config.json"))
    assert "quantization_config" not in json.load(open(back / "config.json"))
    a, b, c = _tensors(src), _tensors(fp8), _tensors(back)
    assert a.keys() == c.keys()
    for name, ta in a.items():
        ta = ta.float()
        tb = dequantize(b[name], b[name + "_scale_inv"], BLOCK) if b[name].dtype == torch.float8_e4m3fn else b[name]
        assert ((tb.float() - ta).abs() <= ta.abs() * 2.0**-4 + 1e-6).all(), name
        # fp8 -> bf16 is a dequantisation and a BF16 rounding, nothing else
        assert torch.equal(c[name], tb.to(c[name].dtype)), name
    assert from_pretrained(back).config.hidden_size == CFG["hidden_size"]


def _tamper(path, fn):
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


NAME = "model.layers.1.self_attn.o_proj.weight"


@pytest.mark.parametrize("damage", ["missing", "misshaped"])
def test_bad_scales_are_refused_with_the_tensor_name(model, tmp_path, damage):
    save_fp8(model, tmp_path)
    if damage == "missing":
        _tamper(tmp_path, lambda t: t.pop(NAME + "_scale_inv"))
    else:
        _tamper(tmp_path, lambda t: t.__setitem__(NAME + "_scale_inv", torch.ones(1, 1)))
    for load in (from_pretrained, load_fp8, lambda p: convert(p, str(p) + "-out", "bf16")):
        with pytest.raises(CheckpointError, match=NAME.replace(".", r"\.")):
            load(tmp_path)
    assert cli(["convert", "--in", str(tmp_path), "--out", str(tmp_path / "x"), "--to", "bf16"]) == 2


def test_convert_bad_arguments(tmp_path):
    assert cli(["convert", "--in", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--to", "fp8"]) == 2
    with pytest.raises(SystemExit):
        cli(["convert", "--in", "a", "--out", "b", "--to", "fp16"])
