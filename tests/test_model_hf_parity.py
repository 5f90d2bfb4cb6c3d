"""Parity with an independent implementation: Hugging Face transformers' DeepseekV4ForCausalLM (5.24.0).

Both load the same synthetic checkpoint in the official layout (FP8 attention/shared-expert weights, FP4
routed experts); HF renames and dequantises on its own. Compared in fp32: prefill logits over 266
tokens (two HCA windows of 128), and cached decode with the same chunk schedule on both sides (HF's own
decode differs from its prefill by ~1e-5, so decode is compared with decode). HF has no MTP block.

Config: tiny, with 16 indexer heads instead of 4. With 4 heads, ReLU(q·k) is 0 for all heads on ~1/16 of
the compressed entries, so exact score ties at 0.0 decide top-k membership and the two libraries break
them differently (a legitimate flip, not a semantic difference); 16 heads make exact ties vanishingly rare.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import v4lab.model as vm  # noqa: E402
from v4lab.checkpoint import synthetic_masters, write_checkpoint  # noqa: E402
from v4lab.config import get_config  # noqa: E402

TOL = 1e-5
N_TOKENS = 266


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = get_config("tiny").replace(index_n_heads=16)
    root = tmp_path_factory.mktemp("parity")
    # The generic synthetic masters give mHC a near-uniform (hence nearly symmetric) comb and sinks near 0,
    # which would hide a transposed mix or a lost sink; make those tensors O(1) so they matter.
    masters = synthetic_masters(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    for k, t in masters.items():
        if "hc_" in k and k.endswith("_base"):
            masters[k] = torch.randn(t.shape, generator=g)
        elif "hc_" in k and k.endswith("_scale"):
            masters[k] = 0.5 + torch.rand(t.shape, generator=g)
        elif k.endswith("attn_sink"):
            masters[k] = torch.randn(t.shape, generator=g)
    ours = write_checkpoint(masters, cfg, root / "ck")
    transformers.logging.set_verbosity_error()
    from transformers import DeepseekV4ForCausalLM
    hf = DeepseekV4ForCausalLM.from_pretrained(str(ours), dtype=torch.float32).eval()
    m = vm.load(ours).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(0))
    return cfg, hf, m, ids


def test_the_oracle_covers_every_layer_kind(pair):
    cfg, hf, m, _ = pair
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_hidden_layers)]
    assert {"window", "csa", "hca"} <= set(kinds)
    assert any(cfg.is_hash_layer(i) for i in range(6)) and not all(cfg.is_hash_layer(i) for i in range(6))
    assert cfg.hc_mult == 4 and N_TOKENS > 2 * 128
    assert m.layers[2].attn.kind == "hca"
    # same weights on both sides (HF dequantised them itself)
    assert torch.equal(hf.model.layers[1].self_attn.sinks.float(), m.layers[1].attn.attn_sink)


def test_prefill_logits_match_transformers(pair):
    _, hf, m, ids = pair
    with torch.no_grad():
        ref = hf(ids).logits
        out = m(ids)
    assert ref.shape == out.shape
    assert (ref - out).abs().max() <= TOL


def test_cached_decode_matches_transformers_decode(pair):
    _, hf, m, ids = pair
    # chunked prefill, then single tokens across the first HCA edge (128), more prefill, then single
    # tokens across the second (256)
    sched = [(0, 120)] + [(i, i + 1) for i in range(120, 134)] + [(134, 250)] + \
            [(i, i + 1) for i in range(250, N_TOKENS)]
    with torch.no_grad():
        hf_out, cache = [], None
        for a, b in sched:
            kw = {"use_cache": True} if cache is None else {"use_cache": True, "cache": cache}
            o = hf(ids[:, a:b], **kw)
            cache = getattr(o, "cache", None) or o.past_key_values
            hf_out.append(o.logits)
        ours, mc = [], m.new_cache(1)
        for a, b in sched:
            ours.append(m(ids[:, a:b], cache=mc))
    ref, out = torch.cat(hf_out, 1), torch.cat(ours, 1)
    assert ref.shape == out.shape == (1, N_TOKENS, m.cfg.vocab_size)
    assert (ref - out).abs().max() <= TOL


def test_a_wrong_mixing_direction_is_caught(pair, monkeypatch):
    # The comb matrix is used transposed (X'_j = Σ_i comb[i, j] X_i); using it the other way round is a
    # plausible bug. The parity check must see it.
    _, hf, m, ids = pair

    right = vm.hc_post
    monkeypatch.setattr(vm, "hc_post", lambda o, x, post, comb: right(o, x, post, comb.transpose(-1, -2)))
    with torch.no_grad():
        ref = hf(ids[:, :32]).logits
        out = m(ids[:, :32])
    assert (ref - out).abs().max() > 100 * TOL
