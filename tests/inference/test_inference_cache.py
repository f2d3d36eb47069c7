"""Decoding through the MLA latent cache (absorbed attention) gives the full forward's logits at every position."""

import pytest
import torch

from fewchips import LatentCache

from inference_utils import YARN, tiny_model

CONFIGS = {"q_lora": {}, "no_q_lora": {"q_lora_rank": None}, "yarn": {"rope_scaling": YARN}}


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_token_by_token_decode_matches_full_forward(name, static):
    """static: every step attends over the whole buffer (fixed shapes for CUDA graphs), masked."""
    model = tiny_model(1, **CONFIGS[name])
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(model.config, n_slots=2, max_len=32, static=static)
        P = 5   # prefill 5 tokens (expanded form), then one token at a time (absorbed form)
        steps = [model(ids[:, :P], cache=cache)]
        for t in range(P, ids.shape[1]):
            pos = torch.full((2, 1), t)
            steps.append(model(ids[:, t:t + 1], positions=pos, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_decode_in_reused_slots_matches_full_forward(name):
    """Several tokens per step from a non-zero position (MTP verification), into cache rows that held
    another request before: stale entries beyond the current position must not be attended."""
    model = tiny_model(2, **CONFIGS[name])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(model.config, n_slots=4, max_len=40)
        slots = torch.tensor([3, 1])
        junk = torch.randint(3, model.config.vocab_size, (2, 40), generator=g)
        model(junk, cache=cache, slots=slots)                   # an earlier, longer request
        out = [model(ids[:, :3], cache=cache, slots=slots)]
        t = 3
        for n in (2, 1, 4, 3, 2, 5):
            pos = torch.arange(t, t + n).expand(2, n)
            out.append(model(ids[:, t:t + n], positions=pos, cache=cache, slots=slots))
            t += n
    torch.testing.assert_close(torch.cat(out, 1), full[:, :t], rtol=1e-4, atol=1e-5)


def test_rows_at_different_positions():
    """One decode step where every row sits at its own position (continuous batching, ragged prompts
    right-padded in the prefill): each row equals its own unpadded full forward."""
    model = tiny_model(3, rope_scaling=YARN)
    g = torch.Generator().manual_seed(2)
    lens = [4, 9, 6]
    seqs = [torch.randint(3, model.config.vocab_size, (n + 3,), generator=g) for n in lens]
    with torch.no_grad():
        cache = LatentCache(model.config, n_slots=3, max_len=16)
        T = max(lens)
        padded = torch.zeros(3, T, dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, lens)):
            padded[i, :n] = s[:n]
        pre = model(padded, cache=cache)
        got = [[pre[i, n - 1]] for i, n in enumerate(lens)]
        for k in range(3):
            pos = torch.tensor([[n + k] for n in lens])
            step = model(torch.stack([s[n + k] for s, n in zip(seqs, lens)])[:, None], positions=pos, cache=cache)
            for i in range(3):
                got[i].append(step[i, 0])
        for i, (s, n) in enumerate(zip(seqs, lens)):
            want = model(s[None, : n + 3])[0, n - 1:]
            torch.testing.assert_close(torch.stack(got[i]), want, rtol=1e-4, atol=1e-5)


def test_cache_bytes_per_token():
    """The cache holds the normalised latent and the rotated rope key, 512 + 64 = 576 numbers per token
    per layer for V3: 70,272 bytes per token over its 61 layers in BF16 (68.6 KiB), 1,152 more with the
    MTP layer; and `bytes_per_token` is what one more cache position really allocates."""
    from fewchips import ModelConfig
    v3 = ModelConfig.from_preset("v3")
    assert LatentCache(v3, 1, 1, n_layers=61, dtype=torch.bfloat16, device="meta").bytes_per_token == 70_272
    assert LatentCache(v3, 1, 1, dtype=torch.bfloat16, device="meta").bytes_per_token == 70_272 + 1_152
    cfg = tiny_model(0).config
    for dtype in (torch.float32, torch.bfloat16):
        short, longer = LatentCache(cfg, 3, 8, dtype=dtype), LatentCache(cfg, 3, 9, dtype=dtype)
        assert longer.nbytes - short.nbytes == 3 * short.bytes_per_token
