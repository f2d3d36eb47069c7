"""Forward and forward+backward speed of our model against transformers' DeepseekV3ForCausalLM,
same weights, same inputs, one process, interleaved repeats. Prints the ratio and how far each is
from this machine's measured fp32 matmul rate (model FLOPs / time / matmul FLOP/s).

    python benchmarks/bench_model.py [--presets tiny small] [--batch 4] [--seq 256] [--repeats 3]
"""

import argparse
import time

import torch

from fewchips.runtime import keep_freed_memory
from fewchips import DeepseekV3, ModelConfig


def matmul_rate(n=1024, reps=20):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def forward_flops(model, batch, seq):
    """2 x activated matmul parameters per token (embedding lookup excluded, head included),
    plus causal attention: QK^T and PV over on average seq/2 keys."""
    cfg = model.config
    c = model.num_parameters()
    matmul_params = c["active"] - c["embedding"]
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq  # 2*(d)*seq/2*2
    return batch * seq * (2 * matmul_params + attn)


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    keep_freed_memory()   # for both sides alike: big tensors reuse warm pages (fewchips/runtime.py)
    torch.set_num_threads(2)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for preset in args.presets:
        cfg = ModelConfig.from_preset(preset, num_nextn_predict_layers=0)
        torch.manual_seed(0)
        ours = DeepseekV3(cfg).init_weights()
        hf = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(cfg.to_dict())).float()
        hf.load_state_dict(ours.state_dict(), strict=True)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
        fl = forward_flops(ours, args.batch, args.seq)
        for m in (ours, hf):
            m.train()

        def fwd(m):
            with torch.no_grad():
                out = m(ids)
                return out if torch.is_tensor(out) else out.logits

        def fwdbwd(m):
            out = m(ids)
            out = out if torch.is_tensor(out) else out.logits
            out.float().logsumexp(-1).mean().backward()
            m.zero_grad(set_to_none=True)

        fwd(ours), fwd(hf)                       # warm up
        res = {}
        for name, fn, mult in (("forward", fwd, 1), ("fwd+bwd", fwdbwd, 3)):
            t_ours, t_hf = [], []
            for _ in range(args.repeats):        # interleave so drift hits both equally
                t_ours.append(best_time(lambda: fn(ours), 1))
                t_hf.append(best_time(lambda: fn(hf), 1))
            a, b = min(t_ours), min(t_hf)
            res[name] = (a, b)
            tok = args.batch * args.seq
            print(f"{preset:6s} {name:8s} B={args.batch} T={args.seq}: ours {tok / a:8.0f} tok/s "
                  f"({mult * fl / a / rate:5.1%} of matmul rate)  transformers {tok / b:8.0f} tok/s "
                  f"({mult * fl / b / rate:5.1%})  ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
