"""The notebook figures work when the notebook model lives on a GPU — checked without one.

On a GPU box ``v4lab.viz.trained`` loads the model onto CUDA (the device setting), so everything a figure
reads from it (logits, ``last_routing``, ``last_inspect``, hooked activations, weights) is on CUDA while the
figure code makes its own tensors on the CPU. :class:`PretendDevice` replays that on a CPU: it tags the
model's parameters and everything computed inside the model's methods as "on the model's device", follows
the tags through every torch op, and raises where an op would mix a tagged tensor with an untagged
non-scalar one (what CUDA refuses). ``.cpu()`` and the Python conversions (``tolist``, ``float``...) drop
the tag, as a real copy to the host would. A deliberately missing ``.cpu()`` shows the harness catches it.
"""
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode

from v4lab.model import V4Model
from v4lab.viz import attention as attn_viz
from v4lab.viz import common, trained

T = torch.Tensor
_TO_HOST = {T.cpu, T.tolist, T.item, T.__float__, T.__int__, T.__bool__, T.numpy, T.__index__, T.__len__,
            T.__repr__, T.__format__}
_MIXABLE = {T.__getitem__, T.__setitem__, T.copy_}      # indexing and copies cross devices in torch


def _leaves(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _leaves(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _leaves(y, out)
    return out


class PretendDevice(TorchFunctionMode):
    def __init__(self, model: V4Model):
        super().__init__()
        self._ids: dict[int, weakref.ref] = {}          # id -> weakref (WeakSet would compare tensors with ==)
        self.depth = 0
        for t in list(model.parameters()) + list(model.buffers()):
            self._add(t)
            self._add(t.data)
        self.violations = []

    def _add(self, t):
        self._ids[id(t)] = weakref.ref(t)

    def has(self, t) -> bool:
        r = self._ids.get(id(t))
        return r is not None and r() is t

    def inside(self, fn):
        def run(*a, **kw):
            self.depth += 1
            try:
                return fn(*a, **kw)
            finally:
                self.depth -= 1
        return run

    def _tag(self, res):
        for t in _leaves(res, []):
            self._add(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = _leaves(list(args) + list(kwargs.values()), [])
        moving_home = func in _TO_HOST or (func is T.to and any(
            (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu") for a in
            list(args[1:]) + [kwargs.get("device")] if a is not None))
        res = func(*args, **kwargs)
        if moving_home:
            if isinstance(res, torch.Tensor) and any(res is t for t in ins):
                res = res.clone()                        # a real host copy is a new tensor
            return res
        if self.depth:                                   # inside the model: everything is on its device
            self._tag(res)
            return res
        tagged = [t for t in ins if self.has(t)]
        plain = [t for t in ins if not self.has(t) and t.dim() > 0]
        if tagged and plain and func not in _MIXABLE:
            self.violations.append(getattr(func, "__name__", str(func)))
            raise RuntimeError(f"{getattr(func, '__name__', func)}: tensors on the model's device mixed with CPU "
                               "tensors (add .cpu() where the figure takes them from the model)")
        if tagged:
            self._tag(res)
        return res


@pytest.fixture
def pretend(monkeypatch):
    path = trained.find_trained() or trained.synthetic_checkpoint()
    model, tok, info = trained.load_dir(path, synthetic=trained.find_trained() is None)
    monkeypatch.setattr(trained, "trained_model", lambda data_dir=None: (model, tok, info))
    mode = PretendDevice(model)
    for name in ("forward", "generate", "route_only"):
        monkeypatch.setattr(model, name, mode.inside(getattr(model, name)))
    model._call_impl = mode.inside(model._call_impl)
    return mode


WIDGETS = ["attention.inspect", "tiny.routing", "tiny.attention_maps", "tiny.mtp", "moe.bias", "clamp.preacts"]


@pytest.mark.parametrize("name", WIDGETS)
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
