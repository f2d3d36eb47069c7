"""Shared fixtures for the inference and server tests: tiny random models and a tiny tokenizer."""

from __future__ import annotations

import json
import os

import torch

from fewchips import DeepseekV3, ModelConfig, save_pretrained

TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, intermediate_size=128,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, moe_intermediate_size=32,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            rope_scaling=None, max_position_embeddings=256, num_nextn_predict_layers=1,
            bos_token_id=1, eos_token_id=2)

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, std: float = 0.08, **overrides) -> DeepseekV3:
    """A random model whose logits are spread enough that greedy choices are not near-ties."""
    cfg = tiny_config(**overrides)
    g = torch.Generator().manual_seed(seed)
    model = DeepseekV3(cfg).init_weights(std=std, generator=g)
    with torch.no_grad():   # a non-zero balancing bias, so selection on s + b is exercised
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.rand(m.e_score_correction_bias.shape, generator=g) * 0.1)
    return model.eval()


def copy_drafter_model(noise: float, seed: int = 0, hidden_gain: float = 0.3):
    """A 1-layer model whose MTP block is a noisy copy of its decoder layer: a drafter that is often
    right, so both acceptances and rejections happen (a random MTP module is almost never right).
    Embedding rows have unit RMS, so enorm(emb) ~ emb and the MTP block at position i sees what the
    main layer sees at i+1. The hidden half of eh_proj is live (x = enorm(emb) + gain·hnorm(h) + noise)
    and the norms have distinct weights, so the drafts depend on hnorm(h), on which hidden state feeds
    the MTP module, and on each norm being the right one."""
    model = tiny_model(seed, num_hidden_layers=1, first_k_dense_replace=0)
    D = model.config.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.div_(emb.pow(2).mean(-1, keepdim=True).sqrt())
        model.mtp[0].load_state_dict(model.model.layers[0].state_dict(), strict=False)
        eh = torch.cat((torch.eye(D), hidden_gain * torch.eye(D)), 1)
        model.mtp[0].eh_proj.weight.copy_(eh + noise * torch.randn(D, 2 * D, generator=g))
        for norm, spread in ((model.model.norm, 0.1), (model.mtp[0].enorm, 0.05), (model.mtp[0].hnorm, 0.5)):
            norm.weight.uniform_(1 - spread, 1 + spread, generator=g)
        model.mtp[0].shared_head.norm.weight.copy_(model.model.norm.weight
                                                   * torch.empty(D).uniform_(0.95, 1.05, generator=g))
    return model


CORPUS = ("the quick brown fox jumps over the lazy dog. hello world! how are you today? "
          "one two three four five six seven eight nine ten. a b c d e f g h i j k l m n o p. ") * 4


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained here on a few sentences (no downloads), with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return tok


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
                 "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tiny_model_dir(path, seed: int = 0, **overrides) -> str:
    """A complete model directory: config.json, safetensors, tokenizer.json, tokenizer_config.json."""
    model = tiny_model(seed, **overrides)
    save_pretrained(model, path)
    tiny_tokenizer().save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "chat_template": CHAT_TEMPLATE}, f)
    return str(path)
