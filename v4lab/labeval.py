"""The lab model's targets, measured from the shipped files alone: ``python -m v4lab.labeval DIR``.

DIR holds the official layout, ``tokenizer.json``, ``heldout.txt`` (held-out documents joined by U+001E)
and ``bigram_counts.safetensors`` (the baseline's statistics; written here from the corpus when absent).

- **Held-out loss** on the *whole* held-out text: the stream ``<|bos|> doc <|eos|> ...`` cut into
  non-overlapping windows of ``seq_len`` tokens plus one shorter tail window, so every token after the
  first is predicted exactly once; nats per predicted token.
- **Bigram baseline** on the same predicted tokens: add-α bigram counted on the training stream (α chosen
  on these targets, which flatters the baseline).
- **Bits per character**: Σ NLL / ln 2 over the characters of the held-out documents (separators excluded).
- **CSA indexer recall**: for every CSA query, the share of the ``index_topk`` compressed entries that the
  main attention weighs most (dense, over all visible entries) which the indexer picked
  (``v4lab.indexer.topk_recall``), against picking at random; from the same pass as the loss.
- **Expert specialisation**: mutual information between token class and expert
  (``v4lab.train.expert_specialisation``, the tiny-v4 measure) for the model and for the same
  architecture with random weights (same hash table), on the first ``spec_windows`` windows.
- **Forward seconds**: CPU seconds of one 2048-token forward on one thread (median of 3 after a warm-up).
- **Samples**: greedy continuations of a few prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from v4lab.model import V4Model

SEQ_LEN = 2048
SPEC_WINDOWS = 16
TINY_V4_MI_BITS = 0.168          # data/README.md, tiny-v4's mean over learned-router layers
PROMPTS = ("The built-in function len() returns",
           "A list comprehension is",
           "def fibonacci(n):\n",
           "The garbage collector")
COUNTS_FILE = "bigram_counts.safetensors"
TARGETS = {"below_bigram_nats": 1.0, "bits_per_char": 1.6, "forward_cpu_seconds": 3.0, "indexer_recall": 0.8,
           "mi_vs_random": 3.0, "mi_vs_tiny_bits": TINY_V4_MI_BITS}


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


# ---------------------------------------------------------------------------------------- held-out stream
def heldout_docs(text: str) -> list[str]:
    from v4lab.corpus import SEP
    docs = text.split(SEP)
    if not any(d for d in docs):
        _bad("heldout.txt", text[:40], "holds no text")
    return docs


def stream_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """ids [N] → windows [1, ≤ seq_len + 1] sharing one boundary token, so every token after the first
    is a target exactly once: full windows of seq_len targets, then the tail."""
    if ids.numel() < 2:
        _bad("ids", int(ids.numel()), "needs at least 2 tokens")
    return [ids[i:i + seq_len + 1][None] for i in range(0, ids.numel() - 1, seq_len)]


@torch.no_grad()
def heldout_pass(model: V4Model, windows: list[torch.Tensor], progress: bool = False) -> dict:
    """One pass over the windows with the indexer measurement on: summed NLL of the main and MTP heads and
    the CSA recall/KL. Returns {"loss", "nll_sum", "tokens", "mtp_loss", "indexer": {...}}."""
    from v4lab.train import _csa_attns
    model.eval()
    attns = _csa_attns(model)
    nll = mtp_nll = 0.0
    n = n_mtp = hits = possible = kl_n = 0
    kl = 0.0
    it = windows
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(windows, desc="held-out", leave=False)
    for a in attns:
        a.distill = True
    try:
        for w in it:
            x = w[:, :-1]
            logits, mtp = model(x, return_mtp=True) if len(model.mtp) else (model(x), None)
            nll += float(F.cross_entropy(logits.float()[0], w[0, 1:], reduction="sum"))
            n += w.shape[1] - 1
            if mtp is not None and w.shape[1] > 2:
                mtp_nll += float(F.cross_entropy(mtp.float()[0], w[0, 2:], reduction="sum"))
                n_mtp += w.shape[1] - 2
            for a in attns:
                kl, kl_n = kl + float(a.last_distill[0]), kl_n + a.last_distill[1]
                hits, possible = hits + a.last_recall[0], possible + a.last_recall[1]
    finally:
        for a in attns:
            a.distill = False
    return {"loss": nll / n, "nll_sum": nll, "tokens": n, "mtp_loss": mtp_nll / n_mtp if n_mtp else None,
            "indexer": {"recall": hits / max(1, possible), "hits": hits, "possible": possible,
                        "kl": kl / max(1, kl_n)}}


# ---------------------------------------------------------------------------------------- bigram
def bigram_counts(train: torch.Tensor, vocab_size: int) -> dict:
    """Sparse bigram counts of a token stream: {"prev", "next", "count"} (int32), sorted by pair."""
    key = train[:-1].long() * vocab_size + train[1:].long()
    uniq, cnt = torch.unique(key, return_counts=True)
    return {"prev": (uniq // vocab_size).int(), "next": (uniq % vocab_size).int(), "count": cnt.int()}


def bigram_nll(counts: dict, prev: torch.Tensor, nxt: torch.Tensor, vocab_size: int,
               alphas: Sequence[float] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)) -> dict:
    """Mean NLL (nats) of next given prev under add-α bigrams from sparse ``counts``; the α that scores best
    on these targets. Same model as ``v4lab.data.bigram_loss``, without a dense V×V table."""
    V = vocab_size
    key, order = (counts["prev"].long() * V + counts["next"].long()).sort()
    cnt = counts["count"][order].double()
    row = torch.zeros(V, dtype=torch.float64).index_add_(0, counts["prev"].long(), counts["count"].double())
    q = prev.long() * V + nxt.long()
    c = torch.zeros(q.shape, dtype=torch.float64)            # count of each (prev, next) target pair
    if key.numel():
        pos = torch.searchsorted(key, q).clamp(max=key.numel() - 1)
        c = torch.where(key[pos] == q, cnt[pos], c)
    losses = {}
    for a in alphas:
        losses[a] = float(-((c + a) / (row[prev.long()] + a * V)).log().mean())
    best = min(losses, key=losses.get)
    return {"loss": losses[best], "alpha": best, "losses": losses}


def corpus_train_stream(tok: Tokenizer, root: str | Path | None = None) -> tuple[torch.Tensor, dict]:
    """The training stream of the corpus (needs ``python3.11-doc``) tokenised with ``tok``, and its fingerprint."""
    from v4lab import corpus
    from v4lab.data import encode_docs
    docs = corpus.load_documents(corpus.DEFAULT_ROOT if root is None else root)
    train, _ = corpus.split_documents(docs)
    return encode_docs(tok, [docs[n] for n in train]), corpus.fingerprint(docs)


def load_counts(path: Path) -> dict:
    from safetensors.torch import load_file
    f = Path(path) / COUNTS_FILE
    if not f.is_file():
        _bad("bigram counts", str(f), "missing (write them with `python -m v4lab.labeval DIR --write-counts`)")
    return load_file(str(f))


def write_counts(path: Path, tok: Tokenizer, vocab_size: int, root: str | Path | None = None) -> dict:
    from safetensors.torch import save_file
    train, fp = corpus_train_stream(tok, root)
    c = bigram_counts(train, vocab_size)
    save_file(c, str(Path(path) / COUNTS_FILE), metadata={"corpus_sha256": fp["sha256"],
                                                         "train_tokens": str(int(train.numel()))})
    return c


# ---------------------------------------------------------------------------------------- other measures
def forward_cpu_seconds(model: V4Model, seq_len: int = SEQ_LEN, repeats: int = 3) -> dict:
    """CPU seconds (process time, one thread) of one forward over seq_len random tokens: warm-up, then the
    median and min of ``repeats``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = torch.randint(0, model.cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    try:
        with torch.no_grad():
            model.eval()
            model(ids)
            for _ in range(repeats):
                t = time.process_time()
                model(ids)
                times.append(time.process_time() - t)
    finally:
        torch.set_num_threads(threads)
    return {"median": statistics.median(times), "min": min(times), "seq_len": seq_len, "threads": 1}


def random_twin(model: V4Model, seed: int = 0) -> V4Model:
    """The same architecture with random weights (seeded) and the model's hash tables: routers compared."""
    from v4lab.model import V4Model
    torch.manual_seed(seed)
    rand = V4Model(model.cfg)
    for b, lb in zip(rand.layers, model.layers):
        if b.ffn.gate.is_hash:
            b.ffn.gate.tid2eid.copy_(lb.ffn.gate.tid2eid.cpu())       # the twin is built on the host
    return rand.eval()


def specialisation(model: V4Model, tok: Tokenizer, windows: torch.Tensor) -> dict:
    """Mutual information token class × expert for the model and its random twin (windows [W, S+1])."""
    from v4lab.data import token_classes
    from v4lab.train import expert_specialisation
    classes = token_classes(tok)
    with torch.no_grad():
        trained = expert_specialisation(model, windows, classes, batch_size=1)
        rand = expert_specialisation(random_twin(model), windows, classes, batch_size=1)
    t, r = trained["mean_learned_mi_bits"], rand["mean_learned_mi_bits"]
    return {"trained": trained, "random": rand, "ratio_vs_random": t / r if r > 0 else math.inf,
            "tiny_v4_bits": TINY_V4_MI_BITS, "windows": int(windows.shape[0])}


def samples(model: V4Model, tok: Tokenizer, prompts: Sequence[str] = PROMPTS, max_new_tokens: int = 40) -> list[dict]:
    """Greedy continuations (deterministic) of each prompt."""
    out = []
    for p in prompts:
        ids = [0] + tok.encode(p).ids                       # documents start with <|bos|>
        gen = model.generate(torch.tensor([ids]), max_new_tokens, temperature=0.0)
        out.append({"prompt": p, "continuation": tok.decode(gen[0, len(ids):].tolist())})
    return out


def masters_vs_file(path: str | Path, ckpt: str | Path, seq_len: int = SEQ_LEN, max_windows: int | None = 8) -> dict:
    """Held-out loss of the shipped file (FP8 attention, FP4 experts) against the fp32 master weights the run
    ended with (``ckpt`` = the run's ``ckpt/`` folder, as ``v4lab.labrun`` leaves it), with the routed
    experts in full precision and through FP4 QAT (what training saw). Same windows for all three."""
    from safetensors.torch import load_file

    from v4lab.data import encode_docs, load_tokenizer
    from v4lab.model import V4Model, load
    path, ckpt = Path(path), Path(ckpt)
    if not (ckpt / "model.safetensors").is_file():
        _bad("ckpt", str(ckpt), "holds no model.safetensors (give the run's ckpt/ folder)")
    shipped = load(path).eval()
    tok = load_tokenizer(path)
    windows = stream_windows(encode_docs(tok, heldout_docs((path / "heldout.txt").read_text(encoding="utf-8"))),
                             seq_len)[:max_windows]
    masters = V4Model(shipped.cfg)
    masters.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    out = {"file": heldout_pass(shipped, windows)["loss"]}
    for name, qat in (("masters_fp32_experts", False), ("masters_fp4_qat_experts", True)):
        masters.set_flags(qat=qat)
        out[name] = heldout_pass(masters.eval(), windows)["loss"]
    out["windows"] = len(windows)
    return out


# ---------------------------------------------------------------------------------------- all together
def evaluate_release(path: str | Path, progress: bool = False, seq_len: int = SEQ_LEN,
                     spec_windows: int = SPEC_WINDOWS, max_windows: int | None = None, timing: bool = True,
                     root: str | Path | None = None, write_missing_counts: bool = True) -> dict:
    """Every target from the files in ``path`` (see the module docstring). ``max_windows``: only the first
    windows (tests of the pieces); None = the whole held-out text. Writes the bigram counts from the corpus
    at ``root`` when absent and ``write_missing_counts`` (else a missing file is an error)."""
    from v4lab.data import encode_docs, load_tokenizer
    from v4lab.model import load
    path = Path(path)
    model = load(path).eval()
    tok = load_tokenizer(path)
    V = model.cfg.vocab_size
    docs = heldout_docs((path / "heldout.txt").read_text(encoding="utf-8"))
    ids = encode_docs(tok, docs)
    windows = stream_windows(ids, seq_len)[:max_windows]
    lm = heldout_pass(model, windows, progress)
    if (path / COUNTS_FILE).is_file() or not write_missing_counts:
        counts = load_counts(path)
    else:
        counts = write_counts(path, tok, V, root)
    prev = torch.cat([w[0, :-1] for w in windows])
    nxt = torch.cat([w[0, 1:] for w in windows])
    bigram = bigram_nll(counts, prev, nxt, V)
    chars = sum(len(d) for d in docs) if max_windows is None else None
    full = [w for w in windows if w.shape[1] == seq_len + 1][:spec_windows]
    spec = specialisation(model, tok, torch.cat(full)) if full else None
    from v4lab.train import _random_recall
    res = {"heldout": {k: lm[k] for k in ("loss", "tokens", "mtp_loss", "nll_sum")},
           "bigram": bigram, "below_bigram_nats": bigram["loss"] - lm["loss"],
           "bits_per_char": lm["nll_sum"] / math.log(2) / chars if chars else None, "heldout_chars": chars,
           "indexer": {**lm["indexer"], "random_recall": _random_recall(model.cfg, seq_len),
                       "topk": model.cfg.index_topk},
           "specialisation": spec, "seq_len": seq_len, "windows": len(windows),
           "samples": samples(model, tok)}
    if timing:
        res["forward_cpu_seconds"] = forward_cpu_seconds(model, seq_len)
    res["targets"] = TARGETS
    res["passed"] = check(res)
    return res


def check(res: dict) -> dict:
    """Which targets hold: {name: bool or None (not measured)}."""
    spec = res.get("specialisation")
    fwd = res.get("forward_cpu_seconds")
    return {"below_bigram": res["below_bigram_nats"] >= TARGETS["below_bigram_nats"],
            "bits_per_char": None if res["bits_per_char"] is None else res["bits_per_char"] <= TARGETS["bits_per_char"],
            "forward_cpu_seconds": None if fwd is None else fwd["median"] <= TARGETS["forward_cpu_seconds"],
            "indexer_recall": res["indexer"]["recall"] >= TARGETS["indexer_recall"],
            "specialisation": None if spec is None else (
                spec["ratio_vs_random"] >= TARGETS["mi_vs_random"]
                and spec["trained"]["mean_learned_mi_bits"] > TARGETS["mi_vs_tiny_bits"])}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4lab.labeval", description="Measure the lab model's targets "
                                "from its shipped files (whole held-out text: minutes on one thread).")
    p.add_argument("path", help="model directory (e.g. data/lab-v4)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first windows (a quick look)")
    p.add_argument("--write-counts", action="store_true", help="(re)write bigram_counts.safetensors from the "
                   "corpus (needs python3.11-doc)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if not Path(args.path).is_dir():
            _bad("path", args.path, "is not a directory")
        if args.max_windows is not None and args.max_windows < 1:
            _bad("--max-windows", args.max_windows, "must be a positive integer")
        if args.write_counts:
            from v4lab.data import load_tokenizer
            tok = load_tokenizer(args.path)
            write_counts(Path(args.path), tok, tok.get_vocab_size())
        res = evaluate_release(args.path, progress=True, max_windows=args.max_windows)
    except ValueError as e:
        print(f"v4lab labeval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
