"""Chat data for supervised fine-tuning (arXiv 2412.19437 §5.1): conversations rendered in the model's
chat format, the loss on the assistant's tokens only, and samples packed into fixed-length sequences
with sample masking (a packed sample sees only itself; its positions restart at 0).

A conversation is one JSON object per line with OpenAI-style `messages` ({"role": "system" | "user" |
"assistant", "content": str}). Rendering goes piece by piece between special tokens, which the
tokenizer never merges across, so the ids equal those of the rendered template (the tests check it
against `transformers.AutoTokenizer.apply_chat_template`), and each piece knows whether it is the
assistant's: its content and the closing EOS are trained on, nothing else.

Tool use in OpenAI's form: an assistant message's `tool_calls` ([{"type": "function", "function":
{"name", "arguments"}}], `content` may be null), `tool` messages with the results, and the row's
`tools` (the function schemas). Such chats render through the model's template, or DeepSeek-V3's tool
format (`tokenizer.TOOL_CHAT_TEMPLATE`): the assistant's tool calls are trained on, the results not.

A packed row of T + 1 tokens holds whole samples back to back (a sample longer than T + 1 is cut) and
padding; per token it stores the id, whether it is a training target (assistant), its sample number
(padding: -1) and its position within the sample. `Batch` carries the rows to the loss.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainError
from ..inference.tokenizer import ChatTemplate
from ..losses import Batch
from .tokenizer import ASSISTANT, BOS, EOS, TOOL_CHAT_TEMPLATE, TOOL_TOKENS, USER, token_byte_lengths

ROLES = ("system", "user", "assistant", "tool")


class Conversation(list):
    """A conversation's messages, and the tools its row offers (`tools`: OpenAI function schemas)."""
    tools: list | None = None

    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in self)


class ChatDataError(TrainError):
    """A chats file or a row of it cannot be used; the message names the file, line and field."""


def read_jsonl(path: str):
    """(where, object) for each non-empty line of a .jsonl file; `where` is "path:line" for messages."""
    if not os.path.exists(path):
        raise ChatDataError(f"{path}: no such file")
    with open(path, "rb") as f:                        # bytes: a bad line is named, not a codec error
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ChatDataError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except ValueError as e:
                raise ChatDataError(f"{path}:{n}: not a JSON object ({e})") from None


def read_rows(path: str):
    """(where, row) for each row of a .jsonl or .parquet file, or of a Hugging Face `datasets` directory
    (`save_to_disk`); `where` is "path:line" (or "path:row N")."""
    if os.path.isdir(path):
        yield from read_dataset_dir(path)
        return
    if path.lower().endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ChatDataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        if not os.path.exists(path):
            raise ChatDataError(f"{path}: no such file")
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:      # pyarrow raises ArrowInvalid/OSError for corrupt or non-parquet files
            raise ChatDataError(f"{path}: not a readable parquet file ({e})") from None
        n = 0
        for batch in pf.iter_batches():                  # row groups stream; the file need not fit twice
            for row in batch.to_pylist():
                yield f"{path}:row {n}", row
                n += 1
        return
    yield from read_jsonl(path)


def read_dataset_dir(path: str):
    """Rows of a `datasets` directory (`Dataset.save_to_disk`, or a DatasetDict's, whose "train" split is
    read), through `datasets.load_from_disk`: the Arrow files are memory-mapped, not loaded."""
    split = None
    if not any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        parent, name = os.path.split(os.path.normpath(path))
        if os.path.exists(os.path.join(parent, "dataset_dict.json")):
            path, split = parent, name            # a split's folder inside a DatasetDict
        else:
            raise ChatDataError(f"{path}: a folder, but not a Hugging Face datasets folder (no state.json or "
                                f"dataset_dict.json from save_to_disk); pass a .jsonl or .parquet file")
    try:
        import datasets
    except ImportError:
        raise ChatDataError(f"{path}: reading a datasets folder needs the datasets library "
                            f"(pip install 'fewchips[datasets]')") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:           # a damaged folder: missing arrow files, unreadable state
        raise ChatDataError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else None)
        if split not in ds:
            raise ChatDataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); pass "
                                f"the split's folder, e.g. {os.path.join(path, next(iter(ds), 'SPLIT'))}")
        ds, path = ds[split], os.path.join(path, split)
    for n, row in enumerate(ds):
        yield f"{path}:row {n}", row


def read_chats(path: str) -> list:
    """SFT samples from a .jsonl or .parquet file or a datasets folder, each row checked (the error names
    the row and field of the first bad one; nothing is trained on a file with one). A row is {"messages": [...]} (a
    conversation), {"prompt", "completion"} (strings: one user turn and the reply; or lists of messages,
    TRL's conversational form), or {"text": str} (trained on every token, no chat template)."""
    out = [sample_of(row, where) for where, row in read_rows(path)]
    if not out:
        raise ChatDataError(f"{path}: no conversations in it")
    return out


def sample_of(row, where: str):
    """A row as a conversation (list of messages) or a plain text ({"text": str})."""
    if not isinstance(row, dict):
        raise ChatDataError(f"{where}: expected an object with messages, prompt/completion or text")
    if "messages" in row:
        chat = check_messages(row["messages"], where)
        tools = row.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ChatDataError(f"{where}: `tools` must be a list of function schemas (objects)")
        chat.tools = tools or None
        return chat
    if "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return check_messages([{"role": "user", "content": p}, {"role": "assistant", "content": c}], where)
        if isinstance(p, list) and isinstance(c, list):
            return check_messages(p + c, where)
        raise ChatDataError(f"{where}: prompt and completion must both be strings or both lists of messages")
    if isinstance(row.get("text"), str):
        return {"text": row["text"]}
    raise ChatDataError(f"{where}: expected \"messages\", \"prompt\" + \"completion\", or \"text\" "
                        f"(got {', '.join(map(repr, row)) or 'no fields'})")


def encode_sample(tok, sp, sample) -> tuple[list[int], list[bool]]:
    """Ids and trained-on flags of a conversation (`encode_chat`, through the model's template if `sp` has
    one) or of a plain text (BOS text EOS, every token after BOS trained)."""
    if isinstance(sample, dict):
        ids = [sp.bos] + tok.encode(sample["text"], add_special_tokens=False).ids + [sp.eos]
        return ids, [False] + [True] * (len(ids) - 1)
    return encode_chat(tok, sample, template=getattr(sp, "template", None))


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatDataError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, "
                                f"got {m.get('role') if isinstance(m, dict) else m!r}")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not calls:
                raise ChatDataError(f"{where}: messages[{i}].tool_calls must be a non-empty list on an assistant "
                                    f"message")
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) \
                        or not isinstance(f.get("arguments"), (str, dict)):
                    raise ChatDataError(f"{where}: messages[{i}].tool_calls[{j}] must be {{\"type\": \"function\", "
                                        f"\"function\": {{\"name\": str, \"arguments\": JSON string}}}}")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise ChatDataError(f"{where}: messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: no assistant message, so nothing to learn from")
    keep = ("role", "content", "tool_calls", "tool_call_id", "name")
    return Conversation({k: m[k] for k in keep if k in m} for m in messages)


def encode_chat(tok, messages: list[dict], add_generation_prompt: bool = False,
                template=None) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it is the assistant's (trained on). With the
    model directory's `template` (a ChatTemplate), in the checkpoint's own format (`encode_templated`);
    without one, DeepSeek-V3's: BOS system USER user ASSISTANT assistant EOS ... [ASSISTANT]."""
    tools = getattr(messages, "tools", None)
    if template is None and isinstance(messages, Conversation) and messages.uses_tools():
        missing = [t for t in TOOL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ChatDataError(f"a chat with tool calls needs DeepSeek-V3's tool tokens, and the tokenizer lacks "
                                f"{', '.join(missing[:3])}...: retrain it with this fewchips, or give the model "
                                f"directory a chat_template that writes tool calls")
        template = ChatTemplate(TOOL_CHAT_TEMPLATE, BOS, EOS)
    if template is not None and isinstance(messages, Conversation) and messages.uses_tools() \
            and "tool_calls" not in template.source:
        raise ChatDataError("a chat with tool calls, and the model directory's chat_template does not write tool "
                            "calls (they would be trained as a bare EOS): give it one that does")
    if template is not None:
        return encode_templated(tok, template, messages, add_generation_prompt, tools=tools)
    for special in (USER, ASSISTANT):
        if tok.token_to_id(special) is None:
            raise ChatDataError(f"the tokenizer has no {special} token: chat data needs DeepSeek-V3's chat tokens, as "
                                f"in a released DeepSeek-V3 tokenizer or one `fewchips train` writes (fewchips 0.1.0 "
                                f"and later), or the model directory's own chat_template")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    pieces = [(BOS + system, False)]
    for m in messages:
        if m["role"] == "user":
            pieces.append((USER + m["content"], False))
        elif m["role"] == "assistant":
            pieces += [(ASSISTANT, False), (m["content"] + EOS, True)]
    if add_generation_prompt:
        pieces.append((ASSISTANT, False))
    ids, train = [], []
    for text, is_assistant in pieces:
        piece = tok.encode(text, add_special_tokens=False).ids
        ids += piece
        train += [is_assistant] * len(piece)
    return ids, train


def encode_templated(tok, template, messages: list[dict], add_generation_prompt: bool = False, **variables):
    """The conversation rendered by the checkpoint's Jinja template, tokenised whole (as
    `transformers.apply_chat_template` does), and the assistant mask derived from that rendering: assistant
    turn i spans what the rendering up to and including it adds beyond the turns before it with the
    generation prompt (their common prefix: R1's prompt opens a `<think>` its rendered history does not
    show); a token is trained on if it lies inside such a span. A template that renders a turn
    differently once later turns follow has no such spans and is refused by name."""
    full = template.render(messages, add_generation_prompt=add_generation_prompt, **variables)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True, **variables)
        through = template.render(messages[: i + 1], **variables)
        start = len(os.path.commonprefix([before, through]))
        if not full.startswith(through) or start < len(template.render(messages[:i], **variables)):
            raise ChatDataError(f"the model's chat template renders turn {i} differently once later turns follow "
                                f"(it rewrites earlier turns), so the assistant's tokens cannot be told from the "
                                f"rendering; train on one assistant turn per row, or use a template without that")
        spans.append((start, len(through)))
    enc = tok.encode(full, add_special_tokens=False)
    train = [e > b and any(lo <= b and e <= hi for lo, hi in spans) for b, e in enc.offsets]
    return enc.ids, train


@dataclass
class PackedRows:
    ids: np.ndarray          # [N, T+1] token ids
    target: np.ndarray       # [N, T+1] bool: the token is trained on (assistant)
    segment: np.ndarray      # [N, T+1] int32: sample number within the row, -1 for padding
    position: np.ndarray     # [N, T+1] int32: position within its sample
    truncated: int = 0       # samples cut to fit a row


def pack_plan(lengths: list[int], L: int) -> list[list[int]]:
    """Best-fit decreasing: the samples of the given lengths (each at most L) into rows of L tokens,
    longest first, each into the row with the least room that still holds it, in O(n log n): rows wait
    in buckets by their free room, and a sorted list of the free sizes present finds the best one by
    bisection. Ties keep the samples' order, so the plan is a function of the lengths alone. Returns
    each row's sample indices."""
    rows: list[list[int]] = []
    buckets: dict[int, list[int]] = {}   # free room -> rows with exactly that room
    sizes: list[int] = []                # the free rooms that have a row, sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(sizes, n)
        if at < len(sizes):
            free = sizes[at]
            r = buckets[free].pop()
            if not buckets[free]:
                del buckets[free]
                sizes.pop(at)
            rows[r].append(i)
        else:
            free, r = L, len(rows)
            rows.append([i])
        left = free - n
        if left not in buckets:
            buckets[left] = []
            bisect.insort(sizes, left)
        buckets[left].append(r)
    return rows


def pack(samples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> PackedRows:
    """Samples packed into rows of seq_len + 1 tokens (`pack_plan`), each cut to the row if longer."""
    L = seq_len + 1
    rows = pack_plan([min(len(ids), L) for ids, _ in samples], L)
    truncated = sum(len(ids) > L for ids, _ in samples)
    N = len(rows)
    out = PackedRows(np.full((N, L), pad_id, np.int64), np.zeros((N, L), bool), np.full((N, L), -1, np.int32),
                     np.zeros((N, L), np.int32), truncated)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            ids, train = samples[i]
            n = min(len(ids), L)
            out.ids[r, at:at + n] = ids[:n]
            out.target[r, at:at + n] = train[:n]
            out.segment[r, at:at + n] = s
            out.position[r, at:at + n] = np.arange(n)
            at += n
    return out


def split_chats(chats: list[list[dict]], val_fraction: float):
    """Held-out conversations by a hash of their text (stable whatever the file's order)."""
    cut = int(val_fraction * 2**64)
    train, val = [], []
    for c in chats:
        h = int.from_bytes(hashlib.sha1(json.dumps(c, sort_keys=True).encode()).digest()[:8], "little")
        (val if h < cut else train).append(c)
    if not val and len(chats) >= 2 and val_fraction > 0:
        val, train = train[-1:], train[:-1]
    return train, val


class RowSampler:
    """Packed rows visited in a fresh seeded permutation each epoch; `state_dict()` is the exact position."""

    def __init__(self, n_rows: int, seed: int = 0):
        if n_rows < 1:
            raise ChatDataError("no training conversations left after the validation split; add data or lower "
                                "--val-fraction")
        self.n_rows, self.seed = n_rows, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch):
        return np.random.default_rng([self.seed, epoch, 1]).permutation(self.n_rows)

    def next_rows(self, n: int) -> np.ndarray:
        out = []
        for _ in range(n):
            if self.cursor == self.n_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(int(self._order[self.cursor]))
            self.cursor += 1
        return np.asarray(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, s: dict):
        if (s.get("n_rows"), s.get("seed")) != (self.n_rows, self.seed):
            raise ChatDataError(f"the checkpoint's data position is for {s.get('n_rows')} packed rows, seed "
                                f"{s.get('seed')}; this run has {self.n_rows} rows, seed {self.seed} (same --data, "
                                f"--seq-len and --seed needed)")
        self.epoch, self.cursor = s["epoch"], s["cursor"]
        self._order = self._permutation(self.epoch)


def batch_of(rows: PackedRows, idx) -> Batch:
    return Batch(torch.from_numpy(rows.ids[idx]), torch.from_numpy(rows.target[idx]),
                 torch.from_numpy(rows.segment[idx]).long(), torch.from_numpy(rows.position[idx]).long())


class ChatData:
    """SFT data with the trainer's data interface (see trainer.TextData): packed training rows drawn by
    a `RowSampler`, held-out conversations packed the same way for validation (assistant tokens only)."""

    def __init__(self, tc, tok, sp, log=print, chats: list[list[dict]] | None = None):
        self.tok, self.sp = tok, sp
        chats = chats if chats is not None else read_chats(tc.data)
        train, val = split_chats(chats, tc.val_fraction)
        order = np.random.default_rng([tc.seed, 2]).permutation(len(train))     # packing order: seeded
        train_samples = [encode_sample(tok, sp, train[i]) for i in order]
        val_samples = [encode_sample(tok, sp, c) for c in val]
        self.train = pack(train_samples, tc.seq_len, sp.eos)
        self.val = pack(val_samples, tc.seq_len, sp.eos) if val_samples else None
        self.sampler = RowSampler(len(self.train.ids), tc.seed)
        self.n_train, self.n_val = len(train), len(val)
        self.trained_tokens = int(sum(sum(t) for _, t in train_samples))
        if self.train.truncated:
            log(f"warning: {self.train.truncated} of {len(train)} conversations are longer than --seq-len "
                f"{tc.seq_len} + 1 tokens and were cut")
        self.unigram_entropy = None
        self.val_bytes = 0
        if self.val is not None:
            vb = batch_of(self.val, np.arange(len(self.val.ids)))
            mask = vb.target_mask(0).numpy()
            self.val_bytes = int(token_byte_lengths(tok)[self.val.ids[:, 1:]][mask].sum())

    packed = True                        # batches carry targets, samples and positions

    def next_batch(self, n: int) -> Batch:
        return batch_of(self.train, self.sampler.next_rows(n))

    def val_batches(self, n: int) -> list[Batch]:
        if self.val is None:
            return []
        return [batch_of(self.val, np.arange(i, min(i + n, len(self.val.ids)))) for i in range(0, len(self.val.ids), n)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict):
        self.sampler.load_state_dict(state)

    def fingerprint(self) -> dict:
        return {"splits": {"train": {"conversations": self.n_train, "rows": len(self.train.ids)},
                           "val": {"conversations": self.n_val}}}

    def describe(self) -> str:
        return (f"{self.n_train:,} training conversations in {len(self.train.ids):,} packed rows "
                f"({self.trained_tokens:,} assistant tokens), {self.n_val:,} held out")
