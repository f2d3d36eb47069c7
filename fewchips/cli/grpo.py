"""`fewchips grpo`: GRPO with rule-based rewards on a model directory (default task: arithmetic)."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

from .errors import say_error


def register(sub):
    from fewchips.train.config import grpo_config

    from .train import add_run_flags, set_defaults_from
    p = sub.add_parser("grpo", help="reinforce a model with GRPO and rule-based rewards",
                       description="Group Relative Policy Optimization as DeepSeekMath defines it: G samples per "
                                   "prompt from the batched engine, group-normalised advantages, the clipped ratio, "
                                   "a k3 KL penalty to the starting model, no critic. Rewards from a built-in rule "
                                   "(arithmetic: the exact answer, boxed; format: a boxed integer; math; code) or your "
                                   "module:function.")
    g = p.add_argument_group("model and task")
    g.add_argument("--model", required=True, dest="init", metavar="MODEL_DIR",
                   help="the model to start from (and the frozen reference for the KL term)")
    g.add_argument("--task",
                   help="arithmetic | format (generated prompts); math (the completion's \\boxed{} answer against "
                        "the row's answer, by math-verify) | code (1 when the row's tests all pass on the completion, "
                        "run in a sandbox) | code-fraction (the share of them that pass) | module:function called "
                        "with (prompt, completion, **the row's fields it names) -> float")
    g.add_argument("--prompts", metavar="PROMPTS_JSONL",
                   help="prompts for math, code and module:function tasks: {\"prompt\": str, ...} or "
                        "{\"messages\": [...], ...} per line; the other fields (answer, tests) go to the reward")
    g.add_argument("--unsafe-code-reward", action="store_true",
                   help="run the code tasks even where no sandbox (user, network, mount and PID namespaces) can be "
                        "made: the completions' code then runs with CPU and memory limits only, able to read your "
                        "files and reach the network")
    g = p.add_argument_group("GRPO")
    g.add_argument("--group-size", type=int, help="G: completions sampled per prompt")
    g.add_argument("--max-new-tokens", type=int, help="longest completion")
    g.add_argument("--temperature", type=float, help="sampling temperature of the rollouts")
    g.add_argument("--top-p", type=float, help="nucleus mass of the rollouts")
    g.add_argument("--clip-eps", type=float, help="ε of the clipped ratio")
    g.add_argument("--kl-beta", type=float, help="β of the KL penalty to the starting model (0: no reference model)")
    g.add_argument("--iterations", type=int,
                   help="μ: updates per batch of rollouts, each with the ratio against the rollout policy "
                        "(DeepSeekMath); the lr schedule and --warmup count optimizer steps (μ per batch)")
    g.add_argument("--val-prompts", type=_count_or_file,
                   help="held-out prompts answered greedily at each evaluation: a number (drawn apart from training's, "
                        "which never sees them) or a prompts .jsonl")
    g.add_argument("--freeze-mtp", action="store_true", help="leave the MTP module as it is")
    add_run_flags(p, pretrain=False, batch_help="prompts per step (each sampled --group-size times)")
    set_defaults_from(p, grpo_config(), func=run)


def _count_or_file(text: str):
    return int(text) if text.strip().isdigit() else text


def run(args):
    import os

    from fewchips.train.grpo import CODE_TASKS, grpo, grpo_config

    from .train import run_trainer
    if args.task in CODE_TASKS:            # how the completions' code runs, said once (or refused), by rank 0
        from fewchips.train import TrainError
        from fewchips.train.rewards import code_sandbox
        main_rank = os.environ.get("RANK", "0") == "0"
        try:
            line = code_sandbox(args.unsafe_code_reward)
        except TrainError as e:
            say_error("grpo", e, show=main_rank)
            return 1
        if main_rank:
            print(line)
    return run_trainer("grpo", grpo_config, grpo, args,
                       lambda r: (f"done: step {r['step']}, held-out reward {r['val_reward']:.3f} (greedy); "
                                  f"model in {args.out}" if "val_reward" in r else None))
