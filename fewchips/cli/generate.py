"""`fewchips generate`: complete one prompt with a saved model (optionally MTP-speculative)."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import sys
import time

from .models import add_ep_flag, add_model_flags, add_sampling_flags, open_model


def register(sub):
    p = sub.add_parser("generate", help="complete a prompt with a saved model")
    add_model_flags(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    add_sampling_flags(p, max_new_tokens=64, temperature=0.0)
    p.add_argument("--mtp", action="store_true",
                   help="speculative decoding with the model's MTP module as drafter: same output, fewer "
                        "forwards; prints the acceptance rate and tokens per forward")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; up to ~1 min, once): faster single-prompt "
                        "decoding, same tokens up to float rounding")
    add_ep_flag(p, "generate")
    p.set_defaults(func=run)


def run(args):
    """One prompt through the serving engine (the same path as chat, serve and GRPO's rollouts); under
    torchrun with --ep N, rank 0 generates and every rank runs the steps with its share of the experts."""
    from fewchips.inference.engine import Engine
    from fewchips.inference.sampling import SamplingParams

    if args.mtp and args.compile:
        raise ValueError("--mtp and --compile cannot be combined (the compiled step decodes one token); pass one")
    opened = open_model(args, "generate", mtp=args.mtp)
    if isinstance(opened, int):
        return opened
    model, tok, ranks = opened
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_token_ids=stops)
    engine_kw = dict(max_batch=1, max_len=len(ids) + args.max_new_tokens + 1, compile=args.compile,
                     speculative="mtp" if args.mtp else None)
    if ranks is not None and not ranks.is_main:
        ranks.follow(model, Engine(model, None, **engine_kw).cache)      # rank 0's cache, the same blocks
        ranks.close()
        return 0
    try:
        return _generate(args, Engine(model if ranks is None else ranks.lockstep(model), tok, **engine_kw),
                         ids, params, tok)
    finally:
        if ranks is not None:
            ranks.close()


def _generate(args, engine, ids, params, tok) -> int:
    from fewchips.inference.engine import Request
    t0 = time.perf_counter()
    req = Request(ids, params)
    engine.add(req)
    engine.step()                          # the prefill and the first token
    if args.compile and req.finish_reason is None:
        engine.step()                      # the first decode step compiles
    t_first = time.perf_counter()
    while req.finish_reason is None:
        engine.step()
    dt = time.perf_counter() - t0
    new = req.output_ids
    text = args.prompt + tok.decode(new) if not args.chat else tok.decode(new)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()                  # the text ends before the stats line starts, on a terminal or a pipe
    line = f"{len(new)} tokens in {dt:.2f}s ({len(new) / max(dt, 1e-9):.1f} tok/s)"
    if args.compile and len(new) > 2:   # the first decode step compiles: report the rate after it
        line = (f"{len(new)} tokens in {dt:.2f}s, of which {t_first - t0:.1f}s the prefill and compiling the decode "
                f"step (then about {(len(new) - 2) / max(dt - (t_first - t0), 1e-9):.1f} tok/s)")
    if args.mtp:
        decode_steps = max(engine.steps - 1, 1)
        line += (f"; MTP acceptance {req.accepted / max(req.drafted, 1):.1%}, "
                 f"{(len(new) - 1) / decode_steps:.2f} tokens per forward")
    print(line, file=sys.stderr)
    return 0
