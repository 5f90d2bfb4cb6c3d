"""RMSNorm as V4 uses it: statistics in fp32, learned gain (``weight``), eps from the config."""
from __future__ import annotations

import torch
from torch import nn


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference of `rms_norm` (same signature and result), differentiated by autograd."""
    dtype = x.dtype
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(dtype)


class _RMSNorm(torch.autograd.Function):
    """`rms_norm_reference`'s ops (so the same values) on fp32 x [..., D] with a hand-written backward: with
    r = (mean(x²) + eps)^−½ and x̂ = x·r, y = x̂·w gives g_x = r·(g·w − x̂·mean(g·w·x̂)) and g_w = Σ g·x̂,
    4 passes over x where autograd's pow / mean / rsqrt / mul nodes make ~9."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        y = x * r
        ctx.save_for_backward(x, r, weight)
        return y if weight is None else y * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        xhat = x * r
        gw = None
        if weight is not None:
            gw = (g * xhat).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
            g = g * weight
        gx = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * r if ctx.needs_input_grad[0] else None
        return gx, gw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / RMS(x) · weight over the last dim, in fp32, returned in x's dtype (weight None: no gain)."""
    w = None if weight is None else weight.float()
    return _RMSNorm.apply(x.float(), w, eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
