"""Rejection sampling (arXiv 2412.19437 §5.1: the reasoning SFT data was curated from the model's own
samples, kept when a rule or a judge accepts them): n completions per prompt from the batched engine,
scored by a task's reward (`grpo.load_task`: arithmetic, math, code, module:function), kept as SFT
chats. `fewchips sample` → `fewchips sft --data` → `fewchips grpo` is the loop.

    keep "best"         the highest-rewarded completion of each prompt, when its reward is > 0
    keep "all-correct"  every distinct completion whose reward is >= 1 (the rule says it is right)
"""

from __future__ import annotations

import json
import random

from ..files import atomic_write_text
from ..inference.engine import Engine, Request
from ..inference.sampling import SamplingParams
from .chat import encode_chat
from .config import TrainError
from .grpo import read_prompts

KEEP = ("best", "all-correct")


def rejection_sample(model, tok, sp, task, prompts, n: int = 8, keep: str = "best", max_new_tokens: int = 256,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch: int = 64, log=print):
    """`prompts`: [(messages, what the reward needs)] (a task's samples). Returns (kept chats as
    {"messages": [...], "reward": r} rows, per-prompt best rewards)."""
    if keep not in KEEP:
        raise TrainError(f"--keep must be one of {', '.join(KEEP)}, got {keep!r}")
    kept, best = [], []
    for start in range(0, len(prompts), max(1, batch // n)):
        chunk = prompts[start:start + max(1, batch // n)]
        ids = [encode_chat(tok, m, add_generation_prompt=True, template=sp.template)[0] for m, _ in chunk]
        engine = Engine(model, None, max_batch=len(ids) * n, max_len=max(map(len, ids)) + max_new_tokens + 1)
        reqs = [Request(p, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          seed=seed * 1_000_003 + (start + i) * n + j, stop_token_ids=[sp.eos]))
                for i, p in enumerate(ids) for j in range(n)]
        engine.run(reqs)
        for i, (messages, need) in enumerate(chunk):
            texts = [tok.decode([t for t in r.output_ids if t != sp.eos], skip_special_tokens=True)
                     for r in reqs[i * n:(i + 1) * n]]
            scored = [(task.reward(messages, t, need), t) for t in texts]
            top = max(r for r, _ in scored)
            best.append(top)
            if keep == "best":
                chosen = [max(scored, key=lambda x: x[0])] if top > 0 else []
            else:
                chosen = list({t: (r, t) for r, t in scored if r >= 1.0}.values())
            kept += [{"messages": messages + [{"role": "assistant", "content": t}], "reward": r} for r, t in chosen]
        log(f"sampled {min(start + len(chunk), len(prompts))}/{len(prompts)} prompts: {len(kept)} chats kept")
    return kept, best


def write_chats(path: str, rows: list[dict]):
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prompts_of(task, prompts_file: str | None, count: int, seed: int):
    """Every row of a file task's prompts, or `count` of a generated task's (seeded)."""
    if task.from_file:
        return [(r.messages, r) for r in read_prompts(prompts_file)]
    rng = random.Random(f"{seed}-sample")
    return [task.sample(rng) for _ in range(count)]
