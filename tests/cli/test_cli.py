"""The command line's first impression: help shows each default and every preset (no stray %%), an
unknown flag gets its subcommand's usage, `train`'s defaults are the recipe's, `generate` prints its
stats on their own line, a damaged tokenizer.json is one line naming it, and --pp without torchrun
says how to launch."""

import shutil

import pytest

from fewchips.cli import build_parser, main
from fewchips.config import PRESETS

from inference_utils import save_tiny_model_dir


def test_train_help_shows_defaults_and_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "%%" not in text and "67.6%" in text
    assert all(name in text for name in PRESETS)
    assert "(default: 300)" in text and "(default: 0.002)" in text and "(default: 1)" in text


def test_train_flag_defaults_are_the_recipe_at_demo_scale():
    """The defaults a user gets, written out here (not read from TrainConfig): the report's recipe
    constants (arXiv 2412.19437 §4.2: γ 0.001, α 1e-4, λ 0.3 then 0.1, clip 1.0, AdamW β 0.9/0.95, decay
    0.1) at the demo's scale (300 steps of 16 x 256 tokens, lr 2e-3); SFT's own cosine schedule."""
    args = build_parser().parse_args(["train", "--out", "x"])
    want = dict(steps=300, batch_size=16, grad_accum=1, seq_len=256, lr=2e-3, lr_schedule="v3", weight_decay=0.1,
                beta1=0.9, beta2=0.95, grad_clip=1.0, bias_update_speed=0.001, balance_alpha=1e-4, mtp_lambda=0.3,
                mtp_lambda_late=0.1, init_std=0.006, fim_rate=0.1, dtype="auto", fp8=False, ema=None, ep=1, pp=1,
                pp_schedule="dualpipev", eval_every=100, save_every=100, max_bad_steps=5)
    assert {k: getattr(args, k) for k in want} == want
    sft = build_parser().parse_args(["sft", "--model", "m", "--data", "d", "--out", "x"])
    assert sft.lr_schedule == "cosine" and sft.lr < args.lr


def test_unknown_flag_shows_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", "x", "--lerning-rate", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: fewchips train") and "unrecognized arguments: --lerning-rate 1" in err


def test_generate_stats_on_their_own_line(tmp_path, capfd):
    model_dir = save_tiny_model_dir(tmp_path / "m")
    assert main(["generate", "--model", model_dir, "--prompt", "hello", "--max-new-tokens", "5",
                 "--temperature", "0.7", "--top-p", "0.95", "--seed", "1"]) == 0
    out, err = capfd.readouterr()
    assert out.endswith("\n") and out.startswith("hello") and "tok/s" not in out
    assert err.strip().splitlines()[-1].startswith("5 tokens in")


def test_damaged_tokenizer_json_is_one_line(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path / "m")
    with open(f"{model_dir}/tokenizer.json", "r+") as f:
        f.truncate(100)
    assert main(["generate", "--model", model_dir, "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer.json: not a readable tokenizer.json" in err
    shutil.rmtree(model_dir)


def test_pipeline_in_one_process_says_how_to_launch(tmp_path, capsys):
    """--pp needs a process per stage: one line that says to start them with torchrun, nothing written."""
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--pp", "2", "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--pp 2 must divide the number of processes (1)" in err and "torchrun --nproc_per_node" in err
    assert not out.exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_error_every_rank_hits_is_printed_by_rank_0_only(rank, monkeypatch, capsys, tmp_path):
    """Under torchrun every process fails the same way on a bad flag or a layout that does not fit:
    rank 0 prints the one line, the others exit with the same code and say nothing. An error only one
    rank meets (every_rank=False) is printed wherever it happens."""
    import fewchips.train.trainer as trainer
    from fewchips.train import TrainError
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    base = ["train", "--preset", "tiny", "--out", str(tmp_path / "run")]
    assert main([*base, "--set", "num_hidden_layer=3"]) == 2
    err = capsys.readouterr().err
    assert ("did you mean" in err) == (rank == "0") and err.count("error:") == (rank == "0")
    for every_rank in (True, False):
        def fail(*a, every_rank=every_rank, **k):
            raise TrainError("--batch-size 3 must be divisible by the 2 processes", every_rank=every_rank)
        monkeypatch.setattr(trainer, "make_layout", fail)
        assert main([*base, "--ep", "2"]) == 1
        err = capsys.readouterr().err
        assert err.count("fewchips train: error: --batch-size 3") == (1 if rank == "0" or not every_rank else 0)


def test_every_run_ends_with_a_line_saying_where_it_stopped(tmp_path, capsys):
    """--stop-at, the last step, and a --resume with nothing left each end with one line that says so."""
    from train_utils import write_corpus
    data = write_corpus(tmp_path / "data", n_files=6, funcs=8)
    run = ["train", "--preset", "tiny", "--vocab-size", "384", "--data", data, "--out", str(tmp_path / "r"),
           "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32", "--eval-every", "1000",
           "--eval-batches", "1", "--no-plots", "--no-progress", "--val-fraction", "0.2", "--threads", "1"]
    assert main([*run, "--stop-at", "1"]) == 0
    assert "stopped at step 1: --stop-at 1 of 2 steps" in capsys.readouterr().out
    assert main([*run, "--resume"]) == 0
    assert "done: step 2 (all 2 steps done)" in capsys.readouterr().out
    assert main([*run, "--resume"]) == 0
    assert "nothing to do: the checkpoint is at step 2, --steps 2" in capsys.readouterr().out


def test_serve_over_ranks_without_torchrun_says_how_to_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["serve", "--model", str(tmp_path), "--ep", "2"]) == 2
    assert "torchrun --nproc_per_node=2 -m fewchips serve --ep 2" in capsys.readouterr().err


@pytest.mark.multiprocess
@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"], ["sft", "--help"], ["grpo", "--help"],
                                  ["data", "prepare", "--help"], ["train", "--bogus"]])
def test_help_starts_without_torch(argv):
    """Building the commands' parser imports no torch (1.2 s of a 2-core machine's start-up): imports
    that load it sit inside the commands (fewchips/cli/__init__.py)."""
    import subprocess
    import sys
    code = ("import sys; import fewchips.cli as c\n"
            f"try: c.main({argv!r})\nexcept SystemExit: pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("TORCH False"), out[-500:]


BAD_NUMBERS = [  # (argv after the command's required flags, the words the one line must hold)
    (["train", "--steps", "-3"], "--steps must be >= 1, got -3"),
    (["train", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["train", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["train", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["train", "--seq-len", "1000000"], "--seq-len 1000000 is longer than the model's context"),
    (["train", "--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
    (["sample", "--model", "M", "--n", "0"], "argument --n: must be >= 1, got 0"),
    (["serve", "--model", "M", "--port", "99999"], "argument --port: must be in [1, 65535], got 99999"),
]


@pytest.mark.parametrize("argv,words", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_a_bad_number_is_one_line_before_any_work(argv, words, tmp_path, capsys):
    """Refused before a tokenizer is trained or data read: a non-zero exit, the flag and its value named
    in one line (argparse's usage line aside), no traceback, and no output folder left behind."""
    out = tmp_path / "out"
    argv = [a.replace("M", str(tmp_path / "no-model")) if a == "M" else a for a in argv]
    argv += ["--out", str(out)] if argv[0] != "serve" else []
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]
    assert code not in (0, None) and "Traceback" not in err
    assert len(lines) == 1 and words in lines[0], err
    assert not out.exists()


def test_bad_data_is_one_line_naming_the_file_and_leaves_no_folder(tmp_path, capsys):
    """Non-UTF-8 bytes in a text file: one line with the file, and the output folder the run made is gone
    again (no lock file left in an empty folder)."""
    text = tmp_path / "a.txt"
    text.write_bytes(b"hello \xff\xfe world")
    out = tmp_path / "out"
    code = main(["train", "--preset", "tiny", "--data", str(text), "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code not in (0, None) and "Traceback" not in err
    assert f"{text}: not UTF-8 text" in err.splitlines()[-1], err
    assert not out.exists()


def test_chats_that_are_not_utf8_are_named_by_file_and_line(tmp_path):
    from fewchips.train.chat import ChatDataError, read_jsonl
    chats = tmp_path / "c.jsonl"
    chats.write_bytes(b'{"messages": []}\n{"messages": [{"role": "user", "content": "h\xff"}]}\n')
    with pytest.raises(ChatDataError, match=f"{chats}:2: not UTF-8 text"):
        list(read_jsonl(str(chats)))
