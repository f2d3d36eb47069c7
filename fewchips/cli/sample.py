"""`fewchips sample`: rejection sampling, a model's own completions kept as SFT chats when a reward accepts them."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import sys

from .errors import say_error


def register(sub):
    from .models import add_model_flags, int_at_least
    p = sub.add_parser("sample",
                       help="rejection sampling: keep a model's completions that a reward accepts, as SFT chats",
                       description="Sample --n completions per prompt with the batched engine, score them with a "
                                   "task's reward (the same tasks as fewchips grpo) and write the accepted ones as "
                                   "{\"messages\": [...]} rows that fewchips sft --data reads (DeepSeek-V3 §5.1).")
    add_model_flags(p)
    g = p.add_argument_group("prompts and reward")
    g.add_argument("--reward", default="arithmetic",
                   help="arithmetic | format (generated prompts) | math | code | code-fraction | module:function "
                        "(with --prompts)")
    g.add_argument("--unsafe-code-reward", action="store_true",
                   help="run the code rewards even where no sandbox (user, network, mount and PID namespaces) can be "
                        "made: the completions' code then runs with CPU and memory limits only, able to read your "
                        "files and reach the network")
    g.add_argument("--prompts", metavar="PROMPTS_JSONL", help="{\"prompt\" or \"messages\", ...fields} rows")
    g.add_argument("--count", type=int_at_least(1), default=None,
                   help="prompts of a generated task (arithmetic, format; default 100)")
    g.add_argument("--n", type=int_at_least(1), default=8, help="completions per prompt")
    g.add_argument("--keep", choices=["best", "all-correct"], default="best",
                   help="best: each prompt's highest-rewarded completion (reward > 0); all-correct: every distinct "
                        "completion with reward >= 1")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=256, help="longest completion")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass")
    g.add_argument("--seed", type=int, default=0, help="seeds the prompts of a generated task and the samples")
    p.add_argument("--out", required=True, help="the .jsonl of kept chats")
    p.set_defaults(func=run)


def run(args):
    from fewchips.train import TrainError
    from fewchips.train.grpo import CODE_TASKS, load_task
    from fewchips.train.rewards import code_sandbox
    from fewchips.checkpoint.run_dir import model_tokenizer
    from fewchips.train.sample import prompts_of, rejection_sample, write_chats

    from .models import load_model_and_tokenizer
    if args.prompts and args.count is not None:
        print("fewchips sample: error: --count applies to generated tasks; a --prompts file is sampled whole",
              file=sys.stderr)
        return 2
    try:
        task = load_task(args.reward, args.prompts, unsafe_code=args.unsafe_code_reward)
        if args.reward in CODE_TASKS:        # how the completions' code runs, said once
            print(code_sandbox(args.unsafe_code_reward), file=sys.stderr)
        prompts = prompts_of(task, args.prompts, args.count or 100, args.seed)
        model, _ = load_model_and_tokenizer(args)
        tok, sp = model_tokenizer(args.model)
        kept, best = rejection_sample(model.eval(), tok, sp, task, prompts, args.n, args.keep, args.max_new_tokens,
                                      args.temperature, args.top_p, args.seed,
                                      log=lambda m: print(m, file=sys.stderr))
    except TrainError as e:
        say_error("sample", e)
        return 1
    write_chats(args.out, kept)
    solved = sum(b > 0 for b in best)
    print(f"kept {len(kept)} chats from {len(prompts)} prompts x {args.n} samples ({solved} prompts with a rewarded "
          f"completion, --keep {args.keep}); wrote {args.out}")
    return 0
