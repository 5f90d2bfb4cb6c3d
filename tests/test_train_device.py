"""Training keeps every tensor where the model is — checked without a GPU (see tests/pretend_device.py).

The whole ``train`` loop (Anticipatory Routing with a spike and rollback, QAT switching on, pre-activation
logging, held-out evaluation, the bias update, gradient clipping, AdamW) runs with the model on a pretend
device; any op that would mix the model's tensors with CPU ones raises. Dropping the move of the batch to
the model's device is caught.
"""
import pytest
import torch
from pretend_device import PRETEND, PretendDevice

from v4lab import train as T
from v4lab.data import load_data
from v4lab.model import V4Model


@pytest.fixture(scope="module")
def data():
    return load_data(512)


def _train_on_pretend_device(data, monkeypatch, **kw):
    cfg = T.micro_config()
    torch.manual_seed(0)
    model = V4Model(cfg)
    monkeypatch.setattr(V4Model, "device", property(lambda self: PRETEND))
    mode = PretendDevice(model).wrap(model)
    with mode:
        res = T.train(cfg, data=data, model=model, steps=4, batch_size=2, seq_len=16, warmup=1, progress=False,
                      threads=1, anticipatory="spike", ar_lag=1, ar_duration=2, spike_at=2, spike_lr_mult=1e3,
                      spike_ratio=1.01, qat=0.5, log_preact=True, eval_every=2, eval_windows=2, **kw)
    return mode, res


def test_the_training_loop_stays_on_the_model_device(data, monkeypatch):
    mode, res = _train_on_pretend_device(data, monkeypatch)
    assert not mode.violations
    assert res["summary"]["steps_done"] == 4 and res["evals"]
    assert any("event" in r for r in res["log"])           # the spike / rollback path ran too


def test_a_batch_left_on_the_cpu_is_caught(data, monkeypatch):
    good = T.lm_losses

    def forgets_to_move(model, ids, forced_routes=None, mtp=True):
        V = model.cfg.vocab_size
        logits, mtp_logits = model(ids[:, :-1], return_mtp=True, forced_routes=forced_routes)
        return (torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), ids[:, 1:].reshape(-1)),
                torch.nn.functional.cross_entropy(mtp_logits.float().reshape(-1, V), ids[:, 2:].reshape(-1)))

    assert good is not forgets_to_move
    monkeypatch.setattr(T, "lm_losses", forgets_to_move)
    with pytest.raises(RuntimeError, match="model's device"):
        _train_on_pretend_device(data, monkeypatch)
