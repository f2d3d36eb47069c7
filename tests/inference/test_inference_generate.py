"""`fewchips.generate` matches transformers' greedy generation, handles ragged batches and stops,
samples reproducibly with a seed, and MTP speculative decoding leaves the output unchanged."""

import pytest
import torch

import fewchips
from fewchips import save_pretrained
from fewchips.inference.sampling import SamplingParams, probabilities
from fewchips.inference.speculative import verify

from inference_utils import YARN, copy_drafter_model, tiny_model, tiny_tokenizer


def prompts(n, lens, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens[:n]]


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_scaling": YARN}],
                         ids=["q_lora", "yarn_no_q_lora"])
def test_greedy_matches_transformers(tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = tiny_model(0, **overrides)
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts(2, [12, 12], seed=1))
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = fewchips.generate(model, ids, max_new_tokens=24, stop_token_ids=[])
    assert torch.equal(got, want)


def test_ragged_batch_equals_one_by_one():
    model = tiny_model(0)
    rows = prompts(4, [3, 11, 1, 7], seed=2)
    batch = fewchips.generate(model, rows, max_new_tokens=10, stop_token_ids=[])
    for r, out in zip(rows, batch):
        assert out[: len(r)] == r and len(out) == len(r) + 10
        assert out == fewchips.generate(model, [r], max_new_tokens=10, stop_token_ids=[])[0]


def test_stop_tokens_and_strings():
    model = tiny_model(0)
    rows = prompts(3, [5, 8, 6], seed=3)
    free = fewchips.generate(model, rows, max_new_tokens=12, stop_token_ids=[])
    # Stop at the 4th generated token of row 0: that row ends there (token kept), the others go on.
    stop_tok = free[0][5 + 3]
    out = fewchips.generate(model, rows, max_new_tokens=12, stop_token_ids=[stop_tok])
    first = free[0][5:].index(stop_tok)
    assert out[0] == free[0][: 5 + first + 1]
    for r, o, f in zip(rows, out, free):
        gen = f[len(r):]
        cut = gen.index(stop_tok) + 1 if stop_tok in gen else len(gen)
        assert o == f[: len(r) + cut]
    # Tensor input: rows that stopped early are padded with the stop token.
    t = fewchips.generate(model, torch.tensor([rows[0]]), max_new_tokens=12, stop_token_ids=[stop_tok])
    assert t.shape == (1, 5 + first + 1)
    # Stop strings: generation ends at the first token whose text completes the string.
    tok = tiny_tokenizer()
    text = tok.decode(free[1][8:])
    needle = text[3:5]
    assert needle
    out = fewchips.generate(model, [rows[1]], max_new_tokens=12, stop_token_ids=[], stop=[needle], tokenizer=tok)[0]
    gen = out[8:]
    assert needle in tok.decode(gen) and needle not in tok.decode(gen[:-1])
    assert out == free[1][: len(out)]


def test_seeded_sampling_is_reproducible():
    model = tiny_model(0)
    rows = prompts(3, [4, 9, 2], seed=4)
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=40, stop_token_ids=[])
    a = fewchips.generate(model, rows, seed=123, **kw)
    b = fewchips.generate(model, rows, seed=123, **kw)
    c = fewchips.generate(model, rows, seed=124, **kw)
    greedy = fewchips.generate(model, rows, max_new_tokens=16, stop_token_ids=[])
    assert a == b
    assert a != c and a != greedy
    # A row's draws depend on its own seed only, not on the batch it runs in.
    assert fewchips.generate(model, [rows[0]], seed=123, **kw)[0] == a[0]


def test_top_k_top_p_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]] * 3)
    p = probabilities(logits, [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.6),
                               SamplingParams(temperature=0.0)])
    full = logits[0].softmax(-1)
    assert torch.allclose(p[0, :2], full[:2] / full[:2].sum()) and (p[0, 2:] == 0).all()
    assert full[0] < 0.6 < full[:2].sum()           # top_p 0.6 keeps the two tokens that reach 0.6
    assert (p[1, 2:] == 0).all() and (p[1, :2] > 0).all()
    assert torch.equal(p[2], torch.tensor([1.0, 0, 0, 0, 0]))


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_mtp_greedy_is_token_for_token_plain_greedy(noise):
    model = copy_drafter_model(noise)
    rows = prompts(3, [6, 1, 10], seed=5)
    plain = fewchips.generate(model, rows, max_new_tokens=40, stop_token_ids=[])
    stats = {}
    spec = fewchips.generate(model, rows, max_new_tokens=40, stop_token_ids=[], use_mtp=True, stats=stats)
    assert spec == plain
    assert 0 < stats["accepted"] < stats["drafted"]                 # both branches were exercised
    # tokens per row-forward: the prefill (one per row) plus one verification per draft
    assert stats["tokens_per_forward"] == pytest.approx(stats["tokens"] / (3 + stats["drafted"]))
    assert 1.0 < stats["tokens_per_forward"] <= 2.0
    # With stops the outputs still agree (a stop inside an accepted pair ends the row there).
    stop_tok = plain[0][6 + 7]
    assert (fewchips.generate(model, rows, max_new_tokens=40, stop_token_ids=[stop_tok], use_mtp=True)
            == fewchips.generate(model, rows, max_new_tokens=40, stop_token_ids=[stop_tok]))


def test_mtp_drafts_equal_the_report_equations():
    """Every draft of greedy speculative decoding (its logits, recorded at each call) equals the MTP
    module written from the report's equations over the final sequence: at position i it reads the
    main model's final-normed h_i and token i+1 and predicts token i+2. Checks the hidden state, the
    token and the MTP cache fed at every step, accepted or rejected."""
    from model_utils import mtp_depth_from_the_report
    model = copy_drafter_model(0.05)
    prompt = prompts(1, [6], seed=11)[0]
    recorded, plain_logits = [], model.mtp_logits
    model.mtp_logits = lambda depth, h: recorded.append(plain_logits(depth, h)) or recorded[-1]
    seq = fewchips.generate(model, [prompt], max_new_tokens=24, stop_token_ids=[], use_mtp=True)[0]
    del model.mtp_logits
    with torch.no_grad():
        ids = torch.tensor([seq])
        _, want = mtp_depth_from_the_report(model, model.mtp[0], ids[:, 1:], model.hidden_states(ids)[:, :-1])
    last, outcomes = len(prompt), []            # position of the newest emitted token
    for logits in recorded:
        if last >= len(seq):                    # the draft after the final step
            break
        torch.testing.assert_close(logits[0], want[0, last - 1], rtol=1e-4, atol=1e-5)
        accepted = last + 1 < len(seq) and int(logits[0].argmax()) == seq[last + 1]
        outcomes.append(accepted)
        last += 2 if accepted else 1
    assert len(outcomes) >= len(recorded) - 1 and any(outcomes) and not all(outcomes)


def test_mtp_sampling_is_seeded_and_accepts():
    model = copy_drafter_model(0.0)
    rows = prompts(2, [5, 8], seed=6)
    kw = dict(max_new_tokens=30, temperature=0.8, top_p=0.95, stop_token_ids=[], use_mtp=True, seed=7)
    stats = {}
    a = fewchips.generate(model, rows, stats=stats, **kw)
    assert a == fewchips.generate(model, rows, **kw)
    assert [len(r) for r in a] == [35, 38]
    assert stats["acceptance_rate"] > 0.5                           # q close to p: most drafts kept


def test_rejection_rule_preserves_the_target_distribution():
    """Draft from q, accept/replace with `verify`: the emitted tokens follow p, not q."""
    V, N = 5, 40000
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    g = torch.Generator().manual_seed(0)
    draft = torch.multinomial(q, N, replacement=True, generator=g)
    params = [SamplingParams(temperature=1.0)] * N
    gens = [g] * N
    ok, fix = verify(p.expand(N, V), q.expand(N, V), draft, params, gens)
    out = torch.where(ok, draft, fix)
    freq = torch.bincount(out, minlength=V).float() / N
    assert torch.allclose(freq, p, atol=0.01)
    assert abs(ok.float().mean().item() - torch.minimum(p, q).sum().item()) < 0.01   # acceptance = sum min(p, q)


def test_mtp_general_rule_on_greedy_rows_is_exact_match():
    """A batch mixing greedy and sampled rows takes the rejection-sampling path; its greedy rows
    (one-hot p and q) must still reproduce plain greedy decoding."""
    from fewchips.inference.generate import row_params
    from fewchips.inference.generate import engine_generate
    model = copy_drafter_model(0.05)
    rows = prompts(2, [6, 9], seed=8)
    params = row_params(2, 30, 0.0, 1.0, 0, None, None, [], None)
    params[1] = SamplingParams(max_tokens=30, temperature=0.9, seed=3)
    stats = {}
    with torch.inference_mode():
        got = engine_generate(model, rows, params, stats=stats)
    plain = fewchips.generate(model, [rows[0]], max_new_tokens=30, stop_token_ids=[])[0]
    assert rows[0] + got[0] == plain and len(got[1]) == 30
    assert 0 < stats["accepted"] < stats["drafted"]


def test_gathered_experts_equal_the_grouped_path():
    """The decode form compiled steps use (each token copy reads its own expert) equals dispatch + grouped SwiGLU."""
    from fewchips.ops import gathered_swiglu
    model = tiny_model(0)
    experts = next(m for m in model.modules() if isinstance(m, fewchips.model.RoutedExperts))
    g = torch.Generator().manual_seed(5)
    x_MD = torch.randn(3, model.config.hidden_size, generator=g)
    experts_MK = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(3)])
    weights_MK = torch.rand(3, 2, generator=g)
    with torch.no_grad():
        gathered = gathered_swiglu(x_MD, experts_MK, weights_MK, experts.gate_up_proj, experts.down_proj)
        torch.testing.assert_close(gathered, experts(x_MD, experts_MK, weights_MK),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lens,overrides", [([9], {}), ([5, 12], {}),
                                           ([70], {"q_lora_rank": None, "rope_scaling": YARN})],
                         ids=["batch1_one_graph", "ragged_batch2", "batch1_yarn_no_q_lora"])
@pytest.mark.slow
def test_compiled_decoding_equals_eager(lens, overrides):
    """generate(compile=True): prefill eager, each decode step one compiled graph.
    Same greedy tokens as eager decoding; at batch 1 the step compiles without a graph break."""
    from torch._dynamo.utils import counters
    model = tiny_model(0, **overrides)
    rows = prompts(len(lens), lens, seed=6)
    counters.clear()
    got = fewchips.generate(model, rows, max_new_tokens=12, stop_token_ids=[], compile=True)
    assert got == fewchips.generate(model, rows, max_new_tokens=12, stop_token_ids=[])
    assert counters["stats"]["unique_graphs"] >= 1                  # it did compile (no silent eager fallback)
    if len(lens) == 1:
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    with pytest.raises(ValueError, match="cannot be combined"):
        fewchips.generate(model, rows, max_new_tokens=2, compile=True, use_mtp=True)


@pytest.mark.slow
def test_compiled_decoding_with_rows_stopping_early():
    """Under compile finished rows keep stepping with their outputs unused; the others are unaffected."""
    model = tiny_model(0)
    rows = prompts(3, [4, 9, 6], seed=8)
    free = fewchips.generate(model, rows, max_new_tokens=12, stop_token_ids=[])
    stop = free[0][len(rows[0]) + 3]                   # row 0 stops at its 4th new token (or earlier)
    want = fewchips.generate(model, rows, max_new_tokens=12, stop_token_ids=[stop])
    assert any(len(w) < len(f) for w, f in zip(want, free))
    assert fewchips.generate(model, rows, max_new_tokens=12, stop_token_ids=[stop], compile=True) == want


@pytest.mark.slow
def test_compiled_step_keeps_fp8_experts():
    """A compiled step of an FP8 model runs its experts through FP8 (not the gathered full-precision
    form): its logits equal the eager step's."""
    from fewchips.fp8 import apply_fp8
    from fewchips.inference.generate import compiled_decode_step
    model = tiny_model(0)
    apply_fp8(model, backend="emulate")
    ids = torch.tensor(prompts(1, [7], seed=9))
    logits = {}
    with torch.inference_mode():
        for name in ("eager", "compiled"):
            cache = fewchips.LatentCache(model.config, 1, 16)
            tok = model(ids, cache=cache)[:, -1].argmax(-1)
            pos = torch.tensor([7])
            if name == "eager":
                logits[name] = model(tok[:, None], positions=pos[:, None], cache=cache)[:, 0]
            else:
                logits[name] = compiled_decode_step()(model, tok, pos, cache, None, 8)
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-4, atol=1e-5)


def test_generate_takes_sampling_params_and_max_tokens():
    """generate(params=SamplingParams(...)) is the keyword form; max_tokens and max_new_tokens are one setting."""
    model = tiny_model(0)
    rows = prompts(2, [4, 7], seed=12)
    kw = generate_kw = dict(temperature=0.8, top_p=0.9, top_k=20, seed=5)
    want = fewchips.generate(model, rows, max_new_tokens=9, stop_token_ids=[], **generate_kw)
    params = SamplingParams(max_tokens=9, stop_token_ids=[], **kw)
    assert fewchips.generate(model, rows, params=params) == want
    assert fewchips.generate(model, rows, max_tokens=9, stop_token_ids=[], **kw) == want
    assert SamplingParams(max_new_tokens=9).max_tokens == 9
    with pytest.raises(ValueError, match="temperature, seed given beside params"):      # refused, not ignored
        fewchips.generate(model, rows, params=params, temperature=0.5, seed=3)
    with pytest.raises(ValueError, match="are one setting"):
        fewchips.generate(model, rows, max_tokens=9, max_new_tokens=8)


def test_mtp_generate_frees_its_engine_and_counts_every_decode():
    """generate(use_mtp=True) builds an engine per call: its paged cache is freed when the call returns
    (no reference cycle waits for the collector). A row that never drafts (a frequency penalty) counts
    its plain decode steps as forwards: one token per forward, as plain decoding."""
    import gc

    from fewchips.inference.paged import PagedLatentCache
    model = copy_drafter_model(0.05)
    rows = prompts(2, [6, 9], seed=8)
    gc.collect()
    gc.disable()
    try:
        fewchips.generate(model, rows, max_new_tokens=10, stop_token_ids=[], use_mtp=True)
        assert not any(isinstance(o, PagedLatentCache) for o in gc.get_objects())
    finally:
        gc.enable()
    stats = {}
    params = SamplingParams(max_tokens=20, stop_token_ids=[], frequency_penalty=0.5)
    fewchips.generate(model, [rows[0]], params=params, use_mtp=True, stats=stats)
    assert stats["drafted"] == 0 and stats["tokens_per_forward"] == 1.0 and stats["forwards"] == 20
