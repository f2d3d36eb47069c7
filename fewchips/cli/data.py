"""`fewchips data prepare`: tokenise a corpus once, ahead of training, into a folder that any number of
`fewchips train --data DIR` runs (and nodes) read. Under torchrun every rank takes its share."""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import os


def register(sub):
    p = sub.add_parser("data", help="prepare pre-training data once (tokenised shards any run can read)",
                       description="Work on pre-training data. `prepare` streams the sources, tokenises each "
                                   "document once (worker processes; under torchrun, every rank a share) and writes "
                                   "token shards with an index; killed, it resumes where it stopped.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    q = verbs.add_parser("prepare", help="tokenise --data into --out")
    q.add_argument("--data", nargs="+", required=True, metavar="[WEIGHT:]PATH",
                   help="text files, folders, .jsonl(.gz/.zst), .parquet or datasets folders; several with weights "
                        "make a mixture (the weights are stored; `fewchips train --data OUT` draws by them)")
    q.add_argument("--out", required=True, help="the prepared folder (new, or an unfinished one to resume)")
    q.add_argument("--tokenizer", help="an existing tokenizer.json (DeepSeek's special tokens)")
    q.add_argument("--vocab-size", type=int, help="without --tokenizer: train a byte-level BPE of this size")
    q.add_argument("--tokenizer-sample-mb", type=float, default=None,
                   help="the BPE's training sample: each source's first training documents by weight (default 100)")
    q.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets rows")
    q.add_argument("--val-fraction", type=float, default=0.03, help="share of documents held out, chosen by name hash")
    q.add_argument("--fim-rate", type=float, default=0.1,
                   help="share of training documents turned into PSM FIM samples")
    q.add_argument("--seed", type=int, default=0,
                   help="seeds the FIM choices (fixed in the folder; a training run's own --seed is free)")
    q.add_argument("--max-corpus-mb", type=float, help="at most this many MB of each source")
    q.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    q.add_argument("--data-workers", type=int, help="tokenising processes per rank (default: the cores / local ranks)")
    q.add_argument("--unit-mb", type=float, default=16.0,
                   help="input per work unit (consecutive files, a .jsonl's byte range, parquet row groups): what one "
                        "worker tokenises at a time; the tokens do not depend on it")
    q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    q.set_defaults(func=run)


def run(args):
    from fewchips.train.prepare import (TOKENIZER_SAMPLE_MB, PrepareConfig, Solo, load_index, prepare, summary_lines,
                                        tokenizer_cache_path, trained_tokenizer)     # no torch: a light process
    from fewchips.train.sources import parse_sources, plan_units
    from fewchips.train.tokenizer import check_vocab_size, load_tokenizer, special_ids

    if args.data_workers is not None and args.data_workers < 1:
        raise ValueError(f"--data-workers must be >= 1, got {args.data_workers}")
    if not args.unit_mb > 0:
        raise ValueError(f"--unit-mb must be > 0, got {args.unit_mb}")
    if bool(args.tokenizer) == bool(args.vocab_size):
        raise ValueError("give --tokenizer FILE (use an existing tokenizer) or --vocab-size N (train one): exactly "
                         "one of them")
    if args.vocab_size:
        check_vocab_size(args.vocab_size)
    if args.tokenizer and args.tokenizer_sample_mb is not None:
        raise ValueError("--tokenizer-sample-mb trains a tokenizer; --tokenizer gives one: drop one of them")
    team = _team()
    log = print if team.rank == 0 else (lambda *a, **k: None)
    sources = parse_sources(args.data)
    pc = PrepareConfig(fim_rate=args.fim_rate, seed=args.seed, val_fraction=args.val_fraction,
                       text_field=args.text_field, skip_bad_rows=args.skip_bad_rows,
                       max_bytes=int(args.max_corpus_mb * 2**20) if args.max_corpus_mb else None,
                       unit_bytes=max(1, int(args.unit_mb * 2**20)))
    out = os.path.abspath(args.out)
    finished = os.path.exists(os.path.join(out, "index.json"))
    tok_file = args.tokenizer
    if tok_file:
        tok_file = os.path.join(tok_file, "tokenizer.json") if os.path.isdir(tok_file) else tok_file
        special_ids(load_tokenizer(tok_file), tok_file)
    else:
        plan = plan_units(sources, pc.unit_bytes, pc.max_bytes)
        mb = args.tokenizer_sample_mb or TOKENIZER_SAMPLE_MB
        tok_file = os.path.join(out, "." + os.path.basename(tokenizer_cache_path(out, plan, pc, args.vocab_size, mb)))
        if finished and not os.path.exists(tok_file):
            raise ValueError(f"{out} was prepared with another tokenizer (not --vocab-size {args.vocab_size}, "
                             f"--tokenizer-sample-mb {mb:g} on these files); choose another --out")
        if team.rank == 0:
            os.makedirs(out, exist_ok=True)
        tok_file = trained_tokenizer(sources, plan, pc, args.vocab_size, mb, tok_file, team, log)
    prepare(sources, tok_file, out, pc, team, args.data_workers, log, args.progress)
    if finished:
        log(f"{out} was already prepared, from the same files and settings:")
        for line in summary_lines(load_index(out)):
            log(line)
    log(f"fewchips data prepare: {out} is ready; train on it with fewchips train --data {out}")
    if not isinstance(team, Solo):
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _team():
    """Every torchrun rank together (gloo, a long timeout: one rank may tokenise for hours), or one process."""
    from fewchips.train.prepare import Solo
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Solo()
    from datetime import timedelta

    import torch.distributed as dist

    from fewchips.train.layout import GlooTeam
    dist.init_process_group("gloo", timeout=timedelta(hours=3))
    return GlooTeam(None)


