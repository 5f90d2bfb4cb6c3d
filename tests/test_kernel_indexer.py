"""kernels/indexer.py == v4lab.indexer.index_scores (Triton interpreter on CPU, small shapes).

Tolerance: atol = rtol = 1e-5 in fp32 (the head sum runs in a different order).
"""
import pytest
import torch

from v4lab.indexer import index_scores as ref
from v4lab.kernels.indexer import index_scores as kern

TOL = dict(atol=1e-5, rtol=1e-5)


def _case(B, S, H, D, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, N, D, generator=g),
            torch.randn(B, S, H, generator=g))   # negative head weights too


@pytest.mark.parametrize("B,S,H,D,N", [
    (2, 7, 4, 32, 45),      # tiny-config indexer dims
    (1, 70, 3, 24, 150),    # S and N not multiples of the 64 / 128 tiles; D not a power of two
    (1, 5, 2, 8, 1),        # one key
])
def test_matches_reference(B, S, H, D, N):
    q, k, w = _case(B, S, H, D, N)
    out = kern(q, k, w)
    assert out.shape == (B, S, N) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref(q, k, w), **TOL)


def test_relu_is_per_head():
    # Σ_h w·ReLU(q_h·k) is not ReLU(Σ_h w·q_h·k): check the comparison would catch that mistake.
    q, k, w = _case(1, 6, 4, 16, 20, seed=1)
    wrong = torch.einsum("bshd,bnd,bsh->bsn", q, k, w).relu()
    assert not torch.allclose(wrong, ref(q, k, w), **TOL)
    torch.testing.assert_close(kern(q, k, w), ref(q, k, w), **TOL)


def test_bf16_and_empty():
    q, k, w = _case(1, 4, 2, 16, 10, seed=2)
    torch.testing.assert_close(kern(q.bfloat16(), k.bfloat16(), w), ref(q.bfloat16(), k.bfloat16(), w), **TOL)
    assert kern(q, k[:, :0], w).shape == (1, 4, 0)


def test_bad_inputs():
    q, k, w = _case(1, 4, 2, 16, 10)
    with pytest.raises(ValueError, match="'k'"):
        kern(q, k[..., :8], w)
    with pytest.raises(ValueError, match="'w'"):
        kern(q, k, w[..., :1])
    with pytest.raises(ValueError, match="'q'"):
        kern(q[0], k, w)


def test_indexer_selection_with_kernel_equals_reference():
    # Drop-in through Indexer.switches.kernels: same scores, so the same top-k picks (−1 for invisible ones).
    from v4lab.config import get_config
    from v4lab.indexer import Indexer
    from v4lab.rope import layer_inv_freq
    cfg = get_config("tiny")
    torch.manual_seed(0)
    ix = Indexer(cfg, layer_inv_freq(cfg, 1)).eval()
    x = torch.randn(1, 40, cfg.hidden_size)
    qr = torch.randn(1, 40, cfg.q_lora_rank)
    pos = torch.arange(40)
    with torch.no_grad():
        keys = ix.keys(x, None)
        q, w = ix.queries(x, qr, pos)
        picks = []
        for fn in (ref, kern):
            ix.switches.kernels = fn is kern
            picks.append(ix.select(q, w, keys, pos))
    torch.testing.assert_close(picks[1][1], picks[0][1], **TOL)
    assert torch.equal(picks[1][0], picks[0][0]) and (picks[0][0] == -1).any()
