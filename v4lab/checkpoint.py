"""The official DeepSeek-V4 release layout: read it lazily, write it atomically, fake one for tests.

A release directory holds ``config.json``, ``model.safetensors.index.json``
(``{"metadata": {"total_size": N}, "weight_map": {name: shard}}``) and shards
``model-XXXXX-of-YYYYY.safetensors`` (all ``mtp.*`` tensors in the last one). Names are the official
"native" ones (``layers.3.attn.wq_a.weight``, ``layers.0.ffn.gate.tid2eid`` ...), no ``model.`` prefix.
Spec: docs/design/v4-moe-mhc-fp4.md §6.1 and §8.

``expected_keys(cfg)`` is the single source of truth for names, shapes and dtypes; the model names its
parameters after it. Stored formats:

* FP8 (attention projections, indexer ``wq_b``, shared experts, MTP ``e_proj``/``h_proj``): ``F8_E4M3``
  ``[o, i]`` + ``.scale`` ``F8_E8M0`` ``[ceil(o/128), ceil(i/128)]``.
* FP4 (routed experts): ``I8`` ``[o, i/2]`` (two E2M1 codes per byte, low nibble first) + ``.scale``
  ``F8_E8M0`` ``[o, i/32]``.
* BF16 (embed, head, norms, gate weight, compressor weights, indexer ``weights_proj``), F32 (``attn_sink``,
  ``ape``, ``gate.bias``, all ``hc_*``), I64 (``gate.tid2eid`` of hash layers).

Which format the experts use: ``quantization_config["expert_dtype"]`` (the V4.1 place), else
``cfg.expert_dtype``, else "fp4" (both released instruct revisions store FP4 experts, spec §6.1, even
though the initial Flash config has no ``expert_dtype``; use ``expert_dtype="fp8"`` for -Base). A config
without ``quantization_config`` describes an unquantised BF16 checkpoint (no ``.scale`` tensors).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from v4lab import quant
from v4lab.config import V4Config
from v4lab.errors import INDEX_FILE, check_replaceable, clean_stale_temporaries, read_json_file, temp_prefix

DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64, "I8": torch.int8,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "U8": torch.uint8,
          "F16": torch.float16, "I32": torch.int32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"BF16": 2, "F32": 4, "I64": 8, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1, "U8": 1, "F16": 2, "I32": 4}
DEFAULT_MAX_SHARD_BYTES = 4 * 2 ** 30
MAX_HEADER_BYTES = 100_000_000          # safetensors' own limit on the JSON header


# ================================================================================ expected keys
def _block(cfg: V4Config) -> tuple[int, int]:
    qc = cfg.quantization_config or {}
    b = qc.get("weight_block_size", [128, 128])
    return int(b[0]), int(b[1])


def expert_format(cfg: V4Config) -> str:
    """'fp4' | 'fp8' | 'bf16' for the routed experts (see module docstring)."""
    if cfg.quantization_config is None:
        return "bf16"
    fmt = cfg.quantization_config.get("expert_dtype") or cfg.expert_dtype or "fp4"
    if fmt not in ("fp4", "fp8", "bf16"):
        raise ValueError(f"config key 'expert_dtype' = {fmt!r}: must be fp4, fp8 or bf16")
    return fmt


def _linear(keys: dict, name: str, o: int, i: int, fmt: str, cfg: V4Config) -> None:
    """Add ``name.weight`` (+ ``name.scale``) for a linear layer with logical weight [o, i]."""
    if fmt == "fp8":
        bo, bi = _block(cfg)
        keys[f"{name}.weight"] = ((o, i), "F8_E4M3")
        keys[f"{name}.scale"] = ((math.ceil(o / bo), math.ceil(i / bi)), "F8_E8M0")
    elif fmt == "fp4":
        if i % quant.FP4_BLOCK:
            raise ValueError(f"{name}.weight: input dim {i} must be a multiple of {quant.FP4_BLOCK} for FP4")
        keys[f"{name}.weight"] = ((o, i // 2), "I8")
        keys[f"{name}.scale"] = ((o, i // quant.FP4_BLOCK), "F8_E8M0")
    else:
        keys[f"{name}.weight"] = ((o, i), "BF16")


def _layer_keys(cfg: V4Config, p: str, ratio: int, hash_layer: bool) -> dict:
    d, H, hd, qr = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    g, orank, n = cfg.o_groups, cfg.o_lora_rank, cfg.hc_mult
    E, I, K = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    w8 = "fp8" if cfg.quantization_config is not None else "bf16"
    k: dict = {}
    k[f"{p}attn_norm.weight"] = ((d,), "BF16")
    _linear(k, f"{p}attn.wq_a", qr, d, w8, cfg)
    k[f"{p}attn.q_norm.weight"] = ((qr,), "BF16")
    _linear(k, f"{p}attn.wq_b", H * hd, qr, w8, cfg)
    _linear(k, f"{p}attn.wkv", hd, d, w8, cfg)
    k[f"{p}attn.kv_norm.weight"] = ((hd,), "BF16")
    _linear(k, f"{p}attn.wo_a", g * orank, H * hd // g, w8, cfg)
    _linear(k, f"{p}attn.wo_b", d, g * orank, w8, cfg)
    k[f"{p}attn.attn_sink"] = ((H,), "F32")
    if ratio:
        c = 1 + (ratio == 4)          # CSA keeps two overlapping streams
        k[f"{p}attn.compressor.ape"] = ((ratio, c * hd), "F32")
        k[f"{p}attn.compressor.wkv.weight"] = ((c * hd, d), "BF16")
        k[f"{p}attn.compressor.wgate.weight"] = ((c * hd, d), "BF16")
        k[f"{p}attn.compressor.norm.weight"] = ((hd,), "BF16")
    if ratio == 4:
        Hi, Di = cfg.index_n_heads, cfg.index_head_dim
        _linear(k, f"{p}attn.indexer.wq_b", Hi * Di, qr, w8, cfg)
        k[f"{p}attn.indexer.weights_proj.weight"] = ((Hi, d), "BF16")
        k[f"{p}attn.indexer.compressor.ape"] = ((ratio, 2 * Di), "F32")
        k[f"{p}attn.indexer.compressor.wkv.weight"] = ((2 * Di, d), "BF16")
        k[f"{p}attn.indexer.compressor.wgate.weight"] = ((2 * Di, d), "BF16")
        k[f"{p}attn.indexer.compressor.norm.weight"] = ((Di,), "BF16")
    mix = (2 + n) * n
    for part in ("attn", "ffn"):
        k[f"{p}hc_{part}_fn"] = ((mix, n * d), "F32")
        k[f"{p}hc_{part}_base"] = ((mix,), "F32")
        k[f"{p}hc_{part}_scale"] = ((3,), "F32")
    k[f"{p}ffn_norm.weight"] = ((d,), "BF16")
    k[f"{p}ffn.gate.weight"] = ((E, d), "BF16")
    if hash_layer:
        k[f"{p}ffn.gate.tid2eid"] = ((cfg.vocab_size, K), "I64")
    else:
        k[f"{p}ffn.gate.bias"] = ((E,), "F32")
    efmt = expert_format(cfg)
    for e in range(E):
        _linear(k, f"{p}ffn.experts.{e}.w1", I, d, efmt, cfg)
        _linear(k, f"{p}ffn.experts.{e}.w2", d, I, efmt, cfg)
        _linear(k, f"{p}ffn.experts.{e}.w3", I, d, efmt, cfg)
    if cfg.n_shared_experts:
        Is = cfg.n_shared_experts * I
        _linear(k, f"{p}ffn.shared_experts.w1", Is, d, w8, cfg)
        _linear(k, f"{p}ffn.shared_experts.w2", d, Is, w8, cfg)
        _linear(k, f"{p}ffn.shared_experts.w3", Is, d, w8, cfg)
    return k


def layer_prefix(cfg: V4Config, i: int) -> str:
    """``layers.{i}.`` for a main layer, ``mtp.{i - L}.`` for the MTP blocks (i >= num_hidden_layers)."""
    L = cfg.num_hidden_layers
    if not 0 <= i < L + cfg.num_nextn_predict_layers:
        raise ValueError(f"layer index {i}: must be in [0, {L + cfg.num_nextn_predict_layers}) "
                         f"({L} layers + {cfg.num_nextn_predict_layers} MTP)")
    return f"layers.{i}." if i < L else f"mtp.{i - L}."


_EXPECTED_CACHE: dict[str, dict] = {}


def expected_keys(cfg: V4Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of a V4 release for ``cfg``: ``{name: (shape, safetensors dtype)}`` in file order
    (embed, layers, norm, head, hc_head, mtp). Spec §8.2/§8.3: Flash has 67,612 + 1,575 MTP keys.
    (Cached per config content; a fresh dict is returned each call.)"""
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in _EXPECTED_CACHE:
        if len(_EXPECTED_CACHE) > 8:
            _EXPECTED_CACHE.clear()
        _EXPECTED_CACHE[key] = _expected_keys(cfg)
    return dict(_EXPECTED_CACHE[key])


def _expected_keys(cfg: V4Config) -> dict:
    if not cfg.is_v4:
        raise ValueError(f"config model_type = {cfg.model_type!r}: the checkpoint layout here is DeepSeek-V4's")
    if expert_format(cfg) == "fp4":   # routed experts: w1/w3 read hidden_size, w2 reads moe_intermediate_size
        for key in ("hidden_size", "moe_intermediate_size"):
            if getattr(cfg, key) % quant.FP4_BLOCK:
                raise ValueError(f"config key {key!r} = {getattr(cfg, key)}: must be a multiple of "
                                 f"{quant.FP4_BLOCK} to store FP4 experts (blocks of {quant.FP4_BLOCK} values "
                                 "share a scale); use expert_dtype fp8 or bf16, or an unquantised config")
    d, n, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    keys: dict = {"embed.weight": ((V, d), "BF16")}
    for i in range(cfg.num_hidden_layers):
        keys.update(_layer_keys(cfg, f"layers.{i}.", cfg.compress_ratio(i), cfg.is_hash_layer(i)))
    keys["norm.weight"] = ((d,), "BF16")
    keys["head.weight"] = ((V, d), "BF16")
    keys["hc_head_fn"] = ((n, n * d), "F32")
    keys["hc_head_base"] = ((n,), "F32")
    keys["hc_head_scale"] = ((1,), "F32")
    w8 = "fp8" if cfg.quantization_config is not None else "bf16"
    for m in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{m}."
        # The MTP block is a sliding-window layer with a learned (non-hash) gate, plus its own projections.
        keys.update(_layer_keys(cfg, p, 0, False))
        _linear(keys, f"{p}e_proj", d, d, w8, cfg)
        _linear(keys, f"{p}h_proj", d, d, w8, cfg)
        for nm in ("enorm", "hnorm", "norm"):
            keys[f"{p}{nm}.weight"] = ((d,), "BF16")
        keys[f"{p}hc_head_fn"] = ((n, n * d), "F32")
        keys[f"{p}hc_head_base"] = ((n,), "F32")
        keys[f"{p}hc_head_scale"] = ((1,), "F32")
    return keys


def nbytes(shape: tuple, dtype: str) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


# ================================================================================ header parsing
def read_header(file: str | Path) -> dict:
    """Parse a safetensors header without touching the data: ``{name: {dtype, shape, data_offsets}}``.
    Raises ValueError naming the file (and key) for a truncated file, a non-JSON header or bad entries."""
    f = Path(file)
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"shard {str(f)!r}: truncated ({size} bytes; no 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"shard {str(f)!r}: header length {n} is over the {MAX_HEADER_BYTES} bytes "
                                 "safetensors allows (not a safetensors file?)")
            if n > size - 8:
                raise ValueError(f"shard {str(f)!r}: truncated (header says {n} bytes, file has {size - 8} "
                                 f"after the length)")
            raw = fh.read(n)
    except OSError as e:
        raise ValueError(f"shard {str(f)!r}: cannot be read ({e.strerror or e})") from None
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"shard {str(f)!r}: header is not JSON ({e})") from None
    if not isinstance(hdr, dict):
        raise ValueError(f"shard {str(f)!r}: header is not a JSON object")
    data_len = size - 8 - n
    out = {}
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"shard {str(f)!r}, key {name!r}: malformed header entry {info!r}") from None
        if dtype not in ITEMSIZE:
            raise ValueError(f"shard {str(f)!r}, key {name!r}: unknown dtype {dtype!r}")
        if b - a != nbytes(shape, dtype):
            raise ValueError(f"shard {str(f)!r}, key {name!r}: data_offsets [{a}, {b}] do not hold a "
                             f"{dtype} {list(shape)}")
        if b > data_len:
            raise ValueError(f"shard {str(f)!r}, key {name!r}: truncated (tensor data ends at byte {b}, "
                             f"the file holds {data_len} data bytes)")
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": (a, b)}
    return out


# ================================================================================ reader
class CheckpointReader:
    """Lazy view of a release directory: headers are parsed up front (cheap, and every structural error
    surfaces here), tensors are read one at a time from memory-mapped shards (``safe_open``), so one
    layer or one expert of V4-Flash/Pro can be read without touching the rest.

    ``get(name)`` gives the stored tensor; ``get_dequantized(name, dtype)`` decodes an FP8/FP4 weight
    with its ``.scale``; ``layer_state(i, dtype, experts)`` gives one layer dequantised, keys relative to
    its prefix (``attn.wq_a.weight`` ...; i = num_hidden_layers is ``mtp.0``); ``validate()`` compares the
    whole header set with ``expected_keys(config)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"checkpoint {str(self.path)!r}: not a directory")
        self.config = V4Config.from_json(self.path / "config.json")
        idx_file = self.path / INDEX_FILE
        idx = read_json_file(idx_file, "index")
        if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
            raise ValueError(f"index {str(idx_file)!r}: needs a 'weight_map' object {{name: shard file}}")
        self.weight_map: dict[str, str] = idx["weight_map"]
        self.metadata = idx.get("metadata", {})
        self._headers: dict[str, dict] = {}
        self._check_shard_paths(idx_file)
        for shard in sorted(set(self.weight_map.values())):
            f = self.path / shard
            if f.exists() and not f.is_file():
                key = next(k for k, v in self.weight_map.items() if v == shard)
                raise ValueError(f"index {str(idx_file)!r}: key {key!r} points to {str(f)!r}, which is not a "
                                 "regular file")
            if not f.is_file():
                key = next(k for k, v in self.weight_map.items() if v == shard)
                raise ValueError(f"index {str(idx_file)!r}: key {key!r} points to missing shard {str(f)!r}")
            self._headers[shard] = read_header(f)
        for name, shard in self.weight_map.items():
            if name not in self._headers[shard]:
                raise ValueError(f"shard {str(self.path / shard)!r}: key {name!r} listed in the index is not in it")
        for shard, hdr in self._headers.items():
            for name in hdr:
                if self.weight_map.get(name) != shard:
                    raise ValueError(f"shard {str(self.path / shard)!r}: key {name!r} is not mapped to it by the index")
        self._expected: dict | None = None
        self._open: dict = {}

    def _check_shard_paths(self, idx_file: Path) -> None:
        """Every shard named by the index is a file name that resolves (after symlinks) inside the folder."""
        root = self.path.resolve()
        seen: dict[str, bool] = {}
        for name, shard in self.weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise ValueError(f"index {str(idx_file)!r}: key {name!r} maps to {shard!r}: must be a shard "
                                 "file name (a string)")
            if shard not in seen:
                target = (self.path / shard).resolve()
                seen[shard] = Path(shard).is_absolute() or not target.is_relative_to(root) or target == root
            if seen[shard]:
                raise ValueError(f"index {str(idx_file)!r}: key {name!r} points to {shard!r}, outside the "
                                 f"checkpoint folder {str(self.path)!r}; shards must lie inside it")

    # ------------------------------------------------------------------ raw access
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> dict:
        """Header entry of ``name`` (dtype, shape, data_offsets) plus its ``file``."""
        shard = self._shard(name)
        return {**self._headers[shard][name], "file": str(self.path / shard)}

    @property
    def expected(self) -> dict:
        if self._expected is None:
            self._expected = expected_keys(self.config)
        return self._expected

    def _shard(self, name: str) -> str:
        if name not in self.weight_map:
            raise ValueError(f"checkpoint {str(self.path)!r}: no key {name!r}")
        return self.weight_map[name]

    def _check_entry(self, name: str) -> None:
        shard = self._shard(name)
        h = self._headers[shard][name]
        want = self.expected.get(name)
        where = f"shard {str(self.path / shard)!r}, key {name!r}"
        if want is None:
            raise ValueError(f"{where}: unexpected key for this config")
        if (tuple(h["shape"]), h["dtype"]) != (tuple(want[0]), want[1]):
            raise ValueError(f"{where}: stored {h['dtype']} {list(h['shape'])}, expected {want[1]} {list(want[0])}")

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor (int8 for packed FP4, float8 types for FP8 and E8M0), memory-mapped."""
        from safetensors import safe_open
        shard = self._shard(name)
        f = self._open.get(shard)
        if f is None:
            try:
                f = safe_open(str(self.path / shard), framework="pt")
            except Exception as e:  # safetensors' own error types; keep the message, name the file
                raise ValueError(f"shard {str(self.path / shard)!r}: cannot be opened ({e})") from None
            self._open[shard] = f
        try:
            return f.get_tensor(name)
        except Exception as e:
            raise ValueError(f"shard {str(self.path / shard)!r}, key {name!r}: cannot be read ({e})") from None

    def _scale(self, name: str) -> torch.Tensor:
        s = self.get(name)
        if s.dtype in (torch.float8_e8m0fnu, torch.uint8):
            bad = s.view(torch.uint8) == quant.E8M0_NAN
            if bool(bad.any()):
                at = bad.nonzero()[0].tolist()
                raise ValueError(f"shard {str(self.path / self._shard(name))!r}, key {name!r}: NaN scale "
                                 f"(E8M0 255) at {at}")
        return s

    def get_dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The logical tensor in ``dtype``: FP8 (E4M3 + 128x128 scales) and FP4 (packed I8 + 1x32 scales)
        weights are decoded with their ``.scale``; everything else is cast."""
        w = self.get(name)
        sname = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
        if sname is None or sname not in self.weight_map:
            if w.dtype in (torch.int8, torch.float8_e4m3fn):
                raise ValueError(f"checkpoint {str(self.path)!r}, key {name!r}: {w.dtype} weight without a .scale")
            return self._checked(name, w.to(dtype) if w.is_floating_point() else w)
        s = self._scale(sname)
        if w.dtype == torch.int8:
            return self._checked(name, quant.mxfp4_dequantize(w, s, dtype))
        if w.dtype == torch.float8_e4m3fn:
            bo, _ = _block(self.config)
            return self._checked(name, quant.fp8_block_dequantize(w, s, dtype, block=bo))
        raise ValueError(f"checkpoint {str(self.path)!r}, key {name!r}: has a .scale but dtype {w.dtype} "
                         "(expected I8 packed FP4 or F8_E4M3)")

    def _checked(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the logical tensor of ``name``) if its values are usable: floats finite, a hash table's
        expert ids in [0, n_routed_experts) and distinct per row. Else ValueError naming file and key."""
        where = f"shard {str(self.path / self._shard(name))!r}, key {name!r}"
        if t.is_floating_point():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                at = (~finite).nonzero()[0].tolist()
                raise ValueError(f"{where}: non-finite value {float(t[tuple(at)])} at {at} (NaN/inf weights "
                                 "are refused)")
        elif name.endswith(".tid2eid"):
            E = self.config.n_routed_experts
            out = (t < 0) | (t >= E)
            if bool(out.any()):
                at = out.nonzero()[0].tolist()
                raise ValueError(f"{where}: expert id {int(t[tuple(at)])} at {at}: must be in [0, {E})")
            srt = t.sort(-1).values
            dup = (srt[:, 1:] == srt[:, :-1]).any(-1)
            if bool(dup.any()):
                row = int(dup.nonzero()[0])
                raise ValueError(f"{where}: row {row} {t[row].tolist()} routes a token to the same expert twice")
        return t

    # ------------------------------------------------------------------ structured access
    def layer_keys(self, i: int, experts: Iterable[int] | None = None) -> list[str]:
        p = layer_prefix(self.config, i)
        keep = None if experts is None else {int(e) for e in experts}
        if keep is not None:
            bad = sorted(e for e in keep if not 0 <= e < self.config.n_routed_experts)
            if bad:
                raise ValueError(f"experts = {bad}: must be in [0, {self.config.n_routed_experts})")
        out = []
        for name in self.expected:
            if not name.startswith(p):
                continue
            rest = name[len(p):]
            if keep is not None and rest.startswith("ffn.experts."):
                if int(rest.split(".")[2]) not in keep:
                    continue
            out.append(name)
        return out

    def layer_state(self, i: int, dtype: torch.dtype = torch.float32,
                    experts: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        """One layer (``i < num_hidden_layers``) or MTP block (``i >= num_hidden_layers``), dequantised,
        keys relative to the layer prefix, ``.scale`` entries folded in. ``experts`` limits the routed
        experts read. Every key is checked (present, dtype, shape, no NaN scale) before anything is
        returned."""
        names = self.layer_keys(i, experts)
        p = layer_prefix(self.config, i)
        for name in self.weight_map:
            if name.startswith(p) and name not in self.expected:
                self._check_entry(name)                  # raises: unexpected key in this layer
        for name in names:
            if name not in self.weight_map:
                raise ValueError(f"checkpoint {str(self.path)!r}: missing key {name!r}")
            self._check_entry(name)
        return {name[len(p):]: self.get_dequantized(name, dtype) for name in names if not name.endswith(".scale")}

    def state_dict(self, dtype: torch.dtype = torch.float32, validate: bool = True) -> dict[str, torch.Tensor]:
        """All logical tensors (full names, no ``.scale``), dequantised. For small models."""
        if validate:
            self.validate(check_scales=True)
        return {n: self.get_dequantized(n, dtype) for n in self.weight_map if not n.endswith(".scale")}

    def validate(self, check_scales: bool = False) -> None:
        """Compare every header entry with ``expected_keys(config)``: missing or unexpected keys, wrong dtype
        or shape -> ValueError naming file and key. ``check_scales`` also reads every ``.scale`` and rejects
        E8M0 255 (NaN); off by default because a full V4 release holds ~9 GB of scales."""
        missing = [k for k in self.expected if k not in self.weight_map]
        if missing:
            raise ValueError(f"checkpoint {str(self.path)!r}: missing key {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        for name in self.weight_map:
            self._check_entry(name)
        if check_scales:
            for name in self.weight_map:
                if name.endswith(".scale"):
                    self._scale(name)


# ================================================================================ writer
def _to_stored(name: str, t: torch.Tensor, want_dtype: str) -> torch.Tensor:
    """Cast a provided tensor to the stored dtype where that is a plain cast (float -> BF16/F32, int -> I64)."""
    tt = DTYPES[want_dtype]
    if t.dtype == tt:
        return t
    if want_dtype in ("BF16", "F32") and t.is_floating_point() and t.dtype not in (
            torch.float8_e4m3fn, torch.float8_e8m0fnu):
        return t.to(tt)
    if want_dtype == "I64" and not t.is_floating_point() and t.dtype != torch.bool:
        return t.to(tt)
    if want_dtype == "F8_E8M0" and t.dtype == torch.uint8:
        return t.view(tt)
    if want_dtype == "I8" and t.dtype == torch.uint8:
        return t.view(tt)
    raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored as {want_dtype}")


def prepare_tensors(tensors: dict[str, torch.Tensor], cfg: V4Config) -> dict[str, torch.Tensor]:
    """Turn a mix of stored-format and float master tensors into exactly the stored layout: a float
    weight of its logical shape for an FP8/FP4 key (and no ``.scale`` given) is quantised here. Every
    key, dtype and shape is checked before any quantisation; a problem is a ValueError naming the key."""
    exp = expected_keys(cfg)
    bo, _ = _block(cfg)
    for name, t in tensors.items():
        if name not in exp:
            raise ValueError(f"tensor {name!r}: unexpected key for this config (see checkpoint.expected_keys)")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensor {name!r}: not a torch.Tensor ({type(t).__name__})")
    out: dict[str, torch.Tensor] = {}
    todo: dict[tuple, list[str]] = {}            # (fmt, logical shape) -> weight names to quantise together
    pending: set[str] = set()                    # .scale keys that quantisation will produce
    for name, (shape, dt) in exp.items():
        t = tensors.get(name)
        sname = name[: -len(".weight")] + ".scale"
        if (name.endswith(".weight") and dt in ("F8_E4M3", "I8") and t is not None and t.is_floating_point()
                and t.dtype != torch.float8_e4m3fn and sname not in tensors):
            logical = tuple(shape) if dt == "F8_E4M3" else (shape[0], shape[1] * 2)
            if tuple(t.shape) != logical:
                raise ValueError(f"tensor {name!r}: shape {list(t.shape)}, expected logical {list(logical)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"tensor {name!r}: has NaN/inf values; cannot quantise to {dt}")
            todo.setdefault((dt, logical), []).append(name)
            pending.add(sname)
            continue
        if name in pending:
            continue
        if t is None:
            raise ValueError(f"tensor {name!r}: missing")
        t = _to_stored(name, t.detach(), dt)
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise ValueError(f"tensor {name!r}: has NaN/inf values; refusing to save non-finite weights")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r}: {dt} {list(t.shape)}, expected {dt} {list(shape)}")
        out[name] = t
    # quantise same-shaped weights in one call each (all experts of a model at once): fewer, bigger ops
    for (dt, _logical), names in todo.items():
        for j in range(0, len(names), 64):
            chunk = names[j:j + 64]
            w = torch.stack([tensors[n].detach().float() for n in chunk])      # [c, o, i]
            if dt == "I8":
                q, s = quant.mxfp4_quantize(w)
                q, s = q.view(torch.int8), s.view(torch.float8_e8m0fnu)
            else:
                qs = [quant.fp8_block_quantize(x, block=bo) for x in w]
                q, s = torch.stack([a for a, _ in qs]), torch.stack([b for _, b in qs])
            for n, qi, si in zip(chunk, q, s):
                out[n], out[n[: -len(".weight")] + ".scale"] = qi.clone(), si.clone()
    return {n: out[n] for n in exp}


# V3-only keys that a V4 release config.json does not carry. HF's DeepseekV4Config maps
# intermediate_size -> moe_intermediate_size, so writing our placeholder 0 would zero its expert width.
_V3_ONLY = ("intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "first_k_dense_replace")


def release_config_dict(cfg: V4Config) -> dict:
    """``cfg.to_dict()`` as a V4 release ``config.json`` holds it: V3-only placeholder keys left out
    (they read back as their defaults)."""
    d = cfg.to_dict()
    if cfg.is_v4:
        for k in _V3_ONLY:
            if not d.get(k):
                d.pop(k, None)
    return d


def _plan_shards(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    main = [n for n in names if not n.startswith("mtp.")]
    mtp = [n for n in names if n.startswith("mtp.")]
    shards: list[list[str]] = []
    cur, cur_b = [], 0
    for n in main:
        if cur and cur_b + sizes[n] > max_bytes:
            shards.append(cur)
            cur, cur_b = [], 0
        cur.append(n)
        cur_b += sizes[n]
    if cur:
        shards.append(cur)
    if mtp:  # the release keeps every MTP tensor in the last shard, on its own
        shards.append(mtp)
    return shards


# What a checkpoint folder holds that belongs to the checkpoint (replaced with it); anything else in the
# folder is the user's and is carried over into the new one.
_COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "train_log.jsonl",
               "training_summary.json", "heldout.txt", "indexer_warmup.json")


def _release_file(name: str) -> bool:
    return (name in ("config.json", INDEX_FILE) + _COMPANIONS
            or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None)


def shards_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint's weight map and shards: which weights a stored measurement, or a run that
    continues them, belongs to."""
    import hashlib
    p = Path(path)
    h = hashlib.sha256()
    idx = json.loads((p / INDEX_FILE).read_text())
    h.update(json.dumps(idx["weight_map"], sort_keys=True).encode())
    for shard in sorted(set(idx["weight_map"].values())):
        with open(p / shard, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def write_checkpoint(tensors: dict[str, torch.Tensor], cfg: V4Config, path: str | Path,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                     extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``tensors`` (stored-format tensors, or float masters for FP8/FP4 weights which are
    quantised here) as a release directory at ``path``. Everything is checked against
    ``expected_keys(cfg)`` first, written into a temporary sibling directory and renamed into place, so
    ``path`` is never half-written. Output is deterministic (same tensors -> same bytes).
    ``overwrite`` replaces only a folder that is itself a checkpoint (config.json + index) or empty; a
    file or any other folder at ``path`` is refused untouched (``v4lab.errors.check_replaceable``). Of a
    replaced checkpoint only its own files go (shards, index, config, tokenizer and training files);
    anything else the user put in the folder is carried over into the new one.
    ``extra_files`` ({name: bytes}, e.g. the tokenizer) go into the same atomic rename. Temporaries a
    killed writer left beside ``path`` are removed first."""
    path = _check_target(path, max_shard_bytes, overwrite)
    stored = prepare_tensors(tensors, cfg)
    names = list(expected_keys(cfg))
    sizes = {n: stored[n].numel() * stored[n].element_size() for n in names}
    plan = _plan_shards(names, sizes, max_shard_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)                        # left by a writer of ours that was killed
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "tmp"), dir=path.parent))
    swap = {"old": None, "carried": []}   # the replaced folder's parking place; the user's entries moved along
    try:
        _write_release_files(tmp, stored, plan, sizes, cfg, extra_files)
        _swap_in(tmp, path, swap)
    except BaseException:
        _roll_back(tmp, path, swap)
        raise
    return path


def _check_target(path: str | os.PathLike, max_shard_bytes: int, overwrite: bool) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"checkpoint path = {type(path).__name__}: must be a str or a path")
    check_replaceable(path, "checkpoint path")          # only our own checkpoints are ever replaced
    path = Path(path)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes = {max_shard_bytes}: must be positive")
    if path.exists() and not overwrite:
        raise ValueError(f"checkpoint path {str(path)!r}: already exists (pass overwrite=True to replace it)")
    return path


def _write_release_files(tmp: Path, stored: dict, plan: list[list[str]], sizes: dict[str, int], cfg: V4Config,
                         extra_files: dict[str, bytes] | None) -> None:
    """Shards, index, config.json and the extra files into the temporary folder ``tmp``."""
    from safetensors.torch import save_file
    N = len(plan)
    weight_map = {}
    for j, group in enumerate(plan, 1):
        fname = f"model-{j:05d}-of-{N:05d}.safetensors"
        save_file({n: stored[n].contiguous() for n in group}, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(release_config_dict(cfg), indent=2) + "\n")
    for fname, data in (extra_files or {}).items():
        if Path(fname).name != fname or fname in ("", ".", "..") or (_release_file(fname)
                                                                  and fname not in _COMPANIONS):
            raise ValueError(f"extra_files key {fname!r}: must be a plain file name beside the shards")
        (tmp / fname).write_bytes(data)


def _swap_in(tmp: Path, path: Path, swap: dict) -> None:
    """Rename ``tmp`` to ``path``; a checkpoint already there is parked in ``swap["old"]`` and removed after,
    and the user's own entries in it are moved into the new one first (listed in ``swap["carried"]``)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    check_replaceable(path, "checkpoint path")  # again: it may have changed while we wrote
    for q in sorted(path.iterdir()):
        if not _release_file(q.name) and not (tmp / q.name).exists():
            os.replace(q, tmp / q.name)
            swap["carried"].append(q.name)
    swap["old"] = old = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "old"), dir=path.parent))
    os.replace(path, old / "x")
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _roll_back(tmp: Path, path: Path, swap: dict) -> None:
    """Ctrl-C or a failure between the two renames: put the previous checkpoint back first, then the
    carried entries (when the new folder was not swapped in), and remove the temporaries."""
    old = swap["old"]
    if old is not None and (old / "x").exists() and not path.exists():
        os.replace(old / "x", path)
    if tmp.exists():                                 # not swapped in: the carried entries go back
        for name in swap["carried"]:
            if os.path.lexists(tmp / name) and path.is_dir():
                os.replace(tmp / name, path / name)
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ================================================================================ synthetic release
def synthetic_masters(cfg: V4Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 masters with every logical tensor of ``expected_keys(cfg)`` (no ``.scale``):
    weights N(0, 0.02), norm gains 1 + N(0, 0.02), ``tid2eid`` rows of distinct experts, small hc
    base/scale, small sinks/biases/ape."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dt) in expected_keys(cfg).items():
        if name.endswith(".scale"):
            continue
        if dt == "I8":
            shape = (shape[0], shape[1] * 2)
        if name.endswith("tid2eid"):
            V, K = shape
            out[name] = torch.rand(V, cfg.n_routed_experts, generator=g).argsort(-1)[:, :K].contiguous()
        elif name.endswith("norm.weight"):
            out[name] = 1 + 0.02 * torch.randn(shape, generator=g)
        elif "hc_" in name and name.endswith("_scale"):
            out[name] = 0.01 * (1 + 0.1 * torch.randn(shape, generator=g))
        elif "hc_" in name and name.endswith("_base"):
            out[name] = 0.01 * torch.randn(shape, generator=g)
        elif name.endswith(("attn_sink", "gate.bias", ".ape")):
            out[name] = 0.01 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=g)
    return out


def make_synthetic_checkpoint(cfg: V4Config, path: str | Path, seed: int = 0, overwrite: bool = False,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Random masters (``synthetic_masters``) quantised into exactly the release layout (FP8 weights with
    128x128 scales, FP4 experts with 1x32 scales) and written with ``write_checkpoint``."""
    return write_checkpoint(synthetic_masters(cfg, seed), cfg, path, max_shard_bytes=max_shard_bytes,
                            overwrite=overwrite)
