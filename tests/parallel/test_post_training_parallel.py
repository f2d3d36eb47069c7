"""`torchrun -m fewchips sft` at dp 2, ep 2 and pp 2 (DualPipeV) logs the single-process run's losses
(packed chats: sample masking and the assistant-only loss across ranks, micro-batches and stages), and
`fewchips grpo` at dp 2 the same loss, reward and KL with the same seeds; what a command cannot honour
is refused by name."""

import json
import os
import subprocess
import sys

import pytest

from train_utils import micro_config, quiet, train_config, write_corpus

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--dtype", "fp32", "--log-every", "1", "--no-plots", "--no-progress", "--threads", "1"]
SFT = ["--steps", "3", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "48", "--eval-every", "3",
       "--val-fraction", "0.2", *COMMON]
GRPO = ["--steps", "2", "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "4", "--eval-every", "2",
        "--val-prompts", "4", "--freeze-mtp", "--iterations", "2", "--grad-accum", "2", *COMMON]


def torchrun(n, command, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "fewchips", command, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def model_and_chats(tmp_path_factory):
    from fewchips.train import Trainer
    from fewchips.train.bundled import arithmetic_chats
    root = tmp_path_factory.mktemp("post")
    Trainer(micro_config(), train_config(root / "model", write_corpus(root / "corpus"), steps=5), log=quiet).train()
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in arithmetic_chats(60, 0)))
    return str(root / "model"), str(chats)


@pytest.fixture(scope="module")
def sft_one(model_and_chats, tmp_path_factory):
    from fewchips.cli import main
    model, chats = model_and_chats
    out = tmp_path_factory.mktemp("sft1") / "one"
    assert main(["sft", "--model", model, "--data", chats, "--out", str(out), *SFT]) == 0
    return records(out)


# pp2: a micro-batch's rows over two pipeline micro-batches
@pytest.mark.parametrize("layout", [["--dp", "2"], ["--ep", "2"],
                                    ["--pp", "2", "--pp-schedule", "1f1b", "--microbatches", "4"]],
                         ids=["dp2", "ep2", "pp2"])
def test_sft_under_torchrun_logs_the_single_process_losses(model_and_chats, sft_one, tmp_path, layout):
    model, chats = model_and_chats
    p = torchrun(2, "sft", "--model", model, "--data", chats, "--out", tmp_path / "par", *SFT, *layout)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("inconsistent results between ranks") == 0           # no DTensor redistribute warning
    assert p.stdout.count("done: step 3") == 1                                   # one line, from rank 0
    got = records(tmp_path / "par")
    for key in ("loss", "mtp_loss", "val_loss"):
        want = [r[key] for r in sft_one if key in r]
        have = [r[key] for r in got if key in r]
        assert len(have) == len(want) > 0 and have == pytest.approx(want, rel=1e-5), (key, have, want)


def test_grpo_at_dp2_gives_the_single_process_loss_reward_and_kl(model_and_chats, tmp_path):
    from fewchips.cli import main
    model, _ = model_and_chats
    assert main(["grpo", "--model", model, "--out", str(tmp_path / "one"), *GRPO]) == 0
    p = torchrun(2, "grpo", "--model", model, "--out", tmp_path / "par", *GRPO, "--dp", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    one, par = records(tmp_path / "one"), records(tmp_path / "par")
    for key in ("loss", "reward_mean", "kl", "completion_len", "val_reward"):
        want, have = [r[key] for r in one if key in r], [r[key] for r in par if key in r]
        assert len(have) == len(want) > 0 and have == pytest.approx(want, rel=1e-5, abs=1e-7), (key, have, want)


@pytest.mark.parametrize("argv, says", [
    (["grpo", "--pp", "2"], "--pp 2: GRPO's rollouts"),
    (["grpo", "--iterations", "0"], "--iterations must be >= 1"),
    (["sft", "--pp-schedule", "1f1b"], "--pp-schedule set the pipeline of --pp N"),
    (["sft", "--step", "3"], "unrecognized arguments: --step 3"),
])
def test_a_flag_a_command_cannot_honour_is_refused_by_name(model_and_chats, tmp_path, capsys, argv, says):
    from fewchips.cli import main
    model, _ = model_and_chats
    with pytest.raises(SystemExit) if "--step" in argv else _noop():
        code = main([argv[0], "--model", model, "--out", str(tmp_path / "x"), *argv[1:]])
        assert code != 0
    err = capsys.readouterr().err
    assert says in err and len([line for line in err.splitlines() if "error" in line]) == 1, err
    assert not os.path.exists(tmp_path / "x" / "checkpoint")


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
