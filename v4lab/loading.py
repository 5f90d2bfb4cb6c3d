"""Building without initialising, reading a release checkpoint into modules, writing one back.

``v4lab.model`` holds the network; this module holds what moves weights in and out of it:

* :func:`no_init` — a context in which module constructors skip their random initialisers (the weights are
  about to be overwritten by a checkpoint, or never exist: ``device="meta"``). It is a
  ``torch.overrides.TorchFunctionMode``, the same scoped mechanism as ``with torch.device(...)``: it patches
  nothing global, and nothing outside the ``with`` block (or on another thread) sees it.
* :func:`fill_block` / :func:`fill_model` — checked reads of a layer / the whole model from a
  ``CheckpointReader`` (every header entry against the config first), FP8/FP4 weights dequantised, the
  packed originals kept so that a save writes unchanged weights back byte for byte.
* :func:`write_release` — the state dict of a model in the official layout, through
  ``v4lab.checkpoint.write_checkpoint`` (atomic rename).

The entry points users call are ``v4lab.model.load`` / ``save`` / ``load_layer`` (also ``v4lab.load`` /
``v4lab.save``); they build the modules and hand them here.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from v4lab import checkpoint
from v4lab.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, _block, expected_keys, layer_prefix
from v4lab.config import V4Config
from v4lab.device import get_device
from v4lab.errors import bad as _bad
from v4lab.norm import RMSNorm
from v4lab.switches import share_switches

QUANT_DTYPES = ("F8_E4M3", "I8")          # checkpoint dtypes stored with a `.scale` companion

# Initialisers a constructor may call. Under no_init each returns its tensor untouched (torch.empty's
# memory on a device, nothing at all on meta, where these would run slow reference decompositions).
_INITS = frozenset({nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
                    nn.init.trunc_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.zeros_,
                    nn.init.ones_, nn.init.constant_, torch.Tensor.normal_, torch.Tensor.uniform_})


class _SkipInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_init(device: str | torch.device | None = None) -> Iterator[None]:
    """Build modules inside this block without running their weight initialisers, on ``device`` (None:
    torch's default). ``no_init("meta")`` gives shapes only (a V4-Pro tree in seconds); ``no_init()`` gives
    uninitialised storage for weights that are read next. Values computed in a constructor by ordinary ops
    (RoPE frequencies, hash tables) are computed as usual."""
    with torch.device(device) if device is not None else contextlib.nullcontext(), _SkipInit():
        yield


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)`` that leaves meta (not loaded) parameters where they are, so a partly loaded
    model (``load(..., layers=[...])``) can move too."""
    if device.type == "cpu" and all(t.device.type in ("cpu", "meta") for t in module.state_dict().values()):
        return module
    return module._apply(lambda t: t if t.is_meta else t.to(device))


# ------------------------------------------------------------------------------------------------ reading
_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "float64": torch.float64}


def float_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` as a floating torch dtype (``torch.bfloat16`` or its name ``"bfloat16"``)."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2:
        return dtype
    _bad("dtype", dtype if isinstance(dtype, str) else str(dtype),
         f"must be a floating torch dtype ({', '.join(sorted(_DTYPE_NAMES))})")


def open_reader(path_or_reader: str | os.PathLike | CheckpointReader) -> CheckpointReader:
    """A CheckpointReader for a checkpoint folder (an open reader is passed through)."""
    if isinstance(path_or_reader, CheckpointReader):
        return path_or_reader
    if not isinstance(path_or_reader, (str, os.PathLike)):
        _bad("path", path_or_reader, "must be a checkpoint folder (str or path) or a CheckpointReader")
    return CheckpointReader(path_or_reader)


def layer_ids(cfg: V4Config, layers: int | list[int] | None) -> list[int]:
    """The block ids a load materialises: every one for None, else ``layers`` checked and sorted."""
    L, n_all = cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if layers is None:
        return list(range(n_all))
    want = sorted({int(i) for i in layers}) if not isinstance(layers, int) else [layers]
    bad = [i for i in want if not 0 <= i < n_all]
    if bad:
        _bad("layers", bad[0], f"layer ids must be in [0, {n_all}) ({L} layers, then MTP)")
    return want


def check_layer_id(cfg: V4Config, i: int) -> None:
    n_all = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_all:
        _bad("layer", i, f"must be an int in [0, {n_all}) ({cfg.num_hidden_layers} layers, then MTP)")


def read_tensors(reader: CheckpointReader, names: list[str], dtype: torch.dtype, originals: dict | None) -> dict:
    """Logical tensors for ``names`` (no ``.scale``): F32 entries stay fp32 (hc_*, attn_sink, ape, gate.bias,
    as the official code keeps them), floats go to ``dtype``, FP8/FP4 weights are dequantised; the raw packed
    weight and its scale go to ``originals`` when it is given."""
    out = {}
    for name in names:
        if name.endswith(".scale"):
            continue
        stored = reader.expected[name][1]
        t = reader.get_dequantized(name, torch.float32 if stored == "F32" else dtype)
        if stored in QUANT_DTYPES and originals is not None:
            sname = name[: -len(".weight")] + ".scale"
            originals[name] = (reader.get(name), reader.get(sname))
        out[name] = t
    return out


def fill_block(reader: CheckpointReader, i: int, blk: nn.Module, dtype: torch.dtype,
               originals: dict | None) -> nn.Module:
    """Read layer ``i`` (checked against the config first) into ``blk``; packed originals → ``originals``
    under their full names."""
    p = layer_prefix(reader.config, i)
    names = reader.layer_keys(i)
    for name in reader.keys():                            # unexpected keys under this prefix, wrong shapes
        if name.startswith(p):
            reader._check_entry(name)
    for name in names:
        if name not in reader:
            _bad("checkpoint", str(reader.path), f"missing key {name!r}")
        reader._check_entry(name)
    sd = read_tensors(reader, names, dtype, originals)
    blk.load_state_dict({k[len(p):]: v for k, v in sd.items()}, strict=True, assign=True)
    return blk


def fill_model(model: nn.Module, reader: CheckpointReader, blocks: dict[int, nn.Module], dtype: torch.dtype,
               keep_quantized: bool) -> nn.Module:
    """Read the top-level tensors (embed, norm, head, hc_head) into ``model`` and layer ``i`` into
    ``blocks[i]``; the packed originals go to ``model.quantized_originals``, the folder to ``source_path``."""
    originals = {} if keep_quantized else None
    top = [k for k in reader.expected if not k.startswith(("layers.", "mtp.")) and not k.endswith(".scale")]
    sd = read_tensors(reader, top, dtype, originals)
    for i, blk in blocks.items():
        fill_block(reader, i, blk, dtype, originals)
    _, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected, unexpected
    model.quantized_originals = originals or {}
    model.source_path = reader.path
    return model


# ------------------------------------------------------------------------------------------------ entry points
# ``v4lab.model.load`` / ``load_layer`` call these with its constructors (the model imports this module,
# not the other way round): ``make_model(cfg)`` builds a V4Model, ``make_block(cfg, i)`` block i of it.
def load_block(make_block: Callable, path: str | os.PathLike | CheckpointReader, i: int,
               dtype: torch.dtype | str = torch.float32, keep_quantized: bool = True,
               device: str | torch.device | None = None) -> nn.Module:
    """One decoder layer (``i < num_hidden_layers``) or MTP block (``i = num_hidden_layers + k``) of a
    checkpoint directory (or an open ``CheckpointReader``), as a Block with its weights and nothing else.
    Only that layer's tensors are read. With ``keep_quantized`` the packed FP8/FP4 originals are kept in
    ``block.quantized_originals`` (names relative to the layer, on the CPU). ``device``: as
    ``v4lab.device.get_device`` (argument, else $V4LAB_DEVICE, else CUDA when present)."""
    dtype, dev = float_dtype(dtype), get_device(device)
    reader = open_reader(path)
    check_layer_id(reader.config, i)
    originals = {} if keep_quantized else None
    with no_init():
        blk = make_block(reader.config, i)
    fill_block(reader, i, blk, dtype, originals)
    p = layer_prefix(reader.config, i)
    blk.quantized_originals = {k[len(p):]: v for k, v in (originals or {}).items()}
    return to_device(blk, dev)


def load_model(make_model: Callable, make_block: Callable, path: str | os.PathLike | CheckpointReader,
               dtype: torch.dtype | str = torch.float32, keep_quantized: bool = True,
               layers: int | list[int] | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Read a directory in the official release layout into a V4Model.

    FP8 / FP4 weights are dequantised to ``dtype`` (F32 tensors such as ``hc_*`` stay fp32). With
    ``keep_quantized`` (default) the packed originals (weight + ``.scale``) are also kept, in
    ``model.quantized_originals`` (uint8/fp8 bytes: ~1/8 of the fp32 size for FP4), for kernels that
    consume packed weights and so that ``save`` writes every unchanged weight back byte-for-byte.
    ``keep_quantized=False`` drops them and ``save`` re-quantises, which is not byte-exact in general: a
    block whose largest value rounded down to the bottom of the top binade (FP4 code 3, FP8 224) gets a
    scale half as large the second time (same values, other bytes). Only the default round-trips exactly
    (measured on the tiny synthetic checkpoint: 168 of 168 FP4 scale tensors moved, no FP8 one).
    ``layers``: ids to materialise (``num_hidden_layers + k`` = MTP block k); the others stay on the meta
    device (shapes only; a forward through them raises). embed/norm/head/hc_head are always loaded.
    Every header entry is checked against the config first: a missing/unexpected key or a wrong
    shape/dtype raises ValueError naming the key. ``device``: as ``v4lab.device.get_device`` (argument, else
    $V4LAB_DEVICE, else CUDA when present); weights are read on the CPU and moved once, the packed
    originals stay on the CPU (only ``save`` reads them)."""
    dtype, dev = float_dtype(dtype), get_device(device)     # a bad device fails before any read
    reader = open_reader(path)
    cfg = reader.config
    reader.validate()
    want = layer_ids(cfg, layers)
    # every weight is about to be replaced: build without initialising (untouched pages of torch.empty
    # cost nothing); with ``layers`` the rest of the tree stays on meta
    with no_init("meta" if layers is not None else None):
        model = make_model(cfg)
    if layers is not None:
        L = cfg.num_hidden_layers
        with no_init():
            model.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            model.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            for i in want:
                (model.layers if i < L else model.mtp)[i if i < L else i - L] = make_block(cfg, i)
        share_switches(model, model.switches)
    fill_model(model, reader, {i: model.blocks()[i] for i in want}, dtype, keep_quantized)
    model.set_flags(hc_mode=model.hc_mode, low_precision=model.low_precision, qat=model.qat)
    return to_device(model, dev)


# ------------------------------------------------------------------------------------------------ writing
def _unchanged(param: torch.Tensor, raw: torch.Tensor, scale: torch.Tensor, cfg: V4Config) -> bool:
    from v4lab import quant
    if raw.dtype == torch.int8:
        deq = quant.mxfp4_dequantize(raw, scale, torch.float32)
    else:
        deq = quant.fp8_block_dequantize(raw, scale, torch.float32, block=_block(cfg)[0])
    return deq.shape == param.shape and torch.equal(deq, param.detach().float().cpu())


def release_tensors(cfg: V4Config, sd: dict, originals: dict) -> dict:
    """The tensors of the official layout: a weight equal to the packed original it was loaded from is
    written back from that original (weight + scale); other FP8/FP4 weights go as fp32, quantised later."""
    meta = [k for k, v in sd.items() if v.is_meta]
    if meta:
        _bad("model", f"parameter {meta[0]!r} on the meta device", "load every layer before saving")
    tensors = {}
    for name, (_, dt) in expected_keys(cfg).items():
        if name.endswith(".scale"):
            continue
        t = sd[name].detach().cpu()
        orig = originals.get(name)
        if dt in QUANT_DTYPES and orig is not None and _unchanged(t, orig[0], orig[1], cfg):
            tensors[name], tensors[name[: -len(".weight")] + ".scale"] = orig
        else:
            tensors[name] = t.float() if dt in QUANT_DTYPES else t
    return tensors


def write_release(model: nn.Module, path: str | os.PathLike, overwrite: bool = False,
                  max_shard_bytes: int | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` (a V4Model: ``cfg``, ``quantized_originals``, ``source_path``) in the official layout,
    copying the tokenizer and generation files of the folder it was loaded from, plus ``extra_files``."""
    tensors = release_tensors(model.cfg, model.state_dict(), model.quantized_originals)
    extras = {}
    src = model.source_path
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if src is not None and (Path(src) / f).is_file():
            extras[f] = (Path(src) / f).read_bytes()
    extras.update(extra_files or {})
    out = checkpoint.write_checkpoint(tensors, model.cfg, path, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, extra_files=extras)
    return Path(out)
