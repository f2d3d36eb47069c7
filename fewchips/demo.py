"""Placeholder main job until training lands: a forward pass and a short greedy generation on a
randomly initialised tiny model (the training issue turns `make demo` into train-then-generate)."""

import time

import torch

from fewchips import DeepseekV3, ModelConfig


def main():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model = DeepseekV3(cfg).init_weights().eval()
    ids = torch.tensor([[cfg.bos_token_id, 17, 42, 7]])
    t0 = time.time()
    with torch.no_grad():
        for _ in range(16):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    print(f"greedy tokens from a random tiny model: {ids[0].tolist()} ({time.time() - t0:.2f}s)")


if __name__ == "__main__":
    main()
