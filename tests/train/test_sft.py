"""Supervised fine-tuning: the chat format equals transformers' rendering of the template fewchips
writes, packed samples are isolated (each one's logits equal its logits alone; positions restart),
the loss counts the assistant's tokens only, bad chat rows are named, and `fewchips sft` runs from a
model directory to a model directory that fine-tunes the held-out loss down."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from model_utils import random_model, tiny_config
from fewchips import losses as L
from fewchips.train import config as C
from fewchips.train.chat import ChatDataError, batch_of, encode_chat, pack, read_chats
from fewchips.train.tokenizer import save_tokenizer, special_ids, train_tokenizer
from train_utils import quiet

TEXT = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog. " * 20,
        "What is 3 + 4? 7. What is 9 - 2? 7.", "print('hello world')\n" * 10]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}],
    [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use numbers."},
     {"role": "user", "content": "What is 9 - 2?"}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "2, of course"}],
    [{"role": "user", "content": "def add"}, {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
     {"role": "user", "content": "thanks"}],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(TEXT * 5, 300)
    save_tokenizer(tok, str(d))
    return d, tok


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_chat_ids_equal_transformers_apply_chat_template(tokenizer_dir, conv, gen):
    transformers = pytest.importorskip("transformers")
    d, tok = tokenizer_dir
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    msgs = CONVERSATIONS[conv]
    want = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    ids, train = encode_chat(tok, msgs, add_generation_prompt=gen)
    assert ids == list(want)
    from fewchips.inference.tokenizer import Tokenizer
    if gen:                                                             # what chat and the server send
        assert Tokenizer.from_dir(str(d)).apply_chat_template(msgs) == ids
    text = tok.decode([i for i, t in zip(ids, train) if t], skip_special_tokens=False)
    assert text == "".join(m["content"] + "<｜end▁of▁sentence｜>" for m in msgs if m["role"] == "assistant")


def packed_three(tok, seq_len=200):
    samples = [encode_chat(tok, c) for c in CONVERSATIONS]
    rows = pack(samples, seq_len, special_ids(tok).eos)
    assert len(rows.ids) == 1 and sorted(set(rows.segment[0].tolist())) == [-1, 0, 1, 2]
    return samples, rows


def test_a_packed_sample_sees_only_itself(tokenizer_dir):
    """Three samples in one row: each one's logits equal its logits run alone (fp32, 1e-5), MTP too."""
    _, tok = tokenizer_dir
    model = random_model(tiny_config(vocab_size=300), std=0.1)
    samples, rows = packed_three(tok)
    b = batch_of(rows, [0])
    with torch.no_grad():
        h = model.hidden_states(b.ids[:, :-1], b.position[:, :-1], segments=b.segment[:, :-1])
        mtp = model.mtp_forward(b.ids[:, :-1], h, b.position[:, :-1], b.segment[:, :-1])[0]
        at = 0
        for i in sorted(range(len(samples)), key=lambda i: -len(samples[i][0])):   # packed longest first
            ids = samples[i][0]
            alone = torch.tensor([ids])
            h1 = model.hidden_states(alone)
            n = min(len(ids), b.ids.shape[1] - 1 - at)
            torch.testing.assert_close(model.lm_head(h)[0, at:at + n], model.lm_head(h1)[0, :n], rtol=1e-5, atol=1e-5)
            m1 = model.mtp_forward(alone, h1)[0]
            k = min(n, len(ids)) - 1
            torch.testing.assert_close(mtp[0, at:at + k], m1[0, :k], rtol=1e-5, atol=1e-5)
            at += len(ids)


def test_sft_loss_counts_assistant_tokens_only(tokenizer_dir):
    """The packed loss (main and MTP) is the CE over the assistant's tokens only, each sample scored alone,
    so what the user or system said is context, never a target."""
    _, tok = tokenizer_dir
    model = random_model(tiny_config(vocab_size=300), std=0.1)
    samples, rows = packed_three(tok)
    batch = batch_of(rows, [0])
    with torch.no_grad():
        main, mtp, _, _ = L.compute_losses(model, batch, 0.3, None)
        total, count, mtp_total = 0.0, 0, 0.0
        for ids, train in samples:
            x = torch.tensor([ids])
            h = model.hidden_states(x)
            ce = F.cross_entropy(model.lm_head(h)[0, :-1], x[0, 1:], reduction="none")
            keep = torch.tensor(train[1:])
            total += ce[keep].sum().item()
            count += int(keep.sum())
            ce2 = F.cross_entropy(model.mtp_forward(x, h)[0][0, :-1], x[0, 2:], reduction="none")
            mtp_total += ce2[torch.tensor(train[2:])].sum().item()
    assert main.item() == pytest.approx(total / count, rel=1e-5)
    assert mtp.item() == pytest.approx(mtp_total / count, rel=1e-5)
    # the same rows scored on every token of every sample: a different number (the mask is what selects)
    everything = type(batch)(batch.ids, batch.segment >= 0, batch.segment, batch.position)
    with torch.no_grad():
        assert abs(L.compute_losses(model, everything, 0.3, None)[0].item() - main.item()) > 1e-3


def test_padding_is_no_expert_load(tokenizer_dir):
    """A packed row that ends in padding: every MoE layer's loads, the MTP layer's too, count the real tokens
    only (K copies each), so padding never moves the balancing biases."""
    _, tok = tokenizer_dir
    cfg = tiny_config(vocab_size=300)
    model = random_model(cfg, std=0.1)
    _, rows = packed_three(tok)
    batch = batch_of(rows, [0])
    assert (batch.segment == -1).sum() > 10
    with torch.no_grad():
        load = L.compute_losses(model, batch, 0.3, None)[3].load
    K, main = cfg.num_experts_per_tok, sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    real = int((batch.segment[:, :-1] >= 0).sum())           # the inputs the decoder layers route
    real_mtp = int((batch.segment[:, 1:-1] >= 0).sum())      # MTP position i reads token i + 1
    assert load.sum(-1).tolist() == [K * real] * main + [K * real_mtp]


def test_bad_chat_rows_are_named(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ChatDataError, match=r"c\.jsonl:2: messages\[1\]\.content must be a string"):
        read_chats(str(f))
    f.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(ChatDataError, match=r"c\.jsonl:1: no assistant message"):
        read_chats(str(f))
    f.write_text("not json\n")
    with pytest.raises(ChatDataError, match=r"c\.jsonl:1: not a JSON object"):
        read_chats(str(f))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A micro model pre-trained for a few steps on a corpus that includes chat-like text."""
    from fewchips.train import Trainer
    from train_utils import micro_config, train_config, write_corpus
    root = tmp_path_factory.mktemp("pt")
    corpus = write_corpus(root / "corpus")
    tr = Trainer(micro_config(), train_config(root / "model", corpus, steps=20), log=quiet)
    tr.train()
    return str(root / "model")


def small_chats(n=120, seed=0):
    from fewchips.train.bundled import arithmetic_chats
    return arithmetic_chats(n, seed)


@pytest.mark.slow
def test_sft_lowers_held_out_assistant_loss_and_writes_a_model_dir(pretrained, tmp_path):
    from fewchips import from_pretrained
    from fewchips.inference.tokenizer import Tokenizer
    from fewchips.train.sft import SFTTrainer, sft_config
    tc = sft_config(init=pretrained, out=str(tmp_path / "sft"), steps=30, batch_size=8, seq_len=64, lr=3e-3,
                    eval_every=30, val_fraction=0.2, plots=False, progress=False, dtype="fp32", threads=1, log_every=1)
    tr = SFTTrainer(tc, quiet, chats=small_chats())
    before = tr.evaluate()["val_loss"]
    mtp_before = tr.model.mtp[0].eh_proj.weight.detach().clone()
    result = tr.train()
    assert result["val_loss"] < before - 1.0, (before, result["val_loss"])
    assert not torch.equal(tr.model.mtp[0].eh_proj.weight, mtp_before)          # MTP trained alongside
    out = str(tmp_path / "sft")
    assert set(os.listdir(out)) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert "chat_template" in json.load(open(os.path.join(out, "tokenizer_config.json")))
    model, tok = from_pretrained(out), Tokenizer.from_dir(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}])[-1] == tok.tok.token_to_id("<｜Assistant｜>")
    assert model.config.num_nextn_predict_layers == 1


def test_a_steps_expert_loads_count_no_padding(pretrained, tmp_path):
    """The loads an SFT step hands the bias update count the packed rows' real tokens (prompts and replies),
    K copies each in every MoE layer, the MTP layer's too: not the padding that fills a row."""
    from fewchips.train.sft import SFTTrainer, sft_config
    tc = sft_config(init=pretrained, out=str(tmp_path / "p"), steps=1, batch_size=4, grad_accum=2, seq_len=64,
                    plots=False, progress=False, dtype="fp32", threads=1)
    tr = SFTTrainer(tc, quiet, chats=small_chats(40))
    seen, draw = [], tr.data.next_batch
    tr.data.next_batch = lambda n: (lambda b: (seen.append(b), b)[1])(draw(n))
    r = tr.train_step()
    segment = torch.cat([b.segment for b in seen])
    assert len(seen) == 2 and (segment == -1).sum() > 10
    K, cfg = tr.cfg.num_experts_per_tok, tr.cfg
    main = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    real, real_mtp = int((segment[:, :-1] >= 0).sum()), int((segment[:, 1:-1] >= 0).sum())
    assert r.loads_LE.sum(-1).tolist() == [K * real] * main + [K * real_mtp]


def test_freeze_mtp_leaves_the_mtp_module_alone(pretrained, tmp_path):
    from fewchips import from_pretrained
    from fewchips.train.sft import SFTTrainer, sft_config
    tc = sft_config(init=pretrained, out=str(tmp_path / "f"), steps=3, batch_size=4, seq_len=64, freeze_mtp=True,
                    plots=False, progress=False, dtype="fp32", threads=1)
    SFTTrainer(tc, quiet, chats=small_chats(40)).train()
    a, b = from_pretrained(pretrained).state_dict(), from_pretrained(str(tmp_path / "f")).state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(not k.startswith("mtp.") or k.endswith("e_score_correction_bias") for k in changed)


def test_a_bad_chats_file_loses_nothing_already_written(pretrained, tmp_path):
    """--overwrite with a malformed chats file: the error names the row, the earlier run stays whole."""
    from fewchips.train.sft import SFTTrainer, sft_config
    out = tmp_path / "run"
    kw = dict(init=pretrained, out=str(out), steps=2, batch_size=4, seq_len=64, plots=False, progress=False,
              dtype="fp32", threads=1)
    SFTTrainer(sft_config(**kw), quiet, chats=small_chats(30)).train()
    before = {p: (out / p).read_bytes() for p in ("metrics.jsonl", "checkpoint/train_state.pt", "model.safetensors")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:1: no assistant message"):
        SFTTrainer(sft_config(**kw, data=str(bad), overwrite=True), quiet)
    assert {p: (out / p).read_bytes() for p in before} == before


def test_mtp_lambda_holds_for_every_step_and_malformed_tool_calls_are_refused(pretrained, tmp_path):
    """`--mtp-lambda 0` trains no MTP at any step (pre-training's late λ follows it); an assistant turn with
    tool_calls not in OpenAI's form is refused by name, not trained as a bare EOS."""
    from fewchips import from_pretrained
    from fewchips.train.sft import SFTTrainer, sft_config
    assert sft_config(mtp_lambda=0.0).mtp_lambda_late == 0.0 and sft_config().mtp_lambda_late == 0.1
    tc = sft_config(init=pretrained, out=str(tmp_path / "l"), steps=6, batch_size=4, seq_len=64, mtp_lambda=0.0,
                    plots=False, progress=False, dtype="fp32", threads=1)
    SFTTrainer(tc, quiet, chats=small_chats(40)).train()
    a, b = from_pretrained(pretrained).state_dict(), from_pretrained(str(tmp_path / "l")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("mtp.") and not k.endswith("correction_bias"))
    f = tmp_path / "tools.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "weather?"},
                                          {"role": "assistant", "content": "", "tool_calls": [{"name": "w"}]}]}) + "\n")
    with pytest.raises(ChatDataError, match=r"tools\.jsonl:1: messages\[1\]\.tool_calls\[0\] must be"):
        read_chats(str(f))


def test_the_loss_is_the_mean_over_every_target_of_the_step(tokenizer_dir):
    """Two micro-batches with 3 and 40 assistant tokens: the step's loss is their summed CE over 43 (a
    micro-batch of short samples weighs by its tokens), not the mean of the two means."""
    from fewchips.losses import Batch, summed_ce
    from fewchips.train.layout import Layout
    _, tok = tokenizer_dir
    model = random_model(tiny_config(vocab_size=300), std=0.1)
    short = batch_of(pack([encode_chat(tok, CONVERSATIONS[0])], 40, special_ids(tok).eos), [0])
    long = batch_of(pack([encode_chat(tok, CONVERSATIONS[2])], 40, special_ids(tok).eos), [0])
    counts = [b.target_count() for b in (short, long)]
    assert counts[0] * 5 < counts[1]
    loads = torch.zeros(3, 8)
    main, _, _, finite = Layout().forward_backward(model, [short, long], 0.0, 0.0, loads, None)
    with torch.no_grad():
        sums = [summed_ce(model(b.ids[:, :-1], b.position[:, :-1]), b.ids[:, 1:], b.target_mask(0)).sum().item()
                for b in (short, long)]
    assert finite and main == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert abs(main - (sums[0] / counts[0] + sums[1] / counts[1]) / 2) > 1e-3
    assert isinstance(short, Batch)


def test_best_fit_decreasing_packs_every_sample_once_and_no_worse_than_first_fit():
    """Every sample lands whole in one row (or cut to the row when longer), rows never overflow, and
    best-fit decreasing needs no more rows than first-fit in the given order."""
    import random
    rng = random.Random(0)
    L = 64
    samples = [([1] * n, [True] * n) for n in (rng.randint(1, 80) for _ in range(500))]
    rows = pack(samples, L - 1, 0)
    seen = {}
    for r in range(len(rows.ids)):
        for s in set(rows.segment[r].tolist()) - {-1}:
            seen[(r, s)] = int((rows.segment[r] == s).sum())
    assert sorted(seen.values()) == sorted(min(len(ids), L) for ids, _ in samples)
    first_fit, room = 0, []
    for ids, _ in samples:
        n = min(len(ids), L)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            room.append(L - n)
            first_fit += 1
        else:
            room[slot] -= n
    assert len(rows.ids) <= first_fit and rows.truncated == sum(len(ids) > L for ids, _ in samples)


def test_sft_reads_prompt_completion_text_and_parquet_rows(tmp_path, tokenizer_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from fewchips.train.chat import encode_sample, read_chats
    rows = [{"prompt": "2+2?", "completion": "4"},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
            {"text": "def f():\n    return 1\n"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_chats(str(f))
    assert got[0] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert got[1][1] == {"role": "assistant", "content": "hello"} and got[2] == {"text": rows[2]["text"]}
    pq.write_table(pa.Table.from_pylist([rows[0], rows[0]]), tmp_path / "p.parquet")
    assert read_chats(str(tmp_path / "p.parquet")) == [got[0], got[0]]
    _, tok = tokenizer_dir
    sp = special_ids(tok)
    ids, train = encode_sample(tok, sp, got[2])
    assert ids[0] == sp.bos and ids[-1] == sp.eos and train == [False] + [True] * (len(ids) - 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ChatDataError,
                       match=r"bad\.jsonl:1: expected \"messages\", \"prompt\" \+ \"completion\", or \"text\""):
        read_chats(str(bad))


def test_sft_reads_a_datasets_folder(tmp_path):
    """A folder written by `datasets` (Dataset.save_to_disk, and a DatasetDict's: its train split or a named
    split's folder) reads as the same rows as the .jsonl; a folder that is none of these is refused by name."""
    datasets = pytest.importorskip("datasets")
    from fewchips.train.chat import read_chats
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = read_chats(str(f))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert read_chats(str(tmp_path / "ds")) == want
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "dd"))
    assert read_chats(str(tmp_path / "dd")) == want[:3]
    assert read_chats(str(tmp_path / "dd" / "test")) == want[3:]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "nv"))
    with pytest.raises(ChatDataError, match="without a 'train' split.*validation"):
        read_chats(str(tmp_path / "nv"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ChatDataError, match="not a Hugging Face datasets folder"):
        read_chats(str(tmp_path / "plain"))


def test_epochs_set_the_steps_and_exclude_steps(pretrained, tmp_path):
    from fewchips.train.sft import SFTTrainer, sft_config
    with pytest.raises(C.TrainError, match="--steps 5 and --epochs 2 both set the run's length"):
        sft_config(steps=5, epochs=2)
    tc = sft_config(init=pretrained, out=str(tmp_path / "e"), epochs=2, batch_size=4, seq_len=64, plots=False,
                    progress=False, dtype="fp32", threads=1)
    tr = SFTTrainer(tc, quiet, chats=small_chats(40))
    rows = len(tr.data.train.ids)
    assert tr.tc.steps == -(-2 * rows // 4) and tr.schedule.micro_batches == (1,) * tr.tc.steps


def test_sample_keeps_what_the_reward_accepts_and_sft_reads_it(pretrained, tmp_path, capsys):
    """`fewchips sample`: --keep best keeps one completion per prompt whose reward is > 0, --keep all-correct every
    distinct one with reward >= 1; the file is SFT data as it stands."""
    import sys
    from fewchips.cli import main
    (tmp_path / "lenreward.py").write_text("def score(prompt, completion, want):\n"
                                           "    return float(len(completion) % 2 == want)\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}", "want": i % 2}) + "\n" for i in range(4)))
    sys.path.insert(0, str(tmp_path))
    try:
        base = ["sample", "--model", pretrained, "--reward", "lenreward:score", "--prompts", str(prompts), "--n", "6",
                "--max-new-tokens", "5", "--threads", "1"]
        assert main([*base, "--keep", "best", "--out", str(tmp_path / "best.jsonl")]) == 0
        assert main([*base, "--keep", "all-correct", "--out", str(tmp_path / "all.jsonl")]) == 0
        assert main([*base, "--count", "3", "--out", str(tmp_path / "x.jsonl")]) == 2
    finally:
        sys.path.remove(str(tmp_path))
    best = [json.loads(line) for line in open(tmp_path / "best.jsonl")]
    every = [json.loads(line) for line in open(tmp_path / "all.jsonl")]
    assert 0 < len(best) <= 4 and len(every) >= len(best)
    for row in best + every:
        want = int(row["messages"][0]["content"].split()[1]) % 2
        assert row["reward"] == 1.0 and len(row["messages"][-1]["content"]) % 2 == want
    prompts_of_best = [r["messages"][0]["content"] for r in best]
    assert len(set(prompts_of_best)) == len(prompts_of_best)                      # one per prompt
    replies = [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in every]
    assert len(set(replies)) == len(replies)                                    # distinct
    assert read_chats(str(tmp_path / "all.jsonl"))[0] == every[0]["messages"]     # SFT reads it as it is


def test_varlen_sample_masking_equals_the_dense_twin(monkeypatch):
    """Packed rows (samples of 1-300 tokens, padding as its own run, rows laid out differently) through
    `causal_attention`: outputs and gradients equal the dense block-diagonal twin's (fp32, 1e-5), and no
    [T, T] mask is built on the way; segments that are not runs fall back to the dense mask, still exact."""
    from fewchips import ops
    g = torch.Generator().manual_seed(0)
    T = 600
    seg = torch.full((2, T), -1)
    for row, lens in enumerate(([300, 1, 120, 150], [64, 64, 64, 200, 7])):
        at = 0
        for i, n in enumerate(lens):
            seg[row, at:at + n] = i
            at += n
    q, k = (torch.randn(2, 4, T, 24, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, 4, T, 16, generator=g).requires_grad_()
    grad = torch.randn(2, 4, T, 16, generator=g)
    want = ops.attention_reference(q, k, v, 0.3, seg)
    want_g = torch.autograd.grad(want, (q, k, v), grad)
    dense = ops.sample_mask
    monkeypatch.setattr(ops, "sample_mask", lambda *a: pytest.fail("a dense [T, T] mask was built"))
    got = ops.causal_attention(q, k, v, 0.3, seg)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), want_g):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    monkeypatch.setattr(ops, "sample_mask", dense)
    scattered = seg.clone()
    scattered[0, 10] = 2                                          # sample 2 no longer one run
    torch.testing.assert_close(ops.causal_attention(q, k, v, 0.3, scattered),
                               ops.attention_reference(q, k, v, 0.3, scattered), rtol=0, atol=1e-5)


# Templates written for these tests in the layouts of later DeepSeek releases (not copies of them):
# V3.1's non-thinking turns open with </think>; R1's generation prompt opens <think> and its rendered
# history keeps only what follows </think>.
V31_STYLE = ("{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
             "{% set ns.system = ns.system + m['content'] %}{% endif %}{% endfor %}{{ bos_token }}{{ ns.system }}"
             "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
             "{% elif m['role'] == 'assistant' %}<｜Assistant｜></think>{{ m['content'] }}<｜end▁of▁sentence｜>"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜></think>{% endif %}")
R1_STYLE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'].split('</think>')[-1] }}"
            "<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
LAST_ONLY = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
             "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{% if loop.last %}"
             "<｜end▁of▁sentence｜>{% endif %}{% endif %}{% endfor %}")


def template_dir(base, tmp_path, source):
    import shutil
    d = tmp_path / "t"
    shutil.copytree(base, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": source}))
    return d


@pytest.mark.parametrize("style", ["v3", "v3.1", "r1"])
def test_the_checkpoints_own_template_renders_chats(tokenizer_dir, tmp_path, style):
    """Chats render through the model directory's Jinja template: ids equal transformers'
    apply_chat_template for V3's template (the one fewchips writes) and V3.1- and R1-style ones, and the
    trained tokens are the assistant's replies and their EOS as derived by hand (R1: the part after
    </think>, which is all its template shows)."""
    transformers = pytest.importorskip("transformers")
    from fewchips.inference.tokenizer import ChatTemplate
    base, tok = tokenizer_dir
    d = base if style == "v3" else template_dir(base, tmp_path, {"v3.1": V31_STYLE, "r1": R1_STYLE}[style])
    template = ChatTemplate.of_dir(str(d))
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    convs = CONVERSATIONS + [[{"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}]]
    for msgs in convs:
        for gen in (False, True):
            want = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            want = want["input_ids"] if hasattr(want, "keys") else want
            ids, train = encode_chat(tok, msgs, add_generation_prompt=gen, template=template)
            assert ids == list(want), (style, msgs, gen)
            replies = [m["content"] for m in msgs if m["role"] == "assistant"]
            if style == "r1":
                replies = [r.split("</think>")[-1] for r in replies]
            trained = tok.decode([i for i, t in zip(ids, train) if t], skip_special_tokens=False)
            assert trained == "".join(r + "<｜end▁of▁sentence｜>" for r in replies)
            if style == "v3":                             # the template fewchips writes = its built-in format
                assert (ids, train) == encode_chat(tok, msgs, add_generation_prompt=gen)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer_dir, tmp_path):
    from fewchips.inference.tokenizer import ChatTemplate
    base, tok = tokenizer_dir
    template = ChatTemplate.of_dir(str(template_dir(base, tmp_path, LAST_ONLY)))
    with pytest.raises(ChatDataError, match="renders turn 1 differently once later turns follow"):
        encode_chat(tok, CONVERSATIONS[1][2:], template=template)


def test_sft_trains_on_tool_call_chats_and_the_model_dir_writes_tool_calls(pretrained, tmp_path):
    """`fewchips sft` on OpenAI-form tool chats (from a .jsonl, with the row's tools): it trains, only the
    assistant's tokens count (the tool results do not), and the model directory's template renders tools."""
    from fewchips.inference.tokenizer import Tokenizer
    from fewchips.train.sft import SFTTrainer, sft_config
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    rows = [{"tools": tools, "messages": [{"role": "user", "content": f"What is {i} + 4?"},
                                          {"role": "assistant", "content": None, "tool_calls": [call]},
                                          {"role": "tool", "tool_call_id": "c1", "content": str(i + 4)},
                                          {"role": "assistant", "content": f"{i + 4}"}]} for i in range(24)]
    f = tmp_path / "tools.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tc = sft_config(init=pretrained, out=str(tmp_path / "t"), steps=3, batch_size=4, seq_len=256, plots=False,
                    progress=False, dtype="fp32", threads=1, data=str(f), val_fraction=0.2)
    tr = SFTTrainer(tc, quiet)
    assert tr.train()["step"] == 3
    tok = Tokenizer.from_dir(str(tmp_path / "t"))
    ids = tok.apply_chat_template(rows[0]["messages"][:1], tools=tools)
    assert "<｜tool▁calls▁begin｜>" in tok.decode(ids, skip_special_tokens=False)       # the tools' instructions
