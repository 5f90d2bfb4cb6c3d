"""The logits of the shipped ``data/tiny-v4`` on a fixed held-out text stay what they were before the
architecture refactor of issue 20 (within 1e-6, fp32, CPU, references not kernels).

``tests/data/tiny_v4_logits.safetensors`` was recorded once from the code as it stood before that refactor.
It holds the token ids, the logits of one full forward, the MTP logits of that forward, and the logits of
a cached decode (prefill of ``PREFILL`` tokens, then one token at a time); its metadata holds the text.

The text is 144 tokens so that every layer kind has real work: the sliding window (32) is exceeded, CSA
(ratio 4) has 36 compressed entries, more than the indexer's top-k (16), and HCA (ratio 128) has one.

This test never writes the file. To record it again (only when a change of the numbers is intended and
reviewed), run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python tests/test_refactor_reference.py --record
"""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

import v4lab
from v4lab.data import load_tokenizer
from v4lab.model import V4Model

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / "data" / "tiny-v4"
REF = ROOT / "tests" / "data" / "tiny_v4_logits.safetensors"
N_TOKENS = 144
PREFILL = 128
TOL = 1e-6


def reference_text() -> str:
    """The first ``N_TOKENS`` tokens of ``heldout.txt``, cut at a token boundary."""
    tok = load_tokenizer(DIR)
    text = (DIR / "heldout.txt").read_text()
    enc = tok.encode(text[:4000])
    return text[:enc.offsets[N_TOKENS - 1][1]]


def compute(model: V4Model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full-forward logits and MTP logits, and the logits of a cached prefill-then-decode, for ids [1, S]."""
    with torch.no_grad():
        logits, mtp = model(ids, return_mtp=True)
        cache = model.new_cache(1)
        model(ids[:, :PREFILL], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(PREFILL, ids.shape[1])]
    return {"ids": ids, "logits": logits, "mtp_logits": mtp, "decode_logits": torch.cat(steps, dim=1)}


def record(path: Path = REF) -> None:
    """Write the reference file from the current code (the test never calls this)."""
    torch.set_num_threads(1)
    text = reference_text()
    ids = torch.tensor([load_tokenizer(DIR).encode(text).ids], dtype=torch.long)
    out = compute(v4lab.load(DIR).eval(), ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path),
              metadata={"text": text, "prefill": str(PREFILL), "source": "data/tiny-v4, fp32, references"})


@pytest.fixture(scope="module")
def recorded():
    with safe_open(str(REF), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(REF)), meta


def test_recorded_ids_are_the_tokenizers_encoding_of_the_text(recorded):
    ref, meta = recorded
    text = meta["text"]
    assert text in (DIR / "heldout.txt").read_text()
    assert ref["ids"].shape == (1, N_TOKENS)
    assert ref["ids"][0].tolist() == load_tokenizer(DIR).encode(text).ids
    assert int(meta["prefill"]) == PREFILL


def test_logits_match_the_pre_refactor_reference(recorded):
    ref, _ = recorded
    model = v4lab.load(DIR).eval()
    assert not model.kernels
    got = compute(model, ref["ids"])
    for name in ("logits", "mtp_logits", "decode_logits"):
        assert got[name].dtype == torch.float32
        assert got[name].shape == ref[name].shape, name
        diff = (got[name] - ref[name]).abs().max().item()
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL}"
    # the decode path agrees with the full forward on the same positions (a check of the reference itself)
    assert torch.allclose(ref["decode_logits"], ref["logits"][:, PREFILL:], atol=1e-4)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_refactor_reference.py --record")
    record()
    print(f"wrote {REF.relative_to(ROOT)}")
