"""`fewchips train`: DeepSeek-V3's pre-training recipe on a preset, by default on the Python
standard library's own source (no downloads)."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import dataclasses
import os
import sys

from .errors import say_error


def register(sub):
    # Long on purpose: one flat list of flag declarations, in the groups --help shows them in.
    from fewchips.config import PRESETS
    from fewchips.train.config import TrainConfig

    p = sub.add_parser("train", help="train a model with the DeepSeek-V3 recipe (default: tiny on the stdlib)",
                       description="Train with DeepSeek-V3's recipe: aux-loss-free balancing, sequence-wise "
                                   "balance loss, MTP, FIM, AdamW with warm-up/constant/cosine. OUT ends up "
                                   "holding a Hugging Face-format model, tokenizer.json, metrics.jsonl, "
                                   "loss.png/expert_load.png and checkpoint/ (resumable).")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="tiny (~10M parameters, minutes on a laptop CPU), small (~170M), v2-lite (DeepSeek-V2-Lite's "
                        "shapes, 16B), v3 (the 671B release)")
    g.add_argument("--config", default=None, metavar="CONFIG_JSON",
                   help="a config.json (Hugging Face keys) instead of a preset: any DeepSeek-V3 shape")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable), e.g. --set num_hidden_layers=6 --set "
                        "n_routed_experts=32; values are JSON (numbers, null, true) or plain strings")
    g.add_argument("--init", default=None, metavar="MODEL_DIR",
                   help="continue pre-training from a Hugging Face deepseek_v3 directory (bf16 or the released "
                        "FP8 layout, sharded or not), with its config and its own tokenizer")
    g.add_argument("--extend-context", type=int, default=None, metavar="POSITIONS",
                   help="with --init: extend the context with YaRN to this many positions (the report's phase: "
                        "factor over the original length, beta_fast 32, beta_slow 1); train the phase with a longer "
                        "--seq-len and a low constant --lr (docs/training.md)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="override the preset's vocabulary (the BPE is trained to this size)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="[WEIGHT:]PATH",
                   help="text files, folders, .jsonl(.gz/.zst), .parquet, a datasets save_to_disk folder, or a folder "
                        "`fewchips data prepare` wrote; several with weights make a mixture, e.g. --data 0.7:web/ "
                        "0.3:code.parquet (default: this Python's standard library .py files)")
    g.add_argument("--text-field", help="field holding the text in .jsonl/.parquet/datasets rows")
    g.add_argument("--max-corpus-mb", type=float,
                   help="use at most this many MB of each source "
                        "(a deterministic subset: whole files, lines or row groups)")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed rows (bad JSON, a missing text field, non-UTF-8 text) and count them, "
                        "instead of stopping at the first with its file and line")
    g.add_argument("--data-workers", type=int,
                   help="tokenising processes per rank (default: the cores, shared by the ranks on a node); "
                        "each document is tokenised once, by one worker of one rank")
    g.add_argument("--tokenizer-sample-mb", type=float,
                   help="train the BPE on this many MB: each source's first training documents, by weight "
                        "(default 100)")
    g.add_argument("--val-fraction", type=float, help="share of documents held out, chosen by name hash")
    g.add_argument("--tokenizer",
                   help="an existing tokenizer.json (must have DeepSeek's BOS/EOS/FIM tokens); default: train a BPE")
    g.add_argument("--cache-dir", help="where tokenised shards are kept and reused (default OUT/cache); share it "
                   "between runs, or prepare once with `fewchips data prepare`")
    g.add_argument("--fim-rate", type=float, help="share of training documents turned into PSM FIM samples")
    add_run_flags(p)
    set_defaults_from(p, TrainConfig(), func=run)


def set_defaults_from(p, tc, **extra):
    """Every default comes from a TrainConfig (the dataclass's own, or SFT's): one place for each, the
    flags cannot drift from it. Fields without a flag here get their default too (what the command's
    run builds the config from anyway)."""
    p.set_defaults(**extra, **{f.name: getattr(tc, f.name) for f in dataclasses.fields(tc)})


def add_run_flags(p, pretrain: bool = True, batch_help: str = "sequences per micro-batch; lower it if memory is short"):
    """The flags `fewchips train`, `sft` and `grpo` share: schedule, recipe, systems, parallelism, output
    (pre-training-only ones, such as the batch ramp, when `pretrain`)."""
    _schedule_flags(p, pretrain, batch_help)
    _recipe_flags(p, pretrain)
    _systems_flags(p)
    _parallel_flags(p)
    _output_flags(p)


def _schedule_flags(p, pretrain: bool, batch_help: str):
    g = p.add_argument_group("schedule (lr: warm-up, constant to 67.6%, cosine to 0.1x by 96.6% of the run's tokens)"
                             if pretrain else "schedule (lr: warm-up, then cosine to --min-lr-ratio x the peak)")
    if not pretrain:
        g.add_argument("--min-lr-ratio", type=float,
                       help="the lr ends at this fraction of the peak (the report: 1e-6/5e-6)")
    g.add_argument("--steps", type=int,
                   help=("optimizer steps (300 x 4096 tokens: ~7 min for tiny on 2 CPU cores); all schedules scale "
                         "to it" if pretrain else "optimizer steps; the schedule scales to it"))
    g.add_argument("--batch-size", type=int, help=batch_help)
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (bigger effective batch)")
    if pretrain:
        g.add_argument("--batch-ramp-tokens", type=_token_count,
                       help="ramp the global batch up over the run's first N tokens (e.g. 2M; the report: 3,072 -> "
                            "15,360 sequences over 469B), one micro-batch at a time, up to --batch-size x --grad-accum")
        g.add_argument("--batch-size-start", type=int,
                       help="sequences per step when the ramp starts: a multiple of --batch-size "
                            "(default: one micro-batch)")
    g.add_argument("--seq-len", type=int, help="tokens per training sequence")
    g.add_argument("--lr", type=float, help="peak learning rate" + (" (2e-3 suits tiny; ~6e-4 for small)" if pretrain
                                                                     else ""))
    g.add_argument("--warmup", type=int, dest="warmup_steps", help="warm-up steps (default 3%% of --steps)")
    g.add_argument("--weight-decay", type=float, help="AdamW decay on matrices (never on norms/biases)")
    g.add_argument("--grad-clip", type=float, help="global gradient-norm clip")


def _recipe_flags(p, pretrain: bool):
    g = p.add_argument_group("DeepSeek-V3 recipe")
    g.add_argument("--bias-update-speed", type=float,
                   help="γ of the aux-loss-free balancing bias (0 turns it off; set to 0 for the last 3.4%% of steps)")
    g.add_argument("--balance-alpha", type=float, help="α of the sequence-wise balance loss")
    g.add_argument("--mtp-lambda", type=float,
                   help="MTP loss weight" + (" for the first 67.6%% of steps" if pretrain else ""))
    if pretrain:
        g.add_argument("--mtp-lambda-late", type=float, help="MTP loss weight afterwards")
        g.add_argument("--init-std", type=float, help="std of the N(0, std) initialisation")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the parameters on the host (e.g. 0.999), updated "
                        "after each step in the background, checkpointed and evaluated beside the model")
    g.add_argument("--export-ema", action="store_true",
                   help="also export the EMA's weights as their own model in OUT/ema")


def _systems_flags(p):
    g = p.add_argument_group("systems")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"],
                   help="autocast precision; auto = bf16 where the hardware has native bf16 (AMX/AVX512-BF16, GPUs)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute layers in backward: less memory, ~30%% more compute")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each layer (slow start; pays off on long runs)")
    g.add_argument("--fp8", action="store_true",
                   help="DeepSeek-V3's FP8 recipe: attention projections, MLPs and experts run their three GEMMs "
                        "in E4M3 with 1x128/128x128 scales (fast on Hopper; emulated, slower, elsewhere)")
    g.add_argument("--fp8-backend", choices=["auto", "scaled_mm", "emulate"],
                   help="auto: cuBLAS block-wise scaled_mm on Hopper, emulation elsewhere")
    g.add_argument("--fp8-activations", choices=["cached", "full"],
                   help="cached (default): what the backward keeps is 8-12 bits too (x in E4M3, the SwiGLU's input "
                        "and o_proj's in 12-bit E5M6, the SwiGLU recomputed); full: kept in the activation dtype")
    g.add_argument("--bf16-moments", action="store_true",
                   help="store AdamW's two moments in BF16 as DeepSeek-V3 does (half the optimizer memory)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--seed", type=int, help="seeds the init, FIM choices and data order")


def _parallel_flags(p):
    g = p.add_argument_group("parallelism (launch with torchrun --nproc_per_node=N -m fewchips train ...)")
    g.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks: each holds n_routed_experts/ep experts; keep it within a node")
    g.add_argument("--dp", type=int, default=None,
                   help="data-parallel ranks (default: processes / (pp x ep)); "
                        "--batch-size stays the global micro-batch")
    g.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel ranks: each holds a run of decoder layers (two runs, in a V, with "
                        "dualpipev/zbv); processes = pp x dp x ep")
    g.add_argument("--pp-schedule", choices=["dualpipev", "1f1b", "interleaved1f1b", "zbv"], default="dualpipev",
                   help="torch.distributed.pipelining schedule (DeepSeek-V3 trained with DualPipe)")
    g.add_argument("--microbatches", type=int, default=None,
                   help="pipeline micro-batches per step, dividing --batch-size x --grad-accum sequences "
                        "(default: --grad-accum, at least the number of stages)")
    g.add_argument("--pp-overlap", choices=["auto", "on", "off"], default="auto",
                   help="run DualPipeV's paired forward and backward chunks on two threads, so one chunk's "
                        "all-to-alls travel while the other computes (auto: on CUDA; on 2 CPU cores it is slower)")


def _output_flags(p):
    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--out", required=True, help="output folder (model, tokenizer, metrics, plots, checkpoint)")
    g.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint")
    g.add_argument("--allow-schedule-change", action="store_true",
                   help="with --resume: accept a different --steps/--warmup "
                        "(the schedules are re-laid over the new run)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that holds a run (keeps the data cache)")
    g.add_argument("--stop-at", type=int, help="stop with a checkpoint after this step (split a run)")
    g.add_argument("--log-every", type=int, help="steps between metrics.jsonl records")
    g.add_argument("--eval-every", type=int, help="steps between validation runs and plot updates")
    g.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    g.add_argument("--save-every", type=int, help="steps between checkpoints")
    g.add_argument("--max-bad-steps", type=int,
                   help="stop after this many consecutive non-finite (skipped) steps")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the matplotlib PNGs")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_trainer(command: str, make_config, runner, args, done=None) -> int:
    """Build the command's TrainConfig from the parsed flags, run it, and turn its ends into exit codes:
    a TrainError is one line and 1 (under torchrun an error every rank hits is printed by rank 0 only);
    a signal stop says how to resume and exits 128 + the signal. Every run that ends ends with one line
    saying where and why; rank 0 says it."""
    import dataclasses

    from fewchips.train import TrainError
    from fewchips.train.stopping import TrainInterrupted
    names = {f.name for f in dataclasses.fields(make_config())}
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        result = runner(make_config(**{k: v for k, v in vars(args).items() if k in names}))
    except TrainError as e:
        say_error(command, e, show=main_rank or not e.every_rank)
        return 1
    except TrainInterrupted as e:
        if main_rank:
            print(f"fewchips {command}: {e}; continue with --resume", file=sys.stderr)
        return e.exit_code
    from fewchips.parallel.mesh import shutdown
    shutdown()                                     # under torchrun: every rank done, then the group closed
    if result is not None and main_rank:
        message = done(result) if done is not None else None
        print(message or f"fewchips {command}: stopped at step {result['step']}: {result.get('stopped', 'done')}; "
                         f"model in {args.out}")
    return 0


def model_config(args):
    """The model's shape: --init's directory, else --config or --preset, then each --set."""
    import json

    from fewchips.config import ConfigError, ModelConfig
    from fewchips.train.tokenizer import check_vocab_size
    sets = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set num_hidden_layers=6")
        try:
            sets[key.strip()] = json.loads(value)
        except ValueError:
            sets[key.strip()] = value
    if args.init:
        if args.config or args.vocab_size:
            raise ConfigError("--init takes the model's config from its directory; --config and --vocab-size apply "
                              "to new models (--set may change fields that keep the weights' shapes)")
        args.init_set = sets or None             # applied, and checked, where the trainer reads --init's config
        return ModelConfig.from_json(args.init)
    if args.extend_context:
        raise ConfigError("--extend-context extends a trained model's context: it needs --init MODEL_DIR")
    cfg = ModelConfig.from_json(args.config) if args.config else ModelConfig.from_preset(args.preset)
    if args.vocab_size:
        sets = {"vocab_size": args.vocab_size, **sets}
    cfg = ModelConfig.from_dict({**cfg.to_dict(), **sets}, source="--set") if sets else cfg
    if not args.tokenizer:                         # a tokenizer will be trained to this size: say now if it cannot
        check_vocab_size(cfg.vocab_size, "--vocab-size" if args.vocab_size else "vocab_size")
    return cfg


def _token_count(text) -> int:
    import argparse

    from fewchips.plan.estimate import parse_count
    if str(text).strip() == "0":
        return 0
    try:
        return int(parse_count(text, "a token count"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args):
    from fewchips.config import ConfigError
    from fewchips.train import train

    try:
        cfg = model_config(args)
    except (ConfigError, ValueError) as e:          # the same on every rank of a launch: rank 0 says it
        say_error("train", e, show=os.environ.get("RANK", "0") == "0")
        return 2
    return run_trainer("train", train_config_class(), lambda tc: train(cfg, tc), args, lambda r: (
        f"done: step {r['step']} ({r['stopped']}), val loss {r['val_loss']:.3f} nats/token "
        f"({r['val_bpb']:.3f} bits/byte"
        + (f"; unigram entropy {r['unigram_entropy']:.3f}" if r.get("unigram_entropy") else "")
        + f"); model in {args.out}" if "val_loss" in r else None))


def train_config_class():
    from fewchips.train import TrainConfig
    return TrainConfig


def train_config(args):
    """The TrainConfig the parsed flags of `fewchips train` describe."""
    import dataclasses
    cls = train_config_class()
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
