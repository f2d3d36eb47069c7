"""`fewchips generate`: complete one prompt with a saved model (optionally MTP-speculative)."""

from __future__ import annotations

import sys
import time


def add_model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a model directory: config.json, safetensors, tokenizer.json")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and cache dtype (auto: bfloat16 on GPU, float32 on CPU, where bf16 is slow)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); tiny models decode fastest on 1")


def load_model_and_tokenizer(args, mtp: bool = False):
    import torch

    from fewchips.checkpoint import from_pretrained
    from fewchips.inference.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    tokenizer = Tokenizer.from_dir(args.model)
    model = from_pretrained(args.model, dtype=dtype, device=device, mtp=None if mtp else False)
    return model, tokenizer


def wants_mtp(args, torch, max_batch: int = 1) -> bool:
    """Whether --speculative asks for the MTP module's weights (auto: on a GPU, or decoding one request)."""
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    return args.speculative == "mtp" or (args.speculative == "auto" and (gpu or max_batch == 1))


def add_sampling_flags(p, max_new_tokens: int, temperature: float):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="0 is greedy; 0.2-0.7 for coherent text, 1.0 samples the model's own distribution")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off); try 0.95")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


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
    p.set_defaults(func=run)


def run(args):
    """One prompt through the serving engine (the same path as chat, serve and GRPO's rollouts)."""
    from fewchips.inference.engine import Engine, Request
    from fewchips.inference.sampling import SamplingParams

    if args.mtp and args.compile:
        raise ValueError("--mtp and --compile cannot be combined (the compiled step decodes one token); pass one")
    model, tok = load_model_and_tokenizer(args, mtp=args.mtp)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_token_ids=stops)
    engine = Engine(model, tok, max_batch=1, max_len=len(ids) + args.max_new_tokens + 1, compile=args.compile,
                    speculative="mtp" if args.mtp else None)
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
