"""Looking inside a real DeepSeek-V4 download (Flash 284B / Pro 1.6T) without loading it whole.

The download is a directory in the official release layout (``config.json``,
``model.safetensors.index.json``, shards, ``tokenizer.json``), found from an argument or
``$V4LAB_REAL_WEIGHTS``. Everything here reads through :class:`v4lab.checkpoint.CheckpointReader`
(lazy, one tensor at a time).

Tensor-level views (no forward pass; each reads a few small tensors):

* :func:`mhc_static` — the mHC matrices a layer applies when its input-dependent term is zero: the
  sigmoids of the static bias ``hc_*_base`` and the Sinkhorn projection (``v4lab.mhc.sinkhorn``) of its
  n x n block. It is the layer's "default" mixing, what the model learned to do before looking at x.
* :func:`attn_sinks` (per layer and head), :func:`compressor_ape` (pooling biases of CSA/HCA and of
  the indexer), :func:`expert_fp4_histograms` (E2M1 codes and E8M0 scale exponents of real experts),
  :func:`hash_tables` / :func:`hash_load` (``tid2eid`` of the hash layers and the expert load a text
  implies).

Streaming forward (:func:`stream_forward`): the prompt goes through the layers one at a time. Each layer
is built on the meta device, its non-expert weights are read and dequantised, and the layer's own
``Block.forward`` runs: its MoE holds an expert provider instead of experts, so only the experts that some
token picked are read, dequantised and applied, **one expert at a time** (``v4lab.moe.moe_grouped_from``:
the arithmetic and order of ``moe_grouped``); the layer is dropped before the next one is read.
The embedding is read by rows, the head in row chunks. It returns the final logits, per-layer routing
and the CSA indexer's selections.

Memory bound (dense weights held by the loader, tracked by :class:`WeightLedger` through the actual
lifetime of the tensors): one layer's non-expert weights + one expert (+ its gate's ``tid2eid``), or the
head chunk. In fp32 that is 153 M + 25 M params = **0.72 GB for V4-Flash** (1.9 GB for V4-Pro); add the
transient dequantisation buffers (< 1 GB) and the activations of a short prompt: a streaming forward fits
a 32 GB workstation with room to spare. (Page cache of the memory-mapped shards is not process memory.)
It is I/O-bound: every call reads each layer's stored weights from disk — V4-Flash: 6.7 GB of non-expert
weights + 13 MB per touched expert (a 20-token prompt touches up to 120 of 256 experts per layer, ~1.6 GB
per layer... so expect minutes even on NVMe) + 1 GB of head, read in chunks; the embedding is read by rows.
V4-Pro: 25 GB + 35 MB per touched expert.
"""
from __future__ import annotations

import dataclasses
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from v4lab import quant
from v4lab.checkpoint import CheckpointReader, layer_prefix
from v4lab.config import V4Config, get_config

ENV = "V4LAB_REAL_WEIGHTS"
TOKENIZER_FILE = "tokenizer.json"
HEAD_CHUNK_ROWS = 8192          # vocabulary rows of the head read at a time (8192 x 4096 fp32 = 134 MB)


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


# ================================================================================ finding the download
def real_weights_path(path: str | os.PathLike | None = None) -> Path | None:
    """``path``, else ``$V4LAB_REAL_WEIGHTS``, else None. Not checked (see :func:`open_real`)."""
    p = path if path is not None else os.environ.get(ENV, "").strip() or None
    return None if p is None else Path(p).expanduser()


def real_weights_status(path: str | os.PathLike | None = None) -> str:
    """A plain message for notebooks: is a real V4 download configured, and how to enable it if not."""
    p = real_weights_path(path)
    how = (f"To enable the real-weights sections, download DeepSeek-V4-Flash (or -Pro) from Hugging Face "
           f"(the whole repository: config.json, model.safetensors.index.json, the shards and tokenizer.json) "
           f"and set {ENV}=/path/to/it before starting Jupyter (or pass path=... to the v4lab.real functions "
           f"and the v4lab.viz.real figures and widgets).")
    if p is None:
        return f"No real V4 download configured (${ENV} is not set). " + how
    try:
        r = open_real(p)
    except ValueError as e:
        where = f"path = {str(p)!r}" if path is not None else f"${ENV} points to {str(p)!r}"
        return f"{where}, but it is not usable: {e}. " + how
    cfg = r.config
    tok = "with tokenizer.json" if (p / TOKENIZER_FILE).is_file() else "WITHOUT tokenizer.json (text prompts disabled)"
    return (f"Real weights: {str(p)!r} ({cfg.name}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} "
            f"experts, hidden {cfg.hidden_size}, {len(r.keys())} tensors) {tok}.")


def open_real(path=None, expect: str | V4Config | None = None) -> CheckpointReader:
    """A validated lazy reader for the download (headers only are read). ``expect``: a preset name or
    config the download must match structurally (e.g. "v4-flash"); a mismatch raises ValueError listing
    the differing keys. ``path`` may already be a CheckpointReader."""
    if isinstance(path, CheckpointReader):
        reader = path
        reader.validate()
    else:
        p = real_weights_path(path)
        if p is None:
            raise ValueError(f"path = None: no download given and ${ENV} is not set")
        reader = _cached_reader(p)
    if expect is not None:
        check_config(reader.config, expect)
    return reader


_READERS: dict[tuple, CheckpointReader] = {}


def _cached_reader(p: Path) -> CheckpointReader:
    """Validated readers, kept per directory (and the mtimes of its config and index) so that a notebook
    drawing 43 layers parses a release's headers once."""
    from v4lab.checkpoint import INDEX_FILE
    try:
        key = (str(p.resolve()), (p / "config.json").stat().st_mtime_ns, (p / INDEX_FILE).stat().st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _READERS:
        return _READERS[key]
    reader = CheckpointReader(p)
    reader.validate()                           # config.json against every header: names, shapes, dtypes
    if key is not None:
        if len(_READERS) >= 4:
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = reader
    return reader


_IGNORED = ("name", "torch_dtype", "max_position_embeddings", "bos_token_id", "eos_token_id",
            "initializer_range", "attention_dropout")


def check_config(cfg: V4Config, expect: str | V4Config) -> None:
    """Raise ValueError naming every structural key where ``cfg`` (a download's) differs from ``expect``."""
    want = get_config(expect) if isinstance(expect, str) else expect
    if not isinstance(want, V4Config):
        _bad("expect", expect, "must be a preset name, a config.json path or a V4Config")
    a, b = dataclasses.asdict(cfg), dataclasses.asdict(want)
    diff = [f"{k}: download {a[k]!r} != expected {b[k]!r}" for k in a if k not in _IGNORED and a[k] != b[k]]
    if diff:
        raise ValueError(f"config mismatch: the download's config.json is not {want.name!r} "
                         f"({len(diff)} keys differ): " + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else ""))


# ================================================================================ tokenizer
def load_tokenizer(path=None, cfg: V4Config | None = None):
    """The download's own ``tokenizer.json`` (``tokenizers`` library). Missing file, an unreadable file,
    or a vocabulary larger than the config's ``vocab_size`` raise ValueError."""
    from tokenizers import Tokenizer
    root = path.path if isinstance(path, CheckpointReader) else real_weights_path(path)
    if root is None:
        raise ValueError(f"path = None: no download given and ${ENV} is not set")
    f = Path(root) / TOKENIZER_FILE
    if not f.is_file():
        raise ValueError(f"tokenizer: {str(f)!r} not found. The streaming forward encodes text with the "
                         f"download's own tokenizer: copy {TOKENIZER_FILE} from the release into {str(root)!r}, "
                         "or pass token ids instead of text")
    from v4lab.errors import read_text_file
    text = read_text_file(f, "tokenizer")          # a regular file of bounded size
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ValueError(f"tokenizer: {str(f)!r} cannot be read ({e})") from None
    if cfg is not None and tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"tokenizer: {str(f)!r} has {tok.get_vocab_size()} tokens but config vocab_size = "
                         f"{cfg.vocab_size}: tokenizer and weights come from different models")
    return tok


def encode(tok, text: str, cfg: V4Config, add_bos: bool = True) -> list[int]:
    """Token ids of ``text``. ``add_bos``: prepend ``cfg.bos_token_id`` unless the tokenizer's own
    post-processor already did (DeepSeek's chat template starts every sequence with BOS)."""
    if not isinstance(text, str) or not text:
        _bad("prompt", text, "must be a non-empty string (or a list of token ids)")
    ids = tok.encode(text).ids
    if add_bos and (not ids or ids[0] != cfg.bos_token_id):
        ids = [cfg.bos_token_id] + ids
    return ids


def _prompt_ids(reader: CheckpointReader, prompt, add_bos: bool) -> tuple[list[int], list[str] | None]:
    cfg = reader.config
    if isinstance(prompt, str):
        tok = load_tokenizer(reader, cfg)
        ids = encode(tok, prompt, cfg, add_bos)
        return ids, [tok.id_to_token(i) for i in ids]
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        _bad("prompt", prompt if not isinstance(prompt, (list, tuple)) else f"<{len(prompt)} items>",
             "must be a string or a non-empty list of int token ids")
    bad = [i for i in prompt if not 0 <= i < cfg.vocab_size]
    if bad:
        _bad("prompt", f"token id {bad[0]}", f"ids must be in [0, vocab_size = {cfg.vocab_size})")
    return list(prompt), None


# ================================================================================ tensor-level views
def mhc_static(path, layer: int, site: str = "attn") -> dict:
    """The mHC coefficients of ``layer`` at ``site`` ("attn" | "ffn" | "head") from the static bias alone
    (input term zero): pre = sigmoid(base_pre) + hc_eps, post = 2 sigmoid(base_post),
    comb = sinkhorn(base_comb [n, n]) (column-stochastic, official orientation), h_res = combᵀ (paper's
    X' = H^res X). ``site="head"`` is the final hc_head (pre only; ``layer`` ignored). Also returns
    ``scale`` (the alphas that weigh the input-dependent term)."""
    from v4lab.mhc import h_res, sinkhorn
    reader = open_real(path)
    cfg = reader.config
    n = cfg.hc_mult
    if site == "head":
        base = reader.get("hc_head_base").float()
        return {"layer": None, "site": "head", "pre": torch.sigmoid(base) + cfg.hc_eps,
                "scale": reader.get("hc_head_scale").float()}
    if site not in ("attn", "ffn"):
        _bad("site", site, "must be 'attn', 'ffn' or 'head'")
    if isinstance(layer, bool) or not isinstance(layer, int):
        _bad("layer", layer, "must be an int layer index")
    p = layer_prefix(cfg, layer)
    base = reader.get(f"{p}hc_{site}_base").float()
    comb = sinkhorn(base[2 * n:].view(n, n), cfg.hc_sinkhorn_iters, cfg.hc_eps)
    return {"layer": layer, "site": site, "pre": torch.sigmoid(base[:n]) + cfg.hc_eps,
            "post": 2 * torch.sigmoid(base[n:2 * n]), "comb": comb, "h_res": h_res(comb),
            "scale": reader.get(f"{p}hc_{site}_scale").float()}


def attn_sinks(path) -> torch.Tensor:
    """``attn_sink`` of every main layer: [num_hidden_layers, heads] fp32 (a sink logit per head)."""
    reader = open_real(path)
    cfg = reader.config
    return torch.stack([reader.get(f"layers.{i}.attn.attn_sink").float() for i in range(cfg.num_hidden_layers)])


def compressor_ape(path, layer: int, indexer: bool = False) -> torch.Tensor:
    """The compressor's learned pooling bias ``ape`` [ratio, coff·c] of a CSA/HCA layer (the indexer's own
    compressor with ``indexer=True``, CSA only). softmax over the ratio axis of ape alone is the pooling
    the layer would use for equal scores."""
    reader = open_real(path)
    cfg = reader.config
    p = layer_prefix(cfg, layer)
    kind = cfg.layer_kind(layer)
    if kind == "window":
        _bad("layer", layer, "is a sliding-window layer: it has no compressor (pick a csa or hca layer)")
    if indexer and kind != "csa":
        _bad("indexer", True, f"layer {layer} is {kind}; only CSA layers have an indexer")
    return reader.get(f"{p}attn.{'indexer.' if indexer else ''}compressor.ape").float()


def expert_fp4_histograms(path, layer: int, experts=None, projections=("w1", "w2", "w3")) -> dict:
    """Histograms of the stored FP4 experts of ``layer``: ``codes`` [16] counts of the E2M1 codes
    (index = 4-bit code, sign in bit 3; value table ``v4lab.quant.e2m1_decode``), ``e8m0`` [256] counts
    of the scale bytes (2^(e-127)), plus ``values`` (the 16 code values) and the experts read."""
    reader = open_real(path)
    cfg = reader.config
    p = layer_prefix(cfg, layer)
    ex = range(cfg.n_routed_experts) if experts is None else [int(e) for e in experts]
    bad = [e for e in ex if not 0 <= e < cfg.n_routed_experts]
    if bad:
        _bad("experts", bad, f"expert ids must be in [0, {cfg.n_routed_experts})")
    codes = torch.zeros(16, dtype=torch.int64)
    scales = torch.zeros(256, dtype=torch.int64)
    for e in ex:
        for w in projections:
            name = f"{p}ffn.experts.{e}.{w}.weight"
            packed = reader.get(name)
            if packed.dtype != torch.int8:
                raise ValueError(f"key {name!r}: stored as {packed.dtype}, not packed FP4 (I8); "
                                 "this download's experts are not FP4")
            u = packed.view(torch.uint8)
            codes += torch.bincount((u & 0xF).reshape(-1).long(), minlength=16)
            codes += torch.bincount((u >> 4).reshape(-1).long(), minlength=16)
            s = reader.get(name[: -len(".weight")] + ".scale").view(torch.uint8)
            scales += torch.bincount(s.reshape(-1).long(), minlength=256)
    return {"layer": layer, "experts": list(ex), "codes": codes, "e8m0": scales,
            "values": quant.e2m1_decode(torch.arange(16, dtype=torch.uint8)).float()}


def hash_tables(path) -> dict[int, torch.Tensor]:
    """``{layer: tid2eid [vocab, K]}`` for the hash-routed layers."""
    reader = open_real(path)
    cfg = reader.config
    return {i: reader.get(f"layers.{i}.ffn.gate.tid2eid") for i in range(cfg.num_hidden_layers)
            if cfg.is_hash_layer(i)}


def hash_load(path, text, add_bos: bool = False) -> dict:
    """Expert load the hash layers put on ``text`` (a string, encoded with the download's tokenizer, or token
    ids): ``{"ids": [...], "load": {layer: [E] counts over tokens x K}}``. No forward pass needed."""
    reader = open_real(path)
    ids, _ = _prompt_ids(reader, text, add_bos)
    t = torch.tensor(ids)
    E = reader.config.n_routed_experts
    return {"ids": ids, "load": {i: torch.bincount(tab[t].reshape(-1).long(), minlength=E)
                                 for i, tab in hash_tables(reader).items()}}


# ================================================================================ weight bookkeeping
class WeightLedger:
    """Bytes of dense weights the streaming loader holds, tracked through the tensors' lifetimes: a
    tensor is counted from :meth:`track` until it is garbage-collected (``weakref.finalize``), so a
    forgotten reference shows up as held memory. ``group`` names what a tensor belongs to
    ("layer.3", "embed", "head")."""

    def __init__(self):
        self._held: dict[int, tuple[str, str, int]] = {}
        self._next = 0
        self.peak_bytes = 0
        self.max_groups = 0              # most distinct groups held at one moment
        self.events: list[tuple[str, str, str, int, int]] = []   # (op, group, name, bytes, held after)

    @property
    def held_bytes(self) -> int:
        return sum(b for _, _, b in self._held.values())

    def groups(self) -> set[str]:
        return {g for g, _, _ in self._held.values()}

    def track(self, t: torch.Tensor, group: str, name: str) -> torch.Tensor:
        key, self._next = self._next, self._next + 1
        nb = t.numel() * t.element_size()
        self._held[key] = (group, name, nb)
        weakref.finalize(t, self._drop, key)
        held = self.held_bytes
        self.peak_bytes = max(self.peak_bytes, held)
        self.max_groups = max(self.max_groups, len(self.groups()))
        self.events.append(("hold", group, name, nb, held))
        return t

    def _drop(self, key: int) -> None:
        g, name, nb = self._held.pop(key)
        self.events.append(("drop", g, name, nb, self.held_bytes))


# ================================================================================ streaming forward
@dataclass
class StreamResult:
    ids: list[int]
    tokens: list[str] | None                 # token strings when the prompt was text
    logits: torch.Tensor                     # [1, S, vocab] fp32
    routing: list[dict]                      # per layer: layer, kind, hash, idx [S,K], weights [S,K], experts, load [E]
    index_selections: dict[int, torch.Tensor] = field(default_factory=dict)   # CSA layer -> [S, index_topk]
    ledger: WeightLedger | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def top_tokens(self, k: int = 5, tokenizer=None) -> list[list[tuple]]:
        """Per position, the k most likely next tokens as (id, prob[, text])."""
        p = self.logits[0].float().softmax(-1)
        v, i = p.topk(k, -1)
        out = []
        for vv, ii in zip(v.tolist(), i.tolist()):
            out.append([(t, pr) + ((tokenizer.id_to_token(t),) if tokenizer else ()) for t, pr in zip(ii, vv)])
        return out


class StreamingLoader:
    """Reads one layer at a time from a release directory, dequantising into ``dtype`` (F32 tensors such
    as ``hc_*`` stay fp32, as ``v4lab.model.load`` keeps them) on ``device``; every dense tensor it hands
    out is tracked by :attr:`ledger`."""

    def __init__(self, reader: CheckpointReader, dtype: torch.dtype = torch.float32, device="cpu"):
        self.reader, self.cfg, self.dtype, self.device = reader, reader.config, dtype, torch.device(device)
        self.ledger = WeightLedger()

    def tensor(self, name: str, group: str) -> torch.Tensor:
        stored = self.reader.expected[name][1]
        t = self.reader.get_dequantized(name, torch.float32 if stored == "F32" else self.dtype)
        return self.ledger.track(t.to(self.device), group, name)

    def rows(self, name: str, ids: list[int], group: str) -> torch.Tensor:
        """Rows ``ids`` of a 2-D BF16/F32 tensor, read row by row from the shard (no full read)."""
        from safetensors import safe_open
        info = self.reader.info(name)
        with safe_open(info["file"], framework="pt") as f:
            sl = f.get_slice(name)
            uniq = sorted(set(ids))
            got = {i: sl[i:i + 1] for i in uniq}
        t = torch.cat([got[i] for i in ids]).to(self.dtype)
        return self.ledger.track(t.to(self.device), group, f"{name}[{len(uniq)} rows]")

    def row_chunks(self, name: str, chunk: int):
        """(start, rows [chunk, ...]) of a 2-D tensor, ``chunk`` rows at a time."""
        from safetensors import safe_open
        info = self.reader.info(name)
        n = info["shape"][0]
        with safe_open(info["file"], framework="pt") as f:
            sl = f.get_slice(name)
            for a in range(0, n, chunk):
                t = sl[a:min(n, a + chunk)].to(self.dtype).to(self.device)
                yield a, self.ledger.track(t, "head", f"{name}[{a}:{a + t.shape[0]}]")

    def block(self, i: int, low_precision: bool = False):
        """Layer ``i`` as a v4lab Block with every weight but the routed experts, which its MoE reads
        through :meth:`expert` when a token picks them (one at a time)."""
        from v4lab.loading import no_init
        from v4lab.model import Block
        from v4lab.rope import layer_inv_freq
        cfg = self.cfg
        with no_init("meta"):
            blk = Block(cfg, i, expert_provider=lambda e: self.expert(i, e))     # experts read when picked
        p = layer_prefix(cfg, i)
        group = f"layer.{i}"
        sd = {n[len(p):]: self.tensor(n, group) for n in self.reader.layer_keys(i, experts=[])
              if not n.endswith(".scale")}
        missing, unexpected = blk.load_state_dict(sd, strict=False, assign=True)
        del sd
        lacking = [m for m in missing if ".experts." not in m]
        if unexpected or lacking:
            raise ValueError(f"layer {i}: checkpoint keys do not match v4lab's Block "
                             f"(unexpected {unexpected[:3]}, missing {lacking[:3]})")
        # Plain tensor attributes built in __init__ (RoPE frequencies) were made on meta: rebuild them.
        freqs = layer_inv_freq(cfg, i)
        for m in blk.modules():
            if isinstance(getattr(m, "rope_freqs", None), torch.Tensor):
                m.rope_freqs = freqs.clone().to(self.device)
        for mname, m in blk.named_modules():
            if mname.startswith("ffn.experts"):
                continue
            for k, v in vars(m).items():
                if isinstance(v, torch.Tensor) and v.is_meta:
                    raise ValueError(f"layer {i}: module {mname or 'block'!r} attribute {k!r} is still on meta "
                                     "(v4lab.real does not know how to build it)")
            for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if v is not None and v.is_meta:
                    raise ValueError(f"layer {i}: {mname}.{k} was not in the checkpoint")
        blk.attn.low_precision = bool(low_precision)
        return blk

    def expert(self, i: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = f"{layer_prefix(self.cfg, i)}ffn.experts.{e}."
        return tuple(self.tensor(f"{p}{w}.weight", f"layer.{i}") for w in ("w1", "w2", "w3"))


def _check_stream_args(max_tokens: int, n_ids: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        _bad("max_tokens", max_tokens, "must be a positive int")
    if n_ids > max_tokens:
        _bad("prompt", f"<{n_ids} tokens>", f"the streaming forward is for short prompts (<= max_tokens = "
                                            f"{max_tokens}); raise max_tokens if you have the memory")


def _stream_layer(loader: StreamingLoader, i: int, x: torch.Tensor, ids: torch.Tensor,
                  low_precision: bool) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """Layer i's own ``Block.forward`` on the streams x [1, S, n, d], its experts read on demand → (x, routing
    record, CSA indexer picks [S, index_topk] or None)."""
    from v4lab.moe import expert_load
    from v4lab.switches import ForwardRecord
    cfg = loader.cfg
    blk = loader.block(i, low_precision)
    csa = cfg.layer_kind(i) == "csa"
    blk.switches.record = ForwardRecord()
    blk.attn.inspect = csa                                                 # records the indexer's picks
    x = blk(x, ids)
    r = blk.switches.record.routing_of(blk.ffn)
    idx, E = r["idx"], blk.ffn.gate.n_experts
    routing = {"layer": i, "hash": blk.ffn.gate.is_hash, "idx": idx.cpu(), "weights": r["weights"].cpu(),
               "experts": sorted(set(idx.reshape(-1).tolist())), "load": expert_load(idx, E).cpu(),
               "kind": cfg.layer_kind(i)}
    picks = blk.attn.last_inspect["selected"][0].cpu() if csa else None        # -1 = none
    return x, routing, picks


def _stream_head(loader: StreamingLoader, x: torch.Tensor, head_chunk_rows: int) -> torch.Tensor:
    """hc_head → norm → head over the final streams x [1, S, n, d], the head read in row chunks → [1, S, V]."""
    from v4lab.mhc import hc_head
    from v4lab.norm import rms_norm
    cfg = loader.cfg
    fn, base, scale = (loader.tensor(k, "head") for k in ("hc_head_fn", "hc_head_base", "hc_head_scale"))
    h = hc_head(x, fn, scale, base, rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps)
    norm_w = loader.tensor("norm.weight", "head")
    h = rms_norm(h, norm_w, cfg.rms_norm_eps)
    del fn, base, scale, norm_w
    logits = torch.empty(1, x.shape[1], cfg.vocab_size, dtype=h.dtype, device=x.device)
    for a, w in loader.row_chunks("head.weight", head_chunk_rows):
        logits[..., a:a + w.shape[0]] = F.linear(h, w)
        del w
    return logits


@torch.no_grad()
def stream_forward(prompt, path=None, *, dtype: torch.dtype = torch.float32, device=None,
                   expect: str | V4Config | None = None, add_bos: bool = True, progress: bool = True,
                   low_precision: bool = False, max_tokens: int = 256,
                   head_chunk_rows: int = HEAD_CHUNK_ROWS) -> StreamResult:
    """Forward a short prompt through a real download, one layer in memory at a time (see module docstring).

    ``prompt``: text (encoded with the download's ``tokenizer.json``; BOS prepended when ``add_bos``) or
    token ids. ``path``: the download (else ``$V4LAB_REAL_WEIGHTS``) or an open CheckpointReader.
    ``expect``: preset the download must match ("v4-flash"). ``dtype``: compute/weight dtype (fp32 equals
    ``v4lab.load(path)``'s forward; bf16 halves the memory). ``device``: as ``v4lab.device.get_device``.
    Returns a :class:`StreamResult` (logits [1, S, vocab], per-layer routing, CSA indexer selections, the
    ledger of weights held). Each layer runs its own ``Block.forward``; its MoE reads the picked experts."""
    from tqdm.auto import tqdm

    from v4lab.device import get_device
    reader = open_real(path, expect)
    cfg = reader.config
    dev = get_device(device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        _bad("dtype", dtype, "must be a floating dtype (float32, bfloat16, float16, float64)")
    ids, tokens = _prompt_ids(reader, prompt, add_bos)
    _check_stream_args(max_tokens, len(ids))
    loader = StreamingLoader(reader, dtype, dev)
    t_ids = torch.tensor([ids], device=dev)
    n, d = cfg.hc_mult, cfg.hidden_size

    emb = loader.rows("embed.weight", ids, "embed")                           # [S, d]
    x = emb.view(1, len(ids), d).unsqueeze(2).expand(1, len(ids), n, d).contiguous()   # [1, S, n, d] copies
    del emb

    routing, selections = [], {}
    for i in tqdm(range(cfg.num_hidden_layers), desc=f"{cfg.name}: layers", disable=not progress):
        x, r, picks = _stream_layer(loader, i, x, t_ids, low_precision)       # layer i is dropped on return
        routing.append(r)
        if picks is not None:
            selections[i] = picks
    logits = _stream_head(loader, x, head_chunk_rows)
    return StreamResult(ids=ids, tokens=tokens, logits=logits.float().cpu(), routing=routing,
                        index_selections=selections, ledger=loader.ledger, dtype=dtype, device=str(dev))


def layer_weight_bound(cfg: V4Config, dtype: torch.dtype = torch.float32) -> int:
    """The most dense-weight bytes :func:`stream_forward` may hold at once: the largest layer's non-expert
    tensors + one routed expert (or the head stage: a head chunk + hc_head + norm, if larger)."""
    import math

    from v4lab.checkpoint import expected_keys
    ek = expected_keys(cfg)
    item = torch.empty(0, dtype=dtype).element_size()

    def size(name):
        shape, dt = ek[name]
        numel = math.prod(shape) * (2 if dt == "I8" else 1)
        return numel * (4 if dt == "F32" else 8 if dt == "I64" else item)

    best = 0
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(cfg, i)
        ne = sum(size(k) for k in ek if k.startswith(p) and not k.endswith(".scale") and ".experts." not in k)
        one = sum(size(f"{p}ffn.experts.0.{w}.weight") for w in ("w1", "w2", "w3"))
        best = max(best, ne + one)
    head = min(HEAD_CHUNK_ROWS, cfg.vocab_size) * cfg.hidden_size * item + size("hc_head_fn") + size("norm.weight")
    return max(best, head + size("hc_head_base") + size("hc_head_scale"))
