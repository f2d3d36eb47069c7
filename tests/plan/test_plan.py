"""`fewchips plan` gets DeepSeek-V3's numbers right (parameters from the model, FLOPs against a hand count,
the MFU its run implies, the report's layout fitting an H800) and rejects bad input clearly."""

import json

import pytest

from fewchips.cli import main
from fewchips.config import ModelConfig
from fewchips.plan import estimate as est
from fewchips.plan.gpus import GPUS, get_gpu, parse_gpu_spec


@pytest.fixture(scope="module")
def v3():
    cfg = ModelConfig.from_preset("v3")
    return cfg, est.count_params(cfg)   # the 671B model on the meta device: a few seconds, once


def test_v3_parameters_from_the_model(v3):
    _, p = v3
    c = p.counts
    assert abs(c["total"] / 671e9 - 1) < 0.005                  # 671B main model
    assert 36.5e9 < c["active"] < 38e9                           # ~37B activated (embedding + head included)
    assert 11e9 < c["mtp"] < 12.5e9                              # MTP counted separately (11.5B in the report)
    assert sum(b.total() for b in p.blocks if b.kind == "mtp") == c["mtp"]
    assert p.sum("embedding") == c["embedding"] == 129280 * 7168


def test_v3_flops_per_token_against_a_hand_count(v3):
    _, p = v3
    D, L, H, S = 7168, 61, 128, 4096
    attn = D * 1536 + 1536 * H * (128 + 64) + D * (512 + 64) + 512 * H * (128 + 128) + H * 128 * D
    dense = 3 * D * 18432                 # SwiGLU gate, up, down
    expert = 3 * D * 2048
    router = 256 * D
    head = 129280 * D
    activated_non_embedding = L * attn + 3 * dense + 58 * ((1 + 8) * expert + router) + head
    causal_attention = 6 * L * H * (192 + 128) * S / 2    # QK^T and PV, fwd + bwd, half the positions
    hand = 6 * activated_non_embedding + causal_attention
    flops = est.flops_per_token(p, S)
    assert abs(flops.training_main / hand - 1) < 0.02
    assert 219e9 < 6 * activated_non_embedding < 221e9
    mtp = next(t for t in flops.terms if t.name == "MTP").value
    assert 0.02 < mtp / flops.forward < 0.06                    # one extra MoE block + the head again


def test_implied_mfu_of_deepseek_v3(v3):
    _, p = v3
    flops = est.flops_per_token(p, est.REPORT_SEQ)
    terms = {t.name: t.value for t in est.implied_mfu_terms(est.REPORT_TOKENS, est.REPORT_PRETRAIN_GPU_HOURS,
                                                             flops, get_gpu("h800"))}
    achieved = 14.8e12 * flops.training / (2_664_000 * 3600)
    assert terms["achieved per GPU"] == pytest.approx(achieved / 1e12)
    assert terms["MFU vs BF16 peak"] == pytest.approx(achieved / 989.4e12)
    assert terms["MFU vs FP8 peak"] == pytest.approx(achieved / 1978.9e12)
    assert 0.39 < terms["MFU vs BF16 peak"] < 0.42               # ~40.7%
    assert 0.195 < terms["MFU vs FP8 peak"] < 0.21               # ~20.3%


def test_report_layout_fits_an_h800(v3):
    cfg, p = v3
    layout = est.gpu_split(cfg, gpus=2048, ep=64, pp=16, zero=1)
    assert (layout.dp, layout.ep, layout.pp) == (2, 64, 16)
    stages = est.training_memory(p, layout, seq=4096, micro_batch=1, fp8=True)
    worst = max(s.total for s in stages)
    assert worst < 80 * est.GIB
    assert worst < max(s.total for s in est.training_memory(p, layout, 4096, 1, fp8=False))   # FP8 saves
    assert {b for s in stages for b in s.blocks} >= {"embedding", "head", "mtp 0", "layer 60"}


def test_671b_on_one_gpu_does_not_fit_and_names_the_largest_term(v3, capsys):
    cfg, p = v3
    (stage,) = est.training_memory(p, est.gpu_split(cfg, gpus=1), 4096, 1, fp8=True)
    assert stage.total > 80 * est.GIB
    assert stage.largest.name == "optimizer state"              # 8 B x 683B params
    assert main(["plan", "--preset", "v3", "--gpus", "1", "--fp8"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "largest term: optimizer state" in out


def test_cli_report_layout_end_to_end(capsys):
    argv = ["plan", "--preset", "v3", "--tokens", "14.8T", "--gpus", "2048", "--gpu", "h800",
            "--ep", "64", "--pp", "16", "--dp", "2", "--fp8", "--pp-schedule", "dualpipe",
            "--memory", "report", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_per_gpu"]["fp8"]["fits"] is True
    assert out["params"]["total"] == pytest.approx(671e9, rel=0.005)
    assert out["serving"]["KV cache per token"] == 2 * 61 * (512 + 64)
    assert out["time"]["GPU-hours"] > 0 and out["time"]["cost"] == pytest.approx(2 * out["time"]["GPU-hours"])
    # 15,360 sequences over dp 2 x ep 64 = 120 micro-batches per pipeline; DualPipe's bubble on 16 GPUs
    assert out["pipeline"]["microbatches"] == 120
    assert out["pipeline"]["bubble fraction"] == pytest.approx(14 / (14 + 120 * 3))
    assert main(argv[:-1] + ["--explain"]) == 0
    text = capsys.readouterr().out
    assert "= 61 layers x 2 x 128 heads" in text and "(PP/2-1)(F&B+B-3W)" in text


def test_implied_mfu_prints_only_its_answer(capsys):
    argv = ["plan", "--preset", "v3", "--gpu", "h800", "--implied-mfu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "MFU vs BF16 peak" in text and "MFU vs FP8 peak" in text
    assert "training memory" not in text and "serving" not in text and "parameters" not in text
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"model", "gpu", "tokens", "seq", "implied_mfu"}
    assert 0.39 < out["implied_mfu"]["MFU vs BF16 peak"] < 0.42


@pytest.mark.parametrize("schedule,bubble", [
    ("1f1b", 15 * 3),                  # (PP-1)(F+B)
    ("zb1p", 15 * 1),                  # (PP-1)(F+B-2W)
    ("dualpipe", 7 * 2),               # (PP/2-1)(F&B+B-3W), F&B = F+B
    ("dualpipev", 15 * 2),             # DualPipeV on 16 GPUs: 32 chunks, (PP-1)(F&B+B-3W) per chunk
])
def test_bubble_follows_the_reports_table(schedule, bubble):
    cfg = ModelConfig.from_preset("v3")
    layout = est.gpu_split(cfg, gpus=2048, ep=64, pp=16, schedule=schedule)
    terms = {t.name: t.value for t in est.bubble_terms(layout, 120)}
    assert terms["bubble"] == bubble
    work = 120 * (2 if schedule == "dualpipev" else 1) * 3
    assert terms["bubble fraction"] == pytest.approx(bubble / (bubble + work))
    measured = {t.name: t.value for t in est.bubble_terms(layout, 120, (1.0, 1.5, 0.5, 2.0))}
    assert measured["bubble"] == {"1f1b": 15 * 2.5, "zb1p": 15 * 1.5, "dualpipe": 7 * 2.0,
                                  "dualpipev": 15 * 2.0}[schedule]


def test_dualpipe_memory_two_copies_dualpipev_one(v3):
    """DualPipe holds every layer on two GPUs (2x parameters); DualPipeV holds each chunk once, with the
    embedding and the head (and MTP) on GPU 0, as the V places them."""
    cfg, p = v3
    def weights(schedule):
        stages = est.training_memory(p, est.gpu_split(cfg, gpus=512, ep=32, pp=16, schedule=schedule), 4096, 1, True)
        return stages, sum(next(t.value for t in s.terms if t.name == "weights") for s in stages)
    one, w1 = weights("1f1b")
    dual, w2 = weights("dualpipe")
    v, wv = weights("dualpipev")
    assert w2 == pytest.approx(2 * w1) and wv == pytest.approx(w1)
    assert {"embedding", "head", "mtp 0"} <= set(v[0].blocks)
    assert "embedding" in one[0].blocks and "head" in one[-1].blocks


def test_small_preset_on_a_laptop_gpu_spec(capsys):
    assert main(["plan", "--preset", "small", "--tokens", "100M", "--gpu-spec",
                 "name=laptop,mem=16,bf16=0.5", "--seq", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"]["name"] == "laptop" and out["memory_per_gpu"]["bf16"]["fits"] is True


@pytest.mark.parametrize("text,value", [("14.8T", 14.8e12), ("500B", 500e9), ("2e12", 2e12), ("2,664K", 2.664e6),
                                        ("4096", 4096), ("1.5m", 1.5e6), (" 3 K ", 3e3)])
def test_units_parse(text, value):
    assert est.parse_count(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["garbage", "14.8X", "-5T", "0", "T", "1e400", "nan", "", "1.2.3B"])
def test_units_rejected(text):
    with pytest.raises(ValueError, match="--tokens"):
        est.parse_count(text, "--tokens")


def test_gpu_table_and_spec():
    for name in ("h800", "h100", "h200", "a100", "b200", "rtx4090"):
        g = GPUS[name]
        assert g.memory_gib > 0 and g.bf16_tflops > 0 and g.link_gbps > 0
    assert GPUS["h800"].bf16_tflops == GPUS["h100"].bf16_tflops and GPUS["h800"].link_gbps < GPUS["h100"].link_gbps
    assert GPUS["a100"].fp8_tflops is None and GPUS["a100"].peak_tflops(fp8=True) == 312.0
    g = parse_gpu_spec("mem=192,bf16=1307,fp8=2615,link=896,name=x")
    assert (g.name, g.memory_gib, g.fp8_tflops) == ("x", 192, 2615)
    assert parse_gpu_spec("mem=96", base=GPUS["h100"]).memory_gib == 96
    with pytest.raises(ValueError, match="missing bf16"):
        parse_gpu_spec("mem=192")
    with pytest.raises(ValueError, match="not a number"):
        parse_gpu_spec("mem=lots,bf16=1")
    with pytest.raises(ValueError, match="bad item"):
        parse_gpu_spec("memory=1,bf16=1")


@pytest.mark.parametrize("argv,message", [
    (["--gpu", "h900"], "unknown GPU 'h900'; known: h800, h100"),
    (["--ep", "48"], "--ep 48 does not divide the 256 routed experts"),
    (["--pp", "62"], "--pp 62 is more pipeline stages than the model's 61 layers"),
    (["--pp", "32"], "--pp 32 with dualpipev needs 64 chunks of at least one decoder layer, "
                     "more than the model's 61 layers"),
    (["--fbw", "1,x,1"], "--fbw '1,x,1': expected numbers"),
    (["--gpus", "2048", "--ep", "64", "--pp", "16", "--dp", "4"], "dp x ep x pp = 4 x 64 x 16 = 4096"),
    (["--gpus", "100", "--ep", "64"], "100 GPUs cannot be split into ep x pp"),
    (["--tokens", "lots"], "--tokens: cannot read 'lots'"),
    (["--implied-mfu", "2664Q"], "--implied-mfu: cannot read"),
    (["--mfu", "35"], "--mfu must be in (0, 1]"),
    (["--seq", "0"], "--seq must be a positive integer"),
    (["--gpu-spec", "mem=x,bf16=1"], "not a number"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(["plan", "--preset", "v3", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_dense_model_rejects_expert_parallelism():
    cfg = ModelConfig.from_preset("tiny", first_k_dense_replace=4, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="no MoE layers"):
        est.gpu_split(cfg, ep=2)
    assert est.gpu_split(cfg, gpus=8, pp=4, schedule="1f1b").dp == 2
    with pytest.raises(ValueError, match="dualpipev needs 8 chunks"):       # two chunks per GPU
        est.gpu_split(cfg, gpus=8, pp=4)


def test_model_from_a_config_file(tmp_path, capsys):
    ModelConfig.from_preset("tiny").save(tmp_path)          # writes tmp_path/config.json
    for src in (str(tmp_path), str(tmp_path / "config.json")):
        assert main(["plan", "--model", src, "--gpus", "4", "--ep", "4", "--gpu", "rtx4090", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["layout"] == {"gpus": 4, "dp": 1, "ep": 4, "pp": 1, "zero": 3, "schedule": "dualpipev"}   # FSDP2
        assert out["params"]["total"] == est.count_params(ModelConfig.from_preset("tiny")).counts["total"]
    assert main(["plan", "--model", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_search_finds_the_fewest_gpus_that_fit(capsys):
    """--search train answers with a layout that fits, and no layout with fewer GPUs fits (checked by
    brute force over every dp x ep x pp on the same candidate pipelines)."""
    from fewchips.plan.gpus import parse_gpu_spec
    from fewchips.plan.search import search
    cfg = ModelConfig.from_preset("small")
    p = est.count_params(cfg)
    gpu = parse_gpu_spec("name=tiny,mem=0.5,bf16=10")
    found = search(cfg, gpu, "train", seq=512, micro_batch=1)
    assert found["gpus"] is not None and found["gpus"] > 1
    cap = 0.5 * est.GIB

    def worst(gpus, ep, pp):
        try:
            layout = est.gpu_split(cfg, gpus=gpus, ep=ep, pp=pp)
        except ValueError:               # not a layout the model takes
            return None
        return max(s.total for s in est.training_memory(p, layout, 512, 1, False))

    assert worst(found["gpus"], found["ep"], found["pp"]) <= cap
    checked = 0
    for n in range(1, found["gpus"]):
        for ep in (d for d in range(1, cfg.n_routed_experts + 1) if cfg.n_routed_experts % d == 0 and n % d == 0):
            for pp in (1, 2, 4, 8, 16):
                w = worst(n, ep, pp) if (n // ep) % pp == 0 else None
                if w is not None:
                    assert w > cap, (n, ep, pp)
                    checked += 1
    assert checked > 10
    assert main(["plan", "--preset", "small", "--gpu-spec", "name=tiny,mem=0.5,bf16=10", "--seq", "512",
                 "--search", "train", "--memory", "report"]) == 0
    assert f"{found['gpus']} x tiny at the fewest" in capsys.readouterr().out


def test_search_serving_v3_fp8_on_h800(capsys):
    """fewchips serve --ep N replicates everything but the routed experts: V3's 18 GiB of FP8 non-expert
    weights sit on every rank beside 1/N of the 620 GiB of experts, so 8 x 80 GiB (which would hold the
    627 GiB split evenly) do not fit (18 + 78 GiB each) and 16 do."""
    assert main(["plan", "--preset", "v3", "--gpu", "h800", "--fp8", "--search", "serve", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == out["ep"] == 16 and out["need_gib"] <= 80
    assert 17 < out["rest_gib"] < 19 and out["experts_gib"] * 16 == pytest.approx(620, rel=0.01)
    eight = est.serving_weight_bytes(ModelConfig.from_preset("v3"), 8, fp8=True)["total"] / 2**30
    assert eight > 80


@pytest.mark.parametrize("fp8", [False, True])
def test_serving_bytes_are_what_each_rank_holds(tmp_path, fp8):
    """The planner's per-rank weight bytes equal the bytes the server's ranks allocate (`held_bytes` of
    `load_for_ranks`, the tensors themselves), FP8 storage and replicas included."""
    import torch
    from types import SimpleNamespace

    from inference_utils import save_tiny_model_dir
    from fewchips.inference.ranks import held_bytes, load_for_ranks
    d = save_tiny_model_dir(tmp_path / "m")
    cfg = ModelConfig.from_json(d)
    for ep, redundant in ((1, 0), (2, 0), (4, 4)):
        want = est.serving_weight_bytes(cfg, ep, fp8=fp8, redundant=redundant, dtype_bytes=4, mtp=False)["total"]
        for rank in range(ep):
            par = SimpleNamespace(ep=ep, ep_rank=rank, ep_group=None, device=torch.device("cpu"))
            model = load_for_ranks(d, par, torch.float32, mtp=False, weights="fp8" if fp8 else "dense",
                                   redundant=redundant)
            assert held_bytes(model) == want, (ep, rank)


def test_fewchips_memory_counts_the_bytes_the_trainer_allocates(tmp_path):
    """--memory fewchips on one GPU: weights, gradients and AdamW state equal the bytes of the trainer's own
    tensors after a step (its parameters, their .grad, the optimizer's exp_avg/exp_avg_sq), FP32 and BF16
    moments alike."""
    import torch

    from fewchips.losses import compute_losses
    from fewchips.train.build import build_optimizer, build_model
    from fewchips.train.config import TrainConfig
    from fewchips.train.layout import Layout
    cfg = ModelConfig.from_preset("tiny", vocab_size=512)
    p = est.count_params(cfg)
    for bf16 in (False, True):
        tc = TrainConfig(out=str(tmp_path), bf16_moments=bf16, steps=2, batch_size=2, seq_len=16)
        lay = Layout()
        model = build_model(cfg, tc)
        lay.materialise(model)
        lay.fill(model, tc)
        opt, _ = build_optimizer(model, tc)
        main, mtp, bal, _ = compute_losses(model, torch.randint(0, 512, (2, 17)), 0.3, None)
        (main + 0.3 * mtp + 1e-4 * bal).backward()
        opt.step()
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)        # noqa: E731
        held = {"weights": nbytes(model.parameters()), "gradients": nbytes(q.grad for q in model.parameters()),
                "optimizer state": nbytes(v for st in opt.state.values() for k, v in st.items() if k != "step")}
        (stage,) = est.training_memory(p, est.gpu_split(cfg, gpus=1), 16, 2, False, "fewchips", bf16,
                                       accumulate=False)
        terms = {t.name: t.value for t in stage.terms}
        for name, got in held.items():                                   # the MTP module included
            assert got == pytest.approx(terms[name], rel=1e-9), (name, bf16)


def test_search_explains_its_answer_and_refuses_flags_of_the_other_accounting(capsys):
    assert main(["plan", "--preset", "v3", "--gpu", "h800", "--fp8", "--search", "train", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "as fewchips train holds it" in out and "worst GPU: stage" in out and "= " in out
    assert "optimizer state" in out and "AdamW m, v in FP32" in out and "export buffer" in out
    assert main(["plan", "--preset", "v3", "--gpus", "8", "--zero", "1"]) == 2
    assert "--zero 1 applies to --memory report" in capsys.readouterr().err
    assert main(["plan", "--preset", "v3", "--gpus", "8", "--memory", "report", "--bf16-moments"]) == 2
    assert "--bf16-moments applies to --memory fewchips" in capsys.readouterr().err
