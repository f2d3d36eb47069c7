"""Training data: find documents, split them by file, tokenise once into memory-mapped shards, and
sample fixed-length windows deterministically.

Layout of a prepared corpus (one folder per corpus x tokenizer x FIM setting, reused when it exists):
    train.bin, val.bin   every document as BOS body EOS, back to back (document packing), as
                         uint16 (vocab <= 65536) or uint32, read with numpy.memmap
    index.json           dtype, token and byte counts, document start offsets, unigram entropy

FIM (arXiv 2412.19437 §4.1): with probability `fim_rate` a training document is cut at two random
character positions into prefix/middle/suffix and stored in PSM order,
    BOS FIM_BEGIN prefix FIM_HOLE suffix FIM_END middle EOS
before packing. Validation documents are never transformed, so bits per byte stay comparable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..files import atomic_path, swap_dir, temp_dir_beside
from ..losses import Batch, bits_per_byte  # noqa: F401 - the data's types, re-exported
from .tokenizer import SpecialIds, load_tokenizer, special_ids, token_byte_lengths, tokenizer_hash, train_tokenizer

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java",
                 ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".json", ".html", ".css", ".tex", ".csv"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", ".git"}


class DataError(ValueError):
    """The data cannot be used as given; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Finding documents
# ---------------------------------------------------------------------------------------------

def default_corpus_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def read_documents(path: str | None = None, max_bytes: int | None = None, text_field: str = "text"):
    """[(name, text)], sorted by a hash of the name (a deterministic shuffle), capped at `max_bytes`
    of UTF-8. `path` None: the Python standard library's own .py files (tests excluded)."""
    if path is None:
        root = default_corpus_root()
        docs = list(_read_tree(root, suffixes={".py"}))
        where = f"the Python standard library at {root}"
    else:
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data {path}: no such file or directory")
        docs = list(_read_tree(path) if os.path.isdir(path) else _read_file(path, os.path.basename(path), text_field))
        where = path
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise DataError(f"no text found in {where}; --data takes text files, folders of them, "
                        f".jsonl (a {text_field!r} field per line) or .parquet")
    docs.sort(key=lambda d: _hash(d[0]))
    if max_bytes:
        kept, total = [], 0
        for n, t in docs:
            if total >= max_bytes:
                break
            kept.append((n, t))
            total += len(t.encode())
        docs = kept
    return docs


def _read_tree(root, suffixes=None):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            ext = os.path.splitext(f)[1].lower()
            if suffixes is not None and ext not in suffixes:
                continue
            if suffixes is None and ext not in TEXT_SUFFIXES | {".jsonl", ".parquet"}:
                continue
            yield from _read_file(full, os.path.relpath(full, root), "text")


def _read_file(full, name, text_field):
    ext = os.path.splitext(full)[1].lower()
    if ext == ".jsonl":
        with open(full, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{full}:{i + 1}: not valid JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise DataError(f"{full}:{i + 1}: no string field {text_field!r} (set --text-field)")
                yield f"{name}:{i}", row[text_field]
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{full}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        try:
            pf = pq.ParquetFile(full)
        except Exception as e:      # pyarrow raises ArrowInvalid/OSError for corrupt or non-parquet files
            raise DataError(f"{full}: not a readable parquet file ({e})") from None
        columns = pf.schema_arrow.names
        if text_field not in columns:
            raise DataError(f"{full}: no column {text_field!r} (columns: {', '.join(columns)}; set --text-field)")
        i = 0
        for batch in pf.iter_batches(columns=[text_field]):    # row groups stream; the file need not fit twice
            for t in batch.column(0).to_pylist():
                if isinstance(t, str):
                    yield f"{name}:{i}", t
                i += 1
    else:
        try:
            with open(full, encoding="utf-8") as f:
                yield name, f.read()
        except UnicodeDecodeError:
            return   # binary or non-UTF-8 files are skipped


def _hash(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "big")


def split_documents(docs, val_fraction: float = 0.03):
    """Split by a hash of the document name: the same file always lands on the same side.
    With two or more documents, validation gets at least one."""
    cut = int(val_fraction * 2**64)
    train = [d for d in docs if _hash("split:" + d[0]) >= cut]
    val = [d for d in docs if _hash("split:" + d[0]) < cut]
    if not val and len(docs) >= 2 and val_fraction > 0:
        val, train = train[-1:], train[:-1]
    return train, val


def corpus_fingerprint(docs) -> str:
    h = hashlib.sha1()
    for n, t in docs:
        h.update(n.encode())
        h.update(hashlib.sha1(t.encode()).digest())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# FIM and tokenisation into shards
# ---------------------------------------------------------------------------------------------

def fim_split(text: str, rng: np.random.Generator):
    """Two uniform cut points over the characters: (prefix, middle, suffix)."""
    a, b = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    return text[:a], text[a:b], text[b:]


def psm(prefix_ids, middle_ids, suffix_ids, sp: SpecialIds) -> list[int]:
    """The PSM-order FIM body (without BOS/EOS)."""
    return [sp.fim_begin, *prefix_ids, sp.fim_hole, *suffix_ids, sp.fim_end, *middle_ids]


def parse_psm(body, sp: SpecialIds):
    """Inverse of `psm`: (prefix_ids, middle_ids, suffix_ids); ValueError if not a PSM sample."""
    body = list(body)
    if not body or body[0] != sp.fim_begin or body.count(sp.fim_hole) != 1 or body.count(sp.fim_end) != 1:
        raise ValueError("not a PSM sample")
    h, e = body.index(sp.fim_hole), body.index(sp.fim_end)
    if not h < e:
        raise ValueError("FIM_HOLE must come before FIM_END")
    return body[1:h], body[e + 1:], body[h + 1:e]


def encode_documents(docs, tok, sp: SpecialIds, fim_rate: float = 0.0, seed: int = 0, batch: int = 256):
    """Yield one int array per document: BOS body EOS, with FIM (PSM) applied at `fim_rate`."""
    rng = np.random.default_rng(seed)
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        pieces, plan = [], []
        for _, text in chunk:
            if fim_rate > 0 and rng.random() < fim_rate:
                plan.append(("fim", len(pieces)))
                pieces.extend(fim_split(text, rng))
            else:
                plan.append(("doc", len(pieces)))
                pieces.append(text)
        enc = [e.ids for e in tok.encode_batch(pieces, add_special_tokens=False)]
        for kind, i in plan:
            body = psm(enc[i], enc[i + 1], enc[i + 2], sp) if kind == "fim" else enc[i]
            yield np.asarray([sp.bos, *body, sp.eos], dtype=np.int64), kind == "fim"


@dataclass
class Split:
    tokens: np.ndarray        # memmap, uint16/uint32
    doc_starts: np.ndarray


@dataclass
class Corpus:
    path: str
    train: Split
    val: Split
    index: dict


def prepare_corpus(train_docs, val_docs, tok, sp: SpecialIds, cache_dir: str, key: str,
                   fim_rate: float = 0.1, seed: int = 0, log=print) -> Corpus:
    """Tokenise into `cache_dir/key/` once (atomically: a temp folder renamed into place), then
    memory-map it. An existing folder with a complete index is reused."""
    out = os.path.join(cache_dir, key)
    if not os.path.exists(os.path.join(out, "index.json")):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = temp_dir_beside(out)
        try:
            index = _write_shards(tmp, train_docs, val_docs, tok, sp, fim_rate, seed)
            swap_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"tokenised {index['splits']['train']['documents']} train / {index['splits']['val']['documents']} val "
            f"documents into {out}")
    return load_corpus(out)


def _write_shards(folder, train_docs, val_docs, tok, sp: SpecialIds, fim_rate: float, seed: int) -> dict:
    """{train,val}.bin token streams, their document starts and index.json in `folder`."""
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    index = {"dtype": np.dtype(dtype).name, "vocab_size": vocab, "fim_rate": fim_rate, "seed": seed, "splits": {}}
    counts = np.zeros(vocab, dtype=np.int64)
    for split, docs, rate in (("train", train_docs, fim_rate), ("val", val_docs, 0.0)):
        starts, n_tok, n_fim = [], 0, 0
        with open(os.path.join(folder, f"{split}.bin"), "wb") as f:
            for ids, is_fim in encode_documents(docs, tok, sp, rate, seed):
                starts.append(n_tok)
                n_tok += len(ids)
                n_fim += is_fim
                if split == "train":
                    counts += np.bincount(ids, minlength=vocab)
                f.write(ids.astype(dtype).tobytes())
        np.save(os.path.join(folder, f"{split}_doc_starts.npy"), np.asarray(starts, dtype=np.int64))
        index["splits"][split] = {"tokens": n_tok, "documents": len(docs), "fim_documents": n_fim,
                                  "bytes": sum(len(t.encode()) for _, t in docs)}
    p = counts[counts > 0] / max(counts.sum(), 1)
    index["unigram_entropy_nats"] = float(-(p * np.log(p)).sum())
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


def load_corpus(path: str) -> Corpus:
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    splits = {}
    for name in ("train", "val"):
        n = index["splits"][name]["tokens"]
        toks = (np.memmap(os.path.join(path, f"{name}.bin"), dtype=index["dtype"], mode="r", shape=(n,))
                if n else np.zeros(0, dtype=index["dtype"]))
        splits[name] = Split(toks, np.load(os.path.join(path, f"{name}_doc_starts.npy")))
    return Corpus(path, splits["train"], splits["val"], index)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

class Sampler:
    """Non-overlapping windows of seq_len + 1 tokens over the packed stream, visited in a fresh
    seeded permutation each epoch. `state_dict()` is the exact position; resuming continues it."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        if len(tokens) < seq_len + 1:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one sequence of "
                            f"--seq-len {seq_len} (+1 for the shifted target); add data or lower --seq-len")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def next_batch(self, batch_size: int):
        """ids [B, seq_len + 1] (int64) and the window numbers [B]."""
        rows, which = [], []
        for _ in range(batch_size):
            if self.cursor == self.n_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            w = int(self._order[self.cursor])
            self.cursor += 1
            start = w * self.seq_len
            rows.append(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
            which.append(w)
        return np.stack(rows), np.asarray(which)

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows}

    def load_state_dict(self, s):
        if (s["seq_len"], s["n_windows"], s["seed"]) != (self.seq_len, self.n_windows, self.seed):
            raise DataError(f"the checkpoint's data position is for seq_len={s['seq_len']}, "
                            f"{s['n_windows']} windows, seed={s['seed']}; this run has seq_len={self.seq_len}, "
                            f"{self.n_windows} windows, seed={self.seed} (same --data, --seq-len and --seed needed)")
        self.epoch, self.cursor = s["epoch"], s["cursor"]
        self._order = self._permutation(self.epoch)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """The first windows of the validation stream, in order (the same every evaluation); a stream
    shorter than one window gives one shorter window; an empty one gives none."""
    if len(tokens) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    T = min(seq_len, len(tokens) - 1)
    n = min(max_windows, (len(tokens) - 1) // T)
    return np.stack([np.asarray(tokens[i * T:i * T + T + 1], dtype=np.int64) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# The trainer's view of a corpus
# ---------------------------------------------------------------------------------------------

def prepare_data(cfg, tc, log=print, tokenizer_path: str | None = None):
    """Documents → tokenizer (trained once per corpus, cached) → memory-mapped shards (cached)."""
    max_bytes = int(tc.max_corpus_mb * 2**20) if tc.max_corpus_mb else None
    docs = read_documents(tc.data, max_bytes, tc.text_field)
    train_docs, val_docs = split_documents(docs, tc.val_fraction)
    if not train_docs:
        raise DataError(f"all {len(docs)} documents went to validation; lower --val-fraction or add data")
    fp = corpus_fingerprint(docs)
    cache = tc.cache_dir or os.path.join(tc.out, "cache")
    tokenizer_path = tokenizer_path or tc.tokenizer
    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
    else:
        cached = os.path.join(cache, f"tokenizer-{fp}-{cfg.vocab_size}.json")
        if os.path.exists(cached):
            tok = load_tokenizer(cached)
        else:
            t0 = time.time()
            tok = train_tokenizer((t for _, t in train_docs), cfg.vocab_size, len(train_docs))
            os.makedirs(cache, exist_ok=True)
            with atomic_path(cached, ".json") as tmp:
                tok.save(tmp)
            log(f"trained a {tok.get_vocab_size()}-token byte-level BPE in {time.time() - t0:.1f}s")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise DataError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is "
                          f"{cfg.vocab_size}; pass --vocab-size {tok.get_vocab_size()} (or more)")
    sp = special_ids(tok)
    key = f"tokens-{fp}-{tokenizer_hash(tok)}-fim{tc.fim_rate}-val{tc.val_fraction}-seed{tc.seed}"
    corpus = prepare_corpus(train_docs, val_docs, tok, sp, cache, key, tc.fim_rate, tc.seed, log)
    val = corpus.index["splits"]["val"]
    if tc.val_fraction > 0 and val["tokens"] < MIN_VAL_TOKENS:
        log(f"warning: the validation split is {val['tokens']:,} tokens in {val['documents']} document(s) "
            f"(--val-fraction {tc.val_fraction} of {len(docs)} documents, split by name): validation loss will "
            f"be noisy. Raise --val-fraction or add documents")
    return tok, sp, corpus


MIN_VAL_TOKENS = 4096      # below this a validation loss is mostly noise: say so


class TextData:
    """Pre-training data: the tokenised corpus, windows drawn by the seeded `Sampler`, and fixed
    validation windows. The trainer's view of any data set: `next_batch`, `val_batches`, `val_bytes`,
    its position (`state_dict`), what must match on resume (`fingerprint`) and one line about it."""

    def __init__(self, cfg, tc, log=print, tokenizer_path: str | None = None):
        self.tok, self.sp, self.corpus = prepare_data(cfg, tc, log, tokenizer_path)
        self.sampler = Sampler(self.corpus.train.tokens, tc.seq_len, tc.seed)
        self.val = eval_windows(self.corpus.val.tokens, tc.seq_len, tc.eval_batches * tc.batch_size)
        # exact bytes behind the evaluated targets: bits per byte compares across tokenizers
        self.val_bytes = int(token_byte_lengths(self.tok)[self.val[:, 1:]].sum()) if len(self.val) else 0
        self.unigram_entropy = self.corpus.index["unigram_entropy_nats"]

    packed = False                       # batches carry ids only (no targets, samples, positions)

    def next_batch(self, n: int) -> Batch:
        ids, _ = self.sampler.next_batch(n)
        return Batch(torch.from_numpy(ids))

    def val_batches(self, n: int) -> list[Batch]:
        return [Batch(torch.from_numpy(self.val[i:i + n])) for i in range(0, len(self.val), n)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict):
        self.sampler.load_state_dict(state)

    def fingerprint(self) -> dict:
        return self.corpus.index            # its "splits" must match on resume; `fewchips.demo` reads the rest

    def describe(self) -> str:
        return (f"train {len(self.corpus.train.tokens):,} tokens, val {len(self.corpus.val.tokens):,}; "
                f"unigram entropy {self.unigram_entropy:.3f} nats")
