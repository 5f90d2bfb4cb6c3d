"""Interleaved partial RoPE on the LAST `qk_rope_head_dim` channels, plain or YaRN-scaled per layer kind.

Spec: docs/design/v4-attention.md §3.3.
- Channels (2i, 2i+1) of the trailing rope slice form one complex pair rotated by angle pos·θ_i.
- Window-only layers (and the MTP block): θ_i = rope_theta^(−2i/r), no scaling.
- CSA / HCA layers: base compress_rope_theta with YaRN frequency blending (factor, original length,
  beta_fast, beta_slow from rope_scaling). V4 applies it at every length and uses NO YaRN mscale
  (neither on cos/sin nor on the softmax scale).
- The attention output's rope slice is rotated back by −pos (`inverse=True`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from v4lab.config import V4Config


def _correction_dim(n_rot: float, dim: int, base: float, original: int) -> float:
    # The pair index whose wavelength completes n_rot turns over the original context.
    return dim * math.log(original / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def inv_freq(dim: int, base: float, yarn: dict | None = None) -> torch.Tensor:
    """θ_i for i < dim/2 (fp32). `yarn`: {factor, original_max_position_embeddings, beta_fast, beta_slow}."""
    theta = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not yarn or float(yarn.get("factor", 1.0)) == 1.0:
        return theta
    factor = float(yarn["factor"])
    original = int(yarn.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(yarn.get("beta_fast") or 32), float(yarn.get("beta_slow") or 1)
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001
    # ramp = 0 for fast-rotating pairs (kept), 1 for slow ones (interpolated by 1/factor).
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return theta / factor * ramp + theta * (1 - ramp)


def layer_inv_freq(cfg: V4Config, layer_id: int) -> torch.Tensor:
    """Frequencies of layer `layer_id`: plain rope_theta for window layers / MTP, YaRN otherwise."""
    r = cfg.qk_rope_head_dim
    if cfg.layer_kind(layer_id) == "window":
        return inv_freq(r, cfg.rope_theta)
    return inv_freq(r, cfg.compress_rope_theta, cfg.rope_scaling)


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: any int tensor [...] → cos, sin [..., r/2] fp32."""
    ang = positions.to(torch.float32)[..., None] * freqs.to(device=positions.device, dtype=torch.float32)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2·cos.shape[-1] channels of x in interleaved pairs.

    x: [..., D]; cos/sin broadcast against x[..., :-r] pairs, i.e. [..., r/2] with the same leading dims
    as x except possibly a head axis (pass cos[..., None, :] for x: [B, S, H, D]).
    """
    r = 2 * cos.shape[-1]
    if r > x.shape[-1]:
        raise ValueError(f"apply_rope: rope width {r} exceeds the last dim of x ({x.shape[-1]})")
    if inverse:
        sin = -sin
    nope, rope = x[..., :x.shape[-1] - r], x[..., x.shape[-1] - r:]
    pairs = rope.float().unflatten(-1, (r // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([nope, out.to(x.dtype)], dim=-1)
