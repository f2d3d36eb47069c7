"""Redundant experts for serving over ranks: the greedy placement from measured loads, the even split of
an expert's tokens between its copies, and the loads a training run leaves beside its model."""

import json
from types import SimpleNamespace

import pytest
import torch

from model_utils import tiny_config
from fewchips.inference.experts import Placement, ServingExperts, imbalance


def test_placement_by_hand():
    """E=4 over 2 ranks, loads [10, 1, 1, 8], 2 replicas: expert 0 (10 per copy) gets the first replica,
    then expert 3 (8); copy 0 goes to rank 1, copy 3 to rank 0, and both ranks carry 10 = 5 + 1 + 4."""
    loads = torch.tensor([10.0, 1, 1, 8])
    p = Placement.place(loads, ep=2, redundant=2)
    assert p.slots_PS.tolist() == [[0, 1, 3], [2, 3, 0]]
    assert p.rank_loads(loads).tolist() == [10.0, 10.0]
    assert imbalance(Placement.place(loads, 2, 0).rank_loads(loads)) == pytest.approx(11 / 10)
    assert p.table().tolist() == [[0, 5], [1, -1], [3, -1], [2, 4]]      # global slots (rank r: r*3 ..)


@pytest.mark.parametrize("seed", range(5))
def test_placement_evens_skewed_loads(seed):
    """Zipf-like loads over 64 experts and 8 ranks: replicas lower the busiest rank's share, every rank
    holds the same number of slots, every expert is somewhere, and a rank holds an expert twice at most
    once per placement (only when no move frees a slot)."""
    g = torch.Generator().manual_seed(seed)
    loads = (1.0 / torch.arange(1, 65).double() ** 1.2)[torch.randperm(64, generator=g)] * 1e4
    before = imbalance(Placement.place(loads, 8, 0).rank_loads(loads))
    last = before
    for redundant in (8, 16, 32):
        p = Placement.place(loads, 8, redundant)
        assert p.slots_PS.shape == (8, 8 + redundant // 8)
        assert set(p.slots_PS.reshape(-1).tolist()) == set(range(64))
        assert sum(len(row) - len(set(row)) for row in p.slots_PS.tolist()) <= 1
        after = imbalance(p.rank_loads(loads))
        assert after < before and after <= last + 1e-9
        last = after
    assert last < 1.1 < before


def test_no_replicas_is_the_contiguous_split():
    p = Placement.place(torch.rand(8), ep=4, redundant=0)
    assert p.slots_PS.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_tokens_of_a_copied_expert_split_evenly_between_its_copies():
    cfg = tiny_config(n_routed_experts=4, n_group=2, topk_group=1)
    par = SimpleNamespace(ep=2, ep_rank=0, ep_group=None, device=torch.device("cpu"))
    experts = ServingExperts(cfg, par, torch.float32, redundant=2, device="cpu")
    experts.set_placement(Placement.place(torch.tensor([10.0, 1, 1, 8]), 2, 2))
    flat = torch.tensor([0, 3, 0, 1, 0, 3, 0, 2, 3])
    slots = experts.slots_of(flat)
    # expert 0: global slots 0 (rank 0) and 5 (rank 1's replica), alternating; expert 3: 2 (rank 0's
    # replica) and 4 (rank 1's own)
    assert slots.tolist() == [0, 2, 5, 1, 0, 4, 5, 3, 2]


def test_replica_flags_are_refused_in_one_process(tmp_path, capsys):
    from inference_utils import save_tiny_model_dir
    from fewchips.cli import main
    d = save_tiny_model_dir(tmp_path / "m")
    for flag, value in (("--redundant-experts", "2"), ("--rebalance-every", "4")):
        assert main(["generate", "--model", d, "--prompt", "hi", "--max-new-tokens", "1", flag, value]) == 2
        assert f"{flag} place expert replicas over the ranks of --ep N" in capsys.readouterr().err


def test_training_writes_the_expert_loads_serving_places_from(tmp_path):
    """`fewchips train` leaves expert_loads.json beside the model: one row per MoE layer (disk names, MTP
    included), the token copies each expert received over the run."""
    from train_utils import micro_config, quiet, train_config, write_corpus
    from fewchips import ModelConfig
    from fewchips.train import train
    cfg = micro_config()
    train(cfg, train_config(tmp_path / "run", write_corpus(tmp_path / "data"), steps=3, eval_every=3), log=quiet)
    doc = json.load(open(tmp_path / "run" / "expert_loads.json"))
    assert list(doc["layers"]) == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts",
                                   "model.layers.3.mlp.experts"]
    K = cfg.num_experts_per_tok
    main_rows = [sum(v) for k, v in doc["layers"].items() if k != "model.layers.3.mlp.experts"]
    assert main_rows == [doc["tokens"] * K] * 2           # every token's K copies, in each main MoE layer
    assert ModelConfig.from_json(tmp_path / "run").n_routed_experts == len(doc["layers"]["model.layers.1.mlp.experts"])


def test_weights_flag_keeps_fp8_where_asked(tmp_path):
    """--weights auto keeps a checkpoint in the released FP8 layout in FP8 (E4M3 + block scales in memory),
    fp8 block-quantises a full-precision one on load, dense dequantises; all three give the logits of
    the checkpoint's own numbers (an FP8 checkpoint's dequantised weights are exact)."""
    from argparse import Namespace

    from inference_utils import save_tiny_model_dir
    from fewchips import from_pretrained
    from fewchips.cli.models import load_model
    from fewchips.checkpoint.fp8 import FP8StoredExperts, FP8StoredLinear, save_fp8
    dense_dir = save_tiny_model_dir(tmp_path / "dense")
    fp8_dir = save_fp8(from_pretrained(dense_dir, dtype=torch.float32), tmp_path / "fp8", dtype=torch.float32)

    def load(path, weights):
        return load_model(Namespace(model=str(path), weights=weights, dtype="float32"), "cpu")

    def stored(m):
        return any(isinstance(x, (FP8StoredLinear, FP8StoredExperts)) for x in m.modules())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    auto, dense = load(fp8_dir, "auto"), load(fp8_dir, "dense")
    assert stored(auto) and not stored(dense) and stored(load(dense_dir, "fp8")) and not stored(load(dense_dir, "auto"))
    with torch.no_grad():
        torch.testing.assert_close(auto(ids), dense(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load(dense_dir, "fp8")(ids), auto(ids), rtol=1e-5, atol=1e-5)


def test_loads_that_do_not_fit_the_model_are_refused(tmp_path):
    from inference_utils import save_tiny_model_dir
    from fewchips.inference.ranks import load_for_ranks
    d = save_tiny_model_dir(tmp_path / "m")
    par = SimpleNamespace(ep=2, ep_rank=0, ep_group=None, device=torch.device("cpu"))
    for loads in ({"model.layers.9.mlp.experts": [1] * 8}, {"model.layers.1.mlp.experts": [1] * 7}):
        with pytest.raises(ValueError, match="expert loads name layers"):
            load_for_ranks(d, par, torch.float32, mtp=False, redundant=2, loads=loads)

