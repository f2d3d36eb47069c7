"""Every GPU path of fewchips in one command, for the few minutes a GPU is lent (issue 38).

    OUT=/path/to/out python benchmarks/device_all.py                   # ~10 minutes on one H100/H200
    OUT=/path/to/out python benchmarks/device_all.py --sections env,train
    python benchmarks/device_all.py --smoke                           # every section on CPU, tiny shapes (~1 min)

Sections, in order (what each measures; its budget in seconds on a GPU):
  env          GPU, torch, CUDA and NCCL versions; measured bf16 GEMM TFLOP/s (MFU's denominator) and copy
               bandwidth GB/s                                                                      (30)
  train        training steps of the "gpu" shape (2.56B total, 0.62B activated; 8 x 2,048 tokens, AdamW,
               autocast bf16), bf16 then the FP8 recipe, same init and batch: MFU, FP8 speedup, both
               losses step by step                                                                 (150)
  decode       512-token prompts + 64 greedy tokens at batch 1 and 32 on the "gpu" shape in bf16: the
               engine (eager), `generate`, and the static cache replayed as a CUDA graph            (120)
  fp8_gemm     block-wise FP8 against bf16 at V3 shapes (benchmarks/device_fp8.py): GEMMs, linear and
               grouped experts forward+backward, error against the emulation, quantisation cost   (90)
  parallel     benchmarks/device_parallel.py's checks on a one-rank NCCL group; a pipeline chunk's F/B/W
               (device_pipeline.py); with 2+ GPUs, `fewchips train` under torchrun as dp2, ep2, pp2
               dualpipev (and pp2 x ep2 with 4+) through benchmarks/bench_pipeline.py              (180)
  serve_ranks  `fewchips serve` over N ranks against one process (device_serve_ranks.py); one GPU: the
               one-process server only                                                             (90)
  paged        the paged engine under load (benchmarks/bench_engine.py) on the "gpu" shape: 96 chats
               against the slot engine, a shared prefix's TTFT, chunked prefill's gaps             (120)
  decode_compiled  the engine's compiled decode step at batch 1 and 32: compile time, then tok/s; last,
               as its compile time is the least certain                                            (150)

Each section runs in its own process (a CUDA error cannot poison the next) and writes OUT/<section>.json
as it measures, so a crash or a timeout keeps what was measured; a section that raises, crashes or runs
past its budget is recorded ({"error", "traceback"}) and the next one runs. OUT/summary.json (rewritten
after every section) holds each section's status and the headline figures. Exit code 1 if any failed.

--smoke runs each section's code on CPU at tiny shapes: FP8 `scaled_mm` becomes the emulated FP8 path,
NCCL becomes gloo (multi-process parts: 2 processes), CUDA graphs and torch.compile become eager steps, bf16
inference fp32; each JSON names what was "substituted" and "skipped". tests/bench/test_device_all.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the device machine has no installed fewchips: the tree's, and tests/ for the helpers the scripts share
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests")]

# issue 38's anchor shape "gpu": 2.56B total, 0.62B activated (transformers on an H200: 33.4% MFU)
GPU_SHAPE = dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=12, intermediate_size=5632,
                 num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1, moe_intermediate_size=512,
                 n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                 rope_scaling=None, max_position_embeddings=4096, num_nextn_predict_layers=0)
# every mechanism of the gpu shape (dense first layer, groups, shared expert), seconds on a CPU
SMOKE_SHAPE = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=3, intermediate_size=256,
                   num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, moe_intermediate_size=64,
                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                   rope_scaling=None, max_position_embeddings=512, num_nextn_predict_layers=0)
ANCHORS = {"gpu": "H200", "transformers_train_mfu": 0.334, "bf16_gemm_tflops": 794,
           "transformers_decode_b1_tok_s": 289, "transformers_decode_b32_tok_s": 1721, "fp8_gemm_tflops": 1310}
GOALS = {"train_bf16_mfu": 0.45, "train_fp8_speedup": 1.3, "decode_b1_tok_s": 870, "fp8_gemm_speedup": 1.5}
SMOKE_CPU = "CPU (smoke)"


class Section:
    """One section's record, written to OUT/<name>.json whenever it grows."""

    def __init__(self, name: str, out: str, smoke: bool):
        self.path = os.path.join(out, f"{name}.json")
        self.rec = {"section": name, "smoke": smoke, "finished": False, "substituted": {}, "skipped": {}}
        self.t0 = time.time()

    def put(self, **kw):
        self.rec.update(kw)
        self.save()

    def substitute(self, what: str, by: str):
        self.rec["substituted"][what] = by
        self.save()

    def skip(self, what: str, why: str):
        self.rec["skipped"][what] = why
        self.save()

    def save(self):
        self.rec["seconds"] = round(time.time() - self.t0, 2)
        write_json(self.path, self.rec)


def write_json(path: str, obj):
    tmp = path + ".tmp"                    # never a half-written file, whenever the process is killed
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# helpers the sections share (imported inside the section's own process)
# ---------------------------------------------------------------------------------------------

def device(args):
    import torch
    return torch.device("cpu" if args.smoke else "cuda")


def build_model(cfg, dev, dtype, seed: int = 0, std: float = 0.006):
    """Random weights drawn on the device (the 2.56B shape in seconds), allocated once in dtype."""
    import torch

    from fewchips.checkpoint.load import empty_model
    return empty_model(cfg, dev, dtype).init_weights(std, generator=torch.Generator(dev).manual_seed(seed))


def gemm_rate(dev, smoke: bool) -> dict:
    """The best bf16 GEMM rate over square sizes: what MFU is measured against."""
    import torch

    from device_fp8 import timed
    by_size = {}
    for n in ((256, 512) if smoke else (4096, 8192, 16384)):
        a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
        t = timed(lambda: a @ b, dev, warmup=2, iters=3 if smoke else 10)
        by_size[n] = 2 * n ** 3 / t / 1e12
    return {"bf16_gemm_tflops": max(by_size.values()), "bf16_gemm_tflops_by_size": by_size}


def measured_gemm_rate(s: Section, args, dev) -> float:
    """env's measured rate if it ran (same mode), else measured here."""
    env = read_json(os.path.join(args.out, "env.json"))
    if env.get("bf16_gemm_tflops") and env.get("smoke") == args.smoke:
        s.put(gemm_rate_from="env.json")
        return env["bf16_gemm_tflops"]
    s.put(gemm_rate_from="measured in this section (env.json missing)")
    return gemm_rate(dev, args.smoke)["bf16_gemm_tflops"]


def shape(args, **overrides):
    from fewchips import ModelConfig
    return ModelConfig(**{**(SMOKE_SHAPE if args.smoke else GPU_SHAPE), **overrides})


def free_cuda():
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# the sections: each fills its Section as it measures and raises on a failed check
# ---------------------------------------------------------------------------------------------

def env(s: Section, args):
    import platform

    import torch
    dev = device(args)
    s.put(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        s.put(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
              capability=list(torch.cuda.get_device_capability(0)), memory_gib=props.total_memory / 2**30,
              nccl=".".join(map(str, torch.cuda.nccl.version())), cudnn=torch.backends.cudnn.version())
    else:
        from machine import cpu_name
        s.put(gpu=None, cpu=cpu_name(), threads=torch.get_num_threads())
        s.substitute("GPU", SMOKE_CPU)
    s.put(**gemm_rate(dev, args.smoke))
    from device_fp8 import timed
    n = (16 if args.smoke else 2048) * 2**20 // 2                         # bf16 elements: 16 MiB / 2 GiB
    x = torch.empty(n, device=dev, dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), dev, warmup=2, iters=5 if args.smoke else 20)
    s.put(copy_GBps=2 * x.numel() * x.element_size() / t / 1e9, copy_bytes=x.numel() * x.element_size())


def train(s: Section, args):
    import torch

    from device_fp8 import train_run
    from fewchips.fp8.gemm import fast_path_available
    from fewchips.plan.estimate import count_params, flops_per_token
    from fewchips.train.build import compile_layers
    dev = device(args)
    cfg = shape(args)
    B, T = (2, 32) if args.smoke else (args.train_batch, args.train_seq)
    warmup, iters = (1, 2) if args.smoke else (2, 5)
    if args.smoke:
        backend, why = "emulate", "smoke"
        s.substitute("FP8 scaled_mm", "the emulated FP8 path (fp8 backend 'emulate', its CPU twin)")
    else:
        fast, why = fast_path_available(dev)
        backend = "scaled_mm" if fast else "emulate"
    if args.train_compile and args.smoke:
        s.skip("--train-compile", "torch.compile of every layer takes minutes on a CPU")
    rate = measured_gemm_rate(s, args, dev)
    flops_tok = flops_per_token(count_params(cfg), T).training_main
    s.put(shape="smoke" if args.smoke else "gpu", seq=T, warmup_steps=warmup, timed_steps=iters,
          fp8_backend=backend, fp8_backend_reason=why, gemm_tflops=rate, train_flops_per_token=flops_tok,
          compiled=bool(args.train_compile and not args.smoke), goals=GOALS, anchors=ANCHORS)

    def one(kind, ids):
        model = build_model(cfg, dev, torch.float32)                      # fp32 master weights, same init
        if args.train_compile and not args.smoke:
            compile_layers(model)
        r = train_run(model, ids, dev, backend if kind == "fp8" else None, warmup, iters)
        r["tflops"] = flops_tok * r["tok_per_s"] / 1e12
        r["mfu"] = r["tflops"] / rate
        return r

    g = torch.Generator().manual_seed(1)
    while True:                                                           # one batch, repeated: the loss falls
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(dev)
        out, oom = {}, None
        try:
            for kind in ("bf16", "fp8"):
                out[kind] = one(kind, ids)
                free_cuda()
                s.put(batch=B, **out)
        except torch.cuda.OutOfMemoryError as e:
            if B == 1:
                raise
            oom = str(e)[:300]
        if oom is None:
            break
        free_cuda()                                     # the failed step's frames went with the exception
        s.put(**{f"oom_at_batch_{B}": oom})
        B //= 2                                         # both kinds again, at the same batch
    lb, lf = out["bf16"]["losses"], out["fp8"]["losses"]
    s.put(fp8_speedup=out["bf16"]["step_s"] / out["fp8"]["step_s"],
          loss_max_abs_diff=max(abs(a - b) for a, b in zip(lb, lf)),
          loss_fell={"bf16": lb[-1] < lb[0], "fp8": lf[-1] < lf[0]})
    if not torch.isfinite(torch.tensor(lb + lf)).all():
        raise RuntimeError(f"a non-finite loss: bf16 {lb}, fp8 {lf}")


def decode_setup(s: Section, args):
    """The bf16 model (fp32 in smoke), its settings and the batch-1 and batch-32 prompts."""
    import torch

    from fewchips.inference.sampling import SamplingParams
    dev = device(args)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    ctx, new = (32, 8) if args.smoke else (512, 64)
    if args.smoke:
        s.substitute("bf16", "fp32 on CPU")
    model = build_model(shape(args), dev, dtype).eval()
    s.put(shape="smoke" if args.smoke else "gpu", dtype=str(dtype), prompt=ctx, new_tokens=new,
          goals={"decode_b1_tok_s": GOALS["decode_b1_tok_s"]}, anchors=ANCHORS)
    g = torch.Generator().manual_seed(2)
    rows = {B: torch.randint(3, model.config.vocab_size, (B, ctx), generator=g) for B in (1, 32)}
    return model, SamplingParams(max_tokens=new), rows     # no stop tokens: every row decodes `new` tokens


def engine_for(model, B, ctx, new, **kw):
    from fewchips.inference.engine import Engine
    return Engine(model, max_batch=B, max_len=ctx + new + 8, max_prefill_tokens=min(B * ctx, 8192), **kw)


def attempt(s: Section, key: str, fn):
    """fn() -> {name: value} into the record; a failure is recorded under errors[key] and the caller goes on."""
    try:
        s.put(**fn())
    except Exception as e:                                  # noqa: BLE001 - raised at the section's end
        s.rec.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:1000]
        s.save()


def decode(s: Section, args):
    import torch

    from bench_engine import decode_rate
    from device_inference import Ours
    from fewchips.inference.generate import generate
    from fewchips.inference.sampling import SamplingParams
    dev = device(args)
    if args.smoke:
        s.substitute("CUDA graph replay", "the same static cache, stepped eagerly")
    model, params, rows = decode_setup(s, args)
    new = params.max_tokens

    def engine(B, ids):
        e = engine_for(model, B, ids.shape[1], new)
        decode_rate(e, ids[:, :8].tolist(), SamplingParams(max_tokens=4))        # warm-up
        rate, outs, _ = decode_rate(e, ids.tolist(), params)
        if any(len(o) != new for o in outs):
            raise RuntimeError(f"the engine decoded {[len(o) for o in outs]} tokens, not {new} each")
        return {f"engine_b{B}_tok_s": rate}

    def plain(B, ids):
        t0 = time.perf_counter()
        out = generate(model, ids.to(dev), params=params)
        if out.shape != (B, ids.shape[1] + new):
            raise RuntimeError(f"generate returned {tuple(out.shape)}")
        return {f"generate_b{B}_tok_s_with_prefill": B * new / (time.perf_counter() - t0)}

    def static(B, ids):
        o = Ours(model, graph=True)                       # device_inference's static cache + CUDA graph
        tok = o.start(ids.to(dev), new + 8)
        for _ in range(3):
            tok = o.step(tok)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new):
            tok = o.step(tok)
        tok.cpu()
        return {f"static_graph_b{B}_tok_s": B * new / (time.perf_counter() - t0)}
    with torch.inference_mode():
        for fn in (engine, plain, static):               # graph capture last: a failed capture can spoil the rest
            for B, ids in rows.items():
                attempt(s, f"{fn.__name__}_b{B}", lambda: fn(B, ids))
                free_cuda()
    if s.rec.get("errors"):
        raise RuntimeError(f"failed: {', '.join(s.rec['errors'])}")


def decode_compiled(s: Section, args):
    import torch

    from bench_engine import decode_rate
    if args.smoke:
        s.substitute("torch.compile", "eager steps (inductor takes ~30 s per graph on a CPU)")
    model, params, rows = decode_setup(s, args)
    with torch.inference_mode():
        for B, ids in rows.items():                       # one graph per batch size (batch 1 is its own)
            e = engine_for(model, B, ids.shape[1], params.max_tokens, compile=not args.smoke)
            t0 = time.perf_counter()
            decode_rate(e, ids.tolist(), params)                  # the compile
            s.put(**{f"engine_compiled_b{B}_first_run_s": time.perf_counter() - t0})
            s.put(**{f"engine_compiled_b{B}_tok_s": decode_rate(e, ids.tolist(), params)[0]})


def fp8_gemm(s: Section, args):
    from device_fp8 import correctness, experts_case, gemm_cases, linear_case, quantise_cost
    from fewchips.fp8.gemm import fast_path_available
    dev = device(args)
    if args.smoke:
        fast, why = False, "smoke"
        s.substitute("FP8 scaled_mm", "the emulated FP8 path (its CPU twin): speedups are not meaningful")
        s.skip("quantisation cost (torch.compile)", "inductor's compile takes long on a CPU")
    else:
        fast, why = fast_path_available(dev)
    backend = "scaled_mm" if fast else "emulate"
    M, D, FD, FE = (256, 256, 384, 128) if args.smoke else (8192, 7168, 18432, 2048)
    it = dict(warmup=1, iters=2) if args.smoke else {}
    s.put(backend=backend, fast_path_reason=why, tokens=M, hidden=D, dense_ffn=FD, expert_ffn=FE,
          goals={"fp8_gemm_speedup": GOALS["fp8_gemm_speedup"]}, anchors=ANCHORS)
    s.put(correctness=correctness(dev, backend))
    gemms = gemm_cases(dev, backend, M, D, FD, FE, it)
    s.put(gemm=gemms, gemm_min_speedup=min(v["speedup"] for v in gemms.values()))
    s.put(linear={"dense up": linear_case(dev, backend, M, D, FD, it),
                  "dense down": linear_case(dev, backend, M, FD, D, it)})
    s.put(experts=experts_case(dev, backend, M, D, FE, 8 if args.smoke else 32, it))
    if not args.smoke:
        s.put(quantise=quantise_cost(dev, M, D, FD, it))
    worst = max(s.rec["correctness"][k] for k in ("y", "dx", "dw"))
    if worst > 1e-3:                                      # what tests/fp8 asserts on a Hopper GPU
        raise RuntimeError(f"the fast path differs from the emulation by {worst:.3g} (relative)")


def parallel(s: Section, args):
    import torch

    import bench_pipeline
    from device_parallel import run_checks
    from device_pipeline import measure
    dev = device(args)
    n = 2 if args.smoke else torch.cuda.device_count()
    if args.smoke:
        s.substitute("NCCL", "gloo: one process for the checks, 2 CPU processes for the layouts")
    rows, ok = run_checks(cpu=args.smoke, on_row=lambda rows: s.put(one_rank_checks=list(rows)))
    s.put(one_rank_checks_passed=ok)
    s.put(pipeline_chunk=measure(dev, "tiny" if args.smoke else "small", 1 if args.smoke else 2,
                                 1 if args.smoke else 4, 32 if args.smoke else 2048, 1 if args.smoke else 5))
    wanted = ("ep2", "pp2-dualpipev") if args.smoke else ("dp2", "ep2", "pp2-dualpipev", "pp2-ep2-dualpipev")
    layouts = [name for name in wanted if bench_pipeline.LAYOUTS[name][0] <= n]
    for name in wanted:
        if name not in layouts:
            s.skip(f"layout {name}", f"needs {bench_pipeline.LAYOUTS[name][0]} GPUs, found {n}")
    run = argparse.Namespace(preset="tiny" if args.smoke else "small", layers=4, batch=4 if args.smoke else 8,
                             seq=32 if args.smoke else 1024, microbatches=4, steps=1 if args.smoke else 3,
                             warmup=1 if args.smoke else 2, dtype="fp32" if args.smoke else "bf16",
                             corpus_mb=0.2 if args.smoke else 2.0, timeout=120 if args.smoke else 300,
                             no_overlap=False, pp_overlap="auto")
    done, failed = {}, []
    for name in layouts:                       # `fewchips train` under torchrun: NCCL on GPUs, gloo in smoke
        try:
            done[name] = bench_pipeline.run_layout(name, run)
        except (Exception, SystemExit) as e:   # run_layout exits with the ranks' stderr
            done[name] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
            failed.append(name)
        s.put(layouts=done)
    if not ok or failed:
        raise RuntimeError(f"failed: {[r['check'] for r in rows if not r['passed']] + failed}")


def serve_ranks(s: Section, args):
    import torch

    from device_serve_ranks import measure
    n = 2 if args.smoke else torch.cuda.device_count()
    if args.smoke:
        s.substitute("NCCL", "gloo, 2 CPU processes")
        s.skip("the FP8 + redundant-experts pass", "the same code with other flags; runs on GPUs")
    elif n < 2:
        s.skip("serving over ranks", f"needs 2+ GPUs, found {n}: the one-process server only")
    res = measure(n, args.smoke, passes=("",) if args.smoke else ("", "fp8_replicas_"), ranked=n >= 2)
    s.put(**res)
    bad = [k for k, v in res.items() if k.endswith("tokens_equal") and not v]
    if bad:
        raise RuntimeError(f"over ranks, greedy tokens differ from one process: {bad}")


def paged(s: Section, args):
    import torch

    import bench_engine
    dev = device(args)
    if args.smoke:
        s.substitute("bf16", "fp32 on CPU")
        s.substitute("sizes", "12 chats of 16 + 8 tokens, a 64-token shared prefix, a 128-token prompt")
    model = build_model(shape(args, max_position_embeddings=512 if args.smoke else 8192), dev,
                        torch.float32 if args.smoke else torch.bfloat16).eval()
    active = model.num_parameters()["active"]
    rate = measured_gemm_rate(s, args, dev) * 1e12
    sizes = (dict(concurrency=dict(n_requests=12, prompt=16, new=8, max_len=64, cap_requests=4),
                  prefix=dict(prefix_len=64, n=4, tail=8), chunking=dict(long=128, chunk=32, streams=2))
             if args.smoke else dict(concurrency={}, prefix={}, chunking={}))   # bench_engine's sizes
    s.put(shape="smoke" if args.smoke else "gpu", dtype=str(next(model.parameters()).dtype), pairs=1)
    with torch.inference_mode():
        s.put(concurrency=bench_engine.concurrency(model, 1, **sizes["concurrency"]))
        s.put(prefix=bench_engine.prefix(model, 1, rate, active, **sizes["prefix"]))
        s.put(chunking=bench_engine.chunking(model, 1, **sizes["chunking"]))


SECTIONS = {   # name: (function, budget seconds on a GPU, in --smoke)
    "env": (env, 30, 60),
    "train": (train, 150, 90),
    "decode": (decode, 120, 90),
    "fp8_gemm": (fp8_gemm, 90, 90),
    "parallel": (parallel, 180, 150),
    "serve_ranks": (serve_ranks, 90, 120),
    "paged": (paged, 120, 90),
    "decode_compiled": (decode_compiled, 150, 30),
}


# ---------------------------------------------------------------------------------------------
# running: the parent starts one process per section and records what it left
# ---------------------------------------------------------------------------------------------

def run_child(name: str, args) -> int:
    s = Section(name, args.out, args.smoke)
    s.save()
    try:
        for spec in args.fail_section:                          # the test hook: a section that fails on purpose
            target, _, mode = spec.partition(":")
            if target == name:
                s.put(reached=True)
                if mode == "exit":
                    os._exit(3)
                if mode == "hang":
                    time.sleep(10**6)
                raise RuntimeError(f"deliberate failure (--fail-section {spec})")
        import torch
        if args.smoke:                     # tiny shapes: one thread is fastest, and never oversubscribes a CI machine
            torch.set_num_threads(1)
        s.put(device=torch.cuda.get_device_name(0) if not args.smoke else SMOKE_CPU)
        SECTIONS[name][0](s, args)
    except BaseException as e:                                   # noqa: BLE001 - recorded, then the next section
        s.rec.update(error=f"{type(e).__name__}: {e}"[:3000], traceback=traceback.format_exc()[-8000:])
        s.save()
        return 1
    s.rec["finished"] = True
    s.save()
    return 0


def run_section(name: str, budget: float, args) -> dict:
    """The section in its own process group, its output echoed; killed past `budget` seconds."""
    path = os.path.join(args.out, f"{name}.json")
    if os.path.exists(path):
        os.remove(path)
    env_ = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    env_.setdefault("NCCL_DEBUG", "WARN")
    if args.smoke:
        env_["OMP_NUM_THREADS"] = "1"      # the processes a section starts (torchrun ranks, servers) too
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", name]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    tail = deque(maxlen=80)

    def echo():
        for line in proc.stdout:
            tail.append(line)
            print(f"[{name}] {line}", end="", flush=True)
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    status = None
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        status, rc = "timeout", None
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):         # the section and whatever it started (torchrun, servers)
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            if sig == signal.SIGTERM:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                time.sleep(0.2)
        reader.join(timeout=5)
    rec = read_json(path)
    if status == "timeout":
        rec["error"] = f"ran past its budget of {budget:.0f} s and was killed (what it measured is kept)"
    elif "error" in rec:
        status = "error"
    elif rc != 0 or not rec.get("finished"):
        status = "crashed"
        rec["error"] = f"the section's process exited with code {rc} before finishing"
    else:
        status = "ok"
    if status != "ok":
        rec.setdefault("section", name)
        rec.setdefault("traceback", "".join(tail)[-8000:])
        rec["status"] = status
        write_json(path, rec)
    return {"status": status, "seconds": round(time.time() - t0, 1), "budget_s": round(budget),
            **({"error": rec["error"].splitlines()[0][:300]} if status != "ok" else {})}


def headline(out: str) -> dict:
    """The figures issue 38 asks for, from the sections' JSON (None where a section did not get there)."""
    r = {n: read_json(os.path.join(out, f"{n}.json")) for n in SECTIONS}

    def get(sec, *keys):
        v = r[sec]
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v
    return {"gpu": get("env", "gpu"), "bf16_gemm_tflops": get("env", "bf16_gemm_tflops"),
            "train_bf16_mfu": get("train", "bf16", "mfu"), "train_fp8_mfu": get("train", "fp8", "mfu"),
            "train_fp8_speedup": get("train", "fp8_speedup"),
            "decode_engine_b1_tok_s": get("decode", "engine_b1_tok_s"),
            "decode_engine_b32_tok_s": get("decode", "engine_b32_tok_s"),
            "decode_engine_compiled_b1_tok_s": get("decode_compiled", "engine_compiled_b1_tok_s"),
            "decode_static_graph_b1_tok_s": get("decode", "static_graph_b1_tok_s"),
            "fp8_gemm_min_speedup": get("fp8_gemm", "gemm_min_speedup"),
            "parallel_one_rank_passed": get("parallel", "one_rank_checks_passed"),
            "parallel_layouts": {k: "error" not in v for k, v in (get("parallel", "layouts") or {}).items()},
            "serve_ranks_tokens_equal": get("serve_ranks", "tokens_equal"),
            "paged_vs_slot_tokens_per_s": get("paged", "concurrency", "ratio_tokens_per_s"),
            "goals": GOALS, "anchors": ANCHORS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to run")
    g.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, run in this file's order (default: all: {','.join(SECTIONS)})")
    g.add_argument("--smoke", action="store_true",
                   help="every section's code path on CPU at tiny shapes, CUDA-only pieces replaced (~1 min)")
    g.add_argument("--out", default=os.environ.get("OUT", "device_out"),
                   help="folder for <section>.json and summary.json (default: $OUT, else ./device_out)")
    g = ap.add_argument_group("time")
    g.add_argument("--total-budget", type=float, default=None,
                   help="seconds for the whole run (default 600 on a GPU, 480 with --smoke); a section gets what "
                        "is left when that is less than its own budget, none when under 10 s")
    g.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help="override one section's budget (repeatable), e.g. --budget train=300")
    g = ap.add_argument_group("train section")
    g.add_argument("--train-batch", type=int, default=8, help="sequences per step (halved once on out-of-memory)")
    g.add_argument("--train-seq", type=int, default=2048, help="tokens per sequence")
    g.add_argument("--train-compile", action="store_true",
                   help="torch.compile each layer (the trainer's --compile); adds its compile time to the budget")
    g = ap.add_argument_group("tests")
    g.add_argument("--fail-section", action="append", default=[], metavar="SECTION[:raise|exit|hang]",
                   help="make a section fail on purpose: raise, exit without a record, or hang past its budget")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names + [f.partition(":")[0] for f in args.fail_section] if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    if any(f.partition(":")[2] not in ("", "raise", "exit", "hang") for f in args.fail_section):
        ap.error(f"--fail-section {args.fail_section}: the mode after ':' is raise, exit or hang")
    budgets = {n: SECTIONS[n][2 if args.smoke else 1] for n in SECTIONS}
    for spec in args.budget:
        n, _, sec = spec.partition("=")
        if n not in SECTIONS or not sec.replace(".", "", 1).isdigit():
            ap.error(f"--budget {spec!r}: want SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)}")
        budgets[n] = float(sec)
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        return run_child(args.child, args)

    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            print("device_all: no CUDA device here; nothing to measure (use --smoke to check the script on CPU)")
            return 0
    total = args.total_budget or (480 if args.smoke else 600)
    t0 = time.time()
    summary = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "smoke": args.smoke,
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "total_budget_s": total,
               "sections": {}}
    for name in (n for n in SECTIONS if n in names):
        left = total - (time.time() - t0)
        if left < 10:
            summary["sections"][name] = {"status": "not run", "error": "the total budget was spent"}
            write_json(os.path.join(args.out, f"{name}.json"),
                       {"section": name, "status": "not run", "error": "the total budget was spent"})
        else:
            print(f"== {name} (budget {min(budgets[name], left):.0f} s)", flush=True)
            summary["sections"][name] = run_section(name, min(budgets[name], left), args)
            print(f"== {name}: {json.dumps(summary['sections'][name])}", flush=True)
        summary["wall_s"] = round(time.time() - t0, 1)
        summary["failed"] = [n for n, v in summary["sections"].items() if v["status"] != "ok"]
        summary["headline"] = headline(args.out)
        write_json(os.path.join(args.out, "summary.json"), summary)
    print(json.dumps(summary, indent=1), flush=True)
    print(f"device_all: {len(summary['sections']) - len(summary['failed'])}/{len(summary['sections'])} sections ok "
          f"in {summary['wall_s']:.0f} s; JSON in {args.out}", flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
