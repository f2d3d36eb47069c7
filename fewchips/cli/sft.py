"""`fewchips sft`: supervised fine-tuning of a model directory on chats (default: the bundled set)."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations


def register(sub):
    from fewchips.train.config import sft_config

    from .train import add_run_flags, set_defaults_from
    p = sub.add_parser("sft", help="fine-tune a model on chats (sample-masked packing, assistant-only loss)",
                       description="Supervised fine-tuning as DeepSeek-V3's post-training starts: chats rendered in "
                                   "the model's chat format, packed with sample masking, the loss on the assistant's "
                                   "tokens, the MTP module trained alongside, a cosine learning rate. OUT ends up a "
                                   "normal model directory (with tokenizer and chat template) plus metrics and plots.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, dest="init", metavar="MODEL_DIR",
                   help="the model to fine-tune: a Hugging Face deepseek_v3 directory with tokenizer.json")
    g.add_argument("--data", metavar="CHATS",
                   help=".jsonl or .parquet file or datasets save_to_disk folder, rows of "
                        "{\"messages\": [{\"role\", \"content\"}, ...]}, {\"prompt\", \"completion\"} or {\"text\"} "
                        "(default: the bundled chats: standard-library functions and arithmetic)")
    g.add_argument("--val-fraction", type=float, help="share of conversations held out, chosen by hash")
    g.add_argument("--freeze-mtp", action="store_true",
                   help="leave the MTP module as it is (no MTP loss): compare speculative acceptance with it trained")
    g.add_argument("--epochs", type=float,
                   help="the run's length in passes over the packed training rows (instead of --steps)")
    add_run_flags(p, pretrain=False)
    set_defaults_from(p, sft_config(), func=run)
    p.set_defaults(steps=None)                       # given or not: --epochs and --steps exclude each other


def run(args):
    from fewchips.train.sft import sft, sft_config

    from .train import run_trainer
    return run_trainer("sft", sft_config, sft, args,
                       lambda r: (f"done: step {r['step']}, held-out assistant loss {r['val_loss']:.3f} nats/token "
                                  f"({r['val_bpb']:.3f} bits/byte); model in {args.out}" if "val_loss" in r else None))
