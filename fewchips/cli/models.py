"""What the commands that load a saved model share (generate, chat, serve, eval, sample): the model
flags, loading the model and its tokenizer onto the device, and the sampling flags."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import argparse
import os
import sys

from .errors import say_error


def int_at_least(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]; otherwise argparse's one line naming the flag."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, "
                                             f"got {v}")
        return v
    return parse


def add_model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a model directory: config.json, safetensors, tokenizer.json")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and cache dtype (auto: bfloat16 on GPU, float32 on CPU, where bf16 is slow)")
    g.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads (default: torch's choice); tiny models decode fastest on 1")
    g.add_argument("--weights", default="auto", choices=["auto", "fp8", "dense"],
                   help="fp8: keep the linear layers' and experts' weights in E4M3 with 128x128 scales (1 byte "
                        "each; a BF16 checkpoint is block-quantised on load); dense: in --dtype; auto: fp8 for "
                        "checkpoints in the released FP8 layout")


def load_model_and_tokenizer(args, mtp: bool = False):
    import torch

    from fewchips.inference.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.from_dir(args.model)
    return load_model(args, device, mtp), tokenizer


def load_model(args, device: str, mtp: bool = False):
    """The model of --model on `device` in --dtype, its recipe weights in FP8 storage when --weights says so."""
    from fewchips.checkpoint import from_pretrained
    from fewchips.config import ModelConfig
    from fewchips.checkpoint.fp8 import load_fp8, stores_fp8

    dtype = model_dtype(args, device)
    if stores_fp8(args.weights, ModelConfig.from_json(args.model)):
        return load_fp8(args.model, dtype=dtype, device=device, fp8_gemm=str(device).startswith("cuda"),
                        mtp=None if mtp else False)
    return from_pretrained(args.model, dtype=dtype, device=device, mtp=None if mtp else False)


def model_dtype(args, device: str):
    """--dtype, where auto is bf16 on a GPU and fp32 on a CPU (where bf16 is slow)."""
    import torch
    if args.dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, args.dtype)


def wants_mtp(args, torch, max_batch: int = 1) -> bool:
    """Whether --speculative asks for the MTP module's weights (auto: on a GPU, or decoding one request)."""
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    return args.speculative == "mtp" or (args.speculative == "auto" and (gpu or max_batch == 1))


def add_sampling_flags(p, max_new_tokens: int, temperature: float):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=max_new_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="0 is greedy; 0.2-0.7 for coherent text, 1.0 samples the model's own distribution")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off); try 0.95")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def add_ep_flag(p, command: str):
    p.add_argument("--ep", type=int, default=None,
                   help=f"split the routed experts over N ranks: launch with torchrun --nproc_per_node=N -m fewchips "
                        f"{command} --ep N (rank 0 does the work; every rank holds 1/N of the experts "
                        "and a copy of the rest)")
    p.add_argument("--redundant-experts", type=int, default=0, metavar="R",
                   help="with --ep N: R extra copies of the hottest experts (R/N per rank), placed from measured "
                        "loads (--expert-loads) so the ranks' loads even out; tokens of a copied expert split between "
                        "its copies")
    p.add_argument("--expert-loads", default=None, metavar="FILE",
                   help="the expert loads replicas are placed from (default: MODEL/expert_loads.json, which "
                        "fewchips train writes, when present)")
    p.add_argument("--rebalance-every", type=int, default=0, metavar="STEPS",
                   help="re-place the replicas from the loads of the last STEPS forward steps, while serving "
                        "(0: never)")


def expert_loads(args) -> dict | None:
    """--expert-loads, or MODEL/expert_loads.json when present: {layer's experts on disk: [E] loads}."""
    import json
    path = args.expert_loads or os.path.join(args.model, "expert_loads.json")
    if not os.path.exists(path):
        if args.expert_loads:
            raise ValueError(f"--expert-loads {path}: no such file")
        return None
    try:
        with open(path) as f:
            return json.load(f)["layers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--expert-loads {path}: not an expert-loads file ({e}); it holds "
                         f"{{\"layers\": {{\"model.layers.N.mlp.experts\": [loads]}}}}") from None


def refuse_replica_flags(args) -> str | None:
    """What is wrong with the replica flags of a command that runs in one process (None: nothing)."""
    given = [f for f, v in (("--redundant-experts", args.redundant_experts), ("--expert-loads", args.expert_loads),
                            ("--rebalance-every", args.rebalance_every)) if v]
    if given:
        return (f"{', '.join(given)} place expert replicas over the ranks of --ep N (under torchrun); "
                "one process has none")
    return None


def ranked(args) -> bool:
    """Whether this command runs over ranks (a torchrun launch, or --ep > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (args.ep or 1) > 1


def open_ranks(args, command: str, mtp: bool):
    """Under torchrun with --ep N: this rank's model (its experts only) and the `Ranks` that run the
    engine's steps in lockstep; or an exit code after one line saying what is wrong."""
    import torch

    from fewchips.inference.ranks import Ranks, load_for_ranks
    from fewchips.parallel import init_parallel

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    ep = args.ep or world

    def refuse(msg):
        say_error(command, msg, show=rank == 0)
        return None, 2
    if world == 1:
        return refuse(f"--ep {ep} splits the experts over {ep} processes: start them with torchrun "
                      f"--nproc_per_node={ep} -m fewchips {command} --ep {ep} ...")
    if ep != world:
        return refuse(f"--ep {ep} must equal the {world} processes torchrun started (the routed experts are split "
                      f"over every rank; data-parallel replicas are not built)")
    if args.device not in ("auto", "cpu", "cuda"):
        return refuse(f"--device {args.device}: under torchrun each rank takes its own device (cuda:LOCAL_RANK), "
                      f"or cpu")
    if getattr(args, "compile", False):
        return refuse("--compile with --ep: the compiled decode step would trace the other ranks' calls; drop one")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        par = init_parallel(ep=ep, backend="gloo" if args.device == "cpu" else None)
    except ValueError as e:
        return refuse(str(e))
    if (args.expert_loads or args.rebalance_every) and not args.redundant_experts:
        return refuse(f"{'--expert-loads' if args.expert_loads else '--rebalance-every'} places expert replicas: "
                      f"add --redundant-experts R")
    try:
        loads = expert_loads(args) if args.redundant_experts else None
        model = load_for_ranks(args.model, par, model_dtype(args, str(par.device)), mtp=None if mtp else False,
                               weights=args.weights, redundant=args.redundant_experts,
                               rebalance_every=args.rebalance_every, loads=loads)
    except ValueError as e:               # a config the experts cannot split over, a damaged checkpoint
        return refuse(str(e))
    # one write: ranks share the pipe
    sys.stderr.write(f"rank {rank}: {describe_holdings(model, rank)}, {par.device}\n")
    sys.stderr.flush()
    return (model, Ranks(par)), 0


def open_model(args, command: str, mtp: bool):
    """(model, tokenizer, Ranks or None) for a command that runs in one process or, under torchrun with
    --ep N, over ranks (rank 0 does the work; the others get their experts and follow); or an exit code
    after one line saying what is wrong."""
    if ranked(args):
        from fewchips.inference.tokenizer import Tokenizer
        opened, code = open_ranks(args, command, mtp=mtp)
        if opened is None:
            return code
        model, ranks = opened
        return model, Tokenizer.from_dir(args.model), ranks
    if refuse_replica_flags(args):
        raise ValueError(refuse_replica_flags(args))
    return (*load_model_and_tokenizer(args, mtp=mtp), None)


def describe_holdings(model, rank: int) -> str:
    """What this rank holds of the model, in the server's start-up words (the planner says the same)."""
    from fewchips.inference.experts import ServingExperts
    from fewchips.inference.ranks import held_bytes
    layers = [m for m in model.modules() if isinstance(m, ServingExperts)]
    m = layers[0]
    first = rank * m.own
    replicas = m.n_local - m.own
    kind = "FP8 E4M3 linears and experts" if m.fp8 else str(m.down.dtype).replace("torch.", "")
    extra = m.placement.slots_PS[rank, m.own:].tolist()
    copies = f" + replicas of {', '.join(map(str, extra))} (first MoE layer)" if replicas else ""
    return (f"{held_bytes(model) / 2**20:,.1f} MiB of weights ({kind}; experts {first}-{first + m.own - 1} of "
            f"{m.n_experts} per MoE layer{copies}, the rest whole)")
