"""Training checkpoints: N steps equal N/2 + resume + N/2 (weights, biases, data order), the output
loads in fewchips and transformers to the same logits, and resume mismatches, non-finite losses,
a full disk and an occupied output folder each stop with a clear message and lose no checkpoint."""

import errno
import json
import os

import pytest
import torch

import fewchips
from fewchips.train import Trainer, TrainError
from train_utils import micro_config, quiet, train_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def record_windows(tr):
    """The window numbers the trainer's sampler hands out, in order (tr.windows)."""
    tr.windows, draw = [], tr.sampler.next_batch

    def next_batch(n):
        ids, which = draw(n)
        tr.windows.extend(which.tolist())
        return ids, which

    tr.sampler.next_batch = next_batch
    return tr


def test_resume_continues_exactly(tmp_path, corpus):
    N = 8
    full = record_windows(Trainer(micro_config(), train_config(tmp_path / "full", corpus, steps=N), log=quiet))
    full.train()
    first = record_windows(Trainer(micro_config(), train_config(tmp_path / "split", corpus, steps=N, stop_at=N // 2),
                                   log=quiet))
    first.train()
    assert first.step == N // 2 and os.path.exists(tmp_path / "split" / "checkpoint" / "train_state.pt")
    second = record_windows(Trainer(micro_config(), train_config(tmp_path / "split", corpus, steps=N, resume=True),
                                    log=quiet))
    assert second.step == N // 2
    second.train()
    assert full.windows == first.windows + second.windows                # same data order
    a, b = full.model.state_dict(), second.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(float(r.e_score_correction_bias.abs().max()) > 0 for r in second.routers)   # biases moved
    sa, sb = full.opt.state_dict()["state"], second.opt.state_dict()["state"]
    torch.testing.assert_close(sa[0]["exp_avg_sq"], sb[0]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert full.sched.get_last_lr() == second.sched.get_last_lr()


@pytest.mark.slow
def test_output_loads_in_fewchips_and_transformers(tmp_path, corpus):
    out = tmp_path / "run"
    tr = Trainer(micro_config(), train_config(out, corpus, steps=4, plots=True), log=quiet)
    tr.train()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl",
                 "loss.png", "expert_load.png", "checkpoint/train_state.pt"):
        assert (out / name).exists(), name
    ids = torch.randint(0, 300, (2, 12))
    ours = fewchips.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ref = tr.model.eval()(ids)
        torch.testing.assert_close(ours(ids), ref)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.decode(tok.encode("def f(x): return x", add_special_tokens=False)) == "def f(x): return x"
    assert tok.model_max_length == tr.cfg.max_position_embeddings != tr.tc.seq_len   # no warning below the context


def test_resume_with_a_different_config_is_refused(tmp_path, corpus):
    Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=2), log=quiet).train()
    with pytest.raises(TrainError, match="hidden_size: checkpoint 64, now 32"):
        Trainer(micro_config(hidden_size=32), train_config(tmp_path / "run", corpus, steps=4, resume=True), log=quiet)
    with pytest.raises(TrainError, match="seq_len"):
        Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=4, seq_len=32, resume=True), log=quiet)
    with pytest.raises(TrainError, match="already holds a training run"):
        Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=4), log=quiet)
    with pytest.raises(TrainError, match="no checkpoint"):
        Trainer(micro_config(), train_config(tmp_path / "empty", corpus, resume=True), log=quiet)


class NanAt(Trainer):
    """Returns a NaN loss at the given steps (through the layout's call of the loss)."""

    def __init__(self, *a, bad=(), **k):
        super().__init__(*a, **k)
        self.bad = set(bad)

    def train_step(self):
        import fewchips.train.layout as layout
        orig = layout.compute_losses

        def nan_at(*a, **k):
            main, mtp, bal, stats = orig(*a, **k)
            return (main * float("nan") if self.step in self.bad else main), mtp, bal, stats

        layout.compute_losses = nan_at
        try:
            return super().train_step()
        finally:
            layout.compute_losses = orig


def test_nan_steps_are_skipped_then_stop(tmp_path, corpus):
    tr = NanAt(micro_config(), train_config(tmp_path / "a", corpus, steps=6), log=quiet, bad={2})
    before = {}

    orig = tr.train_step

    def step():
        if tr.step == 2:
            before.update({k: v.clone() for k, v in tr.model.state_dict().items()})
        r = orig()
        if tr.step == 3:     # the skipped step changed nothing
            assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
        return r

    tr.train_step = step
    assert tr.train()["skipped_steps"] == 1
    tr = NanAt(micro_config(), train_config(tmp_path / "b", corpus, steps=20, max_bad_steps=3, save_every=2),
               log=quiet, bad=range(5, 20))
    with pytest.raises(TrainError, match="3 steps in a row had a non-finite loss"):
        tr.train()
    assert os.path.exists(tmp_path / "b" / "checkpoint" / "train_state.pt")      # the last good one


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=4, stop_at=2), log=quiet)
    tr.train()
    ckpt = tmp_path / "run" / "checkpoint"
    saved = (ckpt / "model.safetensors").read_bytes()
    tr.train_step()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainError, match="No space left on device.*previous checkpoint .* is intact"):
        tr.save_checkpoint()
    monkeypatch.undo()
    assert (ckpt / "model.safetensors").read_bytes() == saved
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith(".checkpoint.tmp")]
    again = Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=4, resume=True), log=quiet)
    assert again.step == 2


def test_cli_reports_bad_input(tmp_path, capsys):
    from fewchips.cli import main
    assert main(["train", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def _first_batch_loss(model_dir, tr):
    """What the loaded model scores on the batch the trainer draws first (λ and α as the trainer's)."""
    from fewchips import losses as L
    seen = []
    draw = tr.data.next_batch
    tr.data.next_batch = lambda n: (seen.append(draw(n)), seen[-1])[1]
    tr.train()
    ref = fewchips.from_pretrained(model_dir, dtype=torch.float32).train()
    with torch.no_grad():
        main, _, _, _ = L.compute_losses(ref, seen[0], 0.3, None)
    return main.item()


@pytest.mark.parametrize("layout", ["transformers", "fp8"])
def test_init_from_a_model_directory_starts_from_its_weights(tmp_path, corpus, layout):
    """--init DIR: a directory transformers saved (no MTP weights) or the released FP8 layout trains with
    that directory's tokenizer, and the first logged loss is the loaded model's loss on that batch."""
    import json
    import shutil

    transformers = pytest.importorskip("transformers")
    Trainer(micro_config(), train_config(tmp_path / "base", corpus, steps=2), log=quiet).train()
    src = tmp_path / layout
    if layout == "transformers":
        transformers.logging.set_verbosity_error()
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        hf.save_pretrained(src)
    else:
        from fewchips.checkpoint.fp8 import save_fp8
        save_fp8(fewchips.from_pretrained(tmp_path / "base", dtype=torch.float32), src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "base" / f, src / f)
    said = []
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=2, init=str(src)), log=said.append)
    assert tr.cfg.num_nextn_predict_layers == (0 if layout == "transformers" else 1)
    want = _first_batch_loss(src, tr)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, rel=1e-5)
    if layout == "transformers":
        assert any("no MTP weights" in m for m in said)


def test_config_and_set_flags(tmp_path, capsys):
    from fewchips.cli import main
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({**micro_config().to_dict(), "num_hidden_layers": 2}))
    from fewchips.cli.train import model_config
    from fewchips.cli import build_parser
    args = build_parser().parse_args(["train", "--out", "o", "--config", str(cfg_file), "--set", "n_routed_experts=4",
                                      "--set", "topk_group=1", "--set", "n_group=1"])
    cfg = model_config(args)
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.n_group) == (2, 4, 1)
    assert main(["train", "--out", str(tmp_path / "o"), "--set", "n_routed_expert=4"]) == 2
    assert "did you mean 'n_routed_experts'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "o"), "--init", str(tmp_path), "--vocab-size", "100"]) == 2
    assert "--init takes the model's config from its directory" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "o"), "--extend-context", "4096"]) == 2
    assert "--extend-context extends a trained model's context: it needs --init" in capsys.readouterr().err


def test_demo_script_reads_a_finished_run(tmp_path, corpus, capsys, monkeypatch):
    """`make demo`'s second half (python -m fewchips.demo OUT) on a run the trainer just wrote."""
    from fewchips import demo
    Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=2, eval_every=2), log=quiet).train()
    monkeypatch.setattr(demo, "PROMPTS", demo.PROMPTS[:1])
    demo.main(str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "validation loss by step" in out and "unigram entropy of the corpus" in out and "--- sample 1" in out


def test_extend_context_from_a_checkpoint(tmp_path, corpus):
    """--init with --extend-context (arXiv 2412.19437 §4.3): the exported config carries the report's YaRN
    settings over the original length, transformers loads it with our logits past the old context, and the
    weights' shapes are kept; a --set that would change a shape is refused by name."""
    base = tmp_path / "base"
    Trainer(micro_config(max_position_embeddings=64, rope_scaling=None),
            train_config(base, corpus, steps=2), log=quiet).train()
    out = tmp_path / "long"
    tr = Trainer(None, train_config(out, corpus, steps=2, seq_len=96, init=str(base), extend_context=256), log=quiet)
    tr.train()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 256
    assert cfg["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = fewchips.from_pretrained(out, dtype=torch.float32)(ids)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)
    with pytest.raises(TrainError, match="--set num_hidden_layers would change the shape"):
        Trainer(None, train_config(tmp_path / "bad", corpus, init=str(base),
                                   init_set={"num_hidden_layers": 2, "topk_group": 1}), log=quiet)
    with pytest.raises(TrainError, match="already has 256 positions"):
        Trainer(None, train_config(tmp_path / "bad2", corpus, init=str(out), extend_context=128), log=quiet)
