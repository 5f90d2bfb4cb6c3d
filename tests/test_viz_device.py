"""The notebook figures work when the notebook model lives on a GPU — checked without one.

On a GPU box ``v4lab.viz.trained`` loads the model onto CUDA (the device setting), so everything a figure
reads from it (logits, ``last_routing``, ``last_inspect``, hooked activations, weights) is on CUDA while the
figure code makes its own tensors on the CPU. ``PretendDevice`` (tests/pretend_device.py) replays that on a
CPU and raises where an op would mix the two. A deliberately missing ``.cpu()`` shows it catches the bug.
"""
import pytest
import torch
from pretend_device import PRETEND, PretendDevice

from v4lab.model import V4Model
from v4lab.viz import MODEL_WIDGETS, trained
from v4lab.viz import attention as attn_viz


@pytest.fixture
def pretend(monkeypatch):
    path = trained.checkpoint_path() or trained.synthetic_checkpoint()
    model, tok, info = trained.load_dir(path, synthetic=trained.checkpoint_path() is None)
    monkeypatch.setattr(trained, "trained_model", lambda data_dir=None: (model, tok, info))
    # only the notebook model pretends; a second model a figure builds (the random twin the specialisation
    # panel compares with) is a real CPU model
    monkeypatch.setattr(V4Model, "device",
                        property(lambda self: PRETEND if self is model else self.embed.weight.device))
    return PretendDevice(model).wrap(model)




@pytest.mark.parametrize("name", MODEL_WIDGETS)
def test_widgets_fed_by_the_model_take_its_tensors_home(pretend, name):
    reg = common_registry()
    with pretend:
        w = reg[name](static=True)
        for c in w.control_names:
            for v in list(w.sweep_values(c))[:2]:
                getattr(w, f"on_{c}")(v)
    assert not pretend.violations


def test_generation_text(pretend):
    from v4lab.viz import tiny
    with pretend:
        assert isinstance(tiny.generate_text("def ", 3), str)


def test_harness_catches_a_missing_cpu(pretend, monkeypatch):
    def take_without_cpu(insp, ratio, kind):
        out = {k: v[0].detach().clone() for k, v in insp.items()
               if isinstance(v, torch.Tensor) and k not in ("positions", "entries")}
        out["n_entries"] = int(insp["entries"].shape[1]) if insp.get("entries") is not None else 0
        pw = insp.get("pool_weights")
        out["pool_mean"] = pw[0].mean(-1) if pw is not None else torch.zeros(0, 2 * ratio if kind == "csa" else ratio)
        return out

    monkeypatch.setattr(attn_viz, "_take", take_without_cpu)
    from v4lab.viz import tiny
    with pretend, pytest.raises(RuntimeError, match="model's device"):
        tiny.Maps("a fresh text for the maps")


def common_registry():
    from v4lab.viz import load_all
    return load_all()
