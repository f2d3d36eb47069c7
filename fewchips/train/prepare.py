"""Tokenise a corpus once into token shards: the plan's units split over ranks and worker processes,
each unit written as it fills, resumable, then one index. No torch here: workers import this alone.

A prepared folder:
    index.json         written last (its presence means "complete"): dtype, vocab, the settings, and per
                       source its weight, counts, skipped rows and the segments of its train/val streams
    tokenizer.json     the tokenizer the shards were made with
    prepare.json       what is being prepared (plan key, settings): a resumed preparation must match it
    parts/uNNNNNN-KKK.{train,val}.bin          tokens, BOS body EOS per document, back to back
    parts/uNNNNNN-KKK.{train,val}.starts.npy   document starts in that file
    parts/uNNNNNN-KKK.json                     a finished shard: documents read through its end, counts
    parts/uNNNNNN.json                         a finished unit: its shards, read statistics, digest

Every file is written under a temporary name and renamed; a shard's .json comes after its tokens, a
unit's after its shards, the index after every unit. A killed preparation resumes: finished units are
kept, an unfinished unit continues after its last finished shard (its documents read again, not
tokenised), and nothing finished is written twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from ..files import atomic_path, atomic_write_text
from .sources import (UNIT_BYTES, DataError, Plan, ReadStats, Source, Unit, fim_choice, fim_split, is_val, plan_units,
                      psm, read_unit)
from .tokenizer import load_tokenizer, special_ids, tokenizer_hash, train_tokenizer

FORMAT, VERSION = "fewchips-tokens", 2
SHARD_TOKENS = 1 << 26                 # 64M tokens (128 MiB as uint16): a bound on any file we write
SPLITS = ("train", "val")
TOKENIZER_SAMPLE_MB = 100.0            # the BPE's training sample when --tokenizer-sample-mb is not given


@dataclass(frozen=True)
class PrepareConfig:
    """What decides the tokens (besides the files and the tokenizer)."""
    fim_rate: float = 0.1
    seed: int = 0
    val_fraction: float = 0.03
    text_field: str = "text"
    skip_bad_rows: bool = False
    max_bytes: int | None = None       # per source
    unit_bytes: int = UNIT_BYTES
    shard_tokens: int = SHARD_TOKENS

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


class Solo:
    """One process preparing alone (the ranks' team when there is no torch.distributed)."""
    rank, size, local_size = 0, 1, 1

    def barrier(self):
        pass

    def all_gather(self, obj) -> list:
        return [obj]


def file_hash(path: str) -> str:
    """The tokenizer's own hash (its JSON as `tokenizers` writes it), whatever the file's formatting."""
    return tokenizer_hash(load_tokenizer(path))


# ---------------------------------------------------------------------------------------------
# One unit: documents -> BOS body EOS -> shards of at most shard_tokens
# ---------------------------------------------------------------------------------------------

_TOKENIZERS: dict = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        tok = load_tokenizer(path)
        _TOKENIZERS[path] = (tok, special_ids(tok, path))
    return _TOKENIZERS[path]


def _part(out: str, name: str) -> str:
    return os.path.join(out, "parts", name)


class ShardWriter:
    """The train and val files of one shard, filled document by document, renamed into place at close."""

    def __init__(self, out: str, unit: int, k: int, dtype):
        self.out, self.name, self.dtype = out, f"u{unit:06d}-{k:03d}", dtype
        # writers never share one
        self.tmp = {s: _part(out, f".{self.name}.{s}.bin.{os.getpid()}.tmp") for s in SPLITS}
        self.files = {s: open(self.tmp[s], "wb") for s in SPLITS}
        self.starts = {s: [] for s in SPLITS}
        self.counts = {s: {"tokens": 0, "documents": 0, "fim_documents": 0, "bytes": 0} for s in SPLITS}

    @property
    def tokens(self) -> int:
        return sum(c["tokens"] for c in self.counts.values())

    def add(self, split: str, ids: np.ndarray, is_fim: bool, nbytes: int):
        c = self.counts[split]
        self.starts[split].append(c["tokens"])
        self.files[split].write(ids.astype(self.dtype).tobytes())
        c["tokens"] += len(ids)
        c["documents"] += 1
        c["fim_documents"] += is_fim
        c["bytes"] += nbytes

    def close(self, docs_through: int) -> dict:
        for s in SPLITS:
            self.files[s].close()
            with atomic_path(_part(self.out, f"{self.name}.{s}.starts.npy"), ".npy") as tmp:
                np.save(tmp, np.asarray(self.starts[s], dtype=np.int64))
            os.replace(self.tmp[s], _part(self.out, f"{self.name}.{s}.bin"))   # same bytes from any writer
        meta = {"name": self.name, "docs_through": docs_through, **self.counts}
        atomic_write_text(_part(self.out, f"{self.name}.json"), json.dumps(meta))
        return meta


def encode_batch(docs, tok, sp, pc: PrepareConfig):
    """[(split, ids, is_fim, utf-8 bytes)] for [(name, text)]: validation documents plain, training
    ones cut for FIM (PSM) where the name's hash says so."""
    pieces, plan = [], []
    for name, text in docs:
        split = "val" if is_val(name, pc.val_fraction) else "train"
        rng = fim_choice(name, pc.seed, pc.fim_rate) if split == "train" and pc.fim_rate > 0 else None
        plan.append((split, len(pieces), rng is not None, len(text.encode())))
        pieces.extend(fim_split(text, rng) if rng is not None else (text,))
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)     # no offsets: ~1.4x faster, same ids
    enc = [e.ids for e in encode(pieces, add_special_tokens=False)]
    out = []
    for split, i, is_fim, nbytes in plan:
        body = psm(enc[i], enc[i + 1], enc[i + 2], sp) if is_fim else enc[i]
        out.append((split, np.asarray([sp.bos, *body, sp.eos], dtype=np.int64), is_fim, nbytes))
    return out


def tokenise_unit(unit: Unit, out: str, tokenizer_file: str, pc: PrepareConfig) -> dict:
    """Write the unit's shards (continuing after any finished ones) and its summary; returns it."""
    done = _part(out, f"u{unit.index:06d}.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    tok, sp = _tokenizer(tokenizer_file)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    shards = []
    while os.path.exists(p := _part(out, f"u{unit.index:06d}-{len(shards):03d}.json")):
        with open(p) as f:
            shards.append(json.load(f))
    skip = shards[-1]["docs_through"] if shards else 0
    stats, digest = ReadStats(), hashlib.sha1()
    writer, batch, batch_bytes, read = None, [], 0, 0

    def flush():
        nonlocal writer
        for split, ids, is_fim, nbytes in encode_batch(batch, tok, sp, pc):
            writer = writer or ShardWriter(out, unit.index, len(shards), dtype)
            writer.add(split, ids, is_fim, nbytes)
        batch.clear()

    for name, text in read_unit(unit, pc.text_field, pc.skip_bad_rows, stats):
        digest.update(name.encode() + b"\0" + hashlib.sha1(text.encode()).digest())
        read += 1
        if read <= skip:
            continue                                  # in a shard a killed run already finished
        batch.append((name, text))
        batch_bytes += len(text)
        if len(batch) >= 1024 or batch_bytes >= min(4 * 2**20, pc.shard_tokens):   # a token is >= 1 byte
            flush()
            batch_bytes = 0
            if writer is not None and writer.tokens >= pc.shard_tokens:
                shards.append(writer.close(read))
                writer = None
    flush()
    if writer is not None:
        shards.append(writer.close(read))
    summary = {"unit": unit.index, "source": unit.source, "shards": shards, "stats": asdict(stats),
               "digest": digest.hexdigest()[:16], "pieces": sorted({p.rel for p in unit.pieces})}
    atomic_write_text(done, json.dumps(summary))
    return summary


def _work(job):                                   # a worker process's entry: one unit
    return tokenise_unit(*job)


def _init_worker(threads: int):
    os.environ["RAYON_NUM_THREADS"] = str(threads)   # read when the tokenizer first runs in parallel


def _pool(workers: int):
    """Worker processes forked where the OS can (as torch's DataLoader: instant, and a script without a
    __main__ guard works), spawned elsewhere. A forked tokenizer cannot reuse the parent's thread pool:
    each worker encodes on one thread, which is what `workers` = the cores wants anyway. A worker the
    OS kills (out of memory) raises BrokenProcessPool here rather than leaving its task waiting forever."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    threads = max(1, (os.cpu_count() or 1) // workers)
    if "fork" not in mp.get_all_start_methods():
        return ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, (threads,))
    was = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"          # the children inherit it (and print no fork warning)
    try:
        pool = ProcessPoolExecutor(workers, mp.get_context("fork"))
        pool.submit(int).result()                           # fork them now, while the variable is set
        return pool
    finally:
        if was is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = was


# ---------------------------------------------------------------------------------------------
# The whole corpus: ranks x workers, then the index
# ---------------------------------------------------------------------------------------------

def assign(units: list[Unit], size: int) -> list[list[Unit]]:
    """Units to ranks, largest first to the least loaded (balanced bytes; deterministic)."""
    load, mine = [0] * size, [[] for _ in range(size)]
    for u in sorted(units, key=lambda u: (-u.nbytes, u.index)):
        r = min(range(size), key=lambda i: (load[i], i))
        load[r] += u.nbytes
        mine[r].append(u)
    return [sorted(m, key=lambda u: u.index) for m in mine]


def default_workers(team) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, team.local_size))


def prepare(sources: list[Source], tokenizer_file: str, out: str, pc: PrepareConfig = PrepareConfig(),
            team=None, workers: int | None = None, log=print, progress: bool = True) -> str:
    """Tokenise `sources` into the folder `out` (kept if complete; resumed if not). Every rank of `team`
    calls it with the same arguments; each takes its share of the units; rank 0 writes the index."""
    team = team or Solo()
    plan, tok_hash = every_rank(team, lambda: (plan_units(sources, pc.unit_bytes, pc.max_bytes),
                                               file_hash(tokenizer_file)))
    if len(set(team.all_gather(plan.key()))) > 1:
        raise DataError("the ranks see different files under --data (is the data folder the same on every "
                        "node?); prepare it once with `fewchips data prepare` into a folder every node reads")
    header = {"format": FORMAT, "version": VERSION, "plan": plan.key(), "tokenizer_hash": tok_hash,
              "settings": asdict(pc),
              "sources": [{"name": s.name, "path": s.path, "weight": s.weight} for s in sources]}
    if os.path.exists(os.path.join(out, "index.json")):
        check_same(out, header)
        return out
    every_rank(team, lambda: _start(out, header, tokenizer_file), main_only=True)
    mine = assign(plan.units, team.size)[team.rank]
    pending = [u for u in mine if not os.path.exists(_part(out, f"u{u.index:06d}.json"))]
    workers = min(workers or default_workers(team), max(len(pending), 1))
    if workers > 1 and math.ceil(len(pending) / workers) * workers > 1.1 * len(pending):
        workers = 1                    # a pool would idle a core on the last units: one process, every thread
    if workers == 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(default_workers(team)))   # the rank's share of the cores
    t0, total = time.time(), sum(u.nbytes for u in pending)
    if len(pending) < len(mine):
        log(f"resuming the preparation in {out}: {len(mine) - len(pending)} of this rank's {len(mine)} units done")
    every_rank(team, lambda: _run(pending, out, os.path.join(out, "tokenizer.json"), pc, workers,
                                  progress and team.rank == 0))
    index = every_rank(team, lambda: finalize(out, plan, header), main_only=True)
    if team.rank == 0:
        dt = time.time() - t0
        how = f"{workers} worker processes" if workers > 1 else f"1 process ({os.environ['RAYON_NUM_THREADS']} threads)"
        log(f"prepared {out} with {team.size} rank(s) x {how}: {total / 2**20:,.1f} MB of this rank's "
            f"input in {dt:.1f}s ({total / 2**20 / max(dt, 1e-9):.1f} MB/s)")
        for line in summary_lines(index, plan):
            log(line)
    team.barrier()
    return out


def check_same(out: str, header: dict):
    """A finished folder serves only the request it was made for: anything else is refused by name."""
    with open(os.path.join(out, "prepare.json")) as f:
        was = json.load(f)
    if was == header:
        return
    what = [f"--{k.replace('_', '-').replace('max-bytes', 'max-corpus-mb').replace('unit-bytes', 'unit-mb')} "
            f"{was['settings'].get(k)} (now {v})" for k, v in header["settings"].items() if was["settings"].get(k) != v]
    what += ["the files (names, sizes or times)"] if was["plan"] != header["plan"] else []
    what += ["the tokenizer"] if was["tokenizer_hash"] != header["tokenizer_hash"] else []
    what += ["the sources or weights"] if was["sources"] != header["sources"] else []
    raise DataError(f"{out} was prepared from other data or settings: {'; '.join(what)}. Choose another --out, or "
                    f"delete it to prepare again")


def every_rank(team, fn, main_only: bool = False):
    """fn() on every rank (or rank 0 alone), then its result; an error on any rank is raised on all of
    them (the failing rank's own exception there, a DataError naming it elsewhere), so none is left
    waiting in a collective."""
    value, err = None, None
    if team.rank == 0 or not main_only:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - a full disk or unreadable file on one rank stops all of them
            err = e
    errors = [m for m in team.all_gather(None if err is None else (str(err) if isinstance(err, DataError)
                                                                    else f"{type(err).__name__}: {err}")) if m]
    if err is not None:
        raise err
    if errors:
        raise DataError(f"another rank: {errors[0]}")
    return value


def _start(out: str, header: dict, tokenizer_file: str):
    """Rank 0: the folder made (or an unfinished one checked to be this very preparation)."""
    os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    marker = os.path.join(out, "prepare.json")
    if os.path.exists(marker):
        with open(marker) as f:
            was = json.load(f)
        if was != header:
            raise DataError(f"{out} holds an unfinished preparation of other data or settings (plan {was.get('plan')}, "
                            f"now {header['plan']}); delete the folder or choose another --out")
    elif os.listdir(os.path.join(out, "parts")) or {f for f in os.listdir(out) if not f.startswith(".")} - {"parts"}:
        raise DataError(f"{out} is not empty and holds no preparation; choose an empty or new folder")
    if os.path.abspath(tokenizer_file) != os.path.abspath(os.path.join(out, "tokenizer.json")):
        with atomic_path(os.path.join(out, "tokenizer.json"), ".json") as tmp:
            shutil.copyfile(tokenizer_file, tmp)
    atomic_write_text(marker, json.dumps(header, indent=2))


def _run(units, out, tokenizer_file, pc, workers: int, progress: bool):
    """Tokenise the units here (one worker) or in a pool of worker processes; a unit's error is raised."""
    bar = None
    if progress and units:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(u.nbytes for u in units), unit="B", unit_scale=True, desc="tokenising", dynamic_ncols=True)
    sizes = {u.index: u.nbytes for u in units}
    jobs, pool = [(u, out, tokenizer_file, pc) for u in units], None
    try:
        if workers <= 1:
            results = map(_work, jobs)
        else:
            pool = _pool(workers)
            results = pool.map(_work, jobs)
        for summary in results:
            if bar is not None:
                bar.update(sizes[summary["unit"]])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()


def finalize(out: str, plan: Plan, header: dict) -> dict:
    """index.json from the units' summaries, in the plan's order."""
    settings = header["settings"]
    tok, _ = _tokenizer(os.path.join(out, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    index = {**{k: header[k] for k in ("format", "version", "plan", "tokenizer_hash", "settings")},
             "dtype": np.dtype(np.uint16 if vocab <= 2**16 else np.uint32).name, "vocab_size": vocab,
             "fim_rate": settings["fim_rate"], "seed": settings["seed"], "sources": []}
    digest = hashlib.sha1()
    for s_idx, src in enumerate(header["sources"]):
        segs = {s: [] for s in SPLITS}
        counts = {s: {"tokens": 0, "documents": 0, "fim_documents": 0, "bytes": 0} for s in SPLITS}
        stats = ReadStats()
        for u in plan.units:
            if u.source != s_idx:
                continue
            with open(_part(out, f"u{u.index:06d}.json")) as f:
                summary = json.load(f)
            digest.update(summary["digest"].encode())
            stats.add(ReadStats(**summary["stats"]))
            for shard in summary["shards"]:
                for s in SPLITS:
                    if shard[s]["tokens"]:
                        segs[s].append([f"{shard['name']}.{s}", 0, shard[s]["tokens"], shard[s]["documents"]])
                    for k in counts[s]:
                        counts[s][k] += shard[s][k]
        if settings["val_fraction"] > 0 and not counts["val"]["documents"] and counts["train"]["documents"] >= 2:
            _move_last_document(out, segs, counts)     # with two or more documents, validation gets one
        index["sources"].append({**src, "splits": {s: {**counts[s], "segments": segs[s]} for s in SPLITS},
                                 "read": asdict(stats), "left_out": plan.left_out.get(src["name"], {})})
    index["splits"] = {s: {k: sum(src["splits"][s][k] for src in index["sources"]) for k in counts[s]} for s in SPLITS}
    _remove_stale_temps(out)
    index["fingerprint"] = digest.hexdigest()[:16]
    index["unigram_entropy_nats"] = _unigram_entropy(out, index)
    atomic_write_text(os.path.join(out, "index.json"), json.dumps(index, indent=1))
    return index


def _remove_stale_temps(out: str, age_s: float = 600.0):
    """Partial shards a killed writer left: its process gone (on this host) and the file untouched for a while."""
    parts = os.path.join(out, "parts")
    for f in os.listdir(parts):
        if not (f.startswith(".u") and f.endswith(".tmp")):
            continue
        path, pid = os.path.join(parts, f), int(f.split(".")[-2])
        try:
            os.kill(pid, 0)
            continue                                  # still running: not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if time.time() - os.path.getmtime(path) > age_s:
            os.remove(path)


def _move_last_document(out, segs, counts):
    name, start, stop, docs = segs["train"][-1]
    first = int(np.load(_part(out, f"{name}.starts.npy"))[docs - 1])
    segs["val"].append([name, first, stop, 1])
    if first > start:
        segs["train"][-1] = [name, start, first, docs - 1]
    else:
        segs["train"].pop()
    moved = stop - first
    for k, v in (("tokens", moved), ("documents", 1)):
        counts["train"][k] -= v
        counts["val"][k] += v


def _unigram_entropy(out: str, index: dict, sample: int = 1 << 24) -> float:
    """Of the first `sample` training tokens of each source (a reference line on the loss plot)."""
    counts = np.zeros(index["vocab_size"], dtype=np.int64)
    for src in index["sources"]:
        stream = TokenStream(out, src["splits"]["train"]["segments"], index["dtype"])
        for a in range(0, min(sample, len(stream)), 1 << 20):        # in slices: no corpus-sized copy
            counts += np.bincount(stream[a:min(a + (1 << 20), sample, len(stream))],
                                  minlength=len(counts))[:len(counts)]
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum())


def summary_lines(index: dict, plan: Plan | None = None) -> list[str]:
    """Documents, bytes, tokens and skips per source: what a preparation made of each."""
    lines = []
    for src in index["sources"]:
        tr, va, rd = src["splits"]["train"], src["splits"]["val"], src["read"]
        line = (f"  {src['name']}: {tr['documents'] + va['documents']:,} documents, {rd['bytes'] / 2**20:,.1f} MB, "
                f"{tr['tokens'] + va['tokens']:,} tokens (train {tr['tokens']:,}, val {va['tokens']:,}; "
                f"{tr['fim_documents']:,} FIM)")
        if rd["skipped"]:
            line += f"; {rd['skipped']:,} bad rows skipped (first: {rd['examples'][0]})"
        if rd["empty"]:
            line += f"; {rd['empty']:,} empty documents left out"
        if src.get("left_out"):
            line += "; files left out by suffix: " + ", ".join(f"{n} {e or '(none)'}"
                                                              for e, n in src["left_out"].items())
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# The tokenizer, trained on a bounded sample of the sources
# ---------------------------------------------------------------------------------------------

def sample_texts(sources, plan, pc: PrepareConfig, sample_bytes: int):
    """The tokenizer's training sample: each source's first training documents in the plan's order,
    up to its weight's share of `sample_bytes` (deterministic; validation documents never)."""
    total = sum(s.weight for s in sources)
    for i, src in enumerate(sources):
        budget, used = sample_bytes * src.weight / total, 0
        for unit in (u for u in plan.units if u.source == i):
            for name, text in read_unit(unit, pc.text_field, pc.skip_bad_rows):
                if used >= budget:
                    break
                if not is_val(name, pc.val_fraction):
                    used += len(text.encode())
                    yield text
            if used >= budget:
                break


def tokenizer_cache_path(cache: str, plan, pc: PrepareConfig, vocab_size: int, sample_mb: float) -> str:
    return os.path.join(cache, f"tokenizer-{plan.key()}-{pc.key()}-{vocab_size}-{sample_mb:g}mb.json")


def trained_tokenizer(sources, plan, pc: PrepareConfig, vocab_size: int, sample_mb: float, path: str, team, log):
    """A byte-level BPE trained by rank 0 on `sample_texts` into `path` (kept if it exists); the path."""
    if not os.path.exists(path):
        every_rank(team, lambda: _train_tokenizer(sources, plan, pc, vocab_size, sample_mb, path, log), main_only=True)
    return path


def _train_tokenizer(sources, plan, pc: PrepareConfig, vocab_size: int, sample_mb: float, path: str, log):
    t0, seen = time.time(), []

    def texts():
        for t in sample_texts(sources, plan, pc, int(sample_mb * 2**20)):
            seen.append(len(t.encode()))
            yield t
    tok = train_tokenizer(texts(), vocab_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path, ".json") as tmp:
        tok.save(tmp)
    log(f"trained a {tok.get_vocab_size()}-token byte-level BPE in {time.time() - t0:.1f}s on a sample of "
        f"{len(seen):,} training documents, {sum(seen) / 2**20:.1f} MB (--tokenizer-sample-mb {sample_mb:g}: each "
        f"source's first documents by weight)")


# ---------------------------------------------------------------------------------------------
# Reading a prepared folder
# ---------------------------------------------------------------------------------------------

class TokenStream:
    """The concatenation of token segments [(file, start, stop, documents)], read by slices (memory-
    mapped, opened on first use): any length, never loaded whole."""

    def __init__(self, folder: str, segments: list, dtype: str):
        self.folder, self.segments, self.dtype = folder, segments, np.dtype(dtype)
        self.offsets = np.cumsum([0] + [stop - start for _, start, stop, _ in segments])
        self._maps: OrderedDict = OrderedDict()      # the most recently read files stay mapped

    def __len__(self) -> int:
        return int(self.offsets[-1])

    MAX_OPEN = 1024                                  # well under Linux's 65,530 mappings per process

    def _map(self, i: int):
        if i in self._maps:
            self._maps.move_to_end(i)
        else:
            name = self.segments[i][0]
            n = os.path.getsize(_part(self.folder, f"{name}.bin")) // self.dtype.itemsize
            self._maps[i] = np.memmap(_part(self.folder, f"{name}.bin"), dtype=self.dtype, mode="r", shape=(n,))
            if len(self._maps) > self.MAX_OPEN:
                self._maps.popitem(last=False)
        return self._maps[i]

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(len(self))
        out, i = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop and i < len(self.segments):
            seg_start = self.segments[i][1]
            a, b = start - self.offsets[i], min(stop, self.offsets[i + 1]) - self.offsets[i]
            out.append(self._map(i)[seg_start + a:seg_start + b])
            start = int(self.offsets[i + 1])
            i += 1
        if not out:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])

    def doc_starts(self) -> np.ndarray:
        """Where each document starts in the stream (reads every segment's starts: for tests, small data)."""
        parts = []
        for (name, start, stop, _), off in zip(self.segments, self.offsets):
            s = np.load(_part(self.folder, f"{name}.starts.npy"))
            parts.append(s[(s >= start) & (s < stop)] - start + off)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class PreparedSource:
    name: str
    weight: float
    train: TokenStream
    val: TokenStream
    index: dict                        # this source's entry in index.json


def is_prepared(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "index.json")) and \
        os.path.exists(os.path.join(path, "prepare.json"))


def load_index(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}/index.json cannot be read ({e}); prepare the folder again") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{folder}: not a fewchips token folder of version {VERSION}; prepare it again")
    return index


def open_prepared(folder: str) -> list[PreparedSource]:
    index = load_index(folder)
    return [PreparedSource(s["name"], s["weight"],
                           TokenStream(folder, s["splits"]["train"]["segments"], index["dtype"]),
                           TokenStream(folder, s["splits"]["val"]["segments"], index["dtype"]), s)
            for s in index["sources"]]
