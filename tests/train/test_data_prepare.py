"""Preparing pre-training data: every document of every kind of source lands in the token stream once,
exactly as the tokenizer encodes it, whether one process, two workers or two torchrun ranks prepare it,
and after a preparation killed halfway is resumed (no finished shard rewritten); mixtures follow their
weights and resume exactly; bad input stops with its file and line, or is skipped and counted."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fewchips.train import data as D
from fewchips.train import prepare as P
from fewchips.train.sources import DataError, is_val, parse_sources, plan_units
from fewchips.train.tokenizer import save_tokenizer, special_ids, train_tokenizer
from train_utils import quiet, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(unit_bytes=3000, shard_tokens=700)      # many units, several shards per unit


def texts(n, seed, prefix):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "ünïcode", "数据", "x = 1", "\n", "def f():", "return"]
    return [f"{prefix} {i}: " + " ".join(rng.choice(words, size=int(rng.integers(5, 120)))) for i in range(n)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of every kind (.py, .jsonl, .jsonl.gz, .jsonl.zst, .parquet in row groups) and the texts in it."""
    root = tmp_path_factory.mktemp("mixed")
    write_corpus(root / "code", n_files=6)
    written = [open(root / "code" / f).read() for f in sorted(os.listdir(root / "code"))]
    lines = texts(60, 0, "jsonl")
    with open(root / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in lines)
    gz = texts(20, 1, "gz")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t, "meta": 1}) + "\n" for t in gz)
    written += lines + gz
    zstandard = pytest.importorskip("zstandard")
    zs = texts(15, 2, "zst")
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in zs).encode()))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pt = texts(30, 3, "parquet")
    pq.write_table(pa.table({"text": pt}), root / "d.parquet", row_group_size=7)
    written += zs + pt
    return str(root), written


@pytest.fixture(scope="module")
def tok(mixed):
    return train_tokenizer(texts(200, 9, "bpe"), 400)


@pytest.fixture(scope="module")
def tok_file(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, folder)
    return str(folder / "tokenizer.json")


def streams(folder):
    """{source: (train tokens, val tokens)} of a prepared folder."""
    return {s.name: (s.train[0:len(s.train)], s.val[0:len(s.val)]) for s in P.open_prepared(folder)}


def test_every_document_once_exactly_as_the_tokenizer_encodes_it(mixed, tok, tok_file, tmp_path):
    root, written = mixed
    pc = P.PrepareConfig(fim_rate=0.0, val_fraction=0.2, **SMALL)
    out = P.prepare(parse_sources(root), tok_file, str(tmp_path / "one"), pc, workers=1, log=quiet, progress=False)
    plan = plan_units(parse_sources(root), pc.unit_bytes)
    assert len(plan.units) > 5 and any(p.kind == "jsonl" and p.start > 0 for u in plan.units for p in u.pieces)
    docs = [d for u in plan.units for d in D.read_unit(u)]
    assert sorted(t for _, t in docs) == sorted(written)          # nothing lost, nothing twice
    assert len({n for n, _ in docs}) == len(docs)                 # names unique: the split and FIM hash them
    sp = special_ids(tok)
    want = {"train": [], "val": []}
    for name, text in docs:                                       # the tokenizer itself, document by document
        ids = tok.encode(text, add_special_tokens=False).ids
        want["val" if is_val(name, 0.2) else "train"] += [sp.bos, *ids, sp.eos]
    train, val = streams(out)[os.path.basename(root)]
    assert train.tolist() == want["train"] and val.tolist() == want["val"] and len(val) > 0
    index = json.load(open(os.path.join(out, "index.json")))
    src = index["sources"][0]
    assert src["splits"]["train"]["documents"] + src["splits"]["val"]["documents"] == len(written)
    assert any(name.endswith("-001.train") for name, *_ in src["splits"]["train"]["segments"])   # units: several shards
    longest = max(len(tok.encode(t).ids) for t in written) + 1
    for f in os.listdir(os.path.join(out, "parts")):             # bounded: a shard closes once it passes the bound
        if f.endswith(".train.bin"):
            assert os.path.getsize(os.path.join(out, "parts", f)) // 2 <= 2 * pc.shard_tokens + longest


def test_two_workers_and_a_killed_preparation_give_the_same_tokens(mixed, tok_file, tmp_path, monkeypatch):
    root, _ = mixed
    pc = P.PrepareConfig(fim_rate=0.5, val_fraction=0.2, **SMALL)
    src = parse_sources(root)
    one = streams(P.prepare(src, tok_file, str(tmp_path / "one"), pc, workers=1, log=quiet, progress=False))
    two = streams(P.prepare(src, tok_file, str(tmp_path / "two"), pc, workers=2, log=quiet, progress=False))
    assert all(np.array_equal(a, b) for k in one for a, b in zip(one[k], two[k]))
    # killed after its 5th shard: finished shards stay as they are, the rest is written on resume
    out, closed, real_close = str(tmp_path / "killed"), [], P.ShardWriter.close

    def close_then_die(self, docs_through):
        meta = real_close(self, docs_through)
        closed.append(self.name)
        if len(closed) == 5:
            raise KeyboardInterrupt
        return meta
    monkeypatch.setattr(P.ShardWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(src, tok_file, out, pc, workers=1, log=quiet, progress=False)
    monkeypatch.setattr(P.ShardWriter, "close", real_close)
    assert not os.path.exists(os.path.join(out, "index.json"))
    parts = os.path.join(out, "parts")
    before = {f: os.stat(os.path.join(parts, f)).st_mtime_ns for f in os.listdir(parts) if not f.startswith(".")}
    unfinished = closed[-1].split("-")[0]
    assert not os.path.exists(os.path.join(parts, unfinished + ".json"))      # killed inside a unit
    stale = os.path.join(parts, ".u000000-009.train.bin.999999999.tmp")     # a killed writer's partial shard
    open(stale, "wb").write(b"\0" * 10)
    os.utime(stale, (0, 0))
    resumed = streams(P.prepare(src, tok_file, out, pc, workers=1, log=quiet, progress=False))
    assert not os.path.exists(stale)
    assert all(os.stat(os.path.join(parts, f)).st_mtime_ns == t for f, t in before.items())   # none rewritten
    assert all(np.array_equal(a, b) for k in one for a, b in zip(one[k], resumed[k]))
    assert json.load(open(os.path.join(out, "index.json")))["fingerprint"] == \
        json.load(open(os.path.join(tmp_path / "one", "index.json")))["fingerprint"]


def test_a_folder_holding_another_preparation_is_refused(mixed, tok_file, tmp_path):
    root, _ = mixed
    out = str(tmp_path / "p")
    os.makedirs(os.path.join(out, "parts"))
    P._start(out, {"plan": "x"}, tok_file)
    with pytest.raises(DataError, match="unfinished preparation of other data"):
        P.prepare(parse_sources(root), tok_file, out, P.PrepareConfig(**SMALL), log=quiet, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        P.prepare(parse_sources(root), tok_file, str(tmp_path / "full"), P.PrepareConfig(**SMALL), log=quiet)


def test_datasets_folder(tok_file, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = texts(25, 4, "ds")
    datasets.Dataset.from_dict({"content": rows, "n": list(range(25))}).save_to_disk(str(tmp_path / "ds"))
    assert sorted(t for _, t in D.read_documents(str(tmp_path / "ds"), text_field="content")) == sorted(rows)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="pass one split's folder"):
        D.read_documents(str(tmp_path / "dd"))


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_rows_name_their_file_and_line_or_are_counted(tmp_path, tok_file):
    good = [json.dumps({"text": t}) for t in texts(40, 5, "ok")]
    lines = good[:30] + ['{"text": "cut', json.dumps({"body": "no text"})] + good[30:]
    (tmp_path / "j").mkdir()
    p = tmp_path / "j" / "rows.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:31: not valid JSON.*--skip-bad-rows"):
        D.read_documents(str(p))
    plan = plan_units(parse_sources(str(p)), unit_bytes=700)              # the bad line is in a later byte range
    assert plan.units[-1].pieces[0].start > 0
    with pytest.raises(DataError, match=r"rows.jsonl:31: not valid JSON"):
        [d for u in plan.units for d in D.read_unit(u)]
    assert len(D.read_documents(str(p), skip_bad_rows=True)) == 40
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="rows.jsonl:2: not UTF-8"):
        D.read_documents(str(p))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("hello there")
    (tmp_path / "t" / "b.txt").write_bytes(b"\xff\xfebinary")
    (tmp_path / "t" / "c.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"b.txt: not UTF-8 text \(byte 0\)"):
        D.read_documents(str(tmp_path / "t"))
    pc = P.PrepareConfig(skip_bad_rows=True, val_fraction=0.0)
    out = P.prepare(parse_sources(str(tmp_path / "t")), tok_file, str(tmp_path / "prep"), pc, log=(log := []).append,
                    progress=False)
    src = json.load(open(os.path.join(out, "index.json")))["sources"][0]
    assert src["read"]["skipped"] == 1 and "b.txt" in src["read"]["examples"][0] and src["left_out"] == {".png": 1}
    assert any("1 bad rows skipped" in line and "1 .png" in line for line in log)


def test_bad_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["def f():\n    return 1\n", None, "x = 2\n"], "n": [1, 2, 3]}), p,
                   row_group_size=2)
    with pytest.raises(DataError, match=r"d.parquet:row 1: column 'content' holds NoneType"):
        D.read_documents(str(p), text_field="content")
    assert sorted(t for _, t in D.read_documents(str(p), text_field="content", skip_bad_rows=True)) == \
        ["def f():\n    return 1\n", "x = 2\n"]
    with pytest.raises(DataError, match="no column 'text'.*content, n"):
        D.read_documents(str(p))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable parquet"):
        D.read_documents(str(tmp_path / "bad.parquet"))


# ---- mixtures -----------------------------------------------------------------------------------

def test_mixture_follows_the_weights_and_resumes_exactly():
    streams_ = [np.arange(n, dtype=np.uint16) for n in (5000, 800, 3000)]
    weights = [0.7, 0.2, 0.1]
    m = D.MixtureSampler(streams_, weights, 16, seed=3, names=["web", "code", "math"])
    _, which = m.next_batch(10_000)
    share = np.bincount(which, minlength=3) / 10_000
    assert np.all(np.abs(share - weights) <= 0.02 * np.asarray(weights))    # within 2% of each weight
    p = m.progress()
    assert p["tokens_code"] == 2000 * 16 and p["epoch_code"] > 1             # the small source went round
    a = D.MixtureSampler(streams_, weights, 16, seed=3, names=["web", "code", "math"])
    a.next_batch(777)
    state = json.loads(json.dumps(a.state_dict()))                          # what a checkpoint keeps
    rest = [a.next_batch(64)[0] for _ in range(20)]
    b = D.MixtureSampler(streams_, weights, 16, seed=3, names=["web", "code", "math"])
    b.load_state_dict(state)
    assert all(np.array_equal(x, b.next_batch(64)[0]) for x in rest)
    for bad in ("0:x", "inf:x", "-1:x"):
        with pytest.raises(DataError, match="finite number > 0"):
            parse_sources([bad])
    with pytest.raises(DataError, match="same --data"):
        D.MixtureSampler(streams_, [0.5, 0.3, 0.2], 16, names=["web", "code", "math"]).load_state_dict(state)
    with pytest.raises(DataError, match="mixture"):
        D.Sampler(streams_[0], 16).load_state_dict(state)


def test_mixture_through_the_trainer_resumes_exactly(tmp_path):
    """Two sources by weight: per-source validation and progress in metrics.jsonl; a run stopped at step 2
    and resumed logs the losses of the uninterrupted run."""
    from fewchips.train import Trainer
    from train_utils import micro_config, train_config
    web, code = write_corpus(tmp_path / "web", n_files=8), write_corpus(tmp_path / "code", n_files=8, seed=1)
    data = ["0.75:" + web, "0.25:" + code]

    def run(out, **kw):
        tc = train_config(out, web, steps=4, eval_every=4, val_fraction=0.3, cache_dir=str(tmp_path / "cache"), **kw)
        import dataclasses
        Trainer(micro_config(), dataclasses.replace(tc, data=data), log=quiet).train()
        return [json.loads(line) for line in open(out / "metrics.jsonl")]
    full = run(tmp_path / "full")
    run(tmp_path / "split", stop_at=2)
    resumed = run(tmp_path / "split", resume=True)
    assert [r.get("loss") for r in full] == [r.get("loss") for r in resumed]
    last = full[-1]
    assert {"val_loss_web", "val_loss_code", "val_bpb_web", "val_loss"} <= set(last)
    train = full[-2]
    assert (train["tokens_web"] + train["tokens_code"] == train["tokens"]
            and train["tokens_web"] == 3 * train["tokens_code"])


# ---- the command and torchrun ---------------------------------------------------------------------

def test_data_prepare_command_and_training_on_its_folder(mixed, tok_file, tmp_path, capsys):
    from fewchips.cli import main
    root, written = mixed
    out = str(tmp_path / "prepared")
    assert main(["data", "prepare", "--data", f"2:{root}", os.path.join(root, "code"), "--out", out, "--tokenizer",
                 tok_file, "--no-progress", "--data-workers", "2", "--fim-rate", "0.2"]) == 0
    said = capsys.readouterr().out
    assert "mixed" in said and "code" in said and "is ready" in said
    index = json.load(open(os.path.join(out, "index.json")))
    assert [s["weight"] for s in index["sources"]] == [2.0, 1.0]
    args = ["train", "--preset", "tiny", "--vocab-size", "400", "--data", out, "--out", str(tmp_path / "run"),
            "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--no-plots", "--eval-every", "2",
            "--threads", "1"]
    assert main(args) == 2                                     # --fim-rate 0.1 (the default) is not the folder's
    assert "--fim-rate 0.2" in capsys.readouterr().err
    assert main([*args, "--fim-rate", "0.2", "--data-workers", "2"]) == 2
    assert "--data-workers is for preparing raw sources" in capsys.readouterr().err
    assert main([*args, "--fim-rate", "0.2"]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert f"val_loss_{index['sources'][0]['name']}" in recs[-1] and "tokens_code" in recs[-2]
    assert not os.path.exists(tmp_path / "run" / "cache")      # nothing tokenised again


@pytest.mark.multiprocess
def test_two_torchrun_ranks_prepare_the_tokens_of_one_process(mixed, tok_file, tmp_path):
    root, _ = mixed
    pc = P.PrepareConfig(fim_rate=0.3, val_fraction=0.2)
    one = streams(P.prepare(parse_sources(root), tok_file, str(tmp_path / "one"), pc, workers=1, log=quiet,
                            progress=False))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "fewchips", "data", "prepare", "--data", root, "--out", str(tmp_path / "two"), "--tokenizer",
                        tok_file, "--fim-rate", "0.3", "--val-fraction", "0.2", "--data-workers", "1", "--no-progress",
                        "--unit-mb", "0.003"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 rank(s) x 1 process" in p.stdout and len(os.listdir(tmp_path / "two" / "parts")) > 20
    two = streams(str(tmp_path / "two"))
    assert all(np.array_equal(a, b) for k in one for a, b in zip(one[k], two[k]))


def test_a_prepared_folder_serves_only_its_own_request(mixed, tok_file, tmp_path, capsys):
    """A finished folder asked for with other settings, or an unfinished one given to training, is
    refused by name; --max-corpus-mb cuts inside a compressed file too."""
    from fewchips.cli import main
    root, _ = mixed
    out = str(tmp_path / "p")
    base = ["data", "prepare", "--data", root, "--out", out, "--tokenizer", tok_file, "--no-progress"]
    assert main(base) == 0 and main(base) == 0                       # the same request: kept
    assert "already prepared" in capsys.readouterr().out
    assert main([*base, "--fim-rate", "0.3"]) == 2
    assert "--fim-rate 0.1 (now 0.3)" in capsys.readouterr().err
    os.remove(os.path.join(out, "index.json"))                       # as if killed before the end
    args = ["train", "--preset", "tiny", "--vocab-size", "400", "--data", out, "--out", str(tmp_path / "run")]
    assert main(args) == 2 and "unfinished `fewchips data prepare`" in capsys.readouterr().err
    gz = os.path.join(root, "b.jsonl.gz")
    whole = D.read_documents(gz)
    capped = D.read_documents(gz, max_bytes=2000)
    assert 0 < len(capped) < len(whole) and capped == whole[:len(capped)]
