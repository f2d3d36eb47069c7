"""The model's compute kernels, each fast path beside the plain PyTorch it must equal. `model.py` calls
one function per operation and reads like the paper; which kernel runs (by device, sequence length,
dtype, batch size, under a compiler) is decided here. Tests check every fast path against its twin.

    causal_attention(q, k, v, scale)            softmax(q k^T scale + causal mask) v
        fast: torch's fused SDPA (GPU; CPU beyond 512 tokens), with V padded to the q/k head dim
              an explicit matmul-softmax-matmul (CPU up to 512 tokens, where it is faster)
              packed samples: varlen_attention (each sample alone on views; no [T, T] mask)
        twin: attention_reference
    positional_attention(q, k, v, scale, positions)   queries at absolute positions over a cached context
        fast: torch's fused SDPA with a boolean mask; twin: attention_reference(positions_BT=...)
    expert_swiglu(x_sorted, counts_E, gate_up, down)   each expert's SwiGLU on its run of sorted rows
        fast: grouped_mm (GPU, skewed or sparse CPU loads), padded bmm (balanced CPU loads), bf16 runs
              rounded to a few shapes (oneDNN's kernel cache)
        twin: swiglu_reference (a loop over experts)
    gathered_swiglu(x, experts_MK, weights_MK, gate_up, down)   decode-sized batches in a compiled graph
        twin: expert_swiglu after dispatch (RoutedExperts.forward)
    gather_rows(pool_NC, index_BS)              the paged cache's working set: pool rows by block table
        fast: one index_select into the step's [B, S, C] (CPU; a paged-attention kernel would read in place)
        twin: gather_rows_reference (a loop over batch rows)

Shape legend as in model.py (B batch, H heads, T tokens, E experts, N sorted token copies, D hidden,
F expert width, f = 2F gate and up rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

# On CPU, up to this many tokens plain softmax(QK^T + mask)V beats torch's fused attention kernel
# (forward + backward, small preset shapes, bf16 and fp32: 10.6 against 20 ms per layer at 256 tokens,
# 40 against 50 at 512); beyond it the fused kernel's O(T) memory wins.
CPU_EXPLICIT_ATTENTION_MAX_T = 512


def causal_attention(q_BHTk, k_BHTk, v_BHTV, scale, segments_BT=None):
    """softmax(q k^T scale + causal mask) v for training and prefill (v's head dim may be smaller).
    `segments_BT` (packed samples): a token attends only to earlier tokens of its own segment, computed
    sample by sample (`varlen_attention`): no [T, T] mask is built."""
    if segments_BT is not None:
        runs = sample_runs(segments_BT)
        if runs is not None:
            return varlen_attention(q_BHTk, k_BHTk, v_BHTV, scale, segments_BT, runs)
    T, v_dim = q_BHTk.shape[-2], v_BHTV.shape[-1]
    if q_BHTk.is_cuda or T > CPU_EXPLICIT_ATTENTION_MAX_T:
        pad = q_BHTk.shape[-1] - v_dim
        if pad > 0:   # equal head dims select torch's fused CPU kernel (2x faster than its math path)
            v_BHTV = F.pad(v_BHTV, (0, pad))
        if segments_BT is None:
            o = F.scaled_dot_product_attention(q_BHTk, k_BHTk, v_BHTV, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(q_BHTk, k_BHTk, v_BHTV, attn_mask=sample_mask(segments_BT)[:, None],
                                               scale=scale)
        return o[..., :v_dim]
    # Under bf16 autocast the scores leave the matmul in bf16 (as in transformers' eager attention;
    # fused kernels keep them fp32); the mask add promotes them, so the softmax runs in fp32.
    if segments_BT is None:
        mask = torch.full((T, T), float("-inf"), device=q_BHTk.device).triu_(1)
    else:
        allowed = sample_mask(segments_BT)[:, None]                     # [B, 1, T, T]
        mask = torch.zeros(allowed.shape, device=q_BHTk.device).masked_fill_(~allowed, float("-inf"))
    scores_BHTT = torch.matmul(q_BHTk * scale, k_BHTk.transpose(-2, -1)) + mask
    return torch.matmul(scores_BHTT.softmax(dim=-1).to(v_BHTV.dtype), v_BHTV)


def sample_runs(segments_BT) -> list[list[int]] | None:
    """Each row's sample lengths, or None if some sample is not one run of consecutive positions (then the
    dense mask is needed). Two small host reads (the run starts and their ids), no loop over tokens."""
    B, T = segments_BT.shape
    change_BT = torch.ones_like(segments_BT, dtype=torch.bool)
    change_BT[:, 1:] = segments_BT[:, 1:] != segments_BT[:, :-1]
    starts = change_BT.nonzero().tolist()                  # (row, position) of each run, row-major
    ids = segments_BT[change_BT].tolist()
    runs, seen = [[] for _ in range(B)], [set() for _ in range(B)]
    for i, ((b, t0), sid) in enumerate(zip(starts, ids)):
        if sid in seen[b]:
            return None
        seen[b].add(sid)
        end = starts[i + 1][1] if i + 1 < len(starts) and starts[i + 1][0] == b else T
        runs[b].append(end - t0)
    return runs


def varlen_attention(q_BHTk, k_BHTk, v_BHTV, scale, segments_BT, runs=None):
    """Causal attention inside each packed sample, one sample at a time on views of q, k, v: the varlen
    form (FlashAttention's cu_seqlens) on top of torch's fused causal SDPA, so no [T, T] mask or score
    matrix spans samples, and the work is sum(L^2) rather than T^2. Twin: attention_reference with
    `segments_BT` (the dense block-diagonal mask)."""
    v_dim = v_BHTV.shape[-1]
    pad = q_BHTk.shape[-1] - v_dim
    if pad > 0:   # equal head dims select torch's fused CPU kernel
        v_BHTV = F.pad(v_BHTV, (0, pad))
    runs = runs if runs is not None else sample_runs(segments_BT)
    if runs is None:
        raise ValueError("varlen_attention needs each sample to be one run of positions")
    rows = []
    for lens, q, k, v in zip(runs, q_BHTk.split(1), k_BHTk.split(1), v_BHTV.split(1)):
        # split, not slices: its backward is one concatenation, where each slice's would be a full-size zero tensor
        rows.append(torch.cat([F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                               for qs, ks, vs in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))], dim=2))
    return torch.cat(rows)[..., :v_dim]


def positional_attention(q_BHTk, k_BHSk, v_BHSV, scale, positions_BT):
    """Queries at absolute positions `positions_BT` over keys at positions 0..S-1: query t sees key s <= its
    position (prefill chunks after cached tokens). torch's fused SDPA with a boolean mask (V padded to the
    q/k head dim, which selects the fused CPU kernel); twin: attention_reference with `positions_BT`."""
    S, v_dim = k_BHSk.shape[-2], v_BHSV.shape[-1]
    allowed_B1TS = (torch.arange(S, device=q_BHTk.device) <= positions_BT[..., None])[:, None]
    pad = q_BHTk.shape[-1] - v_dim
    if pad > 0:
        v_BHSV = F.pad(v_BHSV, (0, pad))
    return F.scaled_dot_product_attention(q_BHTk, k_BHSk, v_BHSV, attn_mask=allowed_B1TS, scale=scale)[..., :v_dim]


def sample_mask(segments_BT):
    """[B, T, T] bool: query t may attend to key s (s <= t, same segment). Block-diagonal causal."""
    T = segments_BT.shape[-1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=segments_BT.device).tril_()
    return causal_TT & (segments_BT[:, :, None] == segments_BT[:, None, :])


def attention_reference(q_BHTk, k_BHTk, v_BHTV, scale, segments_BT=None, positions_BT=None):
    """The plain twin: fp32 scores, a (block-diagonal) causal mask, softmax, weighted values.
    `positions_BT`: the twin of positional_attention (query t sees keys 0..positions[t])."""
    T = q_BHTk.shape[-2]
    scores = (q_BHTk.float() @ k_BHTk.float().transpose(-2, -1)) * scale
    if positions_BT is not None:
        allowed = (torch.arange(k_BHTk.shape[-2], device=q_BHTk.device) <= positions_BT[..., None])[:, None]
    elif segments_BT is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q_BHTk.device).tril()
    else:
        allowed = sample_mask(segments_BT)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v_BHTV.float()).to(v_BHTV.dtype)


def gather_rows(pool_NC, index_BS):
    """pool_NC[index_BS]: the cache rows [B, S, C] that a step's queries attend, read through the block
    tables (`inference.paged`). On CPU a copy into the step's working set costs what the attention's own
    read of it does; a GPU kernel reading the pool in place (FlashMLA's paged decode) would go here."""
    B, S = index_BS.shape
    return pool_NC.index_select(0, index_BS.reshape(-1)).view(B, S, pool_NC.shape[-1])


def gather_rows_reference(pool_NC, index_BS):
    """The plain twin of `gather_rows`: one row of the batch at a time."""
    return torch.stack([pool_NC[row] for row in index_BS])


# ---------------------------------------------------------------------------------------------
# Routed experts
# ---------------------------------------------------------------------------------------------

def gathered_experts_fit(tokens: int, top_k: int, n_experts: int) -> bool:
    """Whether a compiled step may use `gathered_swiglu`: token copies at most a quarter of the
    experts, so reading each copy's expert stays well below reading every expert once."""
    return 4 * tokens * top_k <= n_experts


def use_gathered_experts(tokens: int, top_k: int, n_experts: int) -> bool:
    """The gathered form applies inside a compiled graph, without grad, at decode-sized batches."""
    return (torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and gathered_experts_fit(tokens, top_k, n_experts))


def gathered_swiglu(x_MD, experts_MK, weights_MK, gate_up_EfD, down_EDF):
    """The routed experts' weighted SwiGLU sum for decode-sized batches inside a compiled graph: every
    token copy reads only its own expert's rows. No data-dependent shapes and no host sync, so the whole
    decode step stays one graph. Inductor fuses the gather into the reduction and copies no weights; run
    eagerly, the same lines would copy each chosen expert's matrices (2-4x slower than grouped_mm).
    Inductor's reduction reads ~half as fast as MKL's GEMV, and a busy expert is read once per copy,
    so at a copy per expert (batch 8 of `small`) this measured 118 against 80 ms per step."""
    M, K = experts_MK.shape
    e = experts_MK.reshape(-1)
    x_ND = x_MD.repeat_interleave(K, dim=0).to(gate_up_EfD.dtype)             # N = M*K copies
    gate, up = (gate_up_EfD[e] * x_ND[:, None, :]).sum(-1).chunk(2, dim=-1)
    y_ND = (down_EDF[e] * (F.silu(gate) * up)[:, None, :]).sum(-1)
    return (y_ND * weights_MK.reshape(-1, 1)).view(M, K, -1).sum(1).to(x_MD.dtype)


# On CPU in low precision, each expert's run of rows is rounded up to a number with this many
# significant bits (<= 1/8 padding at 4). oneDNN's bf16 matmul JIT-compiles a kernel per shape and caches
# ~1,024; row counts that change every step missed that cache on nearly every call (measured: 9-36 ms
# instead of 3.5 ms for 32 experts x 128 rows x 512 x 512). Rounded, the shapes repeat: 8 per octave.
CPU_GEMM_ROW_BITS = 4


@torch.compiler.disable   # grouped_mm's meta kernel accepts only bf16 and the row counts are data-dependent
def expert_swiglu(x_sorted, counts_E, gate_up_EfD, down_EDF):
    """Grouped SwiGLU: rows of x_sorted belong to experts 0..E-1 in runs of counts_E.

    `grouped_mm` is the fused kernel on GPUs. On CPU it issues one GEMM per expert: right for
    decode-sized batches (most experts idle) and skewed loads, ~3x slower than `bmm` for balanced
    training batches, so there the runs are padded to the longest one and batched when that at most
    doubles the rows (measured, 3x padding already loses). In bf16 on CPU the runs are rounded up to
    a few shapes (CPU_GEMM_ROW_BITS). No Python loop over experts."""
    E, (N, D) = counts_E.shape[0], x_sorted.shape
    device = x_sorted.device.type
    # grouped_mm is not on autocast's list: cast by hand (weights follow the activations without autocast)
    dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_sorted.dtype
    x_sorted, gate_up_EfD, down_EDF = x_sorted.to(dt), gate_up_EfD.to(dt), down_EDF.to(dt)
    if x_sorted.is_cuda:                       # no host sync on GPU
        return _grouped_swiglu(x_sorted, counts_E, gate_up_EfD, down_EDF)
    cap = int(counts_E.max()) if N else 0
    aligned = all(n * x_sorted.element_size() % 16 == 0 for n in (D, down_EDF.shape[-1]))  # grouped_mm needs it
    padded_bmm = not aligned or N >= E and E * cap <= 2 * N
    if padded_bmm:
        run_E = torch.full_like(counts_E, cap)
    elif x_sorted.dtype != torch.float32 and cap >= 1 << CPU_GEMM_ROW_BITS:
        step_E = (counts_E.clamp(min=1).float().log2().floor() + 1 - CPU_GEMM_ROW_BITS).clamp(min=0).exp2().long()
        run_E = (counts_E + step_E - 1) // step_E * step_E
    else:
        return _grouped_swiglu(x_sorted, counts_E, gate_up_EfD, down_EDF)
    # Place each expert's rows at the start of its padded run; index_copy/index_select (cheap backwards).
    expert_of = torch.repeat_interleave(torch.arange(E, device=x_sorted.device), counts_E, output_size=N)
    shift_E = (run_E.cumsum(0) - run_E) - (counts_E.cumsum(0) - counts_E)
    row = torch.arange(N, device=x_sorted.device) + shift_E[expert_of]
    x_pad = x_sorted.new_zeros(E * cap if padded_bmm else int(run_E.sum()), D).index_copy(0, row, x_sorted)
    if padded_bmm:
        x_ECD = x_pad.view(E, cap, D)
        gate, up = torch.bmm(x_ECD, gate_up_EfD.transpose(-2, -1)).chunk(2, dim=-1)
        y_pad = torch.bmm(F.silu(gate) * up, down_EDF.transpose(-2, -1)).reshape(E * cap, -1)
    else:
        y_pad = _grouped_swiglu(x_pad, run_E, gate_up_EfD, down_EDF)
    return y_pad.index_select(0, row)


def _grouped_swiglu(x_sorted, counts_E, gate_up_EfD, down_EDF):
    offs = counts_E.cumsum(0).to(torch.int32)
    gate, up = F.grouped_mm(x_sorted, gate_up_EfD.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    return F.grouped_mm((F.silu(gate) * up).contiguous(), down_EDF.transpose(-2, -1), offs=offs)


def swiglu_reference(x_sorted, counts_E, gate_up_EfD, down_EDF):
    """The plain twin of `expert_swiglu`: one SwiGLU per expert on its rows, in a loop."""
    out, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        gate, up = (x_sorted[start:start + n] @ gate_up_EfD[e].T).chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ down_EDF[e].T)
        start += n
    return torch.cat(out) if out else x_sorted.new_zeros(0, down_EDF.shape[1])
