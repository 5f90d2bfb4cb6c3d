"""The model the notebooks run: the trained lab model in ``data/``, else the tiny one, else a synthetic stand-in.

:func:`trained_model` returns ``(model, tokenizer, info)``, loaded once per process. Which checkpoint, in
this order (no modification times involved):

* ``name=...`` asks for one checkpoint under ``data/`` by name (``trained_model(name="tiny-v4")``: the fast
  model the test suite pins); ValueError when it is not there.
* ``$V4LAB_WEIGHTS``, when set, names the checkpoint directory to use.
* otherwise the first of :data:`PREFERRED` under ``data/`` that holds a checkpoint: ``lab-v4`` (16 M
  parameters, texts of 2048 tokens: what the notebooks are written for), then ``tiny-v4`` (1.2 M, fast);
  then any other checkpoint directory there, by name.
* otherwise a synthetic checkpoint: random weights of the ``tiny`` config
  (:func:`v4lab.checkpoint.make_synthetic_checkpoint`, seed 0) written once into a cache directory
  (``$V4LAB_CACHE``, else ``~/.cache/v4lab``) and loaded through the same :func:`v4lab.load`, with a
  byte-level tokenizer (one id per byte). Routing and attention patterns then show the mechanics only,
  and ``info["synthetic"]`` is True so a notebook can say so.

A checkpoint directory is the official release layout written by ``v4lab.save`` (config, safetensors
index and shards) plus ``tokenizer.json``, read with :func:`v4lab.load` and
:func:`v4lab.data.load_tokenizer`.

``info``: ``{"source": "trained" | "synthetic", "synthetic": bool, "path": str, "config": name,
"name": directory name, "description": one line a notebook prints}``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "data"
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>")           # ids 0 and 1, as v4lab.data's tokenizer
SYNTHETIC_CONFIG = "tiny"
SYNTHETIC_SEED = 0
WEIGHTS_ENV = "V4LAB_WEIGHTS"                      # a checkpoint directory to use instead of data/
PREFERRED = ("lab-v4", "tiny-v4")                  # the default checkpoint: the first of these under data/

_CACHE: dict = {}


def cache_dir() -> Path:
    return Path(os.environ.get("V4LAB_CACHE") or Path.home() / ".cache" / "v4lab")


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file()


def find_trained(data_dir: Path | str | None = None, name: str | None = None) -> Path | None:
    """The checkpoint directory under ``data_dir`` (default ``data/``): ``name`` when given (None if it is
    not there), else the first of :data:`PREFERRED` present, else any other checkpoint directory by name.
    ``$V4LAB_WEIGHTS`` is not consulted here (:func:`checkpoint_path` does)."""
    d = Path(DATA_DIR if data_dir is None else data_dir)
    if name is not None:
        return d / name if is_checkpoint(d / name) else None
    if not d.is_dir():
        return None
    for n in PREFERRED:
        if is_checkpoint(d / n):
            return d / n
    found = sorted(p for p in d.iterdir() if is_checkpoint(p))
    return found[0] if found else None


def checkpoint_path(data_dir: Path | str | None = None, name: str | None = None) -> Path | None:
    """The checkpoint :func:`trained_model` loads (None: the synthetic stand-in). ``name`` (a directory
    under ``data_dir``) must exist; else ``$V4LAB_WEIGHTS`` when set (and ``data_dir`` is not given); else
    :func:`find_trained`."""
    if name is not None:
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"name = {name!r}: must be the name of a checkpoint directory under data/, "
                             f"e.g. {PREFERRED[-1]!r}")
        found = find_trained(data_dir, name)
        if found is None:
            d = Path(DATA_DIR if data_dir is None else data_dir)
            raise ValueError(f"name = {name!r}: no checkpoint at {_shown(d / name)} (config.json and "
                             "model.safetensors.index.json)")
        return found
    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env and data_dir is None:
        if not (Path(env) / "config.json").is_file():
            raise ValueError(f"${WEIGHTS_ENV} = {env!r}: not a checkpoint directory (no config.json there)")
        return Path(env)
    return find_trained(data_dir)


def byte_tokenizer():
    """A ``tokenizers.Tokenizer`` with ids 0/1 = <|bos|>/<|eos|> and one id (2..257) per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())           # the 256 byte-level symbols
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: i + len(SPECIAL_TOKENS) for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def synthetic_checkpoint(path: Path | str | None = None) -> Path:
    """Write (once) the synthetic ``tiny`` checkpoint with a byte-level tokenizer; returns its directory."""
    from v4lab import get_config
    from v4lab.checkpoint import make_synthetic_checkpoint
    p = Path(path) if path is not None else cache_dir() / f"synthetic-{SYNTHETIC_CONFIG}-seed{SYNTHETIC_SEED}"
    if not (p / "config.json").is_file() or not (p / "tokenizer.json").is_file():
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        make_synthetic_checkpoint(get_config(SYNTHETIC_CONFIG), tmp, seed=SYNTHETIC_SEED, overwrite=True)
        byte_tokenizer().save(str(tmp / "tokenizer.json"))
        if p.exists():                       # another process finished first: keep theirs
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(p)
    return p


def load_dir(path: Path | str, synthetic: bool = False, device=None):
    """(model, tokenizer, info) from one checkpoint directory (eval mode, fp32, no gradients needed), on
    ``device`` (as ``v4lab.device.get_device``: argument, else $V4LAB_DEVICE, else CUDA when present)."""
    import v4lab
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"path = {str(path)!r}: no tokenizer.json there (a notebook needs one to show text)")
    model = v4lab.load(path, device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    from v4lab.data import load_tokenizer
    tok = load_tokenizer(path)                    # a regular file of bounded size, one-line errors
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise ValueError(f"tokenizer.json: {tok.get_vocab_size()} entries do not fit vocab_size = "
                         f"{model.cfg.vocab_size} of {path}")
    cfg = model.cfg
    kinds = ", ".join(f"{i}:{cfg.layer_kind(i)}{'+hash' if cfg.is_hash_layer(i) else ''}"
                      for i in range(cfg.num_hidden_layers))
    if synthetic:
        desc = (f"SYNTHETIC weights (no trained checkpoint under data/ yet): random '{SYNTHETIC_CONFIG}' config, "
                f"byte-level tokenizer; patterns show the mechanics, not learned behaviour. Layers {kinds}.")
    else:
        desc = f"trained weights from {_shown(path)} ('{cfg.name}' config, vocab {cfg.vocab_size}). Layers {kinds}."
    info = {"source": "synthetic" if synthetic else "trained", "synthetic": synthetic, "path": str(path),
            "config": cfg.name, "name": path.name, "description": desc}
    return model, tok, info


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def trained_model(data_dir: Path | str | None = None, name: str | None = None):
    """(model, tokenizer, info) of :func:`checkpoint_path` (``data/lab-v4``, else ``data/tiny-v4``, else the
    synthetic stand-in; ``name="tiny-v4"`` asks for one by name; ``$V4LAB_WEIGHTS`` overrides the search).
    Cached per process (per directory and device), so every widget of a notebook shares one model."""
    found = checkpoint_path(data_dir, name)
    from v4lab.device import get_device
    key = (str(found) if found is not None else "synthetic", str(get_device()))   # one model per device
    if key not in _CACHE:
        _CACHE[key] = load_dir(found) if found is not None else load_dir(synthetic_checkpoint(), synthetic=True)
    return _CACHE[key]


def heldout_text(model_dir: Path | str | None) -> str | None:
    """The held-out text shipped with a checkpoint (``heldout.txt``), or None when there is none."""
    if model_dir is None:
        return None
    p = Path(model_dir) / "heldout.txt"
    return p.read_text(encoding="utf-8") if p.is_file() else None


def encode(tok, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids [1, S] of ``text`` (at most ``max_tokens``); ValueError on empty text."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text = {text!r}: must be a non-empty string")
    ids = tok.encode(text).ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor([ids], dtype=torch.long)


def token_strings(tok, ids) -> list[str]:
    """Readable token strings (byte-level BPE symbols decoded one by one; spaces shown as '·')."""
    out = []
    for i in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)):
        s = tok.decode([i], skip_special_tokens=False)
        out.append(s.replace(" ", "·").replace("\n", "⏎").replace("\x1e", "␞") or f"<{i}>")
    return out


SAMPLE_TEXTS = {
    "for-loop": ("The for statement is used to iterate over the elements of a sequence (such as a string, "
                 "tuple or list) or other iterable object. The suite is executed once for each item provided "
                 "by the iterator, in the order returned by the iterator. Each item in turn is assigned to the "
                 "target list using the standard rules for assignments, and then the suite is executed. When "
                 "the items are exhausted, the suite in the else clause, if present, is executed, and the loop "
                 "terminates. A break statement executed in the first suite terminates the loop without "
                 "executing the else clause's suite."),
    "code": ("def fib(n):\n    a, b = 0, 1\n    while a < n:\n        print(a, end=' ')\n        a, b = b, a + b\n"
             "    print()\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
             "    def __repr__(self):\n        return f'Point({self.x}, {self.y})'\n\nfor i in range(10):\n"
             "    if i % 2 == 0:\n        continue\n    print(i, fib(i))\n"),
    "numbers": ("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 "
                "35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64"),
}
