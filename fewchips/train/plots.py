"""PNG plots of a run, from its metrics.jsonl: loss curves, lr and MaxVio, and an expert-load
heatmap (layers x experts, load / mean load since the start of the run)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..files import atomic_path  # noqa: E402


def read_metrics(path):
    """The records of metrics.jsonl; a line cut short by a crash is skipped."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _per_source(records, prefix: str) -> list[str]:
    return sorted({k for r in records for k in r if k.startswith(prefix)})


def write_plots(metrics_path, load_LE, out_dir, unigram_entropy=None, layer_names=None):
    recs = read_metrics(metrics_path)
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    a = ax[0, 0]
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (main)")
    a.plot([r["step"] for r in train], [r["mtp_loss"] for r in train], label="train (MTP, next-next token)", alpha=0.7)
    if val:
        a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    for key in _per_source(val, "val_loss_"):          # a mixture: each source's own curve
        a.plot([r["step"] for r in val if key in r], [r[key] for r in val if key in r], ".--", label=key[9:], alpha=0.7)
    if unigram_entropy:
        a.axhline(unigram_entropy, color="grey", ls="--", label="unigram entropy")
    a.set(xlabel="step", ylabel="nats / token", title="loss")
    a.legend(fontsize=8)
    a = ax[0, 1]
    if val:
        a.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "o-", label="all")
    for key in _per_source(val, "val_bpb_"):
        a.plot([r["step"] for r in val if key in r], [r[key] for r in val if key in r], ".--", label=key[8:], alpha=0.7)
    if _per_source(val, "val_bpb_"):
        a.legend(fontsize=8)
    a.set(xlabel="step", ylabel="bits / byte", title="validation bits per byte")
    a = ax[1, 0]
    if train and train[0].get("maxvio"):
        n_layers = len(train[0]["maxvio"])
        for i in range(n_layers):
            name = layer_names[i] if layer_names and i < len(layer_names) else f"MoE layer {i}"
            a.plot([r["step"] for r in train], [r["maxvio"][i] for r in train], label=name)
        a.legend(fontsize=7)
    a.set(xlabel="step", ylabel="(max - mean) / mean load", title="expert-load imbalance (MaxVio)")
    a = ax[1, 1]
    a.plot([r["step"] for r in train], [r["lr"] for r in train])
    a.set(xlabel="step", ylabel="lr", title="learning rate")
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "loss.png"))

    load = load_LE.float()
    if load.numel() and load.sum() > 0:
        rel = (load / load.mean(-1, keepdim=True).clamp_min(1e-9)).numpy()
        fig, a = plt.subplots(figsize=(max(5, 0.35 * rel.shape[1] + 2), 0.5 * rel.shape[0] + 2))
        im = a.imshow(rel, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        top = float(rel.max())
        a.set(xlabel="expert", title="expert load / mean load (whole run)"
              + (f"\nthe busiest expert {top:.1f}x; colours stop at 2" if top > 2 else ""))
        a.set_yticks(range(rel.shape[0]), layer_names or [f"MoE layer {i}" for i in range(rel.shape[0])])
        bar = fig.colorbar(im, ax=a, extend="max" if top > 2 else "neither")   # an arrow: values beyond 2
        bar.set_ticks([0, 0.5, 1, 1.5, 2], labels=["0", "0.5", "1", "1.5", "≥ 2" if top > 2 else "2"])
        fig.tight_layout()
        _save(fig, os.path.join(out_dir, "expert_load.png"))


def _save(fig, path):
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def write_grpo_plots(metrics_path, out_dir):
    """grpo.png: reward (mean and spread of the sampled groups, and greedy on held-out prompts), KL to
    the starting model, completion length."""
    recs = read_metrics(metrics_path)
    train = [r for r in recs if "reward_mean" in r]
    val = [r for r in recs if "val_reward" in r]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    steps = [r["step"] for r in train]
    mean = [r["reward_mean"] for r in train]
    std = [r["reward_std"] for r in train]
    ax[0].plot(steps, mean, label="sampled (group mean)")
    ax[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    if val:
        ax[0].plot([r["step"] for r in val], [r["val_reward"] for r in val], "o-", label="held-out prompts (greedy)")
    ax[0].set(xlabel="step", ylabel="reward", title="reward")
    ax[0].legend()
    ax[1].plot(steps, [r["kl"] for r in train])
    ax[1].set(xlabel="step", ylabel="KL (k3, per token)", title="KL to the starting model")
    ax[2].plot(steps, [r["completion_len"] for r in train])
    ax[2].set(xlabel="step", ylabel="tokens", title="completion length")
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "grpo.png"))
