"""MTP speculative decoding on a trained model: acceptance rate, tokens per forward and wall-clock
speed-up against plain decoding (batch 1, CPU or GPU), greedy and sampled.

    fewchips train --preset tiny --out runs/tiny            # trains the MTP module too (MTP loss)
    python benchmarks/bench_mtp.py --model runs/tiny --prompts 8 --new 128

Prompts are `--prompt-len`-token windows of Python standard-library source (what `fewchips train`
trains on by default), taken from files chosen by a fixed seed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sysconfig
import time

import torch


def prompts_from_stdlib(tok, n, length, seed=0):
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        with open(rng.choice(files), encoding="utf-8", errors="replace") as f:
            ids = tok.encode(f.read())
        if len(ids) > length + 1:
            start = rng.randrange(0, len(ids) - length)
            out.append(ids[start: start + length])
    return out


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained model directory with MTP weights and tokenizer.json")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="for the sampled measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import fewchips
    from fewchips.inference.tokenizer import Tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = fewchips.from_pretrained(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                     device=device)
    tok = Tokenizer.from_dir(args.model)
    prompts = prompts_from_stdlib(tok, args.prompts, args.prompt_len)
    res = {"model": args.model, "device": device, "prompts": args.prompts, "prompt_len": args.prompt_len,
           "new_tokens": args.new, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for mode, temp in (("greedy", 0.0), ("sampled", args.temperature)):
        t_plain = t_mtp = 0.0
        drafted = accepted = tokens = forwards = 0
        same = 0
        for i, pr in enumerate(prompts):
            kw = dict(max_new_tokens=args.new, temperature=temp, seed=i, stop_token_ids=[])
            t0 = time.perf_counter()
            plain = fewchips.generate(model, [pr], **kw)[0]
            t_plain += time.perf_counter() - t0
            st = {}
            t0 = time.perf_counter()
            spec = fewchips.generate(model, [pr], use_mtp=True, stats=st, **kw)[0]
            t_mtp += time.perf_counter() - t0
            drafted, accepted = drafted + st["drafted"], accepted + st["accepted"]
            tokens, forwards = tokens + st["tokens"], forwards + st["forwards"]
            same += plain == spec
        res[mode] = {"acceptance_rate": accepted / max(drafted, 1), "tokens_per_forward": tokens / max(forwards, 1),
                     "plain_tok_s": args.prompts * args.new / t_plain, "mtp_tok_s": args.prompts * args.new / t_mtp,
                     "speedup": t_plain / t_mtp, "identical_outputs": f"{same}/{len(prompts)}"}
        print(mode, json.dumps(res[mode]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
