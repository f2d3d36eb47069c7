"""`fewchips.generate`: prefill the prompts into a latent cache, then decode one token per step.

With `use_mtp=True` the prompts run through the serving engine (`engine.Engine`, MTP speculation), the
one decoding loop of the package. Plain decoding here (`plain_generate`, a contiguous cache) is the
engine's declared reference twin, as `ops.py` keeps plain twins: the engine's tests hold it to this.

Prompts of different lengths are right-padded for the prefill. No attention mask is needed: attention
is causal by absolute position, so a real token never sees the padding after it, and a row's padding
entries in the cache sit beyond its position until its own decoded tokens overwrite them. Rows that
stop leave the batch (the remaining rows keep their cache slots); with compile=True they keep stepping
instead, their outputs unused, so the compiled batch keeps its shape.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..model import LatentCache
from .engine import Engine, Request
from .sampling import MAX_TOKENS, SamplingParams, sample
from .steps import compiled_decode_step, pad_rows, prefill, stop_reason


def as_rows(input_ids) -> tuple[list[list[int]], bool]:
    """Token ids as a list of rows, and whether they came as a tensor."""
    if isinstance(input_ids, torch.Tensor):
        t = input_ids if input_ids.dim() == 2 else input_ids[None]
        return t.tolist(), True
    if input_ids and isinstance(input_ids[0], int):
        return [list(input_ids)], False
    return [list(r) for r in input_ids], False


def finish(rows, gens, as_tensor, pad_id, device):
    """Prompt + new ids per row; a tensor (padded with `pad_id` after early stops) if the input was one."""
    out = [r + g for r, g in zip(rows, gens)]
    if not as_tensor:
        return out
    return pad_rows(out, pad_id, device)


def row_params(B, max_new_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, eos) -> list[SamplingParams]:
    if stop_token_ids is None:
        stop_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=None if seed is None else seed + i, stop=list(stop or []),
                           stop_token_ids=list(stop_token_ids)) for i in range(B)]


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop_token_ids: list[int] | None = None,
             stop: list[str] | None = None, tokenizer=None, use_mtp: bool = False, stats: dict | None = None,
             compile: bool = False, *, params: SamplingParams | None = None, max_tokens: int | None = None):
    """Prompt + up to `max_new_tokens` (or `max_tokens`, the same setting; default `sampling.MAX_TOKENS`)
    new ids per prompt.

    input_ids: [T] or [B, T] (returns [B, T + n], early-stopped rows padded with the first stop token),
    or a list of token lists (returns lists). Greedy at temperature 0; row i samples with seed + i.
    A row stops at a `stop_token_ids` token (default: eos; kept) or a `stop` string (needs `tokenizer`).
    `params`: the same settings as one SamplingParams (the engine's form). use_mtp: MTP speculative
    decoding; compile: each decode step as one compiled graph; `stats` receives their figures."""
    cfg = model.config
    rows, as_tensor = as_rows(input_ids)
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    if max_tokens is not None and max_new_tokens not in (None, max_tokens):
        raise ValueError(f"max_tokens={max_tokens} and max_new_tokens={max_new_tokens} are one setting: give one")
    max_new_tokens = max_tokens if max_tokens is not None else max_new_tokens
    if params is not None:                 # every sampling setting comes from params: one given beside it is refused
        given = [name for name, value, default in (
            ("max_new_tokens", max_new_tokens, None), ("temperature", temperature, 0.0), ("top_p", top_p, 1.0),
            ("top_k", top_k, 0), ("seed", seed, None), ("stop_token_ids", stop_token_ids, None), ("stop", stop, None))
            if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} given beside params=SamplingParams(...): set it there")
        rows_params = [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)
                       for i in range(len(rows))]
    else:
        rows_params = row_params(len(rows), MAX_TOKENS if max_new_tokens is None else max_new_tokens, temperature,
                                 top_p, top_k, seed, stop, stop_token_ids, cfg.eos_token_id)
    n_new = rows_params[0].max_tokens
    if rows_params[0].stop and tokenizer is None:
        raise ValueError("stop strings need tokenizer= to read the generated text")
    if compile and use_mtp:
        raise ValueError("compile=True and use_mtp=True (--compile, --mtp) cannot be combined: "
                         "only plain decoding is compiled")
    pad_id = rows_params[0].stop_token_ids[0] if rows_params[0].stop_token_ids else 0
    device = next(model.parameters()).device
    if max(len(r) for r in rows) + n_new + 1 > cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens exceeds max_position_embeddings={cfg.max_position_embeddings}")
    if n_new == 0:
        return finish(rows, [[] for _ in rows], as_tensor, pad_id, device)
    if use_mtp:
        gens = engine_generate(model, rows, rows_params, tokenizer, stats)
    else:
        gens = plain_generate(model, rows, rows_params, tokenizer, compile, stats)
    return finish(rows, gens, as_tensor, pad_id, device)


def engine_generate(model, rows, params, tokenizer=None, stats: dict | None = None) -> list[list[int]]:
    """The rows as engine requests with MTP speculation, admitted together (max_batch and the prefill
    budget hold them all). `stats`: drafts and acceptance; `forwards`, the main-model forwards;
    `tokens_per_forward`, tokens per row-forward (each row's prefill chunks and decode steps)."""
    cfg = model.config
    if cfg.num_nextn_predict_layers < 1 or len(getattr(model, "mtp", [])) < 1:
        raise ValueError("use_mtp needs a model with an MTP module (num_nextn_predict_layers >= 1 and its weights)")
    engine = Engine(model, tokenizer, max_batch=len(rows), max_len=max(map(len, rows)) + params[0].max_tokens + 1,
                    max_prefill_tokens=sum(map(len, rows)), speculative="mtp")
    reqs = engine.run([Request(r, p) for r, p in zip(rows, params)])
    if stats is not None:
        n_tokens, drafted = sum(len(r.output_ids) for r in reqs), sum(r.drafted for r in reqs)
        accepted = sum(r.accepted for r in reqs)
        stats.update(drafted=drafted, accepted=accepted, forwards=engine.forwards, tokens=n_tokens,
                     acceptance_rate=accepted / max(drafted, 1),
                     tokens_per_forward=n_tokens / sum(r.forwards for r in reqs))
    return [r.output_ids for r in reqs]


def plain_generate(model, rows, params, tokenizer=None, compile: bool = False,
                   stats: dict | None = None) -> list[list[int]]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(rows)
    lens = torch.tensor([len(r) for r in rows], device=device)
    cache = LatentCache(model.config, B, int(lens.max()) + params[0].max_tokens, dtype=dtype, device=device)
    gens_gen = [p.generator(device) for p in params]
    _, last_BV = prefill(model, rows, cache)                      # eager, expanded attention
    gens: list[list[int]] = [[] for _ in rows]
    active = list(range(B))
    pos_B = lens.clone()
    if compile:
        t_compile = time.perf_counter()            # importing torch._dynamo is part of the cost
        step = compiled_decode_step()
        tok_all_B = torch.zeros(B, dtype=torch.long, device=device)
        attend_len = int(lens.max()) + 1                  # all rows advance together: a host-side count
    while True:
        tok_B = sample(last_BV, [params[i] for i in active], [gens_gen[i] for i in active])
        keep = []
        for j, (i, t) in enumerate(zip(active, tok_B.tolist())):
            gens[i].append(t)
            if stop_reason(gens[i], params[i], tokenizer) is None:
                keep.append(j)
        if not keep:
            return gens
        sel = torch.tensor(active, device=device)
        if compile:             # finished rows keep stepping (outputs unused): the batch shape never changes
            tok_all_B[sel] = tok_B
            active = [active[j] for j in keep]
            last_BV = step(model, tok_all_B, pos_B, cache, None, attend_len)[torch.tensor(active, device=device)]
            if stats is not None and "compile_seconds" not in stats:
                stats["compile_seconds"] = time.perf_counter() - t_compile
            pos_B += 1
            attend_len += 1
            continue
        if len(keep) < len(active):
            active = [active[j] for j in keep]
            tok_B = tok_B[torch.tensor(keep, device=device)]
            sel = torch.tensor(active, device=device)
        slots = None if len(active) == B else sel
        last_BV = model(tok_B[:, None], positions=pos_B[sel][:, None], cache=cache, slots=slots)[:, 0]
        pos_B[sel] += 1
