"""Two non-V4 attention layers to measure V4 against: V3.2's MLA + DSA, and a dense MQA layer.

Both are one layer with random weights, real shapes and a decode step over a cache; they exist for
``v4lab bench attention`` and are written to be read, not to be fast.

- ``MLADSA`` (DeepSeek-V3.2, ``get_config("v3.2")``): MLA with q_lora 1536, kv_lora 512, rope 64, nope 128,
  v 128, 128 heads; decode runs *absorbed* MLA (queries and outputs folded through ``wkv_b``) over a latent
  cache [N, 512 + 64]; the DSA indexer (64 heads × 128, top-2048) scores EVERY raw token's key
  (``wk`` d → 128 with a LayerNorm, RoPE on its first 64 dims) — the O(N) term V4 divides by 4 and sparsifies.
  Parameter names follow the V3.2 checkpoint (``wq_a``, ``q_norm``, ``wq_b``, ``wkv_a``, ``kv_norm``,
  ``wkv_b``, ``wo``, ``indexer.{wq_b,wk,k_norm,weights_proj}``).
- ``DenseMQA``: V4-Flash's own query/KV/output path (64 heads × head dim **512**, one shared K=V head, sink,
  grouped output projection) attending densely to every cached token — V4 with neither window nor
  compression. Its cache is one 512-wide BF16 K=V vector per token (1024 B).

Computation is fp32 on CPU (cache tensors are fp32); ``cache_format_bytes`` gives the bytes of the
format the real model stores (FP8 latent + scales for V3.2, BF16 for MQA).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import V4Config
from .indexer import index_scores
from .norm import RMSNorm, rms_norm
from .rope import apply_rope, cos_sin, inv_freq


class _Buffer:
    """[B, capacity, D] storage written in place; `view()` is the filled prefix [B, n, D]. (Appending with
    torch.cat would copy the whole cache every step: seconds per step at 1M tokens.)"""

    def __init__(self, data: torch.Tensor, n: int):
        self.data, self.n = data, n

    def append(self, x: torch.Tensor) -> None:
        if self.n + x.shape[1] > self.data.shape[1]:
            grown = self.data.new_empty(self.data.shape[0], 2 * (self.n + x.shape[1]), self.data.shape[2])
            grown[:, :self.n] = self.data[:, :self.n]
            self.data = grown
        self.data[:, self.n:self.n + x.shape[1]] = x
        self.n += x.shape[1]

    def view(self) -> torch.Tensor:
        return self.data[:, :self.n]

    def nbytes(self) -> int:
        return self.n * self.data.shape[0] * self.data.shape[2] * self.data.element_size()


def _synthetic(B: int, n: int, D: int, spare: int, generator, normed: bool = False, device=None) -> _Buffer:
    # drawn by a CPU generator (the same values on every device), then placed on `device`
    data = torch.empty(B, n + spare, D, device=device)
    data[:, :n] = torch.randn(B, n, D, generator=generator).to(data.device)
    if normed:
        data[:, :n] = rms_norm(data[:, :n], None, 1e-6)
    return _Buffer(data, n)


class MLADSACache:
    """latent [B, N, kv_lora], k_pe [B, N, rope], index_keys [B, N, Di]; `length` = N."""

    def __init__(self, latent: _Buffer, k_pe: _Buffer, index_keys: _Buffer):
        self._latent, self._k_pe, self._index_keys = latent, k_pe, index_keys
        self.length = latent.n

    latent = property(lambda self: self._latent.view())
    k_pe = property(lambda self: self._k_pe.view())
    index_keys = property(lambda self: self._index_keys.view())

    def append(self, c: torch.Tensor, pe: torch.Tensor, ik: torch.Tensor) -> None:
        for buf, x in ((self._latent, c), (self._k_pe, pe), (self._index_keys, ik)):
            buf.append(x)
        self.length += c.shape[1]

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in (self._latent, self._k_pe, self._index_keys))


class MLADSA(nn.Module):
    """One DeepSeek-V3.2 attention layer (MLA + DeepSeek Sparse Attention indexer)."""

    def __init__(self, cfg: V4Config):
        super().__init__()
        if cfg.arch != "v3.2":
            raise ValueError(f"config model_type {cfg.model_type!r}: MLADSA needs a deepseek_v32 config")
        d, qr, H = cfg.hidden_size, cfg.q_lora_rank, cfg.num_attention_heads
        self.cfg, self.H = cfg, H
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.vd, self.kvr = cfg.v_head_dim, cfg.kv_lora_rank
        self.wq_a = nn.Linear(d, qr, bias=False)
        self.q_norm = RMSNorm(qr, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(qr, H * (self.nope + self.rope), bias=False)
        self.wkv_a = nn.Linear(d, self.kvr + self.rope, bias=False)     # latent + one shared rope key
        self.kv_norm = RMSNorm(self.kvr, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kvr, H * (self.nope + self.vd), bias=False)
        self.wo = nn.Linear(H * self.vd, d, bias=False)
        self.indexer = nn.Module()
        self.Hi, self.Di, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.indexer.wq_b = nn.Linear(qr, self.Hi * self.Di, bias=False)
        self.indexer.wk = nn.Linear(d, self.Di, bias=False)
        self.indexer.k_norm = nn.LayerNorm(self.Di)
        self.indexer.weights_proj = nn.Linear(d, self.Hi, bias=False)
        # V3.2 scores with softmax_scale = (nope + rope)^-1/2 times YaRN's mscale²; the mscale only changes a
        # constant, so it is left out here (it does not change the cost).
        self.scale = (self.nope + self.rope) ** -0.5
        self.register_buffer("freqs", inv_freq(self.rope, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    # one token's new cache entries
    def _kv(self, x, cos, sin):
        ckv = self.wkv_a(x)
        c = self.kv_norm(ckv[..., :self.kvr])
        pe = apply_rope(ckv[..., self.kvr:], cos, sin)
        ik = self.indexer.k_norm(self.indexer.wk(x))
        # V3.2's indexer ropes the FIRST rope dims of its key and query (V4 ropes the last ones).
        ik = torch.cat([apply_rope(ik[..., :self.rope], cos, sin), ik[..., self.rope:]], -1)
        return c, pe, ik

    def new_cache(self, batch_size: int, context: int, generator: torch.Generator | None = None, spare: int = 64,
                  device: str | torch.device | None = None) -> MLADSACache:
        """A cache holding `context` synthetic tokens (random entries of the right shapes and count) and
        room for `spare` more, on `device` (default: the layer's)."""
        g, dev = generator, device or self.wq_a.weight.device
        return MLADSACache(_synthetic(batch_size, context, self.kvr, spare, g, normed=True, device=dev),
                           _synthetic(batch_size, context, self.rope, spare, g, device=dev),
                           _synthetic(batch_size, context, self.Di, spare, g, device=dev))

    @staticmethod
    def cache_format_bytes(cfg: V4Config, n_tokens: int) -> int:
        """Bytes of the served format: latent FP8 + 4 FP32 scales + rope BF16 = 656 B, indexer key FP8 +
        one FP32 scale = 132 B, per token (same layout as v4lab.accounting)."""
        lat = cfg.kv_lora_rank + 4 * math.ceil(cfg.kv_lora_rank / 128) + 2 * cfg.qk_rope_head_dim
        key = cfg.index_head_dim + 4 * math.ceil(cfg.index_head_dim / 128)
        return n_tokens * (lat + key)

    def decode(self, x: torch.Tensor, cache: MLADSACache) -> torch.Tensor:
        """x [B, 1, d] at position cache.length → [B, 1, d]; appends to the cache."""
        B = x.shape[0]
        pos = torch.tensor([cache.length], device=x.device)
        cos, sin = cos_sin(self.freqs, pos)
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(B, 1, self.H, self.nope + self.rope)
        q_nope, q_pe = q[..., :self.nope], apply_rope(q[..., self.nope:], cos[:, None], sin[:, None])
        cache.append(*self._kv(x, cos, sin))

        # DSA indexer: score every cached token, keep the top-k.
        iq = self.indexer.wq_b(qr).view(B, 1, self.Hi, self.Di)
        iq = torch.cat([apply_rope(iq[..., :self.rope], cos[:, None], sin[:, None]), iq[..., self.rope:]], -1)
        iw = self.indexer.weights_proj(x) * (self.Di ** -0.5 * self.Hi ** -0.5)
        scores = index_scores(iq, cache.index_keys, iw)                              # [B, 1, N]
        top = scores.topk(min(self.topk, scores.shape[-1]), dim=-1).indices[:, 0]   # [B, k]

        # Absorbed MLA: fold wkv_b's key half into the query and its value half into the output, so the
        # attention runs in the 512-wide latent space over the gathered cache rows.
        wkv_b = self.wkv_b.weight.view(self.H, self.nope + self.vd, self.kvr)
        q_lat = torch.einsum("bhn,hnc->bhc", q_nope[:, 0], wkv_b[:, :self.nope])     # [B, H, kvr]
        c = torch.gather(cache.latent, 1, top[..., None].expand(-1, -1, self.kvr))   # [B, k, kvr]
        pe = torch.gather(cache.k_pe, 1, top[..., None].expand(-1, -1, self.rope))   # [B, k, rope]
        z = (torch.einsum("bhc,bkc->bhk", q_lat, c) + torch.einsum("bhr,bkr->bhk", q_pe[:, 0], pe)) * self.scale
        o_lat = torch.einsum("bhk,bkc->bhc", z.softmax(-1), c)                       # [B, H, kvr]
        o = torch.einsum("bhc,hvc->bhv", o_lat, wkv_b[:, self.nope:])                # [B, H, v]
        return self.wo(o.reshape(B, 1, -1))


class DenseMQACache:
    """kv [B, N, D]: one shared K=V head per token."""

    def __init__(self, kv: _Buffer):
        self._kv, self.length = kv, kv.n

    kv = property(lambda self: self._kv.view())

    def append(self, kv: torch.Tensor) -> None:
        self._kv.append(kv)
        self.length += kv.shape[1]

    def nbytes(self) -> int:
        return self._kv.nbytes()


class DenseMQA(nn.Module):
    """V4-Flash-shaped MQA (64 heads × 512, one K=V head, sink, grouped wo) over ALL cached tokens."""

    def __init__(self, cfg: V4Config):
        super().__init__()
        d, H, D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.cfg, self.H, self.D, self.eps = cfg, H, D, cfg.rms_norm_eps
        self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * D, bias=False)
        self.wkv = nn.Linear(d, D, bias=False)
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.o_groups = cfg.o_groups
        self.wo_a = nn.Linear(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, d, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H))
        self.register_buffer("freqs", inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta), persistent=False)

    def new_cache(self, batch_size: int, context: int, generator: torch.Generator | None = None, spare: int = 64,
                  device: str | torch.device | None = None) -> DenseMQACache:
        return DenseMQACache(_synthetic(batch_size, context, self.D, spare, generator, normed=True,
                                        device=device or self.wq_a.weight.device))

    @staticmethod
    def cache_format_bytes(cfg: V4Config, n_tokens: int) -> int:
        return n_tokens * 2 * cfg.head_dim          # BF16 K=V

    def decode(self, x: torch.Tensor, cache: DenseMQACache) -> torch.Tensor:
        B = x.shape[0]
        cos, sin = cos_sin(self.freqs, torch.tensor([cache.length], device=x.device))
        q = rms_norm(self.wq_b(self.q_norm(self.wq_a(x))).view(B, 1, self.H, self.D), None, self.eps)
        q = apply_rope(q, cos[:, None], sin[:, None])
        cache.append(apply_rope(self.kv_norm(self.wkv(x)), cos, sin))
        z = torch.einsum("bhd,bnd->bhn", q[:, 0], cache.kv) * self.D ** -0.5         # [B, H, N]
        z = torch.cat([z, self.attn_sink.view(1, -1, 1).expand(B, -1, 1)], -1)
        o = torch.einsum("bhn,bnd->bhd", z.softmax(-1)[..., :-1], cache.kv)[:, None]  # [B, 1, H, D]
        o = apply_rope(o, cos[:, None], sin[:, None], inverse=True)
        og = o.reshape(B, 1, self.o_groups, -1)
        wa = self.wo_a.weight.view(self.o_groups, -1, og.shape[-1])
        return self.wo_b(torch.einsum("bsgi,goi->bsgo", og, wa).flatten(2))
