"""`fewchips eval`: loss, perplexity and bits per byte of a model directory on text or chats, the
numbers the trainers log as validation (chats: the assistant's tokens only, samples packed with
sample masking, as `fewchips sft` scores them)."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import json
import math
import os

from .models import add_model_flags, int_at_least, load_model


def register(sub):
    p = sub.add_parser("eval", help="loss, perplexity and bits/byte of a model on text or chats")
    add_model_flags(p)
    p.add_argument("--data", required=True,
                   help="text file, folder, .jsonl (text field) or .parquet; "
                        "or a chats .jsonl ({\"messages\": ...} rows)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet rows")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per evaluated sequence")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="sequences per forward")
    p.add_argument("--max-mb", type=float, default=4.0, help="read at most this many MB of text")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def is_chats(path: str) -> bool:
    if not (os.path.isfile(path) and path.endswith(".jsonl")):
        return False
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from None
                try:
                    return "messages" in json.loads(line)
                except ValueError:
                    return False
    return False


def batches_for(path: str, tok, sp, seq_len: int, batch_size: int, max_mb: float, text_field: str):
    """(Batches, bytes behind their scored targets, what was read)."""
    import numpy as np
    import torch

    from fewchips.train import data as D
    from fewchips.train.chat import batch_of, encode_chat, pack, read_chats
    from fewchips.train.tokenizer import token_byte_lengths

    nbytes = token_byte_lengths(tok)
    if is_chats(path):
        chats = read_chats(path)
        rows = pack([encode_chat(tok, c, template=sp.template) for c in chats], seq_len, sp.eos)
        idx = np.arange(len(rows.ids))
        batches = [batch_of(rows, idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]
        mask = batch_of(rows, idx).target_mask(0).numpy()
        return batches, int(nbytes[rows.ids[:, 1:]][mask].sum()), f"{len(chats):,} conversations"
    docs = D.read_documents(path, int(max_mb * 2**20), text_field)
    tokens = np.concatenate([ids for ids, _ in D.encode_documents(docs, tok, sp)])
    windows = D.eval_windows(tokens, seq_len, len(tokens))
    batches = [D.Batch(torch.from_numpy(windows[i:i + batch_size])) for i in range(0, len(windows), batch_size)]
    return batches, int(nbytes[windows[:, 1:]].sum()), f"{len(docs):,} documents"


def run(args):
    import torch

    from fewchips.train.tokenizer import load_tokenizer, special_ids
    from fewchips.losses import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.model)
    sp = special_ids(tok, args.model)
    model = load_model(args, device)
    batches, target_bytes, what = batches_for(args.data, tok, sp, args.seq_len, args.batch_size, args.max_mb,
                                              args.text_field)
    ev = evaluate(model, batches, target_bytes, device=device)
    if not ev:
        raise ValueError(f"{args.data}: nothing to evaluate")
    out = {"loss": ev["val_loss"], "perplexity": math.exp(min(ev["val_loss"], 700)), "bits_per_byte": ev["val_bpb"],
           "tokens": ev["val_tokens"], "data": args.data}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} on {args.data} ({what}, {out['tokens']:,} scored tokens): "
              f"loss {out['loss']:.4f} nats/token, perplexity {out['perplexity']:.2f}, "
              f"{out['bits_per_byte']:.4f} bits/byte")
    return 0
