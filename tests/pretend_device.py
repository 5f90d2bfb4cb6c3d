"""PretendDevice: replay "the model lives on a GPU" on a CPU-only machine (used by test_viz_device.py and
test_train_device.py).

The model's parameters, buffers and gradients, and everything computed inside the model's own methods,
are tagged "on the model's device"; the tags follow every torch op. An op outside the model that mixes a
tagged tensor with an untagged non-scalar one raises (what CUDA refuses). ``.cpu()`` / ``.to("cpu")`` and
the Python conversions (``tolist``, ``float`` ...) drop the tag, as a host copy would. The model's device
and of every tagged tensor is reported as ``torch.device("cpu", 0)``, a name for the CPU that the harness
can tell apart from a plain ``"cpu"``: ``.to(x.device)`` and factories with ``device=x.device`` of a
tagged x produce tagged tensors, as they would produce CUDA tensors on a GPU.
"""
import weakref

import torch
from torch.overrides import TorchFunctionMode

PRETEND = torch.device("cpu", 0)
T = torch.Tensor
_TO_HOST = {T.cpu, T.tolist, T.item, T.__float__, T.__int__, T.__bool__, T.numpy, T.__index__, T.__len__,
            T.__repr__, T.__format__}
_DEVICE = T.device                                      # the getset descriptor behind Tensor.device
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
    def __init__(self, model):
        super().__init__()
        self._ids: dict[int, weakref.ref] = {}          # id -> weakref (WeakSet would compare tensors with ==)
        self.depth = 0
        for t in list(model.parameters()) + list(model.buffers()):
            self._add(t)
            self._add(t.data)
        for p in model.parameters():                     # gradients are made by autograd, not by an op
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda q: self._add(q.grad))
        self.violations = []

    def wrap(self, model, methods=("forward", "generate", "route_only")):
        """Run these methods (and every module call) as "inside the model"."""
        for name in methods:
            setattr(model, name, self.inside(getattr(model, name)))
        model._call_impl = self.inside(model._call_impl)
        return self

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
        if getattr(func, "__self__", None) is _DEVICE:      # a tagged tensor reports the pretend device
            return PRETEND if self.has(args[0]) else func(*args, **kwargs)
        ins = _leaves(list(args) + list(kwargs.values()), [])
        targets = [torch.device(a) for a in list(args[1:] if func is T.to else []) + [kwargs.get("device")]
                   if isinstance(a, (str, torch.device))]
        to_model = any(d == PRETEND for d in targets)
        moving_home = func in _TO_HOST or (func is T.to and not to_model and any(d.type == "cpu" for d in targets))
        res = func(*args, **kwargs)
        if to_model:
            self._tag(res)
            return res
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
                               "tensors (move one side: .cpu() where a figure takes them from the model, "
                               "device= / .to(model.device) where the model is fed)")
        if tagged:
            self._tag(res)
        return res


