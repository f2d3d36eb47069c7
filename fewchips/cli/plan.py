"""`fewchips plan`: how many chips, how long, how much memory, for any DeepSeek-V3-style config.

    fewchips plan --preset v3 --tokens 14.8T --gpus 2048 --gpu h800 --ep 64 --pp 16 --fp8
    fewchips plan --preset v3 --implied-mfu            # what DeepSeek-V3's own run achieved
    fewchips plan --model path/to/config.json --gpus 8 --gpu h200 --explain
    fewchips plan --preset v3 --gpu h800 --fp8 --search train  # the fewest GPUs that fit
"""

# fewchips imports sit inside the functions, so that `fewchips --help` loads no torch: see fewchips/cli/__init__.py.
from __future__ import annotations

import dataclasses
import json


def register(sub):
    from fewchips.plan.estimate import REPORT_PRICE

    from fewchips.plan.gpus import GPUS   # a plain table, no torch: keeps --help fast

    p = sub.add_parser("plan", help="parameters, FLOPs, memory per GPU, serving capacity and training time",
                       description="Plan a training or serving run from the model definition itself. "
                                   "Add --explain to see the formula behind every line.")
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="tiny, small, v2-lite or v3 (default: v3)")
    src.add_argument("--model", default=None, help="a Hugging Face-format directory or a config.json file")
    g = p.add_argument_group("run")
    g.add_argument("--tokens", default="14.8T",
                   help="training tokens: 14.8T, 500B, 2e12 (K/M/B/T = 1e3/1e6/1e9/1e12; default 14.8T, V3's run)")
    g.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096, V3's pre-training length); "
                   "sets the attention FLOPs, activations and the serving context")
    g.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per micro-batch per GPU (default 1); activations scale with it")
    g.add_argument("--fp8", action="store_true",
                   help="the report's FP8 recipe: FP8 linears (time at the FP8 peak, FP8 serving weights)")
    g.add_argument("--mfu", type=float, default=0.35,
                   help="model FLOPs utilisation to plan with, against the dense peak of the precision used "
                        "(default 0.35; V3 achieved about 0.20 of FP8 peak, 0.41 of BF16 peak)")
    g.add_argument("--price", type=float, default=REPORT_PRICE,
                   help="USD per GPU-hour (default 2, the report's H800 rental assumption)")
    g = p.add_argument_group("hardware and layout (gpus = dp x ep x pp, no tensor parallelism)")
    g.add_argument("--gpu", default=None, help=f"{', '.join(GPUS)} (default h800)")
    g.add_argument("--gpu-spec", default=None, metavar="SPEC",
                   help="another accelerator, e.g. mem=192,bf16=1307,fp8=2615,link=896 (GiB, dense TFLOPS, GB/s); "
                        "with --gpu, overrides that GPU's fields")
    g.add_argument("--gpus", type=int, default=None, help="total GPUs (default dp x ep x pp)")
    g.add_argument("--dp", type=int, default=None, help="data-parallel replicas of the ep x pp grid "
                   "(default gpus / (ep x pp))")
    g.add_argument("--ep", type=int, default=None, help="expert parallelism: must divide the routed experts "
                   "(V3 used 64)")
    g.add_argument("--pp", type=int, default=None, help="pipeline stages, at most the layer count (V3 used 16)")
    g.add_argument("--memory", choices=("fewchips", "report"), default="fewchips",
                   help="whose training memory to count: what fewchips train holds (FSDP2: FP32 weights, gradients "
                        "and AdamW moments sharded, BF16 gathered layers; default) or the report's recipe (BF16 "
                        "weights, FP32 masters, BF16 moments under --zero)")
    g.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3),
                   help="with --memory report: the ZeRO stage "
                        "(default 1, as V3: optimizer state over data parallelism)")
    g.add_argument("--bf16-moments", action="store_true",
                   help="with --memory fewchips: AdamW's moments in BF16 (fewchips train --bf16-moments)")
    g.add_argument("--pp-schedule", default="dualpipev", choices=("dualpipev", "dualpipe", "1f1b", "zb1p"),
                   help="pipeline schedule: memory per GPU and the bubble (default dualpipev, as fewchips train; "
                        "the report's DualPipe holds two parameter copies)")
    g.add_argument("--global-batch", type=int, default=15360,
                   help="sequences per optimizer step (default 15360, V3's); sets the pipeline's micro-batches")
    g.add_argument("--microbatches", type=int, default=None,
                   help="micro-batches per pipeline per step (default: global batch / (dp x ep x micro-batch))")
    g.add_argument("--fbw", default=None, metavar="F,B,W[,F&B]",
                   help="measured per-chunk forward, backward, weight-gradient (and overlapped F&B) times for the "
                        "bubble, e.g. from benchmarks/pipeline.py (default 1,2,1: FLOP ratios)")
    g.add_argument("--search", choices=("train", "serve"), default=None,
                   help="find the fewest GPUs of --gpu (and the layout) that fit the model for training "
                        "(weights, gradients, optimizer, activations; --fp8 for the FP8 recipe) or serving "
                        "as fewchips serve --ep N runs it (experts split, the rest and one --seq context per rank)")
    g = p.add_argument_group("output")
    g.add_argument("--implied-mfu", nargs="?", const="2664K", default=None, metavar="GPU_HOURS",
                   help="the MFU a finished run implies from its GPU-hours and --tokens "
                        "(default 2664K: V3's pre-training on H800s)")
    g.add_argument("--explain", action="store_true", help="print the formula behind each line")
    g.add_argument("--json", action="store_true", help="one JSON object (bytes, FLOPs, seconds) instead of text")
    p.set_defaults(func=run)


def load_config(preset, model):
    from fewchips.config import ModelConfig
    if model:
        return ModelConfig.from_json(model)
    return ModelConfig.from_preset(preset or "v3")


def resolve_gpu(name, spec):
    """--gpu alone: the table's entry; --gpu-spec alone: a new accelerator; both: the entry, overridden."""
    from fewchips.plan.gpus import get_gpu, parse_gpu_spec
    if spec:
        return parse_gpu_spec(spec, base=get_gpu(name) if name else None)
    return get_gpu(name or "h800")


def build_plan(args) -> dict:
    """Everything the text and JSON outputs show, computed once."""
    from fewchips.plan import estimate as est

    cfg = load_config(args.preset, args.model)
    gpu = resolve_gpu(args.gpu, args.gpu_spec)
    tokens = est.parse_count(args.tokens, "--tokens")
    for name, v in (("--seq", args.seq), ("--micro-batch", args.micro_batch)):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu:g} (0.35 means 35%)")
    if args.price < 0:
        raise ValueError(f"--price must be >= 0, got {args.price:g}")
    layout = est.gpu_split(cfg, gpus=args.gpus, dp=args.dp, ep=args.ep, pp=args.pp, zero=args.zero,
                             schedule=args.pp_schedule)
    microbatches = microbatches_per_step(args, layout)
    fbw = parse_fbw(args.fbw)
    params = est.count_params(cfg)
    flops = est.flops_per_token(params, args.seq)
    memory = {}
    for prec, fp8 in (("bf16", False), ("fp8", True)):
        stages = est.training_memory(params, layout, args.seq, args.micro_batch, fp8, args.memory, args.bf16_moments,
                                     accumulate=microbatches > 1)
        worst = max(stages, key=lambda s: s.total)
        acts = est.activation_bytes_per_token(cfg, "moe" if params.sum("routed_experts") else "dense", fp8)
        memory[prec] = dict(stage=worst, fits=worst.total <= gpu.memory_gib * est.GIB, acts=acts)
    plan = dict(
        name=args.model or args.preset or "v3", cfg=cfg, gpu=gpu, layout=layout, tokens=tokens, fp8=args.fp8,
        seq=args.seq, micro_batch=args.micro_batch, mfu=args.mfu, price=args.price, memory_kind=args.memory,
        params=est.param_terms(params), flops=flops, memory=memory,
        serving=est.serving_terms(params, gpu, layout.gpus, args.seq, args.fp8),
        time=est.time_terms(tokens, flops, gpu, layout.gpus, args.mfu, args.fp8, args.price),
        microbatches=microbatches, bubble=est.bubble_terms(layout, microbatches, fbw), measured_fbw=fbw is not None,
        six_n=6 * (params.counts["active"] - params.counts["embedding"]),
    )
    if args.implied_mfu is not None:
        hours = est.parse_count(args.implied_mfu, "--implied-mfu")
        plan["implied"] = est.implied_mfu_terms(tokens, hours, flops, gpu)
        plan["implied_hours"] = hours
    return plan


def microbatches_per_step(args, layout) -> int:
    if args.microbatches is not None:
        if args.microbatches < 1:
            raise ValueError(f"--microbatches must be a positive integer, got {args.microbatches}")
        return args.microbatches
    if args.global_batch < 1:
        raise ValueError(f"--global-batch must be a positive integer, got {args.global_batch}")
    per = layout.dp * layout.ep * args.micro_batch
    return max(1, args.global_batch // per)


def parse_fbw(text):
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--fbw {text!r}: expected numbers F,B,W or F,B,W,F&B, e.g. 1,2,1") from None
    if len(vals) not in (3, 4) or any(v < 0 for v in vals) or vals[0] <= 0:
        raise ValueError(f"--fbw {text!r}: expected three or four non-negative times F,B,W[,F&B] with F > 0")
    return vals


def check_memory_flags(args):
    """Flags that belong to one accounting only are refused under the other."""
    if args.memory == "fewchips":
        if args.zero is not None:
            raise ValueError(f"--zero {args.zero} applies to --memory report: fewchips train shards weights, "
                             f"gradients and optimizer state (FSDP2, ZeRO-3)")
        if args.pp_schedule == "dualpipe":
            raise ValueError("--pp-schedule dualpipe (two parameter copies) is the report's; fewchips train runs "
                             "dualpipev, 1f1b (use --memory report to plan DualPipe)")
    elif args.bf16_moments:
        raise ValueError("--bf16-moments applies to --memory fewchips (the report's recipe already keeps BF16 moments)")
    args.zero = 3 if args.memory == "fewchips" else (1 if args.zero is None else args.zero)   # FSDP2 is ZeRO-3


def run(args):
    check_memory_flags(args)
    if args.search:
        from fewchips.plan.search import render_search, search
        cfg = load_config(args.preset, args.model)
        gpu = resolve_gpu(args.gpu, args.gpu_spec)
        found = search(cfg, gpu, args.search, seq=args.seq, micro_batch=args.micro_batch, fp8=args.fp8,
                       zero=args.zero, schedule=args.pp_schedule, memory=args.memory, bf16_moments=args.bf16_moments)
        if args.json:
            print(json.dumps(found))
        else:
            print(render_search(found))
            if args.explain:
                print("\n".join(explain_search(cfg, found, args)))
        return 0
    plan = build_plan(args)
    if args.json:
        print(json.dumps(to_json(plan, args.explain)))
    else:
        print("\n".join(render(plan, args.explain)))
    return 0


# ---- output ------------------------------------------------------------------------------------

def explain_search(cfg, found: dict, args) -> list[str]:
    """--explain with --search: the found layout's worst GPU, term by term with its formula."""
    from fewchips.plan import estimate as est
    if found["mode"] == "serve":
        r = Report(True)
        if found["gpus"] is None:
            return []
        n = found["ep"]
        r.line("weights held whole", f"{found['rest_gib']:>8.2f} GiB", "attention, dense layers, shared experts, "
               "router, embedding, head, norms (and the MTP module's): replicated on every rank")
        r.line("routed experts", f"{found['experts_gib']:>8.2f} GiB", f"E/{n} = {cfg.n_routed_experts // n} of "
               f"{cfg.n_routed_experts} experts per MoE layer")
        r.line("MLA cache", f"{found['kv_gib']:>8.2f} GiB", f"{found['sequences']} x {found['seq']} tokens x "
               f"(latent {cfg.kv_lora_rank} + rope key {cfg.qk_rope_head_dim}) x layers x 2 B, on every rank")
        r.line("total", f"{found['need_gib']:>8.2f} GiB", f"of {found['capacity_gib']:g} GiB; the weights are what "
               f"each rank of fewchips serve --ep {n} reports at start-up (no activation workspace counted)")
        return r.lines
    if found["gpus"] is None:
        return []
    layout = est.gpu_split(cfg, dp=found["dp"], ep=found["ep"], pp=found["pp"], zero=args.zero,
                             schedule=args.pp_schedule)
    stages = est.training_memory(est.count_params(cfg), layout, args.seq, args.micro_batch, args.fp8, args.memory,
                                 args.bf16_moments)
    worst = max(stages, key=lambda st: st.total)
    r = Report(True)
    r.text(f"worst GPU: stage {worst.stage} ({worst.blocks[0]} .. {worst.blocks[-1]})")
    for t in worst.terms:
        r.line(t.name, f"{t.value / est.GIB:>8.2f} GiB", t.formula)
    r.line("total", f"{worst.total / est.GIB:>8.2f} GiB", "sum of the lines above")
    return r.lines


def to_json(plan, explain=False) -> dict:
    def terms(ts):
        d = {t.name: t.value for t in ts}
        if explain:
            d["formulas"] = {t.name: t.formula for t in ts}
        return d

    flops = plan["flops"]
    out = {
        "model": plan["name"], "gpu": dataclasses.asdict(plan["gpu"]), "layout": dataclasses.asdict(plan["layout"]),
        "tokens": plan["tokens"], "seq": plan["seq"], "micro_batch": plan["micro_batch"], "fp8": plan["fp8"],
        "params": terms(plan["params"]),
        "flops_per_token": {"forward": terms(flops.terms), "forward_total": flops.forward,
                            "training": flops.training, "training_main_model": flops.training_main,
                            "six_n_active_non_embedding": plan["six_n"]},
        "memory_per_gpu": {},
        "serving": terms(plan["serving"]),
        "time": terms(plan["time"]),
    }
    for prec, m in plan["memory"].items():
        st = m["stage"]
        out["memory_per_gpu"][prec] = {**terms(st.terms), "total": st.total, "fits": m["fits"],
                                       "largest": st.largest.name, "stage": st.stage, "blocks": st.blocks}
    if "implied" in plan:
        return {"model": plan["name"], "gpu": out["gpu"], "tokens": plan["tokens"], "seq": plan["seq"],
                "implied_mfu": {**terms(plan["implied"]), "gpu_hours": plan["implied_hours"]}}
    out["pipeline"] = {"schedule": plan["layout"].schedule, "microbatches": plan["microbatches"],
                       **terms(plan["bubble"])}
    return out


class Report:
    """The plan as text: `line(label, value, formula)` rows, formulas shown with --explain."""

    def __init__(self, explain: bool):
        self.lines: list[str] = []
        self.explain = explain

    def text(self, s: str):
        self.lines.append(s)

    def line(self, label, value, formula="", width=28):
        self.lines.append(f"  {label:<{width}} {value}")
        if self.explain and formula:
            self.lines.append(f"  {'':<{width}}   = {formula}")


def render(plan, explain=False) -> list[str]:
    r = Report(explain)
    sections = (_header, _implied) if "implied" in plan else (_header, _params, _flops, _memory, _pipeline,
                                                               _serving, _time)
    for section in sections:
        section(r, plan)
    return r.lines


def _pipeline(r: Report, plan):
    layout = plan["layout"]
    if layout.pp == 1:
        return
    b = {t.name: t for t in plan["bubble"]}
    src = "measured per-chunk times" if plan["measured_fbw"] else "F : B : W = 1 : 2 : 1 by FLOPs"
    r.text(f"\npipeline: {layout.schedule}, {layout.pp} GPUs, {plan['microbatches']} micro-batches per step ({src})")
    r.line("bubble", f"{b['bubble'].value:g} x F", b["bubble"].formula)
    r.line("idle share of a step", f"{b['bubble fraction'].value:.1%}", b["bubble fraction"].formula)


def _header(r: Report, plan):
    cfg, gpu, layout = plan["cfg"], plan["gpu"], plan["layout"]
    fp8_peak = f"{gpu.fp8_tflops:g}" if gpu.fp8_tflops else "no FP8"
    r.text(f"{plan['name']}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
           f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}), {cfg.num_nextn_predict_layers} MTP")
    r.text(f"{layout} on {gpu.name} ({gpu.memory_gib:g} GiB, {gpu.bf16_tflops:g}/{fp8_peak} TFLOPS "
           f"BF16/FP8 dense, {gpu.link_gbps:g} GB/s link)")


def _params(r: Report, plan):
    from fewchips.plan.estimate import human
    r.text("\nparameters (counted from the model on the meta device)")
    for t in plan["params"]:
        r.line(t.name, f"{human(t.value):>10}", t.formula)


def _flops(r: Report, plan):
    flops = plan["flops"]
    div, unit = (1e9, "GFLOP") if flops.forward >= 1e9 else (1e6, "MFLOP")
    r.text(f"\nFLOPs per token at seq {flops.seq} (forward; training = 3x)")
    for t in flops.terms:
        r.line(t.name, f"{t.value / div:>10.2f} {unit}", t.formula)
    r.line("forward total", f"{flops.forward / div:>10.2f} {unit}", "sum of the lines above")
    r.line("training (fwd + bwd)", f"{flops.training / div:>10.2f} {unit}",
           f"3 x forward; {flops.training_main / div:.2f} without MTP. Rule of thumb 6 x activated "
           f"non-embedding params = {plan['six_n'] / div:.2f} {unit} (no attention core, no MTP)")


def _memory(r: Report, plan):
    from fewchips.plan.estimate import GIB
    gpu, precisions = plan["gpu"], ("bf16", "fp8")
    cap = gpu.memory_gib
    sched = plan["layout"].schedule if plan["layout"].pp > 1 else "no pipeline"
    whose = "as fewchips train holds it" if plan["memory_kind"] == "fewchips" else "the report's recipe"
    r.text(f"\ntraining memory per GPU, {whose}, worst pipeline stage (micro-batch {plan['micro_batch']} x "
           f"{plan['seq']} tokens, {sched})")
    by_name = {p: {t.name: t for t in plan["memory"][p]["stage"].terms} for p in precisions}
    names = list(dict.fromkeys([*by_name["bf16"], *by_name["fp8"]]))   # the stages may differ
    r.text(f"  {'':<28} {'BF16':>10} {'FP8':>10}"
           + ("" if gpu.fp8_tflops else f"   (FP8 storage only: the {gpu.name} has no FP8 tensor cores)"))
    for name in names:
        vals = [by_name[p][name].value / GIB if name in by_name[p] else 0.0 for p in precisions]
        r.text(f"  {name:<28} {vals[0]:>6.1f} GiB {vals[1]:>6.1f} GiB")
        if r.explain:
            for p in precisions:
                if name in by_name[p]:
                    r.text(f"  {'':<28}   {p.upper()}: {by_name[p][name].formula}")
    tot = [plan["memory"][p]["stage"].total / GIB for p in precisions]
    r.text(f"  {'total':<28} {tot[0]:>6.1f} GiB {tot[1]:>6.1f} GiB")
    if r.explain:
        for p in precisions:
            acts = plan["memory"][p]["acts"]
            r.text(f"  activations per token per MoE layer, {p.upper()}: {sum(t.value for t in acts) / 1024:.1f} KiB")
            for t in acts:
                r.text(f"      {t.name}: {t.value / 1024:.1f} KiB = {t.formula}")
    for p in precisions:
        m = plan["memory"][p]
        st = m["stage"]
        where = f"stage {st.stage}: {st.blocks[0]} .. {st.blocks[-1]}"
        if m["fits"]:
            verdict = f"fits {cap:g} GiB ({st.total / GIB / cap:.0%} used; {where})"
        else:
            big = st.largest
            verdict = (f"does NOT fit: {st.total / GIB:,.1f} GiB > {cap:g} GiB; largest term: {big.name} "
                       f"{big.value / GIB:,.1f} GiB ({where})")
        r.text(f"  {p.upper() + ':':<28} {verdict}")


def _serving(r: Report, plan):
    from fewchips.plan.estimate import GIB
    s = {t.name: t for t in plan["serving"]}
    r.text(f"\nserving ({'FP8' if plan['fp8'] else 'BF16'} weights, BF16 MLA cache) on "
           f"{plan['layout'].gpus} x {plan['gpu'].name}")
    kv = s["KV cache per token"]
    r.line("KV cache per token", f"{kv.value / 1024:.1f} KiB", kv.formula)
    r.line("weights", f"{s['serving weights'].value / GIB:,.1f} GiB of {s['memory'].value / GIB:,.0f} GiB",
           s["serving weights"].formula)
    tok = s["KV tokens that fit"]
    if tok.value > 0:
        r.line("KV tokens that fit", f"{tok.value:,.0f}", tok.formula)
        r.line("largest batch x context", f"{s['batch at context'].value:,.0f} x {plan['seq']}",
               s["batch at context"].formula + " (upper bound: no activation workspace)")
    else:
        r.line("KV tokens that fit", "0: the weights alone do not fit", tok.formula)


def _time(r: Report, plan):
    from fewchips.plan.estimate import human
    t, gpu = {x.name: x for x in plan["time"]}, plan["gpu"]
    r.text(f"\ntraining {human(plan['tokens'])} tokens at MFU {plan['mfu']:g} "
           f"({'FP8' if plan['fp8'] and gpu.fp8_tflops else 'BF16'} peak)")
    r.line("FLOPs", f"{t['training FLOPs'].value:.3e}", t["training FLOPs"].formula)
    days = t["wall time"].value / 86400
    r.line("wall time", f"{days:,.1f} days" if days >= 1 else f"{t['wall time'].value / 3600:,.2f} hours",
           t["wall time"].formula)
    r.line("GPU-hours", f"{t['GPU-hours'].value:,.0f}", t["GPU-hours"].formula)
    if "cost" in t:
        r.line("cost", f"${t['cost'].value:,.0f}", t["cost"].formula)


def _implied(r: Report, plan):
    from fewchips.plan.estimate import human
    if "implied" not in plan:
        return
    r.text(f"\nimplied MFU of a run of {human(plan['implied_hours'])} {plan['gpu'].name} GPU-hours on "
           f"{human(plan['tokens'])} tokens (seq {plan['flops'].seq})")
    for x in plan["implied"]:
        value = f"{x.value:.1f} TFLOPS" if x.unit == "TFLOPS" else f"{x.value:.1%}"
        r.line(x.name, value, x.formula)
