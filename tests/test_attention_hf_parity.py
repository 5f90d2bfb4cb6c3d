"""Parity of v4lab.attention.Attention with Hugging Face transformers' DeepseekV4Attention (fp32).

transformers (pinned 5.24.0) is a test-only oracle. The same random weights are copied through the
official → HF name map (docs/design/v4-attention.md §3.10). HF needs its own mask for the window (it runs a
dense [S, S+T] eager attention); we build the sliding-window causal mask it expects.
Checked: window, CSA and HCA layers; prefill (no cache) and prefill + cached decode.
"""
import pytest
import torch

from v4lab.attention import Attention
from v4lab.config import get_config

hf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers import DeepseekV4Config  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

TOL = 1e-5


# official name → HF name (spec §3.10)
NAME_MAP = {
    "wq_a": "q_a_proj", "q_norm": "q_a_norm", "wq_b": "q_b_proj", "wkv": "kv_proj", "kv_norm": "kv_norm",
    "wo_a": "o_a_proj", "wo_b": "o_b_proj", "attn_sink": "sinks",
    "compressor.wkv": "compressor.kv_proj", "compressor.wgate": "compressor.gate_proj",
    "compressor.ape": "compressor.position_bias", "compressor.norm": "compressor.kv_norm",
    "indexer.wq_b": "compressor.indexer.q_b_proj",
    "indexer.weights_proj": "compressor.indexer.scorer.weights_proj",
    "indexer.compressor.wkv": "compressor.indexer.kv_proj", "indexer.compressor.wgate": "compressor.indexer.gate_proj",
    "indexer.compressor.ape": "compressor.indexer.position_bias",
    "indexer.compressor.norm": "compressor.indexer.kv_norm",
}


def hf_name(name: str) -> str:
    stem, leaf = name.rsplit(".", 1) if name.endswith((".weight",)) else (name, None)
    mapped = NAME_MAP[stem]
    return f"{mapped}.{leaf}" if leaf else mapped


def tiny_cfg():
    # tiny preset, but 8 indexer heads so indexer scores have no exact ReLU-zero ties at random init
    return get_config("tiny").replace(index_n_heads=8)


def hf_config(cfg):
    hcfg = DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=1, head_dim=cfg.head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, q_lora_rank=cfg.q_lora_rank, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, sliding_window=cfg.sliding_window,
        compress_ratios=cfg.compress_ratios[:cfg.num_hidden_layers], rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters={**cfg.rope_scaling, "rope_type": "yarn"},
        index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hash_layers=cfg.num_hash_layers,
    )
    hcfg._attn_implementation = "eager"
    return hcfg


def make_pair(layer_id, seed=0):
    cfg = tiny_cfg()
    ours = Attention(cfg, layer_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "ape" in name or "sink" in name else 0.08))
    hcfg = hf_config(cfg)
    theirs = hf.DeepseekV4Attention(hcfg, layer_id).float().eval()
    state = {hf_name(k): v.detach().clone() for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "inv_freq" not in m], (missing, unexpected)
    rotary = hf.DeepseekV4RotaryEmbedding(hcfg)
    return cfg, hcfg, ours, theirs, rotary


def hf_forward(theirs, rotary, hcfg, x, start, cache):
    B, S, _ = x.shape
    pos = torch.arange(start, start + S)[None].expand(B, -1)
    pe = {k: rotary(x, pos, layer_type=k) for k in ("main", "compress")}
    kv_len = (min(start, hcfg.sliding_window - 1) if cache is not None else 0) + S
    kpos = torch.arange(start + S - kv_len, start + S)
    q = pos[0][:, None]
    ok = (kpos[None] <= q) & (kpos[None] > q - hcfg.sliding_window)
    mask = torch.zeros(S, kv_len).masked_fill(~ok, float("-inf"))[None, None].expand(B, 1, -1, -1)
    return theirs(x, pe, pos, mask, cache=cache)[0]


LAYERS = {"window": 0, "csa": 1, "hca": 2}


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_prefill_parity(kind):
    cfg, hcfg, ours, theirs, rotary = make_pair(LAYERS[kind])
    assert ours.kind == kind
    S = 300 if kind == "hca" else 61          # HCA: crosses two 128-token windows; CSA: ends mid-window
    x = torch.randn(2, S, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(x)
        b = hf_forward(theirs, rotary, hcfg, x, 0, None)
    print(f"{kind}: max abs diff {(a - b).abs().max().item():.2e}")
    assert (a - b).abs().max().item() <= TOL, (a - b).abs().max().item()
    assert b.abs().max() > 1e-2               # a real signal, not two zero outputs


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_decode_parity(kind):
    """Prompt prefill into a cache, then token-by-token decode, both sides cached."""
    cfg, hcfg, ours, theirs, rotary = make_pair(LAYERS[kind], seed=2)
    S, P = (300, 250) if kind == "hca" else (45, 13)   # HCA: entry 1 closes at t=255 in decode
    x = torch.randn(2, S, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    mine, hc = ours.new_cache(2), DynamicCache(config=hcfg)
    # the HF cache holds one layer object per config layer; only ours is used
    outs_a, outs_b = [], []
    with torch.no_grad():
        steps = [(0, P)] + [(t, t + 1) for t in range(P, S)]
        for s0, s1 in steps:
            outs_a.append(ours(x[:, s0:s1], s0, mine))
            outs_b.append(hf_forward(theirs, rotary, hcfg, x[:, s0:s1], s0, hc))
    a, b = torch.cat(outs_a, 1), torch.cat(outs_b, 1)
    print(f"{kind}: max abs diff {(a - b).abs().max().item():.2e}")
    assert (a - b).abs().max().item() <= TOL, (a - b).abs().max().item()


def test_rope_frequencies_match_hf():
    """Plain (window) and YaRN (compress) inverse frequencies equal HF's, and HF uses no mscale."""
    from v4lab.rope import layer_inv_freq
    cfg, hcfg, ours, theirs, rotary = make_pair(0)
    torch.testing.assert_close(layer_inv_freq(cfg, 0), rotary.main_inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer_inv_freq(cfg, 1), rotary.compress_inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer_inv_freq(cfg, 2), rotary.compress_inv_freq, rtol=1e-6, atol=0)
    assert rotary.compress_attention_scaling == 1.0
    assert not torch.equal(rotary.main_inv_freq, rotary.compress_inv_freq)


def test_parity_catches_the_paper_visibility_rule(monkeypatch):
    """Sensitivity check: with the paper text's ⌊t/m⌋ visibility instead of the code's ⌊(t+1)/m⌋,
    the HCA layer no longer matches HF — so the parity tests above can see such a mistake."""
    import v4lab.attention as A
    cfg, hcfg, ours, theirs, rotary = make_pair(LAYERS["hca"])
    x = torch.randn(1, 260, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(A, "visible_entries", lambda t, m: torch.div(t, m, rounding_mode="floor"))
    with torch.no_grad():
        diff = (ours(x) - hf_forward(theirs, rotary, hcfg, x, 0, None)).abs().max().item()
    assert diff > 100 * TOL
