"""`fewchips grpo`: reinforcement learning with Group Relative Policy Optimization (DeepSeekMath,
arXiv 2402.03300 §4.1; DeepSeek-V3's RL stage, arXiv 2412.19437 §5.2.2) and rule-based rewards.

One step:
    P prompts from the task; G completions each, sampled by the project's own batched engine
    rewards r_i from the task's rule; advantages A_i = (r_i - mean_group r) / std_group r  (no critic)
    per completion token t of output i, with ρ = π_θ / π_old (π_old: the policy that sampled the batch, on
    which μ ≥ 1 updates train (--iterations); in the first, ρ = 1 in value and its gradient is ∇ log π_θ):
        J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ A_i, clip(ρ, 1-ε, 1+ε) A_i) - β D_KL ]
        D_KL = π_ref/π_θ - log(π_ref/π_θ) - 1           (the unbiased, always positive k3 estimator)
    loss = -J averaged over the P groups; π_ref is the model RL started from, frozen.
The MTP module is kept in step with the policy: it is trained (weight λ) to predict the sampled
completions' next-next tokens, so speculative decoding keeps drafting what the policy now writes.

Tasks: built-in `arithmetic` (exact answer: reward 1 when the reply's \\boxed{...} holds the number, else 0)
and `format` (reward 1 when it boxes an integer); `math`, `code` and `code-fraction` on the rows of --prompts
(`rewards.py`); or any `module:function` taking (prompt, completion) and returning a float, with prompts from
--prompts (a .jsonl of {"prompt": ...} or {"messages": ...}).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import rewards
from .bundled import ARITHMETIC_SYSTEM, arithmetic_problem
from .chat import ChatDataError, check_messages, encode_chat, read_jsonl
from .config import GRPO_DEFAULTS, GRPOConfig, TrainConfig, TrainError, grpo_config  # noqa: F401  (re-exported)
from ..checkpoint.run_dir import model_tokenizer
from ..inference.engine import Engine, Request
from ..inference.sampling import SamplingParams
from .trainer import StepResult, Trainer


# ---------------------------------------------------------------------------------------------
# Tasks: prompts and rule-based rewards
# ---------------------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    sample: Callable[[random.Random], tuple[list[dict], object]]   # rng -> (messages, what the reward needs)
    reward: Callable[[list[dict], str, object], float]              # (messages, completion, that) -> reward
    from_file: bool = False                                         # prompts (and their fields) from --prompts


@dataclass
class PromptRow:
    """One row of a prompts file: the prompt's messages, the row's other fields (answer, tests, ...) and
    where it is (path:line), for messages."""
    messages: list[dict]
    fields: dict
    where: str


def _arithmetic_prompt(rng):
    q, a = arithmetic_problem(rng)
    return [{"role": "system", "content": ARITHMETIC_SYSTEM}, {"role": "user", "content": q}], a


_INTEGER = re.compile(r"^-?\d+$")


def _boxed(completion: str) -> str:
    return (rewards.boxed(completion) or "").strip()


BUILTIN_TASKS = {         # generated prompts, the answer beside each; the reply's final answer is its last \boxed{}
    "arithmetic": Task("arithmetic", _arithmetic_prompt, lambda m, c, a: float(_boxed(c) == a)),
    "format": Task("format", _arithmetic_prompt, lambda m, c, a: float(bool(_INTEGER.match(_boxed(c))))),
}
FILE_TASKS = {            # prompts from --prompts, the field the reward checks against; (completion, row, unsafe)
    "math": ("answer", lambda c, row, unsafe: rewards.math_answer(c, row.fields["answer"], where=row.where)),
    "code": ("tests", lambda c, row, unsafe: rewards.code_tests(c, row.fields["tests"], unsafe=unsafe)),
    "code-fraction": ("tests", lambda c, row, unsafe: rewards.code_tests(c, row.fields["tests"], fraction=True,
                                                                         unsafe=unsafe)),
}
CODE_TASKS = tuple(k for k, (field, _) in FILE_TASKS.items() if field == "tests")


def load_task(name: str, prompts_file: str | None = None, unsafe_code: bool = False) -> Task:
    """A built-in task (arithmetic, format: generated prompts), a file task (math: the row's `answer`
    checked by math-verify against the completion's \\boxed{} answer; code: the row's `tests` run against
    the completion, all or nothing; code-fraction: the share of them that pass), or `module:function`
    called with (prompt, completion, the row's fields it names). An error in a reward names the row. The
    code tasks refuse to run without a sandbox unless `unsafe_code` (--unsafe-code-reward)."""
    if name in BUILTIN_TASKS:
        if prompts_file:
            raise TrainError(f"--prompts applies to the math, code and module:function tasks; {name} makes its own")
        return BUILTIN_TASKS[name]
    if name in FILE_TASKS:
        field, rule = FILE_TASKS[name]
        check = field

        def score(c, row):
            return rule(c, row, unsafe_code)
    else:
        module, sep, func = name.partition(":")
        if not sep or not module or not func:
            raise TrainError(f"--task {name!r}: one of {', '.join([*BUILTIN_TASKS, *FILE_TASKS])}, or module:function")
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise TrainError(f"--task {name}: cannot load it ({e})") from None
        check = None

        def score(c, row):
            return float(rewards.call_with_fields(fn, row.messages[-1]["content"], c, row.fields))
    if not prompts_file:
        raise TrainError(f"--task {name}: needs --prompts FILE.jsonl (one prompt per row"
                         + (f", with its {check!r}" if check else "") + ")")
    rows = read_prompts(prompts_file)
    if check:
        missing = next((r for r in rows if check not in r.fields), None)
        if missing is not None:
            raise ChatDataError(f"{missing.where}: the {name} task needs a {check!r} field in every row")
    if name in CODE_TASKS:
        rewards.code_sandbox(unsafe_code)                      # refuses here, before a model is loaded

    def reward(messages, completion, row):
        try:
            return float(score(completion, row))
        except TrainError:
            raise
        except Exception as e:                       # noqa: BLE001 - a user's reward: say which row it failed on
            raise TrainError(f"--task {name}: the reward failed on {row.where} ({type(e).__name__}: {e})") from None

    return Task(name, lambda rng: (lambda r: (r.messages, r))(rng.choice(rows)), reward, from_file=True)


def read_prompts(path: str) -> list[PromptRow]:
    """Prompts from a .jsonl of {"prompt": str, ...} or {"messages": [...], ...} rows (no assistant turn
    needed); the other fields of a row go to its reward."""
    out = []
    for where, row in read_jsonl(path):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            msgs = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row, dict) and "messages" in row:
            msgs = row["messages"]
            check_messages(msgs + [{"role": "assistant", "content": ""}], where)
        else:
            raise ChatDataError(f"{where}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
        out.append(PromptRow(msgs, {k: v for k, v in row.items() if k not in ("prompt", "messages")}, where))
    if not out:
        raise ChatDataError(f"{path}: no prompts in it")
    return out


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------

def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of the group) / (std of the group + eps): outcome supervision, every token of output i
    gets A_i. A group whose rewards are all equal teaches nothing (A = 0)."""
    mean = rewards_PG.mean(-1, keepdim=True)
    std = rewards_PG.std(-1, keepdim=True, unbiased=False)
    return (rewards_PG - mean) / (std + eps)


def grpo_loss(logp_NT, logp_old_NT, logp_ref_NT, mask_NT, adv_N, clip_eps: float, beta: float):
    """-J for N sampled outputs (rows), their completion tokens marked by `mask_NT`. Returns the loss and,
    per completion token, the mean k3 KL, the share where the clip binds and the mean ratio ρ."""
    ratio = torch.exp(logp_NT - logp_old_NT)
    a = adv_N[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    log_ref_over = logp_ref_NT - logp_NT
    kl = torch.exp(log_ref_over) - log_ref_over - 1
    per_token = (surrogate - beta * kl) * mask_NT
    lengths = mask_NT.sum(-1).clamp_min(1)
    loss = -(per_token.sum(-1) / lengths).mean()
    n = mask_NT.sum().clamp_min(1)
    # the clip binds where the clipped term is smaller (TRL's clip_ratio): ρ < 1-ε with A < 0, ρ > 1+ε with A > 0
    clipped = (((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))).float()
    return loss, *(((x * mask_NT).sum() / n).detach() for x in (kl, clipped, ratio))


def token_logprobs(model, ids_NT, return_hidden=False, temperature: float = 1.0, load_mask=None):
    """log π(token t | tokens < t) for t = 1..T-1 [N, T-1] (fp32), of the distribution the rollouts were
    sampled from: logits / `temperature` (TRL does the same). With `return_hidden` also the final hidden
    states and the MoE layers' MoEStats, their loads counted over `load_mask` [N, T-1]."""
    h, stats = model.hidden_states(ids_NT[:, :-1], with_stats=return_hidden, load_mask=load_mask), None
    if return_hidden:
        h, stats = h
    logits = model.lm_head(h).float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, ids_NT[:, 1:, None])[..., 0]
    return (lp, h, stats) if return_hidden else lp


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

def _key(messages) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


class PromptData:
    """Prompts of a task, drawn from a generator seeded by (seed, step): no position to save, a resumed
    run draws the same prompts. The held-out prompts come first, from their own seed (or a file), and
    training never draws one of them: a prompt the task gives again is drawn again instead."""

    MAX_REDRAWS = 1000

    def __init__(self, tc: GRPOConfig, tok, sp, task: Task, log=print):
        self.tok, self.sp, self.task, self.tc = tok, sp, task, tc
        self.unigram_entropy, self.val_bytes, self.sampler = None, 0, None
        if isinstance(tc.val_prompts, str):
            if not task.from_file:
                raise TrainError(f"--val-prompts {tc.val_prompts}: the {task.name} task makes its own prompts (and "
                                 f"answers); give a number of held-out prompts")
            self.val = [(r.messages, r) for r in read_prompts(tc.val_prompts)]
        else:
            rng = random.Random(f"{tc.seed}-held-out")
            self.val = [task.sample(rng) for _ in range(tc.val_prompts)]
        self.held_out = {_key(m) for m, _ in self.val}
        log(f"held-out: {len(self.val)} prompts ({len(self.held_out)} distinct), never drawn for training")

    def prompts(self, step: int, n: int):
        rng = random.Random(f"{self.tc.seed}-{step}")
        out = []
        for _ in range(n):
            for _ in range(self.MAX_REDRAWS):
                messages, answer = self.task.sample(rng)
                if _key(messages) not in self.held_out:
                    break
            else:
                raise TrainError(f"task {self.task.name}: {self.MAX_REDRAWS} draws in a row were held-out prompts; "
                                 f"hold out fewer (--val-prompts)")
            out.append((messages, answer))
        return out

    def encode(self, messages) -> list[int]:
        return encode_chat(self.tok, messages, add_generation_prompt=True, template=self.sp.template)[0]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def fingerprint(self):
        return {"splits": {"task": self.task.name}}

    def describe(self):
        tc = self.tc
        return (f"task {self.task.name}, {tc.batch_size} prompts x {tc.group_size} samples of up to "
                f"{tc.max_new_tokens} tokens per step, {tc.iterations} update(s) per batch")

    def val_batches(self, n):
        return []


class GRPOTrainer(Trainer):
    """The trainer with GRPO's step. Under torchrun (--dp/--ep) every rank samples the same rollouts from
    the sharded policy (the same prompts and seeds, so the same completions) and trains on its slice of
    them; the frozen reference is sharded the same way, and not built at all when β = 0."""

    positions_span_the_row = False       # rollouts are as long as prompt + completion, not --seq-len

    def __init__(self, tc: GRPOConfig, log=print, device="cpu"):
        if not tc.init:
            raise TrainError("fewchips grpo needs a model to start from: --model DIR")
        if tc.group_size < 2:
            raise TrainError(f"--group-size must be at least 2 (advantages compare samples), got {tc.group_size}")
        refuse = [(tc.pp > 1, f"--pp {tc.pp}: GRPO's rollouts run whole forwards on every rank; use --dp/--ep"),
                  (tc.microbatches is not None, "--microbatches applies to --pp, which GRPO does not run")]
        for bad, why in refuse:
            if bad:
                raise TrainError(f"fewchips grpo: {why}", every_rank=True)
        self.task = load_task(tc.task, tc.prompts, unsafe_code=tc.unsafe_code_reward)
        self._signal_seen, self._quiet_steps = False, 0
        super().__init__(None, tc, log, device)
        rows = tc.batch_size * tc.group_size
        if rows % self.layout.data_size:
            raise TrainError(f"--batch-size {tc.batch_size} x --group-size {tc.group_size} = {rows} rollouts must "
                             f"split evenly over the {self.layout.data_size} processes", every_rank=True)
        if self.layout.data_size > 1 and self._trains_mtp():
            raise TrainError("fewchips grpo: under torchrun the MTP module cannot follow the policy (its loss would "
                             "reach the shared embedding and head through FSDP's gradients); pass --freeze-mtp or "
                             "--mtp-lambda 0", every_rank=True)
        taken, want = self.sched.last_epoch, self.step * tc.iterations     # optimizer steps: μ per batch
        if taken != want:                                                  # a checkpoint taken at another μ
            what = (f"--resume: the checkpoint's lr schedule took {taken} optimizer steps in its {self.step} steps, "
                    f"--iterations {tc.iterations} takes {want}")
            if not tc.allow_schedule_change:
                self.run.abandon()
                raise TrainError(f"{what}; pass the checkpoint's --iterations to continue exactly, or "
                                 f"--allow-schedule-change to continue on the new schedule", every_rank=True)
            self.log(f"warning: {what} (--allow-schedule-change)")
        self.ref = None
        if tc.kl_beta > 0:                 # π_ref: the starting model, frozen, placed like the policy
            ref_tc = dataclasses.replace(tc, fp8=False, activation_checkpointing=False, compile=False, freeze_mtp=False)
            self.ref = self.build(self.cfg.replace(num_nextn_predict_layers=0), ref_tc, frozen=True).eval()

    def _trains_mtp(self) -> bool:
        return self.tc.mtp_lambda > 0 and not self.tc.freeze_mtp and len(self.model.mtp) > 0

    data_first_on_main = True            # rank 0 reads the chats first; the others then do the same

    def make_data(self, cfg, resume_from):
        tok, sp = model_tokenizer(resume_from or self.tc.init)
        return PromptData(self.tc, tok, sp, self.task, self.log)

    def sample(self, prompt_ids: list[list[int]], n: int, greedy: bool = False, seed: int = 0):
        """n completions per prompt from the current policy with the batched engine: token lists. One
        engine serves every step (rebuilt only to grow); its prefix cache is cleared first, since the
        weights changed, and then each prompt's full blocks are prefilled once for its n samples."""
        tc = self.tc
        engine = self.engine(len(prompt_ids) * n, max(len(p) for p in prompt_ids) + tc.max_new_tokens + 1)
        engine.reset_prefix_cache()
        reqs = [Request(p, SamplingParams(max_tokens=tc.max_new_tokens, temperature=0.0 if greedy else tc.temperature,
                                          top_p=tc.top_p, seed=seed * 10_000 + i * n + j, stop_token_ids=[self.sp.eos]))
                for i, p in enumerate(prompt_ids) for j in range(n)]
        was = self.model.training
        self.model.eval()
        engine.run(reqs)
        self.model.train(was)
        return [r.output_ids for r in reqs]

    def engine(self, batch: int, max_len: int):
        e = getattr(self, "_engine", None)
        if e is None or e.max_batch < batch or e.max_len < max_len:
            if e is not None:
                batch, max_len = max(batch, e.max_batch), max(max_len, e.max_len)
            self._engine = e = Engine(self.model, None, max_batch=batch, max_len=max_len,
                                      inference_mode=self.layout.data_size == 1)
        return e

    def completion_text(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t != self.sp.eos], skip_special_tokens=True)

    def banner(self, ramp: str = "") -> str:
        return f"GRPO on a {self.cfg.num_hidden_layers}-layer model for {self.tc.steps} steps; {self.data.describe()}"

    def rollouts(self, problems):
        """Sample G completions per prompt, score them: (prompt + completion rows [P·G, T] right-padded with
        EOS, completion-token mask [P·G, T-1] (position t predicts token t+1), rewards [P, G])."""
        tc, G = self.tc, self.tc.group_size
        prompt_ids = [self.data.encode(m) for m, _ in problems]
        outs = self.sample(prompt_ids, G, seed=tc.seed * 1_000_003 + self.step)
        rewards = torch.tensor([[self.task.reward(problems[i][0], self.completion_text(outs[i * G + j]),
                                                  problems[i][1]) for j in range(G)] for i in range(len(problems))])
        rows = [prompt_ids[k // G] + outs[k] for k in range(len(outs))]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.sp.eos, dtype=torch.long)
        mask = torch.zeros(len(rows), T - 1)
        for k, r in enumerate(rows):
            ids[k, :len(r)] = torch.tensor(r)
            mask[k, len(prompt_ids[k // G]) - 1:len(r) - 1] = 1.0
        return ids, mask, rewards

    def train_step(self) -> StepResult:
        """One batch of rollouts, then μ (`--iterations`) updates on it: the ratio against the rollout
        policy π_old, whose log-probabilities (at the sampling temperature) are taken once before the
        first update; each update's gradient accumulated over `--grad-accum` micro-batches of completions,
        then an optimizer step and a step of the lr schedule (μ of each per batch). KL, clip share and
        ratio are per completion token over all μ updates. The expert loads of the bias update count the
        completion tokens only, in the policy's layers and the MTP module's alike."""
        tc = self.tc
        P, G, mu = tc.batch_size, tc.group_size, tc.iterations
        ids, mask, rewards = self.rollouts(self.data.prompts(self.step, P))
        adv = group_advantages(rewards).reshape(-1)
        mine = self.layout.my_rows(P * G)                     # this process's rows of the rollouts
        ids, mask, adv = ids[mine].to(self.device), mask[mine].to(self.device), adv[mine].to(self.device)
        chunks = list(torch.arange(len(ids), device=self.device).tensor_split(tc.grad_accum))   # micro-batches
        amp = dict(device_type=self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)
        with torch.no_grad(), torch.autocast(**amp):
            old = [token_logprobs(self.model, ids[c], temperature=tc.temperature) for c in chunks] if mu > 1 else None
            ref = [token_logprobs(self.ref, ids[c], temperature=tc.temperature) for c in chunks] \
                if self.ref is not None else None
        grad_norm, losses, mtps = float("nan"), [], []
        sums = torch.zeros(4, device=self.device)        # KL, clip share, ρ (each x its tokens), tokens: all updates
        for it in range(mu):
            frac = self.schedule.fraction(self.step * mu + it)           # the schedule counts optimizer steps
            loads_LE = torch.zeros(len(self.routers), self.cfg.n_routed_experts, device=self.device)
            loss_it, mtp_it, finite = 0.0, 0.0, True
            for i, c in enumerate(chunks):
                self.layout.sync_gradients(self.model, i == len(chunks) - 1)
                with torch.autocast(**amp):
                    logp, h, stats = token_logprobs(self.model, ids[c], return_hidden=True, temperature=tc.temperature,
                                                    load_mask=mask[c])
                    logp_old = logp.detach() if old is None else old[i]
                    logp_ref = logp.detach() if ref is None else ref[i]
                    loss, kl, clip_frac, ratio = grpo_loss(logp, logp_old, logp_ref, mask[c], adv[c], tc.clip_eps,
                                                           tc.kl_beta)
                    loss = self.layout.global_value(loss * (len(c) / len(ids)))   # the mean over every row
                    mtp = None
                    if self._trains_mtp():
                        mtp, mtp_stats = self._mtp_loss(ids[c], h, mask[c])
                        stats = stats.cat(mtp_stats)
                if not (torch.isfinite(loss) and (mtp is None or torch.isfinite(mtp))):
                    finite = False
                    break
                if mtp is not None:      # MTP's gradient goes to the MTP module only: it follows the policy
                    params = [p for p in self.model.mtp.parameters() if p.requires_grad]
                    for p, g in zip(params, torch.autograd.grad(tc.mtp_lambda * mtp * len(c) / len(ids), params,
                                                                allow_unused=True)):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad + g
                    mtp_it += mtp.item() * len(c) / len(ids)
                loss.backward()
                loads_LE[:len(stats.load)] += stats.load
                loss_it += loss.item()
                n = mask[c].sum()
                sums += torch.stack([kl * n, clip_frac * n, ratio * n, n]).detach()
            grad_norm = self.update(loads_LE, finite, frac)
            self.sched.step()
            losses.append(loss_it if math.isfinite(grad_norm) else float("nan"))
            mtps.append(mtp_it)
        self.step += 1
        kl, clip_frac, ratio, counted, tokens = self.layout.sum(torch.cat([sums, mask.sum()[None]]))
        kl, clip_frac, ratio = (x / counted.clamp_min(1) for x in (kl, clip_frac, ratio))
        self.tokens_seen += int(tokens)
        signal = int((rewards.std(-1) > 0).sum())
        self._watch_signal(signal)
        finite = math.isfinite(grad_norm)
        extra = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                 "kl": kl.item(), "clip_frac": clip_frac.item(), "ratio_mean": ratio.item(),
                 "completion_len": tokens.item() / (P * G), "groups_with_signal": signal,
                 **({"loss_last_iteration": losses[-1]} if mu > 1 else {})}
        return StepResult(losses[0] if finite else float("nan"), mtps[0], 0.0, grad_norm, loads_LE.cpu(), not finite,
                          P * G, extra, tokens=int(tokens))

    def _watch_signal(self, groups_with_signal: int):
        """GRPO learns only from groups whose rewards differ; a run where none do has nothing to learn."""
        self._signal_seen |= groups_with_signal > 0
        self._quiet_steps += groups_with_signal == 0
        if not self._signal_seen and self._quiet_steps == self.tc.no_signal_steps:
            self.log(f"warning: in each of the first {self._quiet_steps} steps every one of the {self.tc.batch_size} "
                     f"groups scored all its {self.tc.group_size} completions the same, so there is no gradient. "
                     f"Try a model that sometimes succeeds (SFT first), a larger --group-size, a higher --temperature, "
                     f"or check the reward on a few completions (metrics.jsonl: reward_mean, groups_with_signal)")

    def _mtp_loss(self, ids, h, mask):
        """MTP depth 1 on the sampled rows: position t predicts token t+2, scored on completion tokens. It
        reads the policy's hidden states detached, and only its own parameters take this loss's gradient.
        Returns the loss and the MTP layers' MoEStats, their loads counted where the target is a completion
        token (the positions the loss scores: as many as the policy's layers count)."""
        logits, stats = self.model.mtp_forward(ids[:, :-1], h.detach(), with_stats=True, load_mask=mask)
        logits = logits[0]                                                            # [N, T-2, V]
        target_mask = mask[:, 1:]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1), reduction="none")
        return (ce * target_mask.reshape(-1)).sum() / target_mask.sum().clamp_min(1), stats

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy replies to the held-out prompts: their mean reward."""
        ids = [self.data.encode(m) for m, _ in self.data.val]
        outs = self.sample(ids, 1, greedy=True)
        rewards = [self.task.reward(m, self.completion_text(o), a) for (m, a), o in zip(self.data.val, outs)]
        return {"val_reward": float(np.mean(rewards)), "val_len": float(np.mean([len(o) for o in outs]))}

    def _eval_and_plot(self, bar):
        ev = self.evaluate()
        if self.ema is not None:           # the EMA's weights answer the same prompts (sample resets the prefix cache)
            ev.update(self.evaluate_ema())
        self.run.write({"step": self.step, **ev})
        ema = f"; EMA {ev['ema_val_reward']:.3f}" if "ema_val_reward" in ev else ""
        (bar.write if bar is not None else self.log)(
            f"step {self.step}: held-out reward {ev['val_reward']:.3f} (greedy), reply length {ev['val_len']:.1f}{ema}")
        if self.tc.plots:
            self.plot()
        return ev

    def plot(self):
        from .plots import write_grpo_plots    # here, not at the top: plots imports matplotlib (~350 ms)
        write_grpo_plots(self.metrics_path, self.tc.out)


def grpo(tc: GRPOConfig, log=print) -> dict:
    return GRPOTrainer(dataclasses.replace(tc), log).train()
