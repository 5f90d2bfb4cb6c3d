"""``v4lab generate``: decode from a saved model directory (official layout) with the KV cache.

    v4lab generate PATH (--prompt-ids 1,2,3 | --prompt TEXT) [--max-new-tokens N] [--temperature T]
                        [--top-k K] [--seed S] [--json]

Text prompts: with ``PATH/tokenizer.json`` the text is encoded as is by that tokenizer (``tokenizers``
library; no BOS is added). Without one, a byte fallback: each UTF-8 byte is a token id (0..255; the
vocabulary must hold 256 ids) and generated ids >= 256 print as ``<id>``. ``--temperature 0`` (default) is greedy.
Bad input (missing directory, malformed ids, ids out of range, context too long) prints one line on stderr
and exits with code 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from v4lab.errors import OneLineParser


class ByteTokenizer:
    """UTF-8 bytes as token ids: the fallback when a checkpoint ships no tokenizer.json."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"--prompt: the checkpoint has no tokenizer.json and vocab_size = {vocab_size} "
                             "is below 256, too small for the byte fallback (use --prompt-ids)")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(f"<{i}>")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class FileTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        from v4lab.errors import read_text_file
        text = read_text_file(path, "tokenizer")            # regular file, bounded size
        try:
            self.tok = Tokenizer.from_str(text)
        except Exception as e:  # the library's own error types
            raise ValueError(f"tokenizer {str(path)!r}: cannot be read ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def tokenizer_for(path: str | Path, vocab_size: int) -> FileTokenizer | ByteTokenizer:
    f = Path(path) / "tokenizer.json"
    return FileTokenizer(f) if f.exists() or f.is_symlink() else ByteTokenizer(vocab_size)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids = {text!r}: must be comma-separated integers, e.g. 1,2,3") from None
    if not ids:
        raise ValueError(f"--prompt-ids = {text!r}: needs at least one token id")
    big = next((i for i in ids if not 0 <= i < 2 ** 63), None)
    if big is not None:
        raise ValueError(f"--prompt-ids: token id {big} is out of range (ids are in [0, vocab_size))")
    return ids


def run(path: str | Path, prompt_ids: list[int] | None = None, prompt: str | None = None, max_new_tokens: int = 32,
        temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
        device: str | torch.device | None = None, kernels: bool = False) -> dict:
    """Load ``path`` on ``device`` (as ``v4lab.device.get_device``), decode, return
    ``{"prompt_ids", "new_ids", "text"?, "device"}``. Greedy decoding gives the same ids on every device (up
    to float ties); sampling draws from the device's own generator, so a seed reproduces per device type.
    ``kernels``: decode through the Triton kernels (``V4Model.use_kernels``)."""
    import torch

    from v4lab.model import load
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"checkpoint {str(p)!r}: not a directory (give a model saved in the official layout)")
    if (prompt_ids is None) == (prompt is None):
        raise ValueError("give exactly one of --prompt-ids and --prompt")
    if prompt is not None:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:   # bytes from argv that are not UTF-8 arrive as lone surrogates
            bad = prompt[e.start].encode("utf-8", "surrogateescape")
            raise ValueError(f"--prompt: not UTF-8 text (byte {bad[0]:#04x} at character {e.start}); "
                             "pass UTF-8 or --prompt-ids") from None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ValueError(f"--seed = {seed!r}: must be an integer in [0, 2**63)")
    model = load(p, keep_quantized=False, device=device).eval()
    if kernels:
        model.use_kernels()
    tok = None
    if prompt is not None:
        tok = tokenizer_for(p, model.cfg.vocab_size)
        prompt_ids = tok.encode(prompt)
        if not prompt_ids:
            raise ValueError("--prompt: the text encodes to no tokens")
    n_max = model.cfg.max_position_embeddings
    if len(prompt_ids) > n_max:
        raise ValueError(f"{'--prompt' if prompt is not None else '--prompt-ids'}: {len(prompt_ids)} tokens, "
                         f"more than the model's max_position_embeddings ({n_max})")
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    new = out[0, len(prompt_ids):].tolist()
    res = {"prompt_ids": list(prompt_ids), "new_ids": new, "device": str(model.device)}
    if tok is None and (p / "tokenizer.json").exists():
        tok = tokenizer_for(p, model.cfg.vocab_size)
    if tok is not None:
        res["text"] = tok.decode(new)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="v4lab generate", description="Decode from a saved V4 model directory.")
    ap.add_argument("path")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--prompt", help="text (tokenizer.json of the checkpoint, else UTF-8 bytes)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: $V4LAB_DEVICE, else auto)")
    ap.add_argument("--kernels", action="store_true", help="run the hot ops through the Triton kernels")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        ids = parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
        res = run(args.path, ids, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                  args.device, args.kernels)
    except ValueError as e:
        sys.stderr.write(f"v4lab generate: error: {e}\n")
        return 2
    if args.json:
        print(json.dumps(res))
    else:
        print(res.get("text", " ".join(map(str, res["new_ids"]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
