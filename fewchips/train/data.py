"""The trainer's view of pre-training text: sources prepared once into token shards (`prepare`), a
tokenizer trained on a bounded sample of them, windows drawn from each source by weight, and fixed
validation windows per source.

FIM (arXiv 2412.19437 §4.1): with probability `fim_rate` a training document is cut at two random
character positions into prefix/middle/suffix and stored in PSM order,
    BOS FIM_BEGIN prefix FIM_HOLE suffix FIM_END middle EOS
before packing; which documents, and where, follows from a hash of the document's name and the seed,
so any split of the work gives the same tokens. Validation documents are never transformed, so bits
per byte stay comparable.

Mixtures (`--data 0.7:web/ 0.3:code/`), as Megatron's blended datasets: window i comes from the source
furthest below its share of the first i windows, so every prefix of the run follows the weights to
within one window; each source walks its own windows in a fresh seeded permutation per epoch.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch

from ..losses import Batch, bits_per_byte  # noqa: F401 - the data's types, re-exported
from .prepare import (TOKENIZER_SAMPLE_MB, PrepareConfig, Solo, TokenStream, encode_batch, every_rank,  # noqa: F401
                      file_hash, is_prepared, load_index, open_prepared, prepare, sample_texts, tokenizer_cache_path,
                      trained_tokenizer)
from .sources import (TEXT_SUFFIXES, DataError, default_corpus_root, doc_hash, fim_split, is_val,  # noqa: F401
                      parse_sources, plan_units, psm, read_documents, read_unit)
from .tokenizer import SpecialIds, load_tokenizer, special_ids, token_byte_lengths, tokenizer_hash



def split_documents(docs, val_fraction: float = 0.03):
    """(train, val) by a hash of each document's name: the same document always lands on the same side."""
    return [d for d in docs if not is_val(d[0], val_fraction)], [d for d in docs if is_val(d[0], val_fraction)]


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
    """Yield (ids, is_fim) per document, BOS body EOS, with FIM (PSM) where the name's hash says so:
    exactly what preparation writes for a training document."""
    pc = PrepareConfig(fim_rate=fim_rate, seed=seed, val_fraction=0.0)
    for start in range(0, len(docs), batch):
        for _, ids, is_fim, _ in encode_batch(docs[start:start + batch], tok, sp, pc):
            yield ids, is_fim


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

class Sampler:
    """Non-overlapping windows of seq_len + 1 tokens over the packed stream, visited in a fresh
    seeded permutation each epoch. `state_dict()` is the exact position; resuming continues it."""

    def __init__(self, tokens, seq_len: int, seed: int = 0, stream: int = 0):
        if len(tokens) < seq_len + 1:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one sequence of "
                            f"--seq-len {seq_len} (+1 for the shifted target); add data or lower --seq-len")
        self.tokens, self.seq_len, self.seed, self.stream = tokens, seq_len, seed, stream
        self.n_windows = (len(tokens) - 1) // seq_len
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch):
        key = [self.seed, epoch] + ([self.stream] if self.stream else [])     # a mixture's sources: their own orders
        return np.random.default_rng(key).permutation(self.n_windows)

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

    def progress(self) -> dict:
        return {}

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows}

    def load_state_dict(self, s):
        if "mixture" in s:
            raise DataError(f"the checkpoint's data position is for a mixture of {s['names']}; this run has one "
                            f"source (same --data needed)")
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


class MixtureSampler:
    """Windows from several sources by weight (see the module's docstring): deterministic, and
    `state_dict()` is the exact position of every source and of the blend."""

    def __init__(self, streams, weights, seq_len: int, seed: int = 0, names=None):
        total = float(sum(weights))
        self.weights = np.asarray(weights, dtype=np.float64) / total
        self.names = list(names or range(len(streams)))
        self.samplers = []
        for i, (name, stream) in enumerate(zip(self.names, streams)):
            try:
                self.samplers.append(Sampler(stream, seq_len, seed, stream=i))
            except DataError as e:
                raise DataError(f"source {name}: {e}") from None
        self.drawn = np.zeros(len(streams), dtype=np.int64)

    def next_batch(self, batch_size: int):
        """ids [B, seq_len + 1] and the source of each row [B]."""
        rows, which = [], []
        for _ in range(batch_size):
            s = int(np.argmax(self.weights * (self.drawn.sum() + 1) - self.drawn))   # furthest below its share
            self.drawn[s] += 1
            rows.append(self.samplers[s].next_batch(1)[0][0])
            which.append(s)
        return np.stack(rows), np.asarray(which)

    def progress(self) -> dict:
        """Tokens drawn and the epoch reached, per source (for the metrics)."""
        out = {}
        for name, smp, n in zip(self.names, self.samplers, self.drawn):
            out[f"tokens_{name}"] = int(n) * smp.seq_len
            out[f"epoch_{name}"] = round(smp.epoch + smp.cursor / smp.n_windows, 4)
        return out

    def state_dict(self):
        return {"mixture": [s.state_dict() for s in self.samplers], "drawn": self.drawn.tolist(),
                "names": self.names, "weights": self.weights.tolist()}

    def load_state_dict(self, s):
        if "mixture" not in s or s["names"] != self.names or not np.allclose(s["weights"], self.weights):
            was = list(zip(s.get("names", ["(one source)"]), s.get("weights", [1.0])))
            raise DataError(f"the checkpoint's data position is for the sources {was}; this run has "
                            f"{list(zip(self.names, self.weights.round(4).tolist()))} (same --data needed)")
        for smp, st in zip(self.samplers, s["mixture"]):
            smp.load_state_dict(st)
        self.drawn = np.asarray(s["drawn"], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# The trainer's view of a corpus
# ---------------------------------------------------------------------------------------------

MIN_VAL_TOKENS = 4096      # below this a validation loss is mostly noise: say so


def prepare_config(tc) -> PrepareConfig:
    return PrepareConfig(fim_rate=tc.fim_rate, seed=tc.seed, val_fraction=tc.val_fraction, text_field=tc.text_field,
                         skip_bad_rows=tc.skip_bad_rows or tc.data is None,     # our own corpus: best effort
                         max_bytes=int(tc.max_corpus_mb * 2**20) if tc.max_corpus_mb else None)


def prepare_data(cfg, tc, log=print, tokenizer_path: str | None = None, team=None):
    """--data items → (tokenizer, special ids, [PreparedSource]): prepared folders used as they are, the
    other sources tokenised once into OUT/cache (or --cache-dir) by every rank and worker together."""
    team = team or Solo()
    given = tokenizer_path or tc.tokenizer
    got = every_rank(team, lambda: _read_items(tc, given))       # a path missing on one node stops every rank
    items, ready, folders = got
    raw = [s for s in items if s not in ready]
    cache = tc.cache_dir or os.path.join(tc.out, "cache")
    pc = prepare_config(tc)
    if raw:
        if tc.tokenizer_sample_mb is not None and (tc.tokenizer or tc.init or folders):
            raise DataError("--tokenizer-sample-mb trains a tokenizer, but this run has one (--tokenizer, --init's or "
                            "a prepared folder's): drop the flag")
        plan = every_rank(team, lambda: plan_units(raw, pc.unit_bytes, pc.max_bytes))
        tok_file = given and (os.path.join(given, "tokenizer.json") if os.path.isdir(given) else given)
        tok_file = tok_file or (os.path.join(folders[0][0].path, "tokenizer.json") if folders else None)
        if tok_file is None:
            mb = tc.tokenizer_sample_mb or TOKENIZER_SAMPLE_MB
            tok_file = trained_tokenizer(raw, plan, pc, cfg.vocab_size, mb,
                                         tokenizer_cache_path(cache, plan, pc, cfg.vocab_size, mb), team, log)
        tok = load_tokenizer(tok_file)
        _check_vocab(tok, cfg)
        key = f"tokens-{plan.key()}-{tokenizer_hash(tok)}-{pc.key()}"
        folder = prepare(raw, tok_file, os.path.join(cache, key), pc, team, tc.data_workers, log, tc.progress)
        folders.append((None, load_index(folder)))
        paths = [s.path for s in ready] + [folder]
    else:
        for flag, value in (("--data-workers", tc.data_workers), ("--tokenizer-sample-mb", tc.tokenizer_sample_mb),
                            ("--cache-dir", tc.cache_dir)):
            if value is not None:
                raise DataError(f"{flag} is for preparing raw sources; every --data here is a prepared folder: drop it")
        tok = load_tokenizer(given or os.path.join(ready[0].path, "tokenizer.json"))
        _check_vocab(tok, cfg)
        paths = [s.path for s in ready]
    sp = special_ids(tok)
    sources = []
    for item, path in zip(ready + [None], paths):    # a folder's sources share its --data item's weight
        inner = open_prepared(path)
        scale = (item.weight if item else 1.0) / sum(s.weight for s in inner)
        for s in inner:
            s.weight *= scale if item else 1.0
            if item and len(items) > 1:          # several --data items: each names its sources
                s.name = f"{item.name}.{s.name}" if len(inner) > 1 else item.name
        sources.extend(inner)
    for s in sources:
        if not s.index["splits"]["train"]["documents"]:
            rd = s.index.get("read", {})
            raise DataError(f"no text found in the source {s.name} for training: "
                            f"{rd.get('empty', 0)} empty document(s), {rd.get('skipped', 0)} bad row(s) skipped, "
                            f"{s.index['splits']['val']['documents']} held out")
    if len({s.name for s in sources}) < len(sources):
        raise DataError(f"two --data sources share a name ({[s.name for s in sources]}); rename a folder")
    _warn_small_val(sources, tc, log)
    return tok, sp, sources


def _read_items(tc, given):
    """(the --data items, those that are prepared folders, [(item, its index)]), each folder checked."""
    items = parse_sources(tc.data)
    for s in items:
        if s.path and os.path.exists(os.path.join(s.path, "prepare.json")) and not is_prepared(s.path):
            raise DataError(f"--data {s.path} is an unfinished `fewchips data prepare`: run it again with the same "
                            f"flags to finish it")
    ready = [s for s in items if s.path is not None and is_prepared(s.path)]
    folders = [(s, load_index(s.path)) for s in ready]
    for s, index in folders:
        _check_prepared(s.path, index, tc, given)
    hashes = {index["tokenizer_hash"] for _, index in folders}
    if len(hashes) > 1:
        raise DataError(f"the prepared folders {[s.path for s in ready]} were tokenised with different tokenizers; "
                        f"prepare them with one")
    return items, ready, folders


def _check_vocab(tok, cfg):
    if tok.get_vocab_size() > cfg.vocab_size:
        raise DataError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is "
                        f"{cfg.vocab_size}; pass --vocab-size {tok.get_vocab_size()} (or more)")


def _check_prepared(path: str, index: dict, tc, given: str | None):
    """A prepared folder fixes the tokens: flags that would change them are refused by name."""
    was = index["settings"]
    for flag, now, then in (("--fim-rate", tc.fim_rate, was["fim_rate"]),
                            ("--val-fraction", tc.val_fraction, was["val_fraction"]),
                            ("--text-field", tc.text_field, was["text_field"]),
                            ("--skip-bad-rows", tc.skip_bad_rows, was["skip_bad_rows"]),
                            ("--max-corpus-mb", int(tc.max_corpus_mb * 2**20) if tc.max_corpus_mb else None,
                             was["max_bytes"])):
        if now != then:
            raise DataError(f"--data {path} was prepared with {flag} {_flag_value(flag, then)}; this run asks for "
                            f"{_flag_value(flag, now)}: pass {flag} {_flag_value(flag, then)}, "
                            "or prepare the data again")
    if given:
        file = os.path.join(given, "tokenizer.json") if os.path.isdir(given) else given
        if file_hash(file) != index["tokenizer_hash"]:
            raise DataError(f"--data {path} was tokenised with its own tokenizer.json, not {file} (--tokenizer, --init "
                            f"or the checkpoint's): prepare the data with that tokenizer")


def _flag_value(flag, v):
    return f"{v / 2**20:g}" if flag == "--max-corpus-mb" and v else v


def _warn_small_val(sources, tc, log):
    for s in sources:
        val = s.index["splits"]["val"]
        if tc.val_fraction > 0 and val["tokens"] < MIN_VAL_TOKENS:
            log(f"warning: the validation split is {val['tokens']:,} tokens in {val['documents']} document(s) of "
                f"{s.name} (--val-fraction {tc.val_fraction}, split by name): validation loss will be noisy. "
                f"Raise --val-fraction or add documents")


class ValSet:
    """One source's validation windows, as the layouts evaluate them (`val_batches`, `val_bytes`)."""

    def __init__(self, name: str, windows: np.ndarray, nbytes: int):
        self.name, self.val, self.val_bytes = name, windows, nbytes

    def val_batches(self, n: int) -> list[Batch]:
        return [Batch(torch.from_numpy(self.val[i:i + n])) for i in range(0, len(self.val), n)]


class TextData:
    """Pre-training data: the prepared sources, windows drawn by the seeded `Sampler` (one source) or
    `MixtureSampler`, and fixed validation windows per source. The trainer's view of any data set:
    `next_batch`, `val_batches`, `val_bytes` (and `val_sets`, one per source), its position
    (`state_dict`), what must match on resume (`fingerprint`), `progress()` and one line about it."""

    def __init__(self, cfg, tc, log=print, tokenizer_path: str | None = None, team=None):
        self.tok, self.sp, self.sources = prepare_data(cfg, tc, log, tokenizer_path, team)
        names = [s.name for s in self.sources]
        if len(self.sources) == 1:
            self.sampler = Sampler(self.sources[0].train, tc.seq_len, tc.seed)
        else:
            self.sampler = MixtureSampler([s.train for s in self.sources], [s.weight for s in self.sources],
                                          tc.seq_len, tc.seed, names)
        per = tc.eval_batches if len(self.sources) == 1 else max(1, math.ceil(tc.eval_batches / len(self.sources)))
        lengths = token_byte_lengths(self.tok)     # exact bytes behind the targets: bits per byte across tokenizers
        self.val_sets = []
        for s in self.sources:
            w = eval_windows(s.val, tc.seq_len, per * tc.batch_size)
            self.val_sets.append(ValSet(s.name, w, int(lengths[w[:, 1:]].sum()) if len(w) else 0))
        first = self.val_sets[0]
        self.val, self.val_bytes = first.val, first.val_bytes     # one source: what every layout evaluates
        self.unigram_entropy = self._entropy()
        self.train_tokens = sum(len(s.train) for s in self.sources)
        self.val_tokens = sum(len(s.val) for s in self.sources)

    packed = False                       # batches carry ids only (no targets, samples, positions)

    def _entropy(self):
        folders = {s.train.folder for s in self.sources}       # one preparation: its entropy; several: none
        return load_index(folders.pop()).get("unigram_entropy_nats") if len(folders) == 1 else None

    def next_batch(self, n: int) -> Batch:
        ids, _ = self.sampler.next_batch(n)
        return Batch(torch.from_numpy(ids))

    def val_batches(self, n: int) -> list[Batch]:
        return self.val_sets[0].val_batches(n)

    def progress(self) -> dict:
        return self.sampler.progress()

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict):
        self.sampler.load_state_dict(state)

    def fingerprint(self) -> dict:
        """Its "splits" (token counts) must match on resume; `fewchips.demo` reads the entropy."""
        splits = {sp: {k: sum(s.index["splits"][sp][k] for s in self.sources)
                       for k in ("tokens", "documents", "fim_documents", "bytes")} for sp in ("train", "val")}
        h = hashlib.sha1(repr(sorted((s.name, s.weight, s.index.get("read", {}).get("bytes"))
                                     for s in self.sources)).encode())
        return {"splits": splits, "sources": {s.name: round(s.weight, 6) for s in self.sources},
                "fingerprint": h.hexdigest()[:16], "unigram_entropy_nats": self.unigram_entropy}

    def describe(self) -> str:
        mix = "" if len(self.sources) == 1 else " from " + ", ".join(
            f"{s.name} {s.weight / sum(x.weight for x in self.sources):.0%}" for s in self.sources)
        ent = f"; unigram entropy {self.unigram_entropy:.3f} nats" if self.unigram_entropy is not None else ""
        return f"train {self.train_tokens:,} tokens{mix}, val {self.val_tokens:,}{ent}"
