"""What the commands that load a saved model share (generate, chat, serve, eval, sample): the model
flags, loading the model and its tokenizer onto the device, and the sampling flags."""

from __future__ import annotations


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
