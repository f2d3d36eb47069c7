"""What the commands that load a saved model share (generate, chat, serve, eval, sample): the model
flags, loading the model and its tokenizer onto the device, and the sampling flags."""

from __future__ import annotations

import os
import sys


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
    dtype = model_dtype(args, device)
    tokenizer = Tokenizer.from_dir(args.model)
    model = from_pretrained(args.model, dtype=dtype, device=device, mtp=None if mtp else False)
    return model, tokenizer


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
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="0 is greedy; 0.2-0.7 for coherent text, 1.0 samples the model's own distribution")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off); try 0.95")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def add_ep_flag(p, command: str):
    p.add_argument("--ep", type=int, default=None,
                   help=f"split the routed experts over N ranks: launch with torchrun --nproc_per_node=N -m fewchips "
                        f"{command} --ep N (rank 0 does the work; every rank holds 1/N of the experts and a copy of the rest)")


def ranked(args) -> bool:
    """Whether this command runs over ranks (a torchrun launch, or --ep > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (args.ep or 1) > 1


def open_ranks(args, command: str, mtp: bool):
    """Under torchrun with --ep N: this rank's model (its experts only) and the `Ranks` that run the
    engine's steps in lockstep; or an exit code after one line saying what is wrong."""
    import torch

    from fewchips.inference.ranks import Ranks, held_bytes, load_for_ranks
    from fewchips.parallel import init_parallel

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    ep = args.ep or world

    def refuse(msg):
        if rank == 0:
            print(f"fewchips {command}: error: {msg}", file=sys.stderr)
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
    try:
        model = load_for_ranks(args.model, par, model_dtype(args, str(par.device)), mtp=None if mtp else False)
    except ValueError as e:               # a config the experts cannot split over, a damaged checkpoint
        return refuse(str(e))
    n = model.config.n_routed_experts // ep
    print(f"rank {rank}: {held_bytes(model) / 2**20:,.1f} MiB of weights (experts {rank * n}-{(rank + 1) * n - 1} "
          f"of {model.config.n_routed_experts} per MoE layer, the rest whole), {par.device}", file=sys.stderr, flush=True)
    return (model, Ranks(par)), 0
