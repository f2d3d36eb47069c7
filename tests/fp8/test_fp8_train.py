"""`fewchips train --fp8` end to end: the trainer swaps in exactly the recipe's FP8 layers, trains
with finite falling loss, and exports an ordinary checkpoint that saves as FP8 and loads back."""

import json

import torch

from fewchips.checkpoint import from_pretrained
from fewchips.cli import build_parser
from fewchips.cli.train import train_config as cli_train_config
from fewchips.fp8 import FP8Linear, FP8RoutedExperts
from fewchips.checkpoint.fp8 import load_fp8, save_fp8
from fewchips.train import Trainer
from train_utils import micro_config, train_config, write_corpus


def test_cli_flag_reaches_the_train_config(tmp_path):
    args = build_parser().parse_args(["train", "--out", str(tmp_path), "--fp8", "--fp8-backend", "emulate"])
    tc = cli_train_config(args)
    assert tc.fp8 and tc.fp8_backend == "emulate"
    assert not cli_train_config(build_parser().parse_args(["train", "--out", str(tmp_path)])).fp8


def test_train_fp8_end_to_end(tmp_path):
    data = write_corpus(tmp_path / "corpus", n_files=6, funcs=12)
    tc = train_config(tmp_path / "run", data, steps=6, eval_every=6, fp8=True, fp8_backend="emulate")
    said = []
    tr = Trainer(micro_config(), tc, log=said.append)
    assert any(m.startswith("fp8: ") and "emulated" in m for m in said)     # the run says what FP8 means here
    fp8_mods = [m for m in tr.model.modules() if isinstance(m, (FP8Linear, FP8RoutedExperts))]
    assert len(fp8_mods) == 4 * 5 + 3 + 3 * 4            # attention in 4 layers, 1 dense MLP, 3x (experts + shared)
    out = tr.train()
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert out["skipped_steps"] == 0
    model = from_pretrained(tmp_path / "run")                              # the export is a plain checkpoint
    save_fp8(model, tmp_path / "fp8")
    ids = torch.randint(0, 384, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_fp8(tmp_path / "fp8", dtype=torch.float32)(ids),
                                   from_pretrained(tmp_path / "fp8", dtype=torch.float32)(ids), rtol=1e-5, atol=1e-5)
