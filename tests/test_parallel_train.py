"""`torchrun -m fewchips train --ep 2` (dp 2 x ep 2, stopped at step 2, resumed at 2 processes with activation checkpointing; gradient accumulation) logs the same losses and exports the same model as the single-process trainer."""

import json
import os
import subprocess
import sys

import pytest
import torch

from train_utils import quiet, train_config, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--preset", "tiny", "--vocab-size", "384", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
        "--dtype", "fp32", "--log-every", "1", "--eval-every", "4", "--eval-batches", "1", "--no-plots",
        "--no-progress", "--val-fraction", "0.1", "--threads", "1", "--grad-accum", "2"]


def torchrun(n, *args, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        "-m", "fewchips", "train", *ARGS, *map(str, args)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r}


def test_torchrun_train_matches_single_process_and_resumes_at_another_world_size(tmp_path):
    from fewchips import ModelConfig, from_pretrained
    from fewchips.train import Trainer

    data = write_corpus(tmp_path / "data")
    one = tmp_path / "one"
    cfg = ModelConfig.from_preset("tiny", vocab_size=384)
    tc = train_config(one, data, steps=4, batch_size=4, seq_len=32, eval_every=4, eval_batches=1, log_every=1,
                      grad_accum=2, lr=2e-3, warmup_steps=None)                                # the CLI defaults
    Trainer(cfg, tc, quiet).train()

    out = tmp_path / "par"
    torchrun(4, "--data", data, "--out", out, "--ep", "2", "--stop-at", "2")       # dp 2 x ep 2
    assert os.path.exists(out / "checkpoint" / ".metadata")
    p = torchrun(2, "--data", data, "--out", out, "--ep", "2", "--resume",          # dp 1 x ep 2
                 "--activation-checkpointing")                                   # recompute: same numbers
    assert "saved at dp 2 x ep 2" in p.stdout + p.stderr

    ref, got = losses(one), losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    # The exported weights agree too, to a small fraction of one AdamW step (lr 2e-3): Adam's m/sqrt(v)
    # magnifies fp32 reduction-order noise in near-zero gradients.
    a, b = from_pretrained(str(one)).state_dict(), from_pretrained(str(out)).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
