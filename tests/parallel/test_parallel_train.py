"""`torchrun -m fewchips train` at several layouts logs the same losses and exports the same model as the
single-process trainer: dp 2 x ep 2 stopped at step 2 and resumed at ep 2 with activation checkpointing;
a DualPipeV pipeline with expert parallelism inside its stages (pp 2 x ep 2) stopped at step 2,
resumed as two 1F1B pipelines (pp 2 x dp 2), then at ep 2. Gradient accumulation throughout."""

import json
import os
import subprocess
import sys

import pytest
import torch

from train_utils import quiet, train_config, write_corpus
from workers import child_with_rank

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--preset", "tiny", "--vocab-size", "384", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
        "--dtype", "fp32", "--log-every", "1", "--eval-every", "4", "--eval-batches", "1", "--no-plots",
        "--no-progress", "--val-fraction", "0.1", "--threads", "1", "--grad-accum", "2"]


EMA = 0.75       # the parameter EMA rides along: each rank averages its shards, checkpoints reshard it


def torchrun(n, *args, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        "-m", "fewchips", "train", *ARGS, *map(str, args)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run on the same data and settings: (data folder, output folder)."""
    from fewchips import ModelConfig
    from fewchips.train import Trainer

    tmp = tmp_path_factory.mktemp("reference")
    data = write_corpus(tmp / "data")
    one = tmp / "one"
    cfg = ModelConfig.from_preset("tiny", vocab_size=384)
    tc = train_config(one, data, steps=4, batch_size=4, seq_len=32, eval_every=4, eval_batches=1, log_every=1,
                      grad_accum=2, lr=2e-3, warmup_steps=None, ema=EMA, export_ema=True)      # the CLI defaults
    Trainer(cfg, tc, quiet).train()
    return data, one


def val_losses(out):
    return {r["step"]: r["val_loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
            if "val_loss" in r}


def same_run(one, out, ema=False):
    """Every step's loss within 1e-5, the step-4 validation loss within 3e-5, and the exported weights (and
    with `ema` the EMA's, exported by --export-ema) within a small fraction of one AdamW step (lr 2e-3):
    Adam's m/sqrt(v) magnifies fp32 reduction-order noise in near-zero gradients."""
    from fewchips import from_pretrained
    ref, got = losses(one), losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    # the weights after 4 steps carry that noise (measured: 1.2e-5 relative after the pipeline legs);
    # the evaluation itself is exact to 1e-6 on equal weights (test_parallel.py)
    assert val_losses(out)[4] == pytest.approx(val_losses(one)[4], rel=3e-5)
    for model in (".", "ema") if ema else (".",):
        a, b = (from_pretrained(os.path.join(run, model)).state_dict() for run in (one, out))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=f"{model}: {k}")
    if ema:                                          # an average, not the live weights
        assert any(not torch.equal(t, from_pretrained(str(out)).state_dict()[k]) for k, t in b.items())


def test_torchrun_train_matches_single_process_and_resumes_at_another_world_size(reference, tmp_path):
    data, one = reference
    out = tmp_path / "par"
    ema = ("--ema", EMA, "--export-ema")
    torchrun(4, "--data", data, "--out", out, "--ep", "2", "--stop-at", "2", *ema)      # dp 2 x ep 2
    assert os.path.exists(out / "checkpoint" / ".metadata")
    p = torchrun(2, "--data", data, "--out", out, "--ep", "2", "--resume",          # dp 1 x ep 2
                 "--activation-checkpointing", *ema)                             # recompute: same numbers
    assert "saved at pp 1 x dp 2 x ep 2" in p.stdout + p.stderr
    same_run(one, out, ema=True)


def test_torchrun_pipeline_matches_single_process_and_resumes_at_other_layouts(reference, tmp_path):
    """One run through three layouts: pp 2 x ep 2 with DualPipeV (4 stages in a V, 4 micro-batches, each
    split over the 2 expert-parallel ranks of a stage, the paired chunks on two threads) for steps 1-2;
    no pipeline (ep 2) for step 3; pp 2 x dp 2 with 1F1B (two pipelines, each with its own tied
    embedding) for step 4, whose validation runs through the pipeline and whose export is reassembled
    from the checkpoint. Each pipeline rank holds only its stages' parameters. Every step's loss and
    the validation loss are the single-process trainer's."""
    import re
    data, one = reference
    out = tmp_path / "pp"
    ema = ("--ema", EMA, "--export-ema")
    p = torchrun(4, "--data", data, "--out", out, "--pp", "2", "--ep", "2", "--stop-at", "2", "--pp-overlap", "on",
                 *ema)
    assert "pp 2 (dualpipev, 4 micro-batches) x dp 1 x ep 2" in p.stdout + p.stderr
    assert "runs on two threads" in p.stdout + p.stderr
    held, total = map(lambda s: int(s.replace(",", "")),
                      re.search(r"holds ([\d,]+) of the model's ([\d,]+) parameters", p.stdout + p.stderr).groups())
    assert held < 0.5 * total                 # rank 0's two V stages, sharded over its 2 ep ranks
    p = torchrun(2, "--data", data, "--out", out, "--ep", "2", "--resume", "--stop-at", "3", *ema)
    assert "saved at pp 2 x dp 1 x ep 2" in p.stdout + p.stderr
    p = torchrun(4, "--data", data, "--out", out, "--pp", "2", "--pp-schedule", "1f1b", "--microbatches", "2",
                 "--resume", *ema)
    assert "saved at pp 1 x dp 1 x ep 2" in p.stdout + p.stderr
    assert "pp 2 (1f1b, 2 micro-batches) x dp 2 x ep 1" in p.stdout + p.stderr
    same_run(one, out, ema=True)


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="finds torchrun's workers through /proc")
def test_kill_9_of_a_pipeline_rank_ends_every_rank_with_a_clear_message(reference, tmp_path):
    """A stage that dies mid-run (kill -9) leaves its peer blocked in a pipeline receive; gloo reports
    the closed connection and the survivor exits at once with one line saying what happened."""
    import signal
    import time

    data, _ = reference
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [a for a in ARGS]
    args[args.index("--steps") + 1] = "500"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fewchips", "train", *args, "--data", str(data), "--out", str(out), "--pp", "2"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:                  # wait for training to be under way
            if os.path.exists(out / "metrics.jsonl") and len(open(out / "metrics.jsonl").readlines()) >= 2:
                break
            time.sleep(0.5)
        victim = child_with_rank(p.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        text, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and time.time() - t0 < 60
    assert "fewchips: rank 0: training failed" in text and "a peer process probably exited" in text



def test_batch_ramp_under_a_pipeline_matches_single_process(reference, tmp_path):
    """--batch-ramp-tokens with --pp: the steps of the ramp run fewer pipeline micro-batches of the same
    shape (a new torch schedule over the same stages when the count changes). DualPipeV on 2 processes
    logs the single-process trainer's batch and loss at every step, through the batch doubling; a ramp
    whose first step could not feed every stage is one line naming the --microbatches that would."""
    data, _ = reference
    ramp = ["--batch-ramp-tokens", "200", "--batch-size-start", "4"]
    one = tmp_path / "one"
    tc = train_config(one, data, steps=4, batch_size=4, seq_len=32, eval_every=4, eval_batches=1, log_every=1,
                      grad_accum=2, lr=2e-3, warmup_steps=None, batch_ramp_tokens=200, batch_size_start=4)
    from fewchips.config import ModelConfig
    from fewchips.train.trainer import Trainer
    Trainer(ModelConfig.from_preset("tiny", vocab_size=384), tc, quiet).train()
    out = tmp_path / "pp"
    torchrun(2, "--data", data, "--out", out, "--pp", "2", "--microbatches", "8", *ramp)
    batches = {r["step"]: r["batch"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    assert batches == {1: 4, 2: 4, 3: 8, 4: 8}
    ref, got = losses(one), losses(out)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fewchips", "train", *ARGS, "--data", data, "--out", tmp_path / "bad", "--pp", "2",
                        "--pp-schedule", "1f1b", *ramp], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "use --microbatches 4" in p.stderr
