"""The whole DeepSeek-V4 model: blocks wired with mHC, the MTP module, a decode cache, load and save.

Spec: docs/design/v4-moe-mhc-fp4.md §5.3 (block order, stream init, hc_head), §7 (MTP), §8 (layout).

One block, in the official order (two mHC sites per block):

    X [B,S,n,d] → hc_pre(attn) → attn_norm → attention → hc_post → hc_pre(ffn) → ffn_norm → MoE → hc_post

The model copies the token embedding into the n = hc_mult streams (no 1/n scaling), runs the blocks,
collapses the streams with ``hc_head`` (a pre-only mHC), applies the final ``norm`` and the ``head``.

MTP (depth 1 in V4): at position i the MTP block combines the main model's final streams at i with the
embedding of token i+1 and predicts token i+2:

    z = e_proj(enorm(embed(t[i+1]))) (broadcast to the n streams) + h_proj(hnorm(X_L[i]))   [each stream]
    mtp_logits[i] = head(mtp.norm(mtp.hc_head(Block_L(z))))

``embed`` and ``head`` are shared (they are not stored under ``mtp.*``). For a sequence of S tokens the
full forward therefore returns S−1 MTP logits; ``mtp_logits[:, i]`` is the distribution of token i+2.
Only ``mtp.0`` runs (V4 has depth 1); a config with more MTP modules builds them for the layout only.

API:
    model = V4Model(cfg)                     # or V4Model(get_config("v4-pro"), device="meta"): shapes only
    logits = model(ids)                      # [B, S, vocab]; return_mtp / return_hidden / forced_routes
    cache = model.new_cache(B); model(ids[:, :P], cache=cache); model(next_ids, cache=cache)   # decode
    routes = model.route_only(ids)           # per-layer expert ids, to feed back as forced_routes
    out = model.generate(prompt, 16, temperature=0.8, top_k=50, seed=0)
    model = load(dir); save(model, dir2); blk = load_layer(dir, i)       # official release layout (loading.py)
    model.set_flags(hc_mode="hc", low_precision=True, qat=True)             # precision / mHC-mode flags
    model.use_kernels()                      # hot ops through the Triton kernels (forward only; model.switches)
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from v4lab import loading, sampling
from v4lab.attention import Attention
from v4lab.config import V4Config, get_config
from v4lab.errors import bad as _bad
from v4lab.gate import check_forced_routes
from v4lab.loading import no_init, to_device  # noqa: F401  (to_device: re-exported, v4lab.model.to_device)
from v4lab.mhc import hc_head, hc_post, hc_pre, token_mean_h_res
from v4lab.moe import MoE
from v4lab.norm import RMSNorm
from v4lab.switches import ForwardRecord, Switches, recording, share_switches

HC_MODES = ("mhc", "hc", "residual")


def _init_hc(fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, std: float) -> None:
    # Spec §5.3 "Initialisation" (UNCERTAIN what DeepSeek used; only alpha = 0.01 is published):
    # fn ~ N(0, std), base = 0 (pre = 0.5, post = 1, uniform mixing), alpha = scale = 0.01.
    with torch.no_grad():
        fn.normal_(0.0, std)
        base.zero_()
        scale.fill_(0.01)


# ---------------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """One V4 decoder layer: attention and MoE, each wrapped by an mHC site.

    Parameters (official names): ``hc_attn_fn [(2+n)n, n·d]``, ``hc_attn_base [(2+n)n]``,
    ``hc_attn_scale [3]``, the same for ``hc_ffn_*``, ``attn_norm``, ``attn``, ``ffn_norm``, ``ffn``.
    ``expert_provider``: see ``v4lab.moe.MoE`` (routed experts supplied on demand instead of held).
    """

    def __init__(self, cfg: V4Config, layer_id: int, expert_provider=None):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        n, d = cfg.hc_mult, cfg.hidden_size
        mix = (2 + n) * n                                   # pre (n) + post (n) + comb (n·n) logits
        for site in ("attn", "ffn"):
            fn = nn.Parameter(torch.empty(mix, n * d, dtype=torch.float32))
            base = nn.Parameter(torch.empty(mix, dtype=torch.float32))
            scale = nn.Parameter(torch.empty(3, dtype=torch.float32))
            _init_hc(fn, base, scale, cfg.initializer_range)
            setattr(self, f"hc_{site}_fn", fn)
            setattr(self, f"hc_{site}_base", base)
            setattr(self, f"hc_{site}_scale", scale)
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, layer_id, expert_provider=expert_provider)
        self.hc_mode = "mhc"
        self.switches = Switches()
        share_switches(self, self.switches)

    def _pre(self, site: str, x: torch.Tensor):
        """hc_pre of one mHC site (the Triton one with ``switches.kernels``); its H^res goes to the record."""
        c, sw = self.cfg, self.switches
        if sw.kernels:
            from v4lab.kernels.mhc import hc_pre as pre
        else:
            pre = hc_pre
        u, post, comb = pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                            getattr(self, f"hc_{site}_base"), rms_eps=c.rms_norm_eps, hc_eps=c.hc_eps,
                            iters=c.hc_sinkhorn_iters, mode=self.hc_mode, check_finite=sw.check_finite)
        if sw.record is not None and sw.record.h_res is not None:
            sw.record.h_res.append(token_mean_h_res(comb))
        return u, post, comb

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None, start_pos: int = 0, cache=None,
                forced_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, n, d] streams → [B, S, n, d]."""
        if self.hc_attn_fn.is_meta:
            raise ValueError(f"layer {self.layer_id}: its weights were not loaded (meta device); "
                             "load it with v4lab.model.load(..., layers=...) or load_layer")
        u, post, comb = self._pre("attn", x)                          # u: [B, S, d]
        x = hc_post(self.attn(self.attn_norm(u), start_pos, cache), x, post, comb)
        u, post, comb = self._pre("ffn", x)
        x = hc_post(self.ffn(self.ffn_norm(u), input_ids, forced_idx), x, post, comb)
        return x


class MTPBlock(Block):
    """``mtp.{k}``: a full Block (layer_id = num_hidden_layers: window attention, learned router) plus
    ``e_proj``, ``h_proj``, ``enorm``, ``hnorm``, its own final ``norm`` and ``hc_head_{fn,base,scale}``."""

    def __init__(self, cfg: V4Config, layer_id: int):
        super().__init__(cfg, layer_id)
        n, d = cfg.hc_mult, cfg.hidden_size
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        _init_hc(self.hc_head_fn, self.hc_head_base, self.hc_head_scale, cfg.initializer_range)
        with torch.no_grad():
            for lin in (self.e_proj, self.h_proj):
                lin.weight.normal_(0.0, cfg.initializer_range)
        self.low_precision = False

    def combine(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """h: main streams [B, S, n, d] at positions i, e: embeddings [B, S, d] of tokens i+1 → [B, S, n, d]."""
        e, h = self.enorm(e), self.hnorm(h)                          # hnorm normalises each stream over d
        if self.low_precision:                                       # FP8 GEMM inputs, as the official linear
            from v4lab.quant import act_quant_fp8
            e, h = act_quant_fp8(e, 128), act_quant_fp8(h, 128)
        return self.e_proj(e).unsqueeze(2) + self.h_proj(h)


# ---------------------------------------------------------------------------------------------- cache
@dataclass
class ModelCache:
    """Decode state of a whole model: one attention cache per layer (and per MTP block), the next
    position, and for MTP the main streams of the last position (they wait for the next token)."""
    batch_size: int
    layers: list
    mtp: list
    pos: int = 0
    mtp_pos: int = 0                      # next position the MTP block has not processed yet
    mtp_pending: torch.Tensor | None = field(default=None, repr=False)   # [B, 1, n, d]
    owner: object = field(default=None, repr=False)     # weakref to the model that made it
    broken: bool = False                  # a call failed after some layer caches had advanced


# ---------------------------------------------------------------------------------------------- model
class V4Model(nn.Module):
    """DeepSeek-V4: ``embed``, ``layers.{i}``, ``norm``, ``head``, ``hc_head_{fn,base,scale}``, ``mtp.{k}``.

    ``V4Model(cfg, device="meta")`` builds the module tree with every shape and no storage (V4-Pro too).
    Like any ``nn.Module`` it is built on torch's default device unless ``device`` says otherwise; the
    entry points that build or load models for you (``load``, ``train``, ``generate``, the notebooks)
    follow v4lab's device setting (``v4lab.device.get_device``). Inputs are moved to ``model.device``.
    """

    def __init__(self, cfg: V4Config | str, device: str | torch.device | None = None,
                 hc_mode: str = "mhc", low_precision: bool = False, qat: bool = False):
        super().__init__()
        cfg = get_config(cfg) if isinstance(cfg, str) else cfg
        if not isinstance(cfg, V4Config):
            _bad("cfg", type(cfg).__name__, "must be a V4Config or a preset name")
        if not cfg.is_v4:
            _bad("cfg.model_type", cfg.model_type, "V4Model builds deepseek_v4 configs only")
        if cfg.tie_word_embeddings:
            _bad("tie_word_embeddings", True, "V4 has a separate head; tied embeddings are not supported")
        self.cfg = cfg
        meta = device is not None and torch.device(device).type == "meta"      # shapes only: no init
        with no_init("meta") if meta else (torch.device(device) if device is not None else contextlib.nullcontext()):
            n, d, V = cfg.hc_mult, cfg.hidden_size, cfg.vocab_size
            self.embed = nn.Embedding(V, d)
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(d, cfg.rms_norm_eps)
            self.head = nn.Linear(d, V, bias=False)
            self.hc_head_fn = nn.Parameter(torch.empty(n, n * d, dtype=torch.float32))
            self.hc_head_base = nn.Parameter(torch.empty(n, dtype=torch.float32))
            self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
            _init_hc(self.hc_head_fn, self.hc_head_base, self.hc_head_scale, cfg.initializer_range)
            with torch.no_grad():
                self.embed.weight.normal_(0.0, cfg.initializer_range)
                self.head.weight.normal_(0.0, cfg.initializer_range)
            # All MTP modules use layer_id = num_hidden_layers (the config has one ratio entry for MTP).
            self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_hidden_layers)
                                     for _ in range(cfg.num_nextn_predict_layers))
        # packed FP8/FP4 originals (raw weight, scale) kept by load() for a byte-exact save(); not in state_dict
        self.quantized_originals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.source_path: Path | None = None
        self.switches = Switches()                 # one switch object for every layer (v4lab.switches)
        share_switches(self, self.switches)
        self.set_flags(hc_mode=hc_mode, low_precision=low_precision, qat=qat)

    # ------------------------------------------------------------------ flags
    def blocks(self):
        return list(self.layers) + list(self.mtp)

    def set_flags(self, hc_mode: str | None = None, low_precision: bool | None = None,
                  qat: bool | None = None, expert_h_fp8: float | None = None) -> "V4Model":
        """Pass mode flags down to every block (None leaves a flag as it is): the mHC mode ("mhc" | "hc" |
        "residual", see v4lab.mhc), the attention FP8/FP4 simulation (``Attention.low_precision``, plus FP8
        activation fake-quant before the MTP ``e_proj``/``h_proj``), routed-expert FP4 QAT (``MoE.qat``) and
        the static-scale FP8 cast of the routed experts' h (``MoE.h_fp8_scale``; 0: off)."""
        if hc_mode is not None and hc_mode not in HC_MODES:
            _bad("hc_mode", hc_mode, f"must be one of {HC_MODES}")
        number = isinstance(expert_h_fp8, (int, float)) and not isinstance(expert_h_fp8, bool)
        if expert_h_fp8 is not None and not (number and 0 <= expert_h_fp8 < float("inf")):
            _bad("expert_h_fp8", expert_h_fp8, "must be a finite number >= 0 (0: off)")
        for b in self.blocks():
            if hc_mode is not None:
                b.hc_mode = hc_mode
            if low_precision is not None:
                b.attn.low_precision = bool(low_precision)
                if isinstance(b, MTPBlock):
                    b.low_precision = bool(low_precision)
            if qat is not None:
                b.ffn.qat = bool(qat)
            if expert_h_fp8 is not None:
                b.ffn.h_fp8_scale = float(expert_h_fp8)
        self.hc_mode = self.hc_mode if hc_mode is None else hc_mode
        self.low_precision = self.low_precision if low_precision is None else bool(low_precision)
        self.qat = self.qat if qat is None else bool(qat)
        return self

    def use_kernels(self, on: bool = True) -> "V4Model":
        """Run the hot ops through the Triton kernels beside their references (``v4lab.kernels``: sparse
        attention with the sink, compressor pooling, indexer scores, the mHC pre-mix, the grouped expert MLP)
        — or, with ``on=False``, through the torch references again. Same signatures, same results (each
        kernel's test compares it with its reference). Kernels are compiled on CUDA and interpreted on the CPU
        (correct but slow there); they are forward-only, so a forward that needs gradients raises."""
        if on:
            from v4lab.device import check_kernel_device
            check_kernel_device(self.device)          # compiled kernels need CUDA tensors, interpreted ones CPU
            import v4lab.kernels  # noqa: F401  (sets Triton's mode before a kernel is defined)
        self.switches.kernels = bool(on)
        return self

    @property
    def kernels(self) -> bool:
        """Whether the hot ops run through the Triton kernels (``switches.kernels``)."""
        return self.switches.kernels

    def recording(self, h_res: bool = False) -> contextlib.AbstractContextManager[ForwardRecord]:
        """``with model.recording() as rec:`` every forward inside fills ``rec`` (a ForwardRecord the caller
        owns): each MoE layer's routing, and with ``h_res`` the token-mean H^res of every mHC site."""
        return recording(self.switches, h_res)

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch_size: int = 1, record: bool = False) -> ModelCache:
        """An empty decode cache; ``record=True``: each layer's cache also keeps what its queries read
        (``AttentionCache.reads``, used by ``v4lab.trace``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            _bad("batch_size", batch_size, "must be a positive integer")
        return ModelCache(batch_size, [b.attn.new_cache(batch_size, record) for b in self.layers],
                          [b.attn.new_cache(batch_size, record) for b in self.mtp], owner=weakref.ref(self))

    # ------------------------------------------------------------------ pieces
    def _check_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            _bad("input_ids", type(input_ids).__name__, "must be a LongTensor [batch, seq]")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            _bad("input_ids", tuple(input_ids.shape), "must be [batch, seq] with batch >= 1 and seq >= 1")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            _bad("input_ids", input_ids.dtype, "must hold integer token ids")
        V = self.cfg.vocab_size
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            _bad("input_ids", f"a token id {lo if lo < 0 else hi}", f"token ids must be in [0, vocab_size = {V})")
        return input_ids.to(self.device, torch.long)

    @property
    def device(self) -> torch.device:
        """Where the weights live (the embedding's device); inputs are moved here, so callers may pass CPU ids."""
        return self.embed.weight.device

    def logits_from_streams(self, x: torch.Tensor, fn, base, scale, norm: nn.Module) -> torch.Tensor:
        """hc_head collapse → norm → shared head. x: [B, S, n, d] → [B, S, vocab]."""
        c = self.cfg
        y = hc_head(x, fn, scale, base, rms_eps=c.rms_norm_eps, hc_eps=c.hc_eps, mode=self.hc_mode,
                    check_finite=self.switches.check_finite)
        return self.head(norm(y))

    def _mtp_forward(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int, cache, forced):
        """h: [B, S', n, d] main streams at positions start_pos.., next_ids: [B, S'] the following tokens."""
        m = self.mtp[0]
        z = m.combine(h, self.embed(next_ids))
        z = m(z, next_ids, start_pos, cache, forced)
        return self.logits_from_streams(z, m.hc_head_fn, m.hc_head_base, m.hc_head_scale, m.norm)

    # ------------------------------------------------------------------ forward
    def _trunk(self, ids: torch.Tensor, start_pos: int, cache: ModelCache | None, forced: list) -> torch.Tensor:
        """Embedding → n copies of the stream → every block: ids [B, S] → the final streams [B, S, n, d]."""
        B, S = ids.shape
        x = self.embed(ids)                                                   # [B, S, d]
        x = x.unsqueeze(2).expand(B, S, self.cfg.hc_mult, self.cfg.hidden_size).contiguous()   # [B, S, n, d]
        for i, layer in enumerate(self.layers):
            x = layer(x, ids, start_pos, cache.layers[i] if cache is not None else None, forced[i])
        return x

    def streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final streams [B, S, n, d] of a cache-free forward from position 0, without the head: for callers
        that want what the layers record (``inspect``), not the logits (the head is ~10 % of a forward)."""
        ids = self._check_ids(input_ids)
        return self._trunk(ids, 0, None, [None] * self.cfg.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, start_pos: int | None = None, cache: ModelCache | None = None,
                return_mtp: bool = False, forced_routes: list | None = None, return_hidden: bool = False):
        """input_ids [B, S] → logits [B, S, vocab].

        ``start_pos``: absolute position of input_ids[:, 0]; with a cache it must be ``cache.pos`` (the
        default), without one it must be 0 (the default): a forward without a cache sees only its input.
        ``cache``: from ``new_cache(B)``; the call appends to it (prefill, then decode).
        ``forced_routes``: one entry per MoE layer (num_hidden_layers, plus one for MTP optionally), each
        None (learned routing; hash layers must be None) or an int tensor [B·S, K] of expert ids
        (Anticipatory Routing); the MTP entry is [B·S_mtp, K].
        Returns ``logits``, or a tuple ``(logits, mtp_logits?, hidden?)`` in that order when
        ``return_mtp`` / ``return_hidden`` ask for them. ``mtp_logits [B, S_mtp, vocab]``: S_mtp = S−1 without
        a cache (entry i predicts token start_pos+i+2); with a cache it is S once earlier calls left the
        last streams pending (entry j then sits at position start_pos−1+j). ``hidden``: the final streams
        [B, S, n, d] before ``hc_head``.
        """
        cfg = self.cfg
        if self.switches.kernels and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            _bad("use_kernels", True, "the Triton kernels are forward-only: run under torch.no_grad() (or "
                                      "inference_mode), or call model.use_kernels(False) to train")
        ids = self._check_ids(input_ids)
        B, S = ids.shape
        start_pos = self._start_position(B, S, start_pos, cache, return_mtp)
        forced = [None if r is None else r.to(self.device)
                  for r in check_forced_routes(cfg, forced_routes, B * S, len(self.mtp))]
        try:                              # everything is checked; a failure now is marked on the cache
            x = self._trunk(ids, start_pos, cache, forced)
            logits = self.logits_from_streams(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.norm)
            out = [logits]
            if return_mtp:
                out.append(self._mtp(x, ids, start_pos, cache, forced[-1] if len(forced) > cfg.num_hidden_layers
                                     else None))
        except BaseException:
            if cache is not None:
                cache.broken = True
            raise
        if cache is not None:
            cache.pos = start_pos + S
        if return_hidden:
            out.append(x)
        return out[0] if len(out) == 1 else tuple(out)

    def _start_position(self, B: int, S: int, start_pos: int | None, cache: ModelCache | None,
                        return_mtp: bool) -> int:
        """The checked absolute position of the call's first token (see ``forward``); nothing has moved yet."""
        if cache is not None:
            if not isinstance(cache, ModelCache):
                _bad("cache", type(cache).__name__, "must come from model.new_cache(batch_size)")
            where = f"<ModelCache at position {cache.pos}>"
            if cache.owner is None or cache.owner() is not self:
                _bad("cache", where, "made by another model (or a copy); use this model's new_cache(batch_size)")
            if cache.broken:
                _bad("cache", where, "a previous call failed part-way and left it inconsistent; start a new_cache")
            if cache.batch_size != B:
                _bad("cache", f"batch size {cache.batch_size}", f"input_ids has batch size {B}")
            if start_pos is None:
                start_pos = cache.pos
            elif start_pos != cache.pos:
                _bad("start_pos", start_pos, f"the cache holds {cache.pos} positions; decoding must continue "
                                             f"at start_pos = {cache.pos}")
        start_pos = 0 if start_pos is None else start_pos
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            _bad("start_pos", start_pos, "must be a non-negative integer")
        if cache is None and start_pos != 0:
            _bad("start_pos", start_pos, "must be 0 without a cache (a forward without one sees only its "
                                         "input); pass cache=model.new_cache(B) to continue a sequence")
        n_max = self.cfg.max_position_embeddings
        if start_pos + S > n_max:
            _bad("context", start_pos + S, f"positions must stay below max_position_embeddings = {n_max} "
                                           f"(start_pos {start_pos} + {S} tokens)")
        if return_mtp and not len(self.mtp):
            _bad("return_mtp", True, "this config has num_nextn_predict_layers = 0")
        if return_mtp and cache is not None:      # checked before any layer cache moves
            if cache.mtp_pos != max(start_pos - 1, 0) or (start_pos > 0) != (cache.mtp_pending is not None):
                _bad("return_mtp", True, "with a cache, MTP must be requested on every call from the first token "
                                         f"(the MTP cache is at position {cache.mtp_pos}, the main one at {start_pos})")
        return start_pos

    def _mtp(self, x, ids, start_pos, cache, forced):
        B = ids.shape[0]
        if cache is None:
            if ids.shape[1] < 2:
                return x.new_zeros(B, 0, self.cfg.vocab_size)
            return self._mtp_forward(x[:, :-1], ids[:, 1:], start_pos, None, forced)
        if cache.mtp_pending is not None:                  # streams of position start_pos−1 meet token start_pos
            h, nxt, p0 = torch.cat([cache.mtp_pending, x[:, :-1]], 1), ids, start_pos - 1
        else:
            h, nxt, p0 = x[:, :-1], ids[:, 1:], start_pos
        cache.mtp_pending = x[:, -1:].detach()
        if h.shape[1] == 0:
            return x.new_zeros(B, 0, self.cfg.vocab_size)
        cache.mtp_pos = p0 + h.shape[1]
        return self._mtp_forward(h, nxt, p0, cache.mtp[0], forced)

    @torch.no_grad()
    def route_only(self, input_ids: torch.Tensor, start_pos: int = 0, return_mtp: bool = False) -> list:
        """Routes of a no-grad forward: one entry per MoE layer (None for hash layers) of expert ids [B·S, K]
        (with ``return_mtp`` one more for the MTP block, [B·(S−1), K]). Feed them back as ``forced_routes``
        (Anticipatory Routing: routes from older parameters, weights from the current ones)."""
        with self.recording() as rec:
            self(input_ids, start_pos=start_pos, return_mtp=return_mtp)
        blocks = list(self.layers) + (list(self.mtp[:1]) if return_mtp else [])
        return [None if (b.layer_id < self.cfg.num_hidden_layers and self.cfg.is_hash_layer(b.layer_id))
                else rec.routing_of(b.ffn)["idx"].clone() for b in blocks]

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None, eos_token_id: int | None = None, return_mtp: bool = False):
        """Greedy (temperature 0) or sampled decoding with the cache: see ``v4lab.sampling.generate``."""
        return sampling.generate(self, prompt_ids, max_new_tokens, temperature, top_k, seed, eos_token_id,
                                 return_mtp)


# ---------------------------------------------------------------------------------------------- load / save
def build_block(cfg: V4Config, i: int) -> Block:
    """Block ``i`` as V4Model builds it: a decoder layer for i < num_hidden_layers, else MTP block
    i − num_hidden_layers (every MTP block uses layer_id = num_hidden_layers)."""
    L = cfg.num_hidden_layers
    return Block(cfg, i) if i < L else MTPBlock(cfg, L)


def load_layer(path, i: int, dtype: torch.dtype = torch.float32, keep_quantized: bool = True,
               device: str | torch.device | None = None) -> Block:
    """One decoder layer or MTP block of a release checkpoint as a Block (``v4lab.loading.load_block``)."""
    return loading.load_block(build_block, path, i, dtype, keep_quantized, device)


def load(path, dtype: torch.dtype = torch.float32, keep_quantized: bool = True, layers=None,
         device: str | torch.device | None = None) -> V4Model:
    """Read a directory in the official release layout into a V4Model (``v4lab.loading.load_model``: the
    FP8/FP4 originals kept for a byte-exact save, ``layers`` to materialise, checks, ``device``)."""
    return loading.load_model(V4Model, build_block, path, dtype, keep_quantized, layers, device)


def save(model: V4Model, path, overwrite: bool = False, max_shard_bytes: int | None = None,
         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` in the official layout (config.json, index, shards; FP8/FP4 where the release has
    them). A weight equal to the packed original it was loaded from is written back from that original;
    any other FP8/FP4 weight is quantised here (power-of-two amax scales, v4lab.quant). Tokenizer and
    generation files of the directory the model was loaded from are copied along, and ``extra_files``
    ({name: bytes}) written too, all in the same atomic rename. ``overwrite`` replaces only a checkpoint
    folder; anything else at ``path`` is refused (ValueError), untouched. Non-finite weights are refused."""
    if not isinstance(model, V4Model):
        _bad("model", type(model).__name__, "must be a v4lab V4Model")
    return loading.write_release(model, path, overwrite, max_shard_bytes, extra_files)
