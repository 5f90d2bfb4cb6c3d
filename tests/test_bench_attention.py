"""The attention benchmark's set-up (not its timings): the synthetic cache fill, device placement, flags."""
import pytest
import torch

from v4lab.attention import Attention
from v4lab.baselines import MLADSA, DenseMQA
from v4lab.bench import attention as B
from v4lab.config import get_config


def test_synthetic_fill_matches_a_real_prefill():
    B.check_fill(lengths=(3, 130))            # raises on any difference in shapes / counts / states


def test_fill_can_be_caught_disagreeing(monkeypatch):
    good = B.fill_v4_cache

    def off_by_one(attn, cache, context, generator=None, device=None):
        good(attn, cache, context + attn.ratio if attn.ratio else context, generator, device)

    monkeypatch.setattr(B, "fill_v4_cache", off_by_one)
    with pytest.raises(RuntimeError, match="disagrees"):
        B.check_fill(lengths=(130,))


@pytest.mark.parametrize("layer_id", [1, 2])
def test_fill_places_the_cache_on_the_requested_device(layer_id):
    """`meta` stands in for a GPU: every tensor the fill writes must land on the device asked for, with the
    values drawn on the CPU (same on every device)."""
    cfg = get_config("tiny")
    attn = Attention(cfg, layer_id)
    cache = attn.new_cache(1)
    B.fill_v4_cache(attn, cache, 300, torch.Generator().manual_seed(0), torch.device("meta"))
    held = [cache.window, cache.entries.get(), cache.comp_state.pending_kv, cache.comp_state.pending_score]
    if attn.kind == "csa":
        held += [cache.index_keys.get(), cache.index_state.prev_kv]
    assert all(t.is_meta for t in held)
    cpu = attn.new_cache(1)
    B.fill_v4_cache(attn, cpu, 300, torch.Generator().manual_seed(0))
    assert cpu.window.device.type == "cpu" and B._cache_layout(cpu) == B._cache_layout(cache)


@pytest.mark.parametrize("cls", [MLADSA, DenseMQA])
def test_baseline_caches_follow_the_device(cls):
    cfg = get_config("tiny") if cls is DenseMQA else get_config("v3.2").replace(
        hidden_size=64, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, index_n_heads=2, index_head_dim=32, index_topk=8)
    layer = cls(cfg)
    c = layer.new_cache(1, 20, torch.Generator().manual_seed(0), device=torch.device("meta"))
    bufs = [v for v in vars(c).values() if hasattr(v, "data")]
    assert bufs and all(b.data.is_meta for b in bufs)
    c = layer.new_cache(1, 20, torch.Generator().manual_seed(0))
    y = layer.decode(torch.randn(1, 1, cfg.hidden_size), c)
    assert torch.isfinite(y).all() and c.length == 21


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_fails_before_any_work(capsys):
    from v4lab import cli
    assert cli.main(["bench", "attention", "--quick", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
