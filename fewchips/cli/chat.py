"""`fewchips chat`: an interactive conversation in the terminal, streamed token by token."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import sys

from .models import add_ep_flag, add_model_flags, add_sampling_flags, open_model, wants_mtp


def register(sub):
    p = sub.add_parser("chat", help="talk to a saved model in the terminal (uses its chat template)")
    add_model_flags(p)
    add_sampling_flags(p, max_new_tokens=512, temperature=0.7)
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; ~1 min before the first reply): faster replies")
    p.add_argument("--speculative", default="auto", choices=["auto", "mtp", "none"],
                   help="MTP speculative decoding (same replies); auto: on for models with an MTP module, unless "
                        "--compile (1.14x tokens/s at batch 1 on CPU for the demo model)")
    add_ep_flag(p, "chat")
    p.set_defaults(func=run)


def run(args, stdin=None, stdout=None):
    """The conversation loop; under torchrun with --ep N rank 0 reads the terminal and every rank runs
    the engine's steps with its share of the experts."""
    import torch

    from fewchips.inference.engine import Engine, speculation_for

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.compile and args.speculative == "mtp":
        raise SystemExit("fewchips chat: --compile and --speculative mtp cannot be combined (the compiled step "
                         "decodes one token); pass one of them")
    mtp = not args.compile and wants_mtp(args, torch)
    opened = open_model(args, "chat", mtp=mtp)
    if isinstance(opened, int):
        return opened
    model, tok, ranks = opened
    spec = None if args.compile else speculation_for(model, args.speculative)
    engine_kw = dict(max_batch=1, max_len=min(model.config.max_position_embeddings, 8192), compile=args.compile,
                     speculative=spec)
    if ranks is not None and not ranks.is_main:
        ranks.follow(model, Engine(model, None, **engine_kw).cache)      # rank 0's cache, the same blocks
        ranks.close()
        return 0
    engine = Engine(model if ranks is None else ranks.lockstep(model), tok, **engine_kw)
    try:
        return _converse(args, engine, tok, stdin, stdout, stop_on_ctrl_c=ranks is None)
    finally:
        if ranks is not None:
            ranks.close()


def _converse(args, engine, tok, stdin, stdout, stop_on_ctrl_c: bool = True) -> int:
    """As a shell does: an empty line asks again, Ctrl-D (or /exit) quits, Ctrl-C stops the reply being
    written and keeps what it said (over ranks Ctrl-C ends the session: the ranks' step is collective)."""
    from fewchips.inference.engine import Request
    from fewchips.inference.sampling import SamplingParams
    from fewchips.inference.tokenizer import TextStream

    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    print("fewchips chat: /exit or Ctrl-D quits, /reset starts over, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        stdout.write("> ")
        stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok.apply_chat_template(messages)
        budget = min(args.max_new_tokens, engine.max_len - len(ids))
        if budget <= 0:
            print("the conversation fills the context; /reset to start over", file=sys.stderr)
            messages.pop()
            continue
        stream = TextStream(tok, [])

        def show(req, kind, payload):
            if kind == "tokens":
                stdout.write(stream.push(payload))
                stdout.flush()

        stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
        req = Request(ids, SamplingParams(max_tokens=budget, temperature=args.temperature, top_p=args.top_p,
                                          top_k=args.top_k, seed=args.seed, stop_token_ids=stops), on_event=show)
        try:
            engine.run([req])
            end = "\n"
        except KeyboardInterrupt:
            if not stop_on_ctrl_c:
                raise
            engine.abort(req)                  # the next step finishes it and frees its blocks
            while req.finish_reason is None:
                engine.step()
            end = " [stopped]\n"
        stdout.write(stream.flush() + end)
        messages.append({"role": "assistant", "content": stream.text})
