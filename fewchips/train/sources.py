"""Where pre-training text comes from: sources with weights, planned into units of bounded size, each
unit streamed document by document. No torch here: preparation workers import this module alone.

A source is a file or a folder (`--data [WEIGHT:]PATH`): text files (one document each), `.jsonl`,
`.jsonl.gz`, `.jsonl.zst` (a text field per line), `.parquet` (a text column, read row group by row
group), or a `datasets` folder written by `save_to_disk` (memory-mapped Arrow). The plan cuts every
source into units of about `unit_bytes` (consecutive small files, byte ranges of a plain `.jsonl`,
runs of parquet row groups, row ranges of a dataset); a unit is what one worker tokenises. The plan
depends only on the files, never on the number of ranks or workers, so neither changes the tokens.

Document names (which the train/val split and FIM choice hash) are stable under any cut: a text file's
path under its source, `path@BYTE` for a JSON line (the line's offset in the decompressed stream),
`path:ROW` for a parquet or dataset row.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sysconfig
import dataclasses
from dataclasses import dataclass, field

import numpy as np

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java",
                 ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".json", ".html", ".css", ".tex", ".csv"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
UNIT_BYTES = 16 * 2**20            # a unit: enough text that a worker's start-up is noise, small enough to spread


class DataError(ValueError):
    """The data cannot be used as given; the message says what to change."""


def doc_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "big")


# ---------------------------------------------------------------------------------------------
# Sources: --data [WEIGHT:]PATH ...
# ---------------------------------------------------------------------------------------------

@dataclass
class Source:
    path: str | None                   # None: the Python standard library's own .py files
    weight: float = 1.0
    name: str = ""

    @property
    def root(self) -> str:
        return default_corpus_root() if self.path is None else self.path


def default_corpus_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def parse_sources(data) -> list[Source]:
    """`--data` items as Sources: `PATH` or `WEIGHT:PATH` (a number before the first colon); None: the
    standard library. Names come from the paths (made unique); weights need not sum to 1."""
    items = [data] if data is None or isinstance(data, str) else list(data)
    if not items:
        raise DataError("--data needs at least one source")
    sources = []
    for item in items:
        if item is None:
            sources.append(Source(None, 1.0, "stdlib"))
            continue
        weight, path = 1.0, item
        head, sep, tail = item.partition(":")
        if sep and tail:
            try:
                weight, path = float(head), tail
            except ValueError:
                pass                   # a colon in a path, not a weight
        if not 0 < weight < float("inf"):
            raise DataError(f"--data {item}: the weight must be a finite number > 0")
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data {path}: no such file or directory")
        sources.append(Source(path, weight, _name_of(path)))
    seen: dict[str, int] = {}
    for s in sources:                  # web, web_2, ...: names key the per-source metrics
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}_{seen[s.name]}"
    return sources


def _name_of(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for suffix in (*JSONL_SUFFIXES, ".parquet", ".txt"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "data"


# ---------------------------------------------------------------------------------------------
# The plan: units of about UNIT_BYTES, the same for any number of ranks and workers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    path: str                          # the file (or dataset folder)
    rel: str                           # its name under the source: document names start with it
    kind: str                          # text | jsonl | parquet | arrow
    start: int = 0                     # jsonl: byte offset (plain files); parquet: row group; arrow: row
    stop: int | None = None            # exclusive; None: to the end
    nbytes: int = 0                    # bytes of input (parquet: uncompressed)
    first_row: int = 0                 # parquet: the row number of the first row in `start`
    limit: int | None = None           # --max-corpus-mb: read documents until this many bytes of the piece


@dataclass
class Unit:
    index: int
    source: int
    pieces: list[Piece] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class Plan:
    units: list[Unit]
    files: list[dict]                  # {"source", "path", "bytes", "mtime_ns"} of every file read
    left_out: dict                     # source name -> {suffix: files not read}

    def key(self) -> str:
        """Names, sizes and modification times of the files: what decides whether a cache is current."""
        h = hashlib.sha1()
        for f in self.files:
            h.update(f"{f['source']}\0{f['rel']}\0{f['bytes']}\0{f['mtime_ns']}\n".encode())
        for u in self.units:
            h.update(repr([(p.rel, p.start, p.stop) for p in u.pieces]).encode())
        return h.hexdigest()[:16]


def plan_units(sources: list[Source], unit_bytes: int = UNIT_BYTES, max_bytes: int | None = None) -> Plan:
    """Every source's pieces in a deterministic order (files shuffled by a hash of their name, as a
    fixed shuffle), grouped into units of about `unit_bytes`. `max_bytes` caps each source's input
    (whole documents of text files, whole JSON lines, whole row groups)."""
    units, files, left_out = [], [], {}
    for s_idx, src in enumerate(sources):
        pieces, skipped = _source_pieces(src, unit_bytes)
        left_out[src.name] = skipped
        total, current = 0, None
        for p in pieces:
            if max_bytes is not None and total >= max_bytes:
                break
            if max_bytes is not None and total + p.nbytes > max_bytes and p.kind != "text":
                p = dataclasses.replace(p, limit=max_bytes - total)    # the cap falls inside: cut there
            total += p.nbytes
            if current is None or current.nbytes + p.nbytes > unit_bytes and current.pieces:
                current = Unit(len(units), s_idx)
                units.append(current)
            current.pieces.append(p)
            current.nbytes += p.nbytes
        seen = set()
        for u in units:
            for p in u.pieces:
                if u.source == s_idx and p.path not in seen:
                    seen.add(p.path)
                    st = os.stat(p.path)
                    files.append({"source": src.name, "rel": p.rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        if not any(u.source == s_idx for u in units):
            where = "the Python standard library" if src.path is None else src.path
            raise DataError(f"no text found in {where}; --data takes text files, folders of them, .jsonl "
                            f"(.gz, .zst; a text field per line), .parquet or a datasets save_to_disk folder"
                            + (f" (left out by suffix: {_suffixes(skipped)})" if skipped else ""))
    return Plan(units, files, left_out)


def _suffixes(counts: dict) -> str:
    return ", ".join(f"{n} {ext or '(none)'}" for ext, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(".parquet"):
        return "parquet"
    if os.path.splitext(low)[1] in TEXT_SUFFIXES:
        return "text"
    return None


def _is_dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, "state.json"))
                                    or os.path.exists(os.path.join(path, "dataset_dict.json")))


def _source_pieces(src: Source, unit_bytes: int):
    """(pieces, {suffix: count of files left out})."""
    root = src.root
    if src.path is not None and _is_dataset_dir(root):
        return _dataset_pieces(root, unit_bytes), {}
    if os.path.isfile(root):
        kind = _kind(root) or "text"               # a single file named on the command line is read as text
        return _file_pieces(root, os.path.basename(root), kind, unit_bytes), {}
    skip = STDLIB_SKIP_DIRS if src.path is None else set()
    found, left_out = [], {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for f in filenames:
            full = os.path.join(dirpath, f)
            kind = "text" if src.path is None and f.endswith(".py") else (_kind(f) if src.path is not None else None)
            if kind is None:
                if src.path is not None and not f.startswith("."):
                    ext = os.path.splitext(f)[1].lower()
                    left_out[ext] = left_out.get(ext, 0) + 1
                continue
            found.append((os.path.relpath(full, root), full, kind))
    found.sort(key=lambda r: doc_hash(r[0]))       # a fixed shuffle: neighbours in a folder spread out
    pieces = []
    for rel, full, kind in found:
        pieces.extend(_file_pieces(full, rel, kind, unit_bytes))
    return pieces, left_out


def _input_bytes(full: str) -> int:
    """A file's bytes of text: the decompressed size a .gz or .zst records (estimated if it does not)."""
    size, low = os.path.getsize(full), full.lower()
    try:
        with open(full, "rb") as f:
            if low.endswith(".gz") and size >= 18:
                f.seek(-4, os.SEEK_END)
                return max(int.from_bytes(f.read(4), "little"), size)      # ISIZE: the size mod 2^32
            if low.endswith(".zst"):
                import zstandard
                n = zstandard.frame_content_size(f.read(18))
                return n if n > 0 else 4 * size
    except Exception:  # noqa: BLE001 - only an estimate; reading the file says what is wrong with it
        pass
    return size


def _file_pieces(full: str, rel: str, kind: str, unit_bytes: int) -> list[Piece]:
    size = os.path.getsize(full) if kind != "jsonl" else _input_bytes(full)
    if kind == "jsonl" and full.lower().endswith(".jsonl") and size > unit_bytes:
        return [Piece(full, rel, kind, a, min(a + unit_bytes, size), min(unit_bytes, size - a))
                for a in range(0, size, unit_bytes)]            # byte ranges: lines that start in each
    if kind == "parquet":
        return _parquet_pieces(full, rel)
    return [Piece(full, rel, kind, 0, None, size)]


def _parquet_pieces(full: str, rel: str) -> list[Piece]:
    pq = _pyarrow_parquet(full)
    try:
        meta = pq.ParquetFile(full).metadata
    except Exception as e:         # pyarrow raises ArrowInvalid/OSError for corrupt or non-parquet files
        raise DataError(f"{full}: not a readable parquet file ({e})") from None
    pieces, row = [], 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        pieces.append(Piece(full, rel, "parquet", g, g + 1, rg.total_byte_size, row))
        row += rg.num_rows
    return pieces


def _dataset_pieces(root: str, unit_bytes: int) -> list[Piece]:
    ds = _load_dataset(root)
    n = len(ds)
    per_row = max(1, ds.data.nbytes // max(n, 1))
    step = max(1, unit_bytes // per_row)
    rel = os.path.basename(os.path.normpath(root))
    return [Piece(root, rel, "arrow", a, min(a + step, n), (min(a + step, n) - a) * per_row) for a in range(0, n, step)]


def _pyarrow_parquet(full):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{full}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    return pq


def _load_dataset(root):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{root}: reading a save_to_disk folder needs datasets (pip install datasets)") from None
    ds = datasets.load_from_disk(root)
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{root}: a DatasetDict with splits {list(ds)}; pass one split's folder, "
                        f"e.g. {os.path.join(root, next(iter(ds), 'train'))}")
    return ds


# ---------------------------------------------------------------------------------------------
# Reading a unit: (name, text) document by document; bad rows raise, or are skipped and counted
# ---------------------------------------------------------------------------------------------

@dataclass
class ReadStats:
    documents: int = 0                 # non-empty documents yielded
    bytes: int = 0                     # their UTF-8 bytes
    empty: int = 0                     # whitespace-only documents, left out
    skipped: int = 0                   # bad rows skipped under --skip-bad-rows
    examples: list = field(default_factory=list)   # the first few skipped rows' reasons

    def add(self, other: "ReadStats"):
        self.documents += other.documents
        self.bytes += other.bytes
        self.empty += other.empty
        self.skipped += other.skipped
        self.examples = (self.examples + other.examples)[:5]


def read_unit(unit: Unit, text_field: str = "text", skip_bad_rows: bool = False, stats: ReadStats | None = None):
    """Yield (name, text) for every non-empty document of the unit, in order."""
    stats = stats if stats is not None else ReadStats()
    for p in unit.pieces:
        for name, text in _read_piece(p, text_field, skip_bad_rows, stats):
            if not text.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            stats.bytes += len(text.encode())
            yield name, text


def _bad(stats: ReadStats, skip: bool, where: str, why: str):
    if not skip:
        raise DataError(f"{where}: {why} (--skip-bad-rows skips and counts such rows)")
    stats.skipped += 1
    if len(stats.examples) < 5:
        stats.examples.append(f"{where}: {why}")


def _read_piece(p: Piece, text_field: str, skip: bool, stats: ReadStats):
    if p.kind == "text":
        with open(p.path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _bad(stats, skip, p.path, f"not UTF-8 text (byte {e.start})")
            return
        yield p.rel, text.replace("\r\n", "\n").replace("\r", "\n")    # as open() in text mode reads it
    elif p.kind == "jsonl":
        yield from _read_jsonl(p, text_field, skip, stats)
    elif p.kind == "parquet":
        yield from _read_parquet(p, text_field, skip, stats)
    else:
        yield from _read_arrow(p, text_field, skip, stats)


def _open_stream(path: str):
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs zstandard (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _line_number(path: str, offset: int, known: int | None) -> int:
    """1-based line of the byte at `offset` (counted only when an error needs it)."""
    if known is not None:
        return known
    n, done = 1, 0
    with _open_stream(path) as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            n += chunk.count(b"\n")
            done += len(chunk)
    return n


def _read_jsonl(p: Piece, text_field: str, skip: bool, stats: ReadStats):
    with _open_stream(p.path) as f:
        pos, line_no = p.start, (1 if p.start == 0 else None)
        if p.start:                                 # the line that crosses into this range is the previous range's
            f.seek(p.start - 1)
            pos = p.start - 1 + len(f.readline())
        stop = p.stop if p.limit is None else min(p.stop or 1 << 62, p.start + p.limit)
        while stop is None or pos < stop:
            line = f.readline()
            if not line:
                break
            at, pos = pos, pos + len(line)
            where = lambda: f"{p.path}:{_line_number(p.path, at, line_no)}"   # noqa: E731 - only on error
            try:
                if line.strip():
                    yield from _json_row(line, at, p, text_field, skip, stats, where)
            finally:
                line_no = line_no + 1 if line_no is not None else None


def _json_row(line: bytes, at: int, p: Piece, text_field: str, skip: bool, stats: ReadStats, where):
    try:
        row = json.loads(line)
    except UnicodeDecodeError as e:
        return _bad(stats, skip, where(), f"not UTF-8 ({e.reason})")
    except ValueError as e:
        return _bad(stats, skip, where(), f"not valid JSON ({e})")
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        return _bad(stats, skip, where(), f"no string field {text_field!r} (set --text-field)")
    yield f"{p.rel}@{at}", row[text_field]


def _read_parquet(p: Piece, text_field: str, skip: bool, stats: ReadStats):
    pq = _pyarrow_parquet(p.path)
    try:
        pf = pq.ParquetFile(p.path)
    except Exception as e:
        raise DataError(f"{p.path}: not a readable parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{p.path}: no column {text_field!r} (columns: {', '.join(columns)}; set --text-field)")
    texts = (t for g in range(p.start, p.stop) for t in _row_group_texts(pf, g, text_field, p.path))
    yield from _rows(texts, p.first_row, p, text_field, skip, stats)


def _rows(texts, first_row: int, p: Piece, text_field: str, skip: bool, stats: ReadStats):
    """(name, text) per row of a text column; a null or non-text value is a bad row; stops at p.limit."""
    used = 0
    for row, t in enumerate(texts, first_row):
        if p.limit is not None and used >= p.limit:
            return
        if isinstance(t, str):
            used += len(t)
            yield f"{p.rel}:{row}", t
        else:
            _bad(stats, skip, f"{p.path}:row {row}", f"column {text_field!r} holds {type(t).__name__}, not text")


def _row_group_texts(pf, g: int, text_field: str, path: str):
    """One row group's texts, 1,024 rows at a time (a row group can be large)."""
    try:
        batches = iter(pf.iter_batches(1024, row_groups=[g], columns=[text_field]))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield from batch.column(0).to_pylist()
    except DataError:
        raise
    except Exception as e:          # pyarrow's errors for damaged pages
        raise DataError(f"{path}: row group {g} cannot be read ({e}); the file is damaged") from None


def _read_arrow(p: Piece, text_field: str, skip: bool, stats: ReadStats):
    ds = _load_dataset(p.path)
    if text_field not in ds.column_names:
        raise DataError(f"{p.path}: no column {text_field!r} (columns: {', '.join(ds.column_names)}; set --text-field)")
    col = ds.data.column(text_field)               # the memory-mapped Arrow table: no copy of the rest
    texts = (t for a in range(p.start, p.stop, 4096) for t in col.slice(a, min(4096, p.stop - a)).to_pylist())
    yield from _rows(texts, p.start, p, text_field, skip, stats)


def read_documents(data=None, max_bytes: int | None = None, text_field: str = "text", skip_bad_rows: bool = False):
    """Every document of the sources as a list [(name, text)], in the plan's order: for small data (an
    evaluation set, the bundled chats); training streams instead."""
    plan, stats = plan_units(parse_sources(data), max_bytes=max_bytes), ReadStats()
    docs = [d for u in plan.units for d in read_unit(u, text_field, skip_bad_rows or data is None, stats)]
    if not docs:
        raise DataError(f"no text found in {data}: {stats.empty} empty document(s), {stats.skipped} bad row(s) skipped")
    return docs


# ---------------------------------------------------------------------------------------------
# The per-document choices: train/val split and FIM, from hashes of the name (any order, any worker)
# ---------------------------------------------------------------------------------------------

def is_val(name: str, val_fraction: float) -> bool:
    return doc_hash("split:" + name) < int(val_fraction * 2**64)


def fim_choice(name: str, seed: int, fim_rate: float):
    """None, or the numpy Generator that cuts this document for FIM."""
    h = doc_hash(f"fim:{seed}:{name}")
    return np.random.default_rng(h) if h < int(fim_rate * 2**64) else None


def fim_split(text: str, rng: np.random.Generator):
    """Two uniform cut points over the characters: (prefix, middle, suffix)."""
    a, b = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    return text[:a], text[a:b], text[b:]


def psm(prefix_ids, middle_ids, suffix_ids, sp) -> list[int]:
    """The PSM-order FIM body (without BOS/EOS)."""
    return [sp.fim_begin, *prefix_ids, sp.fim_hole, *suffix_ids, sp.fim_end, *middle_ids]
