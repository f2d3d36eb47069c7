"""The training data pipeline: the BPE tokenizer loads in transformers, FIM makes valid PSM samples
that round-trip to the document, shards and the split are deterministic, the sampler resumes
exactly, and bad data gives clear errors."""

import json
import os
import sys

import numpy as np
import pytest

from fewchips.train import Trainer
from fewchips.train import data as D
from fewchips.train.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer, special_ids, train_tokenizer
from train_utils import micro_config, quiet, train_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tok(corpus):
    docs = D.read_documents(corpus)
    return train_tokenizer((t for _, t in docs), 384, len(docs))


def test_tokenizer_special_ids_and_transformers_loading(tok, tmp_path):
    sp = special_ids(tok)
    assert (sp.bos, sp.eos) == (0, 1) and tok.get_vocab_size() <= 384
    text = "def f(x):\n    return x  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text).ids) == text            # byte-level: lossless
    save_tokenizer(tok, tmp_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False).ids
    # text for the model starts with BOS, as every training document does
    assert hf.encode(text) == tok.encode(text).ids == [sp.bos, *tok.encode(text, add_special_tokens=False).ids]
    assert hf.bos_token == SPECIAL_TOKENS[0] and hf.eos_token_id == 1
    assert load_tokenizer(str(tmp_path)).to_str() == tok.to_str()


def test_token_byte_lengths_count_utf8_bytes_exactly(tok):
    from fewchips.train.tokenizer import token_byte_lengths
    lengths = token_byte_lengths(tok)
    text = "def f(x):\n    return x  # ünïcode ✓ 数\n"
    ids = tok.encode(text).ids                           # BOS first: a special token, 0 bytes
    assert lengths[ids].sum() == len(text.encode("utf-8")) and lengths[special_ids(tok).bos] == 0


def test_fim_psm_round_trip(corpus, tok):
    sp = special_ids(tok)
    docs = D.read_documents(corpus)
    samples = list(D.encode_documents(docs, tok, sp, fim_rate=1.0, seed=3))
    assert all(is_fim for _, is_fim in samples)
    for (name, text), (ids, _) in zip(docs, samples):
        ids = ids.tolist()
        assert ids[0] == sp.bos and ids[-1] == sp.eos
        body = ids[1:-1]
        assert body[0] == sp.fim_begin and body.index(sp.fim_hole) < body.index(sp.fim_end)   # PSM order
        prefix, middle, suffix = D.parse_psm(body, sp)
        assert tok.decode(prefix) + tok.decode(middle) + tok.decode(suffix) == text
    with pytest.raises(ValueError):
        D.parse_psm([sp.fim_hole, 5, sp.fim_begin], sp)


def test_fim_rate_and_plain_documents(corpus, tok):
    sp = special_ids(tok)
    docs = [(f"{n}#{k}", t) for k in range(20) for n, t in D.read_documents(corpus)]     # 240 named documents
    flags = [f for _, f in D.encode_documents(docs, tok, sp, fim_rate=0.1, seed=0)]
    assert 8 <= sum(flags) <= 45                                 # ~24 expected
    assert flags == [f for _, f in D.encode_documents(docs[::-1], tok, sp, fim_rate=0.1, seed=0)][::-1]   # per name
    plain = next(D.encode_documents(docs[:1], tok, sp, fim_rate=0.0))[0].tolist()
    assert plain == [*tok.encode(docs[0][1]).ids, sp.eos]           # encode() adds the BOS


def test_split_shards_and_determinism(corpus, tok, tmp_path):
    from fewchips.train.prepare import PrepareConfig, open_prepared, prepare
    from fewchips.train.sources import parse_sources
    sp = special_ids(tok)
    docs = D.read_documents(corpus)
    train, val = D.split_documents(docs, 0.2)
    assert train and val and not {n for n, _ in train} & {n for n, _ in val}
    assert {n for n, _ in D.split_documents(list(reversed(docs)), 0.2)[1]} == {n for n, _ in val}  # by name
    save_tokenizer(tok, tmp_path / "tok")
    pc = PrepareConfig(fim_rate=0.1, val_fraction=0.2)
    a, b = (open_prepared(prepare(parse_sources(corpus), str(tmp_path / "tok" / "tokenizer.json"),
                                  str(tmp_path / k), pc, log=quiet, progress=False))[0] for k in "ab")
    assert a.train[0:len(a.train)].dtype == np.uint16
    assert (np.array_equal(a.train[0:len(a.train)], b.train[0:len(b.train)])
            and np.array_equal(a.val[0:10**9], b.val[0:10**9]))
    idx = json.load(open(os.path.join(tmp_path / "a", "index.json")))
    assert idx["splits"]["val"]["fim_documents"] == 0 and idx["splits"]["val"]["documents"] == len(val)
    assert idx["splits"]["train"]["tokens"] == len(a.train)
    # packing: document starts point at BOS, the token before each start is EOS
    starts, tokens = a.train.doc_starts(), a.train[0:len(a.train)]
    assert len(starts) == len(train) and all(tokens[s] == sp.bos for s in starts)
    assert all(tokens[s - 1] == sp.eos for s in starts[1:])
    assert 0 < idx["unigram_entropy_nats"] < np.log(tok.get_vocab_size())


def test_sampler_is_deterministic_and_resumes():
    tokens = np.arange(1000, dtype=np.uint16)
    s = D.Sampler(tokens, 16, seed=1)
    first = [s.next_batch(5)[1] for _ in range(30)]              # crosses an epoch (62 windows)
    s2 = D.Sampler(tokens, 16, seed=1)
    for _ in range(13):
        s2.next_batch(5)
    state = s2.state_dict()
    s3 = D.Sampler(tokens, 16, seed=1)
    s3.load_state_dict(state)
    rest = [s3.next_batch(5)[1] for _ in range(17)]
    assert all(np.array_equal(x, y) for x, y in zip(first[13:], rest))
    ids, which = D.Sampler(tokens, 16, seed=1).next_batch(2)
    assert ids.shape == (2, 17) and ids[0, 0] == which[0] * 16 and np.all(np.diff(ids, axis=1) == 1)


def test_jsonl_and_text_inputs(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "alpha beta"}\n\n{"text": "gamma"}\n')
    assert sorted(t for _, t in D.read_documents(str(p))) == ["alpha beta", "gamma"]
    p.write_text('{"body": "x"}\n')
    with pytest.raises(D.DataError, match="d.jsonl:1: no string field 'text' \\(set --text-field\\)"):
        D.read_documents(str(p))
    q = tmp_path / "notes.txt"
    q.write_text("hello")
    assert D.read_documents(str(q)) == [("notes.txt", "hello")]


def test_parquet_needs_pyarrow(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x = 2\n"]}), p)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)     # as if pyarrow were not installed
    with pytest.raises(D.DataError, match="needs pyarrow"):
        D.read_documents(str(p), text_field="content")


def test_bad_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.read_documents(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(D.DataError, match="no text found"):
        D.read_documents(str(tmp_path / "empty"))
    with pytest.raises(D.DataError, match="fewer than one sequence"):
        D.Sampler(np.zeros(10, dtype=np.uint16), 64)


def test_corpus_smaller_than_one_sequence_via_trainer(tmp_path):
    data = tmp_path / "small"
    data.mkdir()
    (data / "a.py").write_text("x = 1\n")
    (data / "b.py").write_text("y = 2\n")
    with pytest.raises(D.DataError, match="fewer than one sequence"):
        Trainer(micro_config(), train_config(tmp_path / "run", data), log=quiet)


def test_training_with_an_existing_tokenizer(corpus, tok, tmp_path):
    """--tokenizer: the given tokenizer.json is used as is (no BPE training) and shipped with the model;
    one with more tokens than vocab_size, or without the special tokens, is refused clearly."""
    from tokenizers import Tokenizer, models
    path = tmp_path / "given" / "tokenizer.json"
    save_tokenizer(tok, path.parent)
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus, tokenizer=str(path)), log=quiet)
    assert tr.tok.to_str() == tok.to_str()
    assert not any(f.startswith("tokenizer-") for f in os.listdir(tmp_path / "run" / "cache"))   # none trained
    with pytest.raises(D.DataError, match="vocab_size"):
        Trainer(micro_config().replace(vocab_size=64), train_config(tmp_path / "run2", corpus, tokenizer=str(path)),
                log=quiet)
    bare = tmp_path / "bare.json"
    Tokenizer(models.BPE()).save(str(bare))
    with pytest.raises(ValueError, match="special token"):
        Trainer(micro_config(), train_config(tmp_path / "run3", corpus, tokenizer=str(bare)), log=quiet)


def test_default_corpus_is_the_standard_library():
    docs = D.read_documents(None, max_bytes=200_000)
    assert docs and all(n.endswith(".py") for n, _ in docs)
    assert not any(n.startswith(("test/", "site-packages/")) for n, _ in docs)
    assert docs == D.read_documents(None, max_bytes=200_000)     # deterministic
