"""`fewchips serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import os

from .models import (add_ep_flag, add_model_flags, int_at_least, load_model_and_tokenizer, ranked,
                     refuse_replica_flags, wants_mtp)


def register(sub):
    p = sub.add_parser("serve", help="serve a saved model over an OpenAI-compatible HTTP API")
    add_model_flags(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network")
    g.add_argument("--port", type=int_at_least(1, 65535), default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    g.add_argument("--model-name", default=None, help="the id clients send as `model` (default: directory name)")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) "
                        "from the model's generation_config.json (auto), another folder's, or none (vllm: "
                        "OpenAI's); a request's own values win")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template (a file, or the template itself) in place of the model's")
    g.add_argument("--reasoning-parser", default="auto", choices=["auto", "deepseek_r1", "none"],
                   help="split chat replies at </think> into message.reasoning_content and content (vLLM's "
                        "deepseek_r1); auto: on when the chat template opens <think> (R1's does)")
    g.add_argument("--tool-call-parser", default="auto", choices=["auto", "deepseek_v3", "none"],
                   help="read DeepSeek-V3's tool calls from chat replies into message.tool_calls (vLLM's "
                        "deepseek_v3); auto: on when the chat template writes tool calls and the tokenizer holds "
                        "their tokens")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's switch for tool_choice auto: on whenever the tool-call parser is; given without "
                        "one, refused")
    g.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="CORS: origins browsers may call from, comma-separated or a JSON list "
                        "(e.g. http://localhost:3000; '*' for any); default: none")
    e = p.add_argument_group("engine")
    e.add_argument("--max-batch", type=int_at_least(1), default=16, help="requests running together (holding cache)")
    e.add_argument("--max-len", type=int, default=None,
                   help="prompt + completion tokens per request (default: max_position_embeddings, at most 4096)")
    e.add_argument("--cache-gb", type=float, default=None,
                   help="latent-cache pool size (default: --max-batch requests of --max-len tokens); requests "
                        "take blocks as they grow, the newest is preempted if they run out")
    e.add_argument("--block-size", type=int_at_least(1), default=16, help="tokens per cache block")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse cached blocks of earlier requests' prompts")
    e.add_argument("--speculative", default="auto", choices=["auto", "mtp", "none"],
                   help="MTP speculative decoding (same output; acceptance in usage.completion_tokens_details); "
                        "auto: on for models with an MTP module on a GPU (or with --max-batch 1), off for a CPU "
                        "server, where it does not pay at batch > 1")
    add_ep_flag(e, "serve")
    e.add_argument("--max-prefill-tokens", type=int_at_least(1), default=512,
                   help="prompt tokens computed per step; longer prompts are prefilled in chunks beside "
                        "the running decodes")
    from fewchips.inference.server_limits import ServerLimits
    d = ServerLimits()
    lim = p.add_argument_group("limits (what one client may ask for)")
    lim.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                     help="request bodies above this are refused (413) before they are read")
    lim.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts in one /v1/completions request")
    lim.add_argument("--max-n", type=int, default=d.max_n, help="choices (n) per prompt")
    lim.add_argument("--max-waiting", type=int, default=d.max_waiting,
                     help="generations queued for a slot; beyond it requests get 429 with Retry-After")
    lim.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                     help="on SIGTERM/Ctrl-C, seconds in-flight requests get to finish before they are cancelled")
    p.set_defaults(func=run)


def run(args):
    import torch

    from fewchips.inference.engine import speculation_for
    from fewchips.inference.server import listen

    if ranked(args):
        return run_ranked(args)
    if refuse_replica_flags(args):
        raise ValueError(refuse_replica_flags(args))
    sock = listen(args.host, args.port)            # a bad address or a port in use: said before the model loads
    options = http_options(args)                   # a bad template or config: said before the model loads
    model, tok = load_model_and_tokenizer(args, mtp=wants_mtp(args, torch, args.max_batch))
    spec = speculation_for(model, args.speculative, args.max_batch)
    engine = make_engine(args, model, tok, spec)
    print(banner(args, engine, spec))
    serve_http(args, engine, tok, sock, options)
    return 0


def http_options(args) -> dict:
    """What the HTTP side takes from the flags: sampling defaults, the chat template, CORS origins."""
    import json

    from fewchips.inference.generation_config import generation_defaults
    from fewchips.inference.tokenizer import ChatTemplate

    template = None
    if args.chat_template:
        if os.path.isfile(args.chat_template):
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        elif "{{" in args.chat_template or "{%" in args.chat_template:
            template = args.chat_template
        else:
            raise FileNotFoundError(f"--chat-template {args.chat_template}: no such file (nor a Jinja template)")
        try:
            ChatTemplate(template)
        except Exception as e:                     # jinja2's TemplateSyntaxError and kin
            raise ValueError(f"--chat-template: not a valid Jinja template ({e})") from None
    origins = None
    if args.allowed_origins:
        text = args.allowed_origins.strip()
        try:
            origins = json.loads(text) if text.startswith("[") else [o.strip() for o in text.split(",") if o.strip()]
        except ValueError as e:
            raise ValueError(f"--allowed-origins: not a JSON list ({e})") from None
    defaults = generation_defaults(args.model, args.generation_config)
    return {"defaults": defaults, "chat_template": template, "allowed_origins": origins}


def make_engine(args, model, tok, spec):
    from fewchips.inference.engine import Engine
    from fewchips.inference.metrics import EngineMetrics

    cap = None if args.cache_gb is None else int(args.cache_gb * 2**30)
    max_len = args.max_len or min(model.config.max_position_embeddings, 4096)
    return Engine(model, tok, max_batch=args.max_batch, max_len=max_len, max_cache_bytes=cap,
                  block_size=args.block_size, prefix_caching=not args.no_prefix_cache,
                  max_prefill_tokens=args.max_prefill_tokens, metrics=EngineMetrics(model_name(args)), speculative=spec)


def model_name(args) -> str:
    return args.model_name or os.path.basename(os.path.normpath(args.model))


def banner(args, engine, spec) -> str:
    import torch

    from fewchips.inference.ranks import held_bytes
    pool = engine.pool
    fp8 = any(b.dtype == torch.float8_e4m3fn for b in engine.model.buffers())
    return (f"serving {model_name(args)!r} on http://{args.host}:{args.port}/v1 "
            f"(weights {held_bytes(engine.model) / 2**20:,.1f} MiB{', FP8 E4M3' if fp8 else ''}; "
            f"cache {engine.cache_bytes / 2**20:.1f} MiB: "
            f"{pool.n_usable} blocks of {engine.block_size} tokens; up to {engine.max_batch} requests of at most "
            f"{engine.max_len} tokens; prefix cache {'on' if pool.prefix_caching else 'off'}; MTP speculation "
            f"{'on' if spec else 'off'}; metrics at /metrics)")


def serve_http(args, engine, tok, sock=None, options=None):
    from fewchips.inference.server import serve
    from fewchips.inference.server_limits import ServerLimits

    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_prompts=args.max_prompts, max_n=args.max_n,
                          max_waiting=args.max_waiting, shutdown_timeout=args.shutdown_timeout)
    from fewchips.inference.reasoning import opens_thinking
    from fewchips.inference.tool_calls import marker_ids, renders_tool_calls

    options = options or {}
    if options.get("chat_template"):
        tok.set_chat_template(options["chat_template"])
    reasoning = args.reasoning_parser == "deepseek_r1" or (args.reasoning_parser == "auto"
                                                           and opens_thinking(tok.chat_template))
    if reasoning:
        print("reasoning parser deepseek_r1: chat replies split at </think> into reasoning_content and content",
              flush=True)
    tools = args.tool_call_parser == "deepseek_v3" or (args.tool_call_parser == "auto" and marker_ids(tok)
                                                        and renders_tool_calls(tok.chat_template))
    if args.enable_auto_tool_choice and not tools:
        raise ValueError("--enable-auto-tool-choice needs the tool-call parser: --tool-call-parser deepseek_v3 (and "
                         "a chat template that writes tool calls)")
    if tools:
        print("tool-call parser deepseek_v3: tools accepted on /v1/chat/completions, calls returned in "
              "message.tool_calls", flush=True)
    if options.get("defaults"):
        print("sampling defaults from generation_config.json: "
              + ", ".join(f"{k} {v}" for k, v in options["defaults"].items()), flush=True)
    serve(engine, tok, model_name(args), host=args.host, port=args.port, api_key=args.api_key, limits=limits,
          sock=sock, defaults=options.get("defaults"), allowed_origins=options.get("allowed_origins"),
          reasoning=reasoning, tool_parser=bool(tools))


def run_ranked(args) -> int:
    """torchrun --nproc_per_node=N -m fewchips serve --ep N: rank 0 serves, every rank runs each step's
    forward with 1/N of the routed experts (`fewchips.inference.ranks`)."""
    import signal

    import torch

    from fewchips.inference.engine import speculation_for
    from fewchips.inference.server import listen
    from fewchips.inference.tokenizer import Tokenizer

    from .models import open_ranks

    opened, code = open_ranks(args, "serve", mtp=wants_mtp(args, torch, args.max_batch))
    if opened is None:
        return code
    model, ranks = opened
    spec = speculation_for(model, args.speculative, args.max_batch)
    if not ranks.is_main:
        ranks.follow(model, make_engine(args, model, None, spec).cache)   # rank 0's cache, the same blocks
        ranks.close()
        return 0
    for sig in (signal.SIGTERM, signal.SIGINT):   # uvicorn re-raises the signal it drained on: not before the
        signal.signal(sig, lambda *_: None)        # other ranks are told to stop (uvicorn's own handler drains)
    try:                                           # a port in use: the other ranks are told to stop, then one line
        sock = listen(args.host, args.port)
        options = http_options(args)
        tok = Tokenizer.from_dir(args.model)
        engine = make_engine(args, ranks.lockstep(model), tok, spec)
        print(banner(args, engine, spec).replace("serving", f"serving over {ranks.par.ep} ranks (expert parallel),",
                                                 1), flush=True)
        serve_http(args, engine, tok, sock, options)
    finally:
        ranks.close()
    return 0
