"""The training text, its tokenizer and its batches.

Corpus: the English prose of the Python documentation that ships inside CPython itself
(``pydoc_data.topics.topics``: the language reference and library pages ``help()`` shows, 79 topics,
~0.47 MB in Python 3.11). It is on every machine that has Python (so: offline), under the PSF License
(redistribution allowed with the notice), and it is real English prose with code in it, so a tiny model
has both words and syntax to learn. The text changes a little between Python versions, so
``corpus_fingerprint`` records which one a model saw.

Held-out split by *topic* (never by position inside a topic): topics ``sorted(names)[3::10]`` are
held out (8 topics, ~15 % of the characters), so held-out loss measures generalisation to unseen pages.

Tokenizer: a byte-level BPE trained with the ``tokenizers`` library to ``vocab_size`` entries; ids 0 and 1
are ``<|bos|>`` / ``<|eos|>`` (the config's ``bos_token_id`` / ``eos_token_id``). Each topic becomes
``<|bos|> text <|eos|>`` and the topics are concatenated into one token stream.

Batches: the batch of optimiser step t is a pure function of (seed, t): B random windows of S+1 tokens
of the training stream. A training loop can therefore look ahead (Anticipatory Routing fetches the batch
of step t+Δt early) and roll back (a rollback just resets t) without any loader state.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>")
HELDOUT_SLICE = (3, 10)          # held-out topics: sorted(names)[3::10]
TOKEN_CLASSES = ("special", "whitespace", "word-start", "word-piece", "digits", "punct", "mixed")


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


# ---------------------------------------------------------------------------------------- corpus
def load_topics() -> dict[str, str]:
    """{topic name: text} from CPython's ``pydoc_data.topics`` (PSF License)."""
    from pydoc_data.topics import topics
    return dict(topics)


def split_topics(topics: dict[str, str]) -> tuple[list[str], list[str]]:
    """(train names, held-out names): every 10th topic in name order, starting at the 4th, is held out."""
    names = sorted(topics)
    a, b = HELDOUT_SLICE
    held = names[a::b]
    return [n for n in names if n not in held], held


def corpus_fingerprint(topics: dict[str, str]) -> dict:
    """What identifies the corpus a model saw: Python version, topic count, characters, sha256."""
    h = hashlib.sha256()
    for k in sorted(topics):
        h.update(k.encode())
        h.update(b"\0")
        h.update(topics[k].encode())
        h.update(b"\0")
    return {"source": "pydoc_data.topics (CPython documentation, PSF License)",
            "python": sys.version.split()[0], "topics": len(topics),
            "chars": sum(len(v) for v in topics.values()), "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (``tokenizers.Tokenizer``) with exactly ``vocab_size`` entries:
    2 special tokens, the 256 byte symbols, then merges learned from ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258 + 1:
        _bad("vocab_size", vocab_size, "a byte-level BPE needs more than 258 entries (2 special + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if tok.get_vocab_size() != vocab_size:     # a corpus too small for the merges asked for
        _bad("vocab_size", vocab_size, f"the corpus only supports {tok.get_vocab_size()} BPE entries")
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or a directory holding one."""
    from tokenizers import Tokenizer
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        _bad("tokenizer", str(p), "no tokenizer.json there")
    from v4lab.errors import read_text_file
    try:
        return Tokenizer.from_str(read_text_file(p, "tokenizer"))   # regular file, bounded size
    except ValueError:
        raise
    except Exception as e:  # the library's own error types
        raise ValueError(f"tokenizer {str(p)!r}: cannot be read ({e})") from None


@functools.lru_cache(maxsize=4)
def default_tokenizer(vocab_size: int) -> Tokenizer:
    """A BPE of ``vocab_size`` trained on the training topics (cached per process; ~1 s)."""
    topics = load_topics()
    train, _ = split_topics(topics)
    return train_tokenizer([topics[n] for n in train], vocab_size)


def encode_docs(tok: Tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """``<|bos|> text <|eos|>`` for each text, concatenated: LongTensor [N]."""
    ids = []
    for enc in tok.encode_batch(list(texts)):
        ids += [0] + enc.ids + [1]
    return torch.tensor(ids, dtype=torch.long)


def token_classes(tok: Tokenizer) -> torch.Tensor:
    """Class id (index into TOKEN_CLASSES) of every vocabulary entry, from its decoded text: LongTensor [V]."""
    V = tok.get_vocab_size()
    out = torch.empty(V, dtype=torch.long)
    for i in range(V):
        s = tok.decode([i], skip_special_tokens=False)
        out[i] = TOKEN_CLASSES.index(classify(s, special=i < len(SPECIAL_TOKENS)))
    return out


def classify(s: str, special: bool = False) -> str:
    """Coarse class of a token's text: special, whitespace, word-start (' the'), word-piece ('ing'),
    digits, punct, mixed."""
    if special:
        return "special"
    core = s.strip()
    if not core:
        return "whitespace"
    if core.isalpha():
        return "word-start" if s[0].isspace() else "word-piece"
    if core.isdigit():
        return "digits"
    if not any(c.isalnum() for c in core):
        return "punct"
    return "mixed"


# ---------------------------------------------------------------------------------------- data
@dataclass
class TokenData:
    """Token streams for training and held-out evaluation, and the batch of each step."""
    train: torch.Tensor               # [N] int64
    heldout: torch.Tensor             # [M] int64
    tokenizer: object
    fingerprint: dict

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """[B, seq_len + 1] windows of the training stream for optimiser step ``step`` (pure in seed, step):
        inputs are ``[:, :-1]``, next-token targets ``[:, 1:]``, MTP targets ``[:, 2:]``."""
        n = self.train.numel() - seq_len - 1
        if n <= 0:
            _bad("seq_len", seq_len, f"must be < the training stream length ({self.train.numel()} tokens) - 1")
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))
        start = torch.randint(0, n + 1, (batch_size,), generator=g)
        return torch.stack([self.train[s:s + seq_len + 1] for s in start.tolist()])

    def heldout_windows(self, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
        """Non-overlapping [W, seq_len + 1] windows of the held-out stream (stride seq_len: every held-out
        token after the first is a target exactly once)."""
        h = self.heldout
        W = (h.numel() - 1) // seq_len
        if W < 1:
            _bad("seq_len", seq_len, f"the held-out stream has only {h.numel()} tokens")
        if max_windows is not None:
            W = min(W, int(max_windows))
        return torch.stack([h[i * seq_len:i * seq_len + seq_len + 1] for i in range(W)])


def load_data(vocab_size: int = 512, tokenizer: Tokenizer | None = None, heldout_text: str | None = None) -> TokenData:
    """The corpus tokenised. ``tokenizer``: a ``tokenizers.Tokenizer`` or a path (default: train one to
    ``vocab_size`` on the training topics). ``heldout_text``: use this held-out text instead of the
    held-out topics of this Python's corpus (a shipped model keeps the exact text it was measured on)."""
    topics = load_topics()
    train_names, held_names = split_topics(topics)
    if tokenizer is None:
        tok = default_tokenizer(vocab_size)
    elif isinstance(tokenizer, (str, Path)):
        tok = load_tokenizer(tokenizer)
    else:
        tok = tokenizer
    if tok.get_vocab_size() != vocab_size:
        _bad("vocab_size", vocab_size, f"the tokenizer has {tok.get_vocab_size()} entries")
    train = encode_docs(tok, [topics[n] for n in train_names])
    if heldout_text is not None:
        held = encode_docs(tok, heldout_text.split("\x1e"))   # record separator between topics
    else:
        held = encode_docs(tok, [topics[n] for n in held_names])
    fp = corpus_fingerprint(topics)
    fp.update(train_topics=len(train_names), heldout_topics=held_names,
              train_tokens=int(train.numel()), heldout_tokens=int(held.numel()))
    return TokenData(train, held, tok, fp)


def heldout_text() -> str:
    """The held-out topics of this Python's corpus joined by U+001E (what data/ ships as heldout.txt)."""
    topics = load_topics()
    return "\x1e".join(topics[n] for n in split_topics(topics)[1])


# ---------------------------------------------------------------------------------------- baseline
def bigram_loss(train: torch.Tensor, windows: torch.Tensor, vocab_size: int,
                alphas: Sequence[float] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)) -> dict:
    """Cross-entropy (nats/token) of an add-alpha bigram model counted on ``train`` and scored on the same
    targets a model sees in ``windows [W, S+1]`` (predict windows[:, i+1] from windows[:, i]). The alpha is
    chosen on those targets, which flatters the baseline: beating it is then a fair claim.
    Returns {"loss", "alpha", "losses": {alpha: loss}, "unigram_loss"}."""
    V = vocab_size
    counts = torch.zeros(V, V, dtype=torch.float64)
    counts.index_put_((train[:-1], train[1:]), torch.ones(train.numel() - 1, dtype=torch.float64),
                      accumulate=True)
    prev, nxt = windows[:, :-1].reshape(-1), windows[:, 1:].reshape(-1)
    losses = {}
    for a in alphas:
        p = (counts + a) / (counts.sum(1, keepdim=True) + a * V)
        losses[a] = float(-p[prev, nxt].log().mean())
    uni = torch.bincount(train, minlength=V).double() + 1.0
    uni_loss = float(-(uni / uni.sum())[nxt].log().mean())
    best = min(losses, key=losses.get)
    return {"loss": losses[best], "alpha": best, "losses": losses, "unigram_loss": uni_loss,
            "uniform_loss": math.log(V)}


def save_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
