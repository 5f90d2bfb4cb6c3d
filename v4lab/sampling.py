"""Decoding with the cache: greedy or sampled (temperature, top-k), with optional MTP drafts.

``V4Model.generate`` runs :func:`generate`; the loop is here so that the model file holds the network.
The model is used only through its call and ``new_cache``, so this module does not import it.
"""
from __future__ import annotations

import torch

from v4lab.errors import bad as _bad


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    """logits [B, V] → token ids [B]: argmax at temperature 0, else a draw from softmax(logits / T) over
    the top_k largest (all when top_k is None)."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return torch.multinomial(z.softmax(-1), 1, generator=gen)[:, 0]


def _check(model, ids: torch.Tensor, max_new_tokens, temperature, top_k, seed) -> torch.Tensor:
    n_max = model.cfg.max_position_embeddings
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        _bad("max_new_tokens", max_new_tokens, "must be a non-negative integer")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        _bad("temperature", temperature, "must be a number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        _bad("top_k", top_k, "must be a positive integer or None")
    ids = model._check_ids(ids)
    if ids.shape[1] > n_max:
        _bad("prompt_ids", f"{ids.shape[1]} tokens", f"more than max_position_embeddings = {n_max}")
    if seed is not None and (isinstance(seed, bool) or not hasattr(seed, "__index__")
                             or not 0 <= int(seed) < 2 ** 63):
        _bad("seed", seed, "must be an integer in [0, 2**63) or None")
    if ids.shape[1] + max_new_tokens > n_max:
        _bad("max_new_tokens", max_new_tokens, f"prompt ({ids.shape[1]}) + new tokens exceed "
                                               f"max_position_embeddings = {n_max}")
    return ids


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: torch.Tensor | list, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             eos_token_id: int | None = None,
             return_mtp: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Greedy (temperature 0) or sampled decoding of ``model`` with its cache (``V4Model.generate``).

    prompt_ids: [P] or [B, P] → ids [B, P + N] (N ≤ max_new_tokens; stops early when every row has
    produced ``eos_token_id``). With ``return_mtp`` also returns MTP logits [B, P+N−2, vocab], entry i
    predicting token i+2 (what a speculative decoder would have drafted)."""
    ids = prompt_ids if isinstance(prompt_ids, torch.Tensor) else torch.tensor(prompt_ids, device=model.device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    ids = _check(model, ids, max_new_tokens, temperature, top_k, seed)
    gen = torch.Generator(device=ids.device)
    if seed is not None:
        gen.manual_seed(int(seed))
    else:
        gen.seed()
    cache = model.new_cache(ids.shape[0])
    out, mtp_logits, step_in = ids, [], ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        res = model(step_in, cache=cache, return_mtp=return_mtp)
        logits = res[0] if return_mtp else res
        if return_mtp:
            mtp_logits.append(res[1])
        nxt = pick(logits[:, -1].float(), temperature, top_k, gen)       # [B]
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out = torch.cat([out, nxt[:, None]], 1)
        step_in = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    if return_mtp:
        V = model.cfg.vocab_size
        return out, (torch.cat(mtp_logits, 1) if mtp_logits else out.new_zeros(out.shape[0], 0, V).float())
    return out
