"""Exercises of notebook 02 (compressed attention): visibility, top-k, HCA entries and the sink."""
from __future__ import annotations

import torch

from v4lab.attention import sparse_attn_probs
from v4lab.exercises import Answer, exercise
from v4lab.indexer import topk_visible, visible_entries

CSA_QUERY, CSA_TOPK = 50, 16
EDGE_QUERY = 299
HCA_QUERY = 1000
SINK_LOGIT, SINK_TOKENS = 1.0, 3


def csa_picks(t: int = CSA_QUERY, k: int = CSA_TOPK, ratio: int = 4) -> torch.Tensor:
    """The indexer's picks for query ``t`` from random scores over every entry a long context would hold
    (`topk_visible`, −1 = no pick): [k]."""
    n_entries = 4 * t + 64                                  # more entries than the query may see
    scores = torch.randn(1, 1, n_entries, generator=torch.Generator().manual_seed(0))
    return topk_visible(scores, visible_entries(torch.tensor([t]), ratio), k)[0, 0]


@exercise("02.csa_entries")
def _csa_entries() -> Answer:
    picks = csa_picks()
    n = int((picks >= 0).sum())
    vis = int(visible_entries(torch.tensor(CSA_QUERY), 4))
    return Answer(n, f"Only floor(({CSA_QUERY}+1)/4) = {vis} entries are complete by position {CSA_QUERY}; the "
                     f"indexer keeps the best {CSA_TOPK} of the visible ones, so the query attends {n} compressed "
                     f"entries (plus its window). The top-k is a cap: early queries attend every entry there is.")


@exercise("02.visible_at_edge")
def _visible_at_edge() -> Answer:
    n = int(visible_entries(torch.tensor(EDGE_QUERY), 4))
    return Answer(n, f"Entry s covers tokens 4s..4s+3 and may be used once its last token has arrived: s < "
                     f"floor(({EDGE_QUERY}+1)/4) = {n}. Query {EDGE_QUERY} is the last token of block {n - 1}, so that "
                     "block's entry already counts (the paper's text writes floor(t/m), one fewer here; v4lab follows "
                     "the official code).")


@exercise("02.hca_entries")
def _hca_entries() -> Answer:
    n = int(visible_entries(torch.tensor(HCA_QUERY), 128))
    return Answer(n, f"An HCA layer attends every complete 128-token entry, no indexer: floor(({HCA_QUERY}+1)/128) = "
                     f"{n}. Tokens {128 * n}..{HCA_QUERY} are not in any entry yet; the 128-token window covers them.")


def sink_mass(sink: float = SINK_LOGIT, n: int = SINK_TOKENS) -> float:
    """The sink's share when ``n`` candidates all have logit 0 (q = 0) and the sink logit is ``sink``."""
    q, kv = torch.zeros(1, 1, 1, 4), torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0))
    _, p_sink = sparse_attn_probs(q, kv, torch.tensor([sink]), torch.arange(n).view(1, 1, n), 0.5)
    return float(p_sink.flatten()[0])


@exercise("02.sink_mass")
def _sink_mass() -> Answer:
    m = sink_mass()
    return Answer(m, f"The sink is one more term in the softmax's denominator: e^{SINK_LOGIT:g} / ({SINK_TOKENS} e^0 + "
                     f"e^{SINK_LOGIT:g}) = {m:.3f}. That share of the attention goes to 'nothing', and the output is "
                     f"{1 - m:.3f} x the weighted values instead of a full average. Within ±0.03 counts.",
                  abs_tol=0.03)


