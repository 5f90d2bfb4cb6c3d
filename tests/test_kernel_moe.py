"""kernels/moe.py (grouped expert MLP, clamped SwiGLU fused) equals v4lab.moe.grouped_expert_mlp.

Runs under the Triton interpreter on CPU: small shapes, one tile per expert group, few programs.
"""
import pytest
import torch

from v4lab.config import get_config
from v4lab.kernels.moe import grouped_expert_mlp as kernel
from v4lab.kernels.moe import tile_table
from v4lab.moe import MoE, sort_by_expert
from v4lab.moe import grouped_expert_mlp as reference


def sorted_problem(E=4, I=48, D=40, T=10, K=2, seed=0, empty=(), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    allowed = [e for e in range(E) if e not in empty]
    idx = torch.stack([torch.tensor(allowed)[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    order, token, offsets = sort_by_expert(idx, E)
    x = (torch.randn(T, D, generator=g) * 2)[token]
    w1, w3 = (torch.randn(E, I, D, generator=g) * 0.3).to(dtype), (torch.randn(E, I, D, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) * 0.3).to(dtype)
    return x, w1, w3, w2, offsets, torch.rand(T * K, generator=g)


@pytest.mark.parametrize("limit", [0.0, 2.0], ids=["no-clamp", "clamp"])
def test_kernel_equals_reference(limit):
    args = sorted_problem(empty=(2,))
    want, got = reference(*args, limit), kernel(*args, limit)
    assert want.abs().max() > 1.0
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()


def test_clamp_is_fused_and_matters():
    args = sorted_problem(seed=1)
    assert not torch.allclose(kernel(*args, 0.0), kernel(*args, 1.0), atol=1e-3)
    assert torch.allclose(kernel(*args, 0.5), reference(*args, 0.5), rtol=1e-5, atol=1e-4)


def test_kernel_bf16_weights():
    args = sorted_problem(seed=2, dtype=torch.bfloat16)
    want, got = reference(*args, 2.0), kernel(*args, 2.0)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3), (got - want).abs().max()


def test_tile_table_never_straddles_experts():
    offsets = torch.tensor([0, 5, 5, 40, 41])
    e, s, t = tile_table(offsets, 16)
    assert e.tolist() == [0, 2, 2, 2, 3]
    assert s.tolist() == [0, 5, 21, 37, 40] and t.tolist() == [5, 40, 40, 40, 41]


def test_moe_triton_dispatch_equals_grouped():
    cfg = get_config("tiny").replace(hidden_size=32, moe_intermediate_size=16, vocab_size=64, swiglu_limit=2.0)
    torch.manual_seed(0)
    m = MoE(cfg, 3)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, 6, 32) * 3
        y = m(x)
        m.dispatch = "triton"
        assert torch.allclose(m(x), y, rtol=1e-5, atol=1e-4)


def test_kernel_bad_inputs():
    x, w1, w3, w2, off, rw = sorted_problem()
    with pytest.raises(ValueError, match="offsets"):
        kernel(x, w1, w3, w2, off[:-1], rw, 0.0)
    with pytest.raises(ValueError, match="weight shapes"):
        kernel(x, w1, w3, w2.transpose(1, 2), off, rw, 0.0)
    with pytest.raises(ValueError, match="row_weight"):
        kernel(x, w1, w3, w2, off, rw[:-1], 0.0)
