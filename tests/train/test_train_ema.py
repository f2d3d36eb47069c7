"""The parameter EMA (arXiv 2412.19437 §3.2.3): after k steps it equals the closed-form average of the
parameters each step left (fp32), a run stopped and resumed keeps it bitwise, it is evaluated beside the
model, and --export-ema writes it as a model that loads."""

import json

import pytest
import torch
from safetensors.torch import load_file

import fewchips
from fewchips.train import Trainer, TrainError
from train_utils import micro_config, quiet, train_config, write_corpus

DECAY = 0.75          # far from 1, so a few steps move the average visibly


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_ema_equals_the_closed_form_average_of_the_steps(tmp_path, corpus):
    """ema_k = β^k θ_0 + Σ_t (1 − β) β^(k−t) θ_t over the parameters after each step t, in float64."""
    tr = Trainer(micro_config(), train_config(tmp_path / "run", corpus, steps=5, ema=DECAY), log=quiet)
    named = dict(tr.model.named_parameters())
    thetas = [{n: p.detach().double().clone() for n, p in named.items()}]
    for _ in range(5):
        r = tr.train_step()
        assert not r.skipped
        thetas.append({n: p.detach().double().clone() for n, p in named.items()})
    k = len(thetas) - 1
    ema = {n: t.clone() for n, t in tr.ema.state_dict().items()}
    assert tr.ema.updates == k and set(ema) == set(named)
    moved = 0.0
    for n, e in ema.items():
        want = DECAY ** k * thetas[0][n] + sum((1 - DECAY) * DECAY ** (k - t) * thetas[t][n] for t in range(1, k + 1))
        torch.testing.assert_close(e.double(), want, rtol=1e-6, atol=1e-7, msg=n)
        moved = max(moved, float((e.double() - thetas[-1][n]).abs().max()))
    assert moved > 1e-4                          # an average, not the last weights
    ev = tr.evaluate_ema()                       # swaps the average in and back out
    assert ev["ema_val_loss"] != tr.evaluate()["val_loss"]
    for n, p in named.items():
        assert torch.equal(p.detach().double(), thetas[-1][n]) and torch.equal(tr.ema.state_dict()[n], ema[n]), n


def test_resume_keeps_the_ema_bitwise_and_exports_it(tmp_path, corpus):
    N = 6
    full = Trainer(micro_config(), train_config(tmp_path / "full", corpus, steps=N, ema=DECAY, eval_every=N,
                                                export_ema=True), log=quiet)
    full.train()
    Trainer(micro_config(), train_config(tmp_path / "split", corpus, steps=N, ema=DECAY, stop_at=N // 2),
            log=quiet).train()
    second = Trainer(micro_config(), train_config(tmp_path / "split", corpus, steps=N, ema=DECAY, resume=True,
                                                  eval_every=N, export_ema=True), log=quiet)
    assert second.ema.updates == N // 2
    second.train()
    a, b = (load_file(tmp_path / run / "checkpoint" / "ema.safetensors") for run in ("full", "split"))
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    # the EMA is evaluated beside the model, and exported as a model of its own with the same weights
    last = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl") if "ema_val_loss" in line][-1]
    assert last["step"] == N and last["ema_val_loss"] != last["val_loss"]
    ema_model = fewchips.from_pretrained(tmp_path / "split" / "ema", dtype=torch.float32)
    live_model = fewchips.from_pretrained(tmp_path / "split", dtype=torch.float32)
    sd, live = ema_model.state_dict(), dict(second.model.named_parameters())
    for n, t in b.items():
        assert torch.equal(sd[n], t), n
        assert torch.equal(live_model.state_dict()[n], live[n].detach()), n     # the swap left the model as it was
    assert (tmp_path / "split" / "ema" / "tokenizer.json").exists()


def test_ema_flags_are_checked(tmp_path, corpus):
    with pytest.raises(TrainError, match="--ema takes the decay"):
        train_config(tmp_path / "a", corpus, ema=1.0)
    with pytest.raises(TrainError, match="--export-ema .* add --ema"):
        train_config(tmp_path / "b", corpus, export_ema=True)
