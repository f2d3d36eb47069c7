"""`fewchips info`: parameter counts and KV-cache bytes for a preset, config file or checkpoint."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("info", help="parameter counts and KV-cache size of a preset or checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="tiny, small, v2-lite or v3 (default: tiny)")
    src.add_argument("--model", default=None, help="a Hugging Face-format directory or a config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def load_config(preset: str | None, model: str | None):
    from fewchips.config import ModelConfig
    if model:
        return ModelConfig.from_json(model)
    return ModelConfig.from_preset(preset or "tiny")


def run(args):
    import torch

    from fewchips.model import DeepseekV3
    from fewchips.plan.estimate import human as _h

    cfg = load_config(args.preset, args.model)
    with torch.device("meta"):           # counts come from the real module tree, allocating nothing
        counts = DeepseekV3(cfg).num_parameters()
    kv = cfg.kv_cache_elements_per_token
    info = {**counts, "kv_cache_elements_per_token": kv,
            "kv_cache_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
            "kv_cache_bytes_per_token_with_mtp_bf16": cfg.kv_cache_bytes_per_token(2, mtp=True)}
    if args.json:
        print(json.dumps(info))
        return 0
    name = args.model or args.preset or "tiny"
    print(f"{name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}), {cfg.num_nextn_predict_layers} MTP")
    print(f"  total parameters      {_h(counts['total'])}  (main model, MTP not included)")
    print(f"  activated per token   {_h(counts['active'])}  "
          f"(embedding {_h(counts['embedding'])}, head {_h(counts['head'])} included)")
    print(f"  MTP parameters        {_h(counts['mtp'])}  "
          f"({_h(counts['mtp_active'])} activated; embedding and head shared)")
    print(f"  KV cache per token    {kv} elements = {_bytes(cfg.kv_cache_bytes_per_token(2))} in bf16 "
          f"({cfg.kv_lora_rank}+{cfg.qk_rope_head_dim} per layer)")
    return 0


def _bytes(n):
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"
