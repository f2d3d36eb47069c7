"""No process holds the whole model: at dp2 x ep2, ep4 and pp2 x ep2 (DualPipeV) the trainer's placement
(and pp2 alone) gives each rank only its shards, and gathered they equal one process's weights bitwise, for the seeded
initialisation and for a sharded `--init` read of an FP8-layout checkpoint; the streamed export equals
one process's export tensor for tensor and loads in transformers."""

import json
import os

import pytest
import torch

from model_utils import random_model
from test_parallel import _assert_ok, launch, results

LAYOUTS = {"dp2_ep2": (4, {"ep": 2}), "ep4": (4, {"ep": 4}), "pp2": (2, {"pp": 2}), "pp2_ep2": (4, {"pp": 2, "ep": 2})}
# the most any rank may hold: 1/N of every tensor; a V's two stages (the embedding, head and MTP on rank 0)
MOST = {"dp2_ep2": 0.30, "ep4": 0.30, "pp2": 0.75, "pp2_ep2": 0.45}


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """The released FP8 layout (E4M3 weights in 128x128 blocks, bf16 elsewhere) of a random model."""
    from fewchips.checkpoint.fp8 import save_fp8
    from parallel_worker import placement_config
    d = tmp_path_factory.mktemp("fp8")
    save_fp8(random_model(placement_config(), std=0.05), str(d))
    return str(d)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_placed_weights_equal_one_process_and_each_rank_holds_its_share(tmp_path, fp8_dir, layout):
    from safetensors.torch import load_file
    n, flags = LAYOUTS[layout]
    codes, errs, _ = launch(n, ["placement", tmp_path, json.dumps(flags), fp8_dir], tmp_path)
    _assert_ok(codes, errs)
    res = results(tmp_path, n)
    main = res[0]
    for what in ("init", "fp8_load"):
        assert main[f"{what}_names_equal"] and main[f"{what}_bitwise"], main
    share = [r["held_share"] for r in res]
    assert max(share) < MOST[layout], share
    # dp x ep: each element once; under a pipeline the stage's ranks each hold the embedding whole
    assert sum(share) == pytest.approx(1.0, abs=0.02 if not layout.startswith("pp") else 0.2), share
    one, streamed = tmp_path / "one", tmp_path / "streamed"
    assert sorted(os.listdir(streamed)) == sorted(os.listdir(one))            # the same files (several shards)
    assert len([f for f in os.listdir(one) if f.endswith(".safetensors")]) > 1
    for f in os.listdir(one):
        if f.endswith(".safetensors"):
            a, b = load_file(one / f), load_file(streamed / f)
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f
    assert (json.load(open(one / "model.safetensors.index.json"))
            == json.load(open(streamed / "model.safetensors.index.json")))


@pytest.mark.multiprocess
def test_streamed_export_loads_in_transformers(tmp_path, fp8_dir):
    """One layout's streamed export (written by rank 0 from the ranks' shards) is an ordinary HF directory."""
    transformers = pytest.importorskip("transformers")
    from fewchips import from_pretrained
    codes, errs, _ = launch(2, ["placement", tmp_path, json.dumps({"ep": 2}), fp8_dir], tmp_path)
    _assert_ok(codes, errs)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "streamed"), torch_dtype=torch.float32)
    ours = from_pretrained(str(tmp_path / "streamed"))
    ids = torch.randint(0, ours.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
