"""Tiny random V3 configs and models, and the report's MTP equations and the trainer's loss written out:
what the model, training and parallel tests build on (nothing is downloaded)."""

import torch


def tiny_config(**overrides):
    """A very small V3-shaped config: every mechanism present, seconds to run."""
    from fewchips import ModelConfig

    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1, moe_intermediate_size=24,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                rope_scaling=None, max_position_embeddings=256, num_nextn_predict_layers=1)
    base.update(overrides)
    return ModelConfig(**base)


def random_model(cfg, seed=0, std=0.05, bias_std=0.1):
    """A randomly initialised model with non-zero balancing biases (selection must use them)."""
    from fewchips import DeepseekV3
    from fewchips.model import Router

    g = torch.Generator().manual_seed(seed)
    model = DeepseekV3(cfg).init_weights(std, generator=g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Router):
                m.e_score_correction_bias.normal_(0.0, bias_std, generator=g)
    return model.eval()


def mtp_depth_from_the_report(model, mtp, next_ids_BT, h_prev_BTD):
    """One MTP depth written from the report's equations (arXiv 2412.19437 §2.2), without the model's
    MTP code: for positions i = 0..T-1,
        h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]    (eq. 21; the release's [emb; h] order)
        h^k = TRM_k(h')                                            (eq. 22; one causal decoder block)
        P^k_{i+k+1} = OutHead(h^k_i)                                (eq. 23; the release's shared_head.norm first)
    next_ids [B, T] holds t_{i+k}; h_prev [B, T, D] holds h^{k-1}_i. Returns (normed h^k, logits)."""
    from fewchips.model import DecoderLayer

    def rms_norm(x, weight, eps=model.config.rms_norm_eps):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    T = next_ids_BT.shape[1]
    emb = model.model.embed_tokens.weight[next_ids_BT]
    x = (torch.cat((rms_norm(emb, mtp.enorm.weight), rms_norm(h_prev_BTD, mtp.hnorm.weight)), -1)
         @ mtp.eh_proj.weight.t())
    cos, sin = model.rotary(torch.arange(T)[None])
    h = rms_norm(DecoderLayer.forward(mtp, x, cos, sin)[0], mtp.shared_head.norm.weight)
    return h, h @ model.lm_head.weight.t()


def lm_loss(model, ids):
    """The trainer's loss (next token + 0.3 MTP + 1e-4 balance, `compute_losses`) of windows ids [B, T+1],
    and the MoEStats of that forward: what the parallel tests compare across layouts."""
    from fewchips.losses import compute_losses
    main, mtp, bal, stats = compute_losses(model, ids, 0.3, None)
    return main + 0.3 * mtp + 1e-4 * bal, stats


def train_step(model, opt, ids, par, gamma: float = 1e-3) -> float:
    """A dp x ep optimizer step as `Trainer` (fewchips.train.trainer) takes it with the `Sharded` layout
    (fewchips.train.layout), from the trainer's own pieces: this rank's rows of windows ids, expert
    gradients reduced over dp, the clip at 1.0 with the global norm, the optimizer, the bias update from
    every rank's loads. Returns the global loss."""
    import torch.distributed as dist

    from fewchips.parallel import grad_norm_sq
    from fewchips.losses import moe_routers, update_biases
    from fewchips.train.build import clip_grad_norm
    opt.zero_grad(set_to_none=True)
    loss, stats = lm_loss(model, par.local_batch(ids))
    loss.backward()
    clip_grad_norm(model, opt, 1.0, grad_norm_sq(model, par))
    opt.step()
    loads = stats.load.clone()
    dist.all_reduce(loads)
    update_biases(moe_routers(model), loads, gamma)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / par.world_size
