"""Every bad input a newcomer types, one table: each must end in a non-zero exit, one line that names the
flag or the file (argparse's usage lines aside), no traceback, and nothing left behind where nothing was
trained or written: no output folder, no partial model, a folder that held other files as it was.

The cases are those a fresh-clone trial of the CLI found (issue 39's 48, the 6 that once gave tracebacks
or did the wrong thing quietly among them) and the ones found while fixing those."""

from __future__ import annotations

import os
import shutil

import pytest

from fewchips.cli import main

from inference_utils import save_tiny_model_dir

# (argv, words the one line holds, exit status). {M}: a tiny model directory with a fewchips tokenizer;
# {T}: a folder of bad files; {O}: an output path that must not exist afterwards; {N}: a folder holding
# notes.txt, which must hold only that afterwards.
CASES = [
    # train: numbers, checked before a tokenizer is trained or data read
    ("train --steps -3 --out {O}", "--steps must be >= 1, got -3", 1),
    ("train --steps 0 --out {O}", "--steps must be >= 1, got 0", 1),
    ("train --lr -1 --out {O}", "--lr must be > 0, got -1.0", 1),
    ("train --seq-len 0 --out {O}", "--seq-len must be >= 1, got 0", 1),
    ("train --seq-len 1000000 --out {O}", "--seq-len 1000000 is longer than the model's context", 1),
    ("train --init {M} --seq-len 1000 --out {O}", "(max_position_embeddings 256)", 1),
    ("train --val-fraction 1 --out {O}", "--val-fraction must be in [0, 1), got 1.0", 1),
    ("train --batch-size 0 --out {O}", "--batch-size (0) and --grad-accum (1) must be >= 1", 1),
    ("train --grad-accum 0 --out {O}", "--grad-accum (0) must be >= 1", 1),
    ("train --warmup -1 --out {O}", "--warmup must be >= 0, got -1", 1),
    ("train --fim-rate 2 --out {O}", "--fim-rate must be in [0, 1], got 2.0", 1),
    ("train --threads 0 --out {O}", "--threads must be >= 1, got 0", 1),
    ("train --stop-at 0 --out {O}", "--stop-at must be >= 1, got 0", 1),
    ("train --ema 2 --out {O}", "--ema takes the decay, between 0 and 1", 1),
    ("train --vocab-size 10 --out {O}", "--vocab-size 10 is below the smallest byte-level BPE: 274", 2),
    ("train --batch-size-start 3 --out {O}", "--batch-size-start 3 must be a multiple of --batch-size", 1),
    # train: flags and their combinations
    ("train --preset huge --out {O}", "argument --preset: invalid choice: 'huge'", 2),
    ("train --dtype fp16 --out {O}", "argument --dtype: invalid choice: 'fp16'", 2),
    ("train --bogus --out {O}", "unrecognized arguments: --bogus", 2),
    ("train --step 10 --out {O}", "unrecognized arguments: --step 10", 2),
    ("train --fp8-backend emulate --out {O}", "--fp8-backend set(s) the FP8 recipe, which this run does not use", 1),
    ("train --export-ema --out {O}", "--export-ema writes the parameter EMA", 1),
    ("train --pp 2 --out {O}", "--pp 2 must divide the number of processes (1)", 1),
    ("train --ep 3 --out {O}", "--ep 3 must divide the number of processes", 1),
    ("train --init {M} --vocab-size 500 --out {O}", "--init takes the model's config from its directory", 2),
    ("train --set bogus_field=3 --out {O}", "--set: unknown config field(s) 'bogus_field'", 2),
    ("train --set num_hidden_layers=abc --out {O}", "num_hidden_layers: must be a positive integer, got 'abc'", 2),
    ("train --set num_hidden_layers=0 --out {O}", "num_hidden_layers: must be a positive integer, got 0", 2),
    # train: files
    ("train --data {T}/missing --out {O}", "--data {T}/missing: no such file or directory", 2),
    ("train --data {T}/empty --out {O}", "no text found in {T}/empty", 2),
    ("train --data {T}/latin1.txt --out {O}", "{T}/latin1.txt: not UTF-8 text", 2),
    ("train --data nan:{T}/text --out {O}", "the weight must be a finite number > 0", 2),
    ("train --data 0.5:{T}/text 0.5:{T}/missing --out {O}", "--data {T}/missing: no such file or directory", 2),
    ("train --config {T}/missing.json --out {O}", "{T}/missing.json: no config.json here", 2),
    ("train --config {T}/badjson.json --out {O}", "{T}/badjson.json: malformed JSON", 2),
    ("train --init {T}/missing --out {O}", "{T}/missing: no config.json here", 2),
    ("train --tokenizer {T}/missing.json --out {O}", "{T}/missing.json: no tokenizer.json here", 2),
    ("train --out {N}", "--out {N} holds files that are not a fewchips run (notes.txt)", 1),
    ("train --out {T}/text/a.txt", "--out {T}/text/a.txt is a file", 1),
    ("train --resume --out {O}", "--resume: no checkpoint in {O}/checkpoint", 1),
    # sft, grpo, sample, eval
    ("sft --model {T}/missing --out {O}", "{T}/missing: not a directory", 1),
    ("sft --model {M} --steps 0 --out {O}", "--steps must be >= 1, got 0", 1),
    ("sft --model {M} --data {T}/missing.jsonl --out {O}", "{T}/missing.jsonl: no such file", 1),
    ("sft --model {M} --data {T}/trunc.jsonl --out {O}", "{T}/trunc.jsonl:2: not a JSON object", 1),
    ("sft --model {M} --data {T}/latin1.jsonl --out {O}", "{T}/latin1.jsonl:1: not UTF-8 text", 1),
    ("sft --model {M} --data {T}/empty --out {O}", "{T}/empty: a folder, but not a Hugging Face datasets folder", 1),
    ("grpo --model {T}/missing --out {O}", "{T}/missing: not a directory", 1),
    ("grpo --model {M} --task bogus --out {O}", "--task 'bogus': one of arithmetic", 1),
    ("grpo --model {M} --task nomodule:fn --out {O}", "--task nomodule:fn: cannot load it", 1),
    ("grpo --model {M} --task math --prompts {T}/missing.jsonl --out {O}", "{T}/missing.jsonl: no such file", 1),
    ("grpo --model {M} --task math --prompts {T}/trunc.jsonl --out {O}", "{T}/trunc.jsonl:2: not a JSON object", 1),
    ("grpo --model {M} --prompts {T}/trunc.jsonl --out {O}", "--prompts applies to the math, code", 1),
    ("grpo --model {M} --group-size 1 --out {O}", "--group-size must be at least 2", 1),
    ("sample --model {M} --n 0 --out {O}", "argument --n: must be >= 1, got 0", 2),
    ("sample --model {T}/missing --out {O}", "{T}/missing: no tokenizer.json", 2),
    ("sample --model {M} --reward bogus --out {O}", "--task 'bogus': one of arithmetic", 1),
    ("sample --model {M} --reward math --prompts {T}/missing.jsonl --out {O}", "{T}/missing.jsonl: no such file", 1),
    ("eval --model {M} --data {T}/trunc.jsonl", "{T}/trunc.jsonl:2: not a JSON object", 1),
    ("eval --model {M} --data {T}/latin1.jsonl", "{T}/latin1.jsonl:1: not UTF-8 text", 2),
    ("eval --model {M} --data {T}/missing.jsonl", "--data {T}/missing.jsonl: no such file or directory", 2),
    ("eval --model {T}/missing --data {T}/trunc.jsonl", "{T}/missing: no tokenizer.json here", 2),
    ("eval --model {M} --data {T}/trunc.jsonl --seq-len 1", "argument --seq-len: must be >= 2, got 1", 2),
    # inference
    ("generate --model {T}/missing --prompt hi", "{T}/missing: no tokenizer.json", 2),
    ("generate --model {T}/corrupt --prompt hi", "{T}/corrupt/model.safetensors: not a readable safetensors", 2),
    ("generate --model {M} --prompt hi --max-new-tokens 0", "argument --max-new-tokens: must be >= 1, got 0", 2),
    ("generate --model {M} --prompt hi --threads 0", "argument --threads: must be >= 1, got 0", 2),
    ("generate --model {M} --prompt hi --temperature -1", "temperature must be >= 0, got -1.0", 2),
    ("generate --model {M} --prompt hi --top-p 2", "top_p must be in (0, 1], got 2.0", 2),
    ("generate --model {M} --prompt hi --top-k -1", "top_k must be >= 0, got -1", 2),
    ("generate --model {M} --prompt hi --ep 2", "start them with torchrun --nproc_per_node=2", 2),
    ("chat --model {T}/missing", "{T}/missing: no tokenizer.json", 2),
    ("chat --model {M} --max-new-tokens 0", "argument --max-new-tokens: must be >= 1, got 0", 2),
    ("serve --model {M} --port 99999", "argument --port: must be in [1, 65535], got 99999", 2),
    ("serve --model {M} --max-batch 0", "argument --max-batch: must be >= 1, got 0", 2),
    ("serve --model {M} --host 256.1.1.1 --port 8123", "cannot listen on --host 256.1.1.1 --port 8123", 2),
    ("serve --model {T}/missing", "{T}/missing: no tokenizer.json", 2),
    # tools
    ("info --preset bogus", "unknown preset 'bogus'", 2),
    ("info --model {T}/missing", "{T}/missing: no config.json here", 2),
    ("plan --preset bogus", "unknown preset 'bogus'", 2),
    ("plan --preset v3 --tokens abc", "--tokens: cannot read 'abc'", 2),
    ("plan --preset v3 --gpus 0", "--gpus must be a positive integer, got 0", 2),
    ("plan --preset v3 --gpu bogus", "unknown GPU 'bogus'", 2),
    ("plan --preset v3 --gpus 16 --ep 3", "--ep 3 does not divide the 256 routed experts", 2),
    ("plan --preset v3 --mfu 2", "--mfu must be in (0, 1], got 2", 2),
    ("convert --in {T}/missing --out {O} --to fp8", "{T}/missing: not a directory", 2),
    ("convert --in {M} --out {O} --to int4", "argument --to: invalid choice: 'int4'", 2),
    ("convert --in {M} --out {M} --to fp8", "--in and --out must be different directories", 2),
    ("convert --in {M} --out {N} --to fp8", "--out {N} is not empty", 2),
    ("convert --in {T}/corrupt --out {O} --to fp8", "{T}/corrupt/model.safetensors: not a readable safetensors", 2),
    ("data prepare --data {T}/missing --vocab-size 300 --out {O}", "--data {T}/missing: no such file", 2),
    ("data prepare --data {T}/text --out {O}", "--vocab-size N (train one): exactly one of them", 2),
    ("data prepare --data {T}/text --vocab-size 10 --out {O}", "--vocab-size 10 is below the smallest", 2),
    ("data prepare --data {T}/text --tokenizer {T}/missing.json --out {O}", "{T}/missing.json: no tokenizer", 2),
    ("data prepare --vocab-size 300 --out {O}", "the following arguments are required: --data", 2),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model and the bad files the cases name."""
    from fewchips.train.tokenizer import save_tokenizer, train_tokenizer
    t = tmp_path_factory.mktemp("bad")
    model = save_tiny_model_dir(t / "model")
    save_tokenizer(train_tokenizer(["def f(x):\n    return x + 1\n" * 50, "the user asks, the model answers\n" * 50],
                                   300), model, 256)        # a fewchips tokenizer: the special tokens sft needs
    (t / "trunc.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                   '"content": "yo"}]}\n{"messages": [{"role": "us')
    (t / "latin1.jsonl").write_bytes(b'{"messages": [{"role": "user", "content": "h\xe9"}]}\n')
    (t / "latin1.txt").write_bytes(b"caf\xe9 au lait\n" * 20)
    (t / "badjson.json").write_text("{not json")
    (t / "empty").mkdir()
    (t / "text").mkdir()
    (t / "text" / "a.txt").write_text("def f(x):\n    return x\n" * 50)
    (t / "corrupt").mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(model, name), t / "corrupt" / name)
    (t / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00garbage")
    return t


@pytest.mark.parametrize("argv,words,code", CASES, ids=[a for a, _, _ in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(argv, words, code, files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    out, kept = tmp_path / "out", tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    names = {"M": str(files / "model"), "T": str(files), "O": str(out), "N": str(kept)}
    argv, words = argv.format(**names).split(), words.format(**names)
    before = sorted(os.listdir(files))
    try:
        got = main(argv)
    except SystemExit as e:                        # argparse's errors
        got = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line and not line.startswith(("usage:", " "))]
    assert "Traceback" not in err, err
    assert got == code and len(lines) == 1 and words in lines[0], (got, err)
    assert lines[0].startswith(f"fewchips {argv[0]}"), lines[0]
    assert not out.exists(), sorted(os.listdir(out)) if out.is_dir() else out
    assert sorted(os.listdir(kept)) == ["notes.txt"] and sorted(os.listdir(files)) == before


def test_the_table_covers_every_command():
    from fewchips.cli import COMMANDS
    assert {a.split()[0] for a, _, _ in CASES} == set(COMMANDS)
    assert len(CASES) >= 48
