"""The main job's second half: after `fewchips train --preset tiny --out OUT`, print what the run
reached and a few samples from the trained model (`python -m fewchips.demo OUT`)."""

import json
import os
import sys
import time

import torch
from tokenizers import Tokenizer

from fewchips import from_pretrained
from fewchips.inference.generate import generate

PROMPTS = ["def", "import os\n\n\nclass", "    for i in range("]


def main(out="runs/demo"):
    torch.manual_seed(0)
    model = from_pretrained(out, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        val = [r for r in map(json.loads, f) if "val_loss" in r]
    with open(os.path.join(out, "checkpoint", "train_state.pt"), "rb") as f:
        entropy = torch.load(f, map_location="cpu", weights_only=True)["corpus"].get("unigram_entropy_nats")
    if val:
        curve = ", ".join(f"{r['step']}: {r['val_loss']:.2f}" for r in val)
        print(f"\nvalidation loss by step (nats/token): {curve}")
        print(f"final: {val[-1]['val_loss']:.3f} nats/token = {val[-1]['val_bpb']:.3f} bits/byte"
              + (f" (unigram entropy of the corpus: {entropy:.3f} nats/token)" if entropy else "") + "\n")
    t0 = time.time()
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt).ids          # the tokenizer puts BOS first, as in training
        out_ids = generate(model, [ids], max_new_tokens=80, temperature=0.7, top_k=40, seed=i)[0]
        text = tok.decode(out_ids[1:], skip_special_tokens=True)
        print(f"--- sample {i + 1} (prompt {prompt!r}) ---\n{text}\n")
    print(f"({len(PROMPTS)} samples in {time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main(*sys.argv[1:])
