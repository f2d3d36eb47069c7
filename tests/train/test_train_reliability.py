"""Runs survive abuse: SIGINT/SIGTERM at any point of a step save a checkpoint that resumes exactly;
a damaged train_state.pt, tokenizer.json or metrics.jsonl is named (and the previous checkpoint taken
over where one exists); one writer per output folder; a changed schedule on --resume is refused
unless asked for; a tiny validation split is flagged; files get the user's umask."""

import json
import os
import signal
import stat

import pytest
import torch

from fewchips.files import UMASK, FolderLock
from fewchips.train import Trainer, TrainError
from fewchips.train.stopping import TrainInterrupted
from train_utils import micro_config, quiet, train_config, write_corpus

N = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    tr = Trainer(micro_config(), train_config(out, corpus, steps=N), log=quiet)
    tr.train()
    return losses(tr.metrics_path), tr.model.state_dict()


def losses(path):
    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def send_at(tr, step, where, sig):
    """Deliver `sig` to this process while step `step` (1-based) runs: before its batch is drawn, while
    it is drawn, after it (before the forward), or in the middle of the backward pass."""
    kill = lambda: os.kill(os.getpid(), sig)                              # noqa: E731
    draw, run = tr.sampler.next_batch, tr.train_step

    def next_batch(n):
        if tr.step == step - 1 and where == "during_draw":
            kill()
        out = draw(n)
        if tr.step == step - 1 and where == "after_draw":
            kill()
        return out

    def train_step():
        if tr.step == step - 1 and where == "before_draw":
            kill()
        return run()

    tr.sampler.next_batch, tr.train_step = next_batch, train_step
    if where == "backward":
        tr.model.lm_head.weight.register_hook(lambda g: (kill() if tr.step == step - 1 else None, g)[1])


@pytest.mark.parametrize("where,sig", [("before_draw", signal.SIGINT), ("during_draw", signal.SIGINT),
                                       ("after_draw", signal.SIGINT), ("backward", signal.SIGTERM)])
def test_signal_anywhere_in_a_step_resumes_exactly(tmp_path, corpus, uninterrupted, where, sig):
    want, want_weights = uninterrupted
    tr = Trainer(micro_config(), train_config(tmp_path, corpus, steps=N), log=quiet)
    send_at(tr, 4, where, sig)
    with pytest.raises(TrainInterrupted) as info:
        tr.train()
    assert info.value.step == 4 and info.value.exit_code == 128 + sig
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # handlers restored
    again = Trainer(micro_config(), train_config(tmp_path, corpus, steps=N, resume=True), log=quiet)
    assert again.step == 4
    again.train()
    assert os.path.exists(tmp_path / "checkpoint") and not os.path.exists(tmp_path / "checkpoint.old")   # done
    got = losses(again.metrics_path)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
    for k, v in again.model.state_dict().items():
        torch.testing.assert_close(v, want_weights[k], rtol=1e-5, atol=1e-6, msg=k)


def test_second_ctrl_c_aborts_without_touching_the_checkpoint(tmp_path, corpus):
    tr = Trainer(micro_config(), train_config(tmp_path, corpus, steps=N, save_every=2), log=quiet)
    run = tr.train_step

    def train_step():
        if tr.step == 4:                    # inside step 5: Ctrl-C twice
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return run()

    tr.train_step = train_step
    with pytest.raises(KeyboardInterrupt) as info:
        tr.train()
    assert not isinstance(info.value, TrainInterrupted)
    assert Trainer(micro_config(), train_config(tmp_path, corpus, steps=N, resume=True), log=quiet).step == 4


def _two_checkpoints(out, corpus):
    Trainer(micro_config(), train_config(out, corpus, steps=N, stop_at=2), log=quiet).train()
    Trainer(micro_config(), train_config(out, corpus, steps=N, stop_at=4, resume=True), log=quiet).train()
    assert os.path.exists(out / "checkpoint.old" / "train_state.pt")       # the one before is kept


@pytest.mark.parametrize("damage", ["train_state.pt", "tokenizer.json"])
def test_damaged_checkpoint_file_is_named_and_the_previous_one_used(tmp_path, corpus, damage):
    _two_checkpoints(tmp_path, corpus)
    f = tmp_path / "checkpoint" / damage
    f.write_bytes(f.read_bytes()[: 200])                                      # truncated
    said = []
    tr = Trainer(micro_config(), train_config(tmp_path, corpus, steps=N, resume=True), log=said.append)
    assert tr.step == 2
    assert any(str(f) in m for m in said) and any("previous checkpoint" in m for m in said)
    # with no earlier checkpoint: one clear error naming the file, and what to do
    shutil_rm(tmp_path / "checkpoint.old")
    with pytest.raises(TrainError,
                       match=rf"{damage}.*(cannot be read|not a readable).*no earlier checkpoint.*--overwrite"):
        Trainer(micro_config(), train_config(tmp_path, corpus, steps=N, resume=True), log=quiet)


def shutil_rm(path):
    import shutil
    shutil.rmtree(path)


def test_damaged_metrics_lines_are_dropped_with_a_warning(tmp_path, corpus):
    Trainer(micro_config(), train_config(tmp_path, corpus, steps=N, stop_at=3), log=quiet).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0\n\x00\x00garbage\n')
    said = []
    tr = Trainer(micro_config(), train_config(tmp_path, corpus, steps=N, resume=True), log=said.append)
    assert any("metrics.jsonl: dropped 2 line(s)" in m for m in said)
    tr.train()
    assert sorted(losses(tr.metrics_path)) == list(range(1, N + 1))


def test_one_writer_per_output_folder(tmp_path, corpus):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname(), "since": "x"}))
    with pytest.raises(TrainError, match=rf"being written by process {os.getppid()}.*another --out"):
        Trainer(micro_config(), train_config(tmp_path, corpus, steps=2), log=quiet)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    lock.write_text(json.dumps({"pid": dead, "host": __import__("socket").gethostname(), "since": "x"}))
    tr = Trainer(micro_config(), train_config(tmp_path, corpus, steps=2), log=quiet)   # stale: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    tr.train()
    assert not lock.exists()                                                  # released at the end
    assert FolderLock(tmp_path).acquire().held


def test_resume_with_another_schedule_is_refused_unless_asked(tmp_path, corpus):
    Trainer(micro_config(), train_config(tmp_path, corpus, steps=N, stop_at=3), log=quiet).train()
    with pytest.raises(TrainError, match=r"--steps 8 -> 12 changes the run's schedule.*--allow-schedule-change"):
        Trainer(micro_config(), train_config(tmp_path, corpus, steps=12, resume=True), log=quiet)
    said = []
    tr = Trainer(micro_config(), train_config(tmp_path, corpus, steps=12, resume=True, allow_schedule_change=True),
                 log=said.append)
    assert tr.step == 3 and any("changes the schedule" in m for m in said)


def test_small_validation_split_is_flagged(tmp_path):
    data = write_corpus(tmp_path / "data", n_files=30, funcs=25)
    said = []
    Trainer(micro_config(), train_config(tmp_path / "run", data, steps=1, val_fraction=0.02), log=said.append)
    assert any("validation split is" in m and "tokens in 1 document" in m for m in said)


def test_outputs_follow_the_umask(tmp_path, corpus):
    Trainer(micro_config(), train_config(tmp_path, corpus, steps=1), log=quiet).train()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "checkpoint/train_state.pt",
                 "checkpoint/model.safetensors"):
        mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
        assert mode == 0o666 & ~UMASK or name.endswith("train_state.pt"), (name, oct(mode))
    assert stat.S_IMODE(os.stat(tmp_path / "checkpoint").st_mode) == 0o777 & ~UMASK
