"""`fewchips sft`: supervised fine-tuning of a model directory on chats (default: the bundled set)."""

from __future__ import annotations

import sys


def register(sub):
    from fewchips.train.sft import sft_config

    from .train import add_run_flags, set_defaults_from
    p = sub.add_parser("sft", help="fine-tune a model on chats (sample-masked packing, assistant-only loss)",
                       description="Supervised fine-tuning as DeepSeek-V3's post-training starts: chats rendered in "
                                   "the model's chat format, packed with sample masking, the loss on the assistant's "
                                   "tokens, the MTP module trained alongside, a cosine learning rate. OUT ends up a "
                                   "normal model directory (with tokenizer and chat template) plus metrics and plots.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, dest="init", metavar="MODEL_DIR",
                   help="the model to fine-tune: a Hugging Face deepseek_v3 directory with tokenizer.json")
    g.add_argument("--data", metavar="CHATS_JSONL",
                   help="one {\"messages\": [{\"role\", \"content\"}, ...]} object per line (default: the bundled "
                        "chats: standard-library functions and arithmetic)")
    g.add_argument("--val-fraction", type=float, help="share of conversations held out, chosen by hash")
    g.add_argument("--freeze-mtp", action="store_true",
                   help="leave the MTP module as it is (no MTP loss): compare speculative acceptance with it trained")
    add_run_flags(p, pretrain=False)
    set_defaults_from(p, sft_config(), func=run)


def run(args):
    import dataclasses

    from fewchips.train import TrainError
    from fewchips.train.sft import sft, sft_config
    from fewchips.train.stopping import TrainInterrupted

    names = {f.name for f in dataclasses.fields(sft_config())}
    tc = sft_config(**{k: v for k, v in vars(args).items() if k in names})
    try:
        result = sft(tc)
    except TrainError as e:
        print(f"fewchips sft: error: {e}", file=sys.stderr)
        return 1
    except TrainInterrupted as e:
        print(f"fewchips sft: {e}; continue with --resume", file=sys.stderr)
        return e.exit_code
    if "val_loss" in result:
        print(f"done: step {result['step']}, held-out assistant loss {result['val_loss']:.3f} nats/token "
              f"({result['val_bpb']:.3f} bits/byte); model in {args.out}")
    return 0
