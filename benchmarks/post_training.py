"""From the `make demo` model to an SFT model to a GRPO model, on the bundled offline data, with the
numbers docs/post-training.md reports. Nothing is downloaded.

    make demo                                                 # runs/demo: tiny, 300 pre-training steps
    python benchmarks/post_training.py --base runs/demo --out runs/post

1. SFT twice from the same model, seed and data: the MTP module trained alongside, and frozen.
2. Held-out assistant loss (the bundled chats' held-out split, assistant tokens only, as `fewchips eval`
   and the SFT trainer score it) before and after.
3. MTP speculative-decoding acceptance (greedy) on held-out chat prompts, rendered with the chat
   template: the base model, SFT with MTP trained, SFT with MTP frozen.
4. GRPO on the arithmetic task from the SFT model: held-out greedy reward and KL along the run.
Writes OUT/summary.json; the runs keep their metrics.jsonl and plots (loss.png, grpo.png).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def held_out(seed: int, val_fraction: float):
    from fewchips.train.bundled import bundled_chats
    from fewchips.train.chat import split_chats
    return split_chats(bundled_chats(seed), val_fraction)[1]


def heldout_loss(model_dir: str, chats, seq_len: int) -> float:
    import numpy as np

    from fewchips.checkpoint import from_pretrained
    from fewchips.train.chat import batch_of, encode_chat, pack
    from fewchips.train.tokenizer import load_tokenizer, special_ids, token_byte_lengths
    from fewchips.losses import evaluate
    tok = load_tokenizer(model_dir)
    rows = pack([encode_chat(tok, c) for c in chats], seq_len, special_ids(tok).eos)
    idx = np.arange(len(rows.ids))
    batches = [batch_of(rows, idx[i:i + 8]) for i in range(0, len(idx), 8)]
    mask = batch_of(rows, idx).target_mask(0).numpy()
    nbytes = int(token_byte_lengths(tok)[rows.ids[:, 1:]][mask].sum())
    return evaluate(from_pretrained(model_dir, dtype=torch.float32), batches, nbytes)["val_loss"]


def mtp_acceptance(model_dir: str, chats, max_new: int = 32) -> dict:
    from fewchips import generate
    from fewchips.checkpoint import from_pretrained
    from fewchips.train.chat import encode_chat
    from fewchips.train.tokenizer import load_tokenizer, special_ids
    tok = load_tokenizer(model_dir)
    eos = special_ids(tok).eos
    model = from_pretrained(model_dir, dtype=torch.float32)
    drafted = accepted = 0
    for c in chats:
        first = next(i for i, m in enumerate(c) if m["role"] == "assistant")
        ids = encode_chat(tok, c[:first], add_generation_prompt=True)[0]
        stats = {}
        generate(model, [ids], max_new_tokens=max_new, stop_token_ids=[eos], use_mtp=True, stats=stats)
        drafted += stats["drafted"]
        accepted += stats["accepted"]
    return {"acceptance": accepted / max(drafted, 1), "drafted": drafted, "prompts": len(chats)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/demo")
    ap.add_argument("--out", default="runs/post")
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--grpo-steps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=48, help="held-out chat prompts for the acceptance rate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fewchips.runtime import keep_freed_memory
    from fewchips.train.grpo import GRPOTrainer, grpo_config
    from fewchips.train.sft import SFTTrainer, sft_config
    keep_freed_memory()

    os.makedirs(args.out, exist_ok=True)
    summary_path = os.path.join(args.out, "summary.json")
    summary = {"base": args.base, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save():
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)

    val = held_out(args.seed, 0.05)
    chats_for_acceptance = val[: args.prompts]
    summary["heldout_conversations"] = len(val)
    summary["base_heldout_loss"] = heldout_loss(args.base, val, 512)
    summary["base_acceptance"] = mtp_acceptance(args.base, chats_for_acceptance)
    save()
    for name, freeze in (("sft", False), ("sft_frozen_mtp", True)):
        out = os.path.join(args.out, name)
        tc = sft_config(init=args.base, out=out, steps=args.sft_steps, freeze_mtp=freeze, overwrite=True,
                        progress=False, threads=args.threads, seed=args.seed)
        t0 = time.time()
        result = SFTTrainer(tc, print).train()
        summary[name] = {"heldout_loss": result["val_loss"], "seconds": time.time() - t0,
                         "acceptance": mtp_acceptance(out, chats_for_acceptance)}
        save()
    sft_dir = os.path.join(args.out, "sft")
    tc = grpo_config(init=sft_dir, out=os.path.join(args.out, "grpo"), steps=args.grpo_steps, overwrite=True,
                     progress=False, threads=args.threads, seed=args.seed, eval_every=20, max_new_tokens=6)
    tr = GRPOTrainer(tc, print)
    start = tr.evaluate()
    t0 = time.time()
    result = tr.train()
    with open(os.path.join(args.out, "grpo", "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    summary["grpo"] = {"heldout_reward_start": start["val_reward"], "heldout_reward_end": result["val_reward"],
                       "curve": [(r["step"], r["val_reward"]) for r in recs if "val_reward" in r],
                       "kl_last": [r["kl"] for r in recs if "kl" in r][-1],
                       "sampled_reward_by_20_steps": [round(sum(r["reward_mean"] for r in recs if "reward_mean" in r
                                                                and a < r["step"] <= a + 20) / 20, 4)
                                                      for a in range(0, args.grpo_steps, 20)],
                       "kl_by_20_steps": [round(sum(r["kl"] for r in recs if "kl" in r
                                                    and a < r["step"] <= a + 20) / 20, 4)
                                          for a in range(0, args.grpo_steps, 20)],
                       "seconds": time.time() - t0}
    save()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
