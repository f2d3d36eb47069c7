"""The steps every decoder here is made of: a prefill of right-padded prompts into the latent cache, a
decode step (eager, or compiled into one graph), and the stop rule. `generate`, MTP speculative
decoding and the engine all run these, so a prompt is prefilled the same way everywhere.

Prompts of different lengths are right-padded for the prefill. No attention mask is needed: attention
is causal by absolute position, so a real token never sees the padding after it, and a row's padding
entries in the cache sit beyond its position until its own decoded tokens overwrite them.
"""

from __future__ import annotations

import functools

import torch

from .sampling import SamplingParams


def stop_reason(gen_ids: list[int], params: SamplingParams, tokenizer=None) -> str | None:
    """'stop' if the last token is a stop token or the generated text now holds a stop string,
    'length' at max_tokens, else None."""
    if len(gen_ids) < params.min_tokens:
        return "length" if len(gen_ids) >= params.max_tokens else None
    if gen_ids and gen_ids[-1] in params.stop_token_ids:
        return "stop"
    if params.stop and tokenizer is not None and gen_ids:
        longest = max(len(s) for s in params.stop)
        tail = tokenizer.decode(gen_ids[-(4 * longest + 4):])   # a char is at most 4 byte-level tokens
        if any(s in tail for s in params.stop):
            return "stop"
    if len(gen_ids) >= params.max_tokens:
        return "length"
    return None


def pad_rows(rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long, device=device)


def prefill(model, rows: list[list[int]], cache, slots=None):
    """Run the prompts `rows` (right-padded) through the model into `cache` (rows `slots`, or 0..B-1).
    Returns the final-normed hidden states [B, T, D] and the logits at each row's last prompt token [B, V]
    (the head runs only there: a prompt's other positions need no logits)."""
    device = cache.latent_BSC[0].device
    lens_B = torch.tensor([len(r) for r in rows], device=device)
    h_BTD = model.hidden_states(pad_rows(rows, 0, device), cache=cache, slots=slots)
    return h_BTD, model.lm_head(h_BTD[torch.arange(len(rows), device=device), lens_B - 1])


def _decode_step(model, tok_B, pos_B, cache, slots, attend_len: int):
    return model(tok_B[:, None], positions=pos_B[:, None], cache=cache, slots=slots, attend_len=attend_len)[:, 0]


@functools.cache
def compiled_decode_step():
    """`step(model, tok_B, pos_B, cache, slots, attend_len) -> logits [B, V]`: one decode step (token
    `tok_B[b]` at position `pos_B[b]` of cache row `slots[b]`, or row b if None) as one compiled graph.

    Eager, a batch-1 step of `small` on CPU is ~1,800 small ops whose dispatch costs more than reading
    the weights. Compiled by inductor, with the routed experts in their gathered form
    (`ops.gathered_swiglu`) and the attend length passed in (no host sync), the step has no graph
    break. Shapes are dynamic: the cache length grows every step and one compile serves them all
    (about a minute for `small` on 2 cores; batch 1 is its own graph)."""
    return torch.compile(_decode_step, dynamic=True)
