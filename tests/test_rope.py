"""Interleaved partial RoPE on the last r dims, plain vs YaRN per layer kind, inverse rotation."""

import pytest
import torch

from v4lab.config import get_config
from v4lab.rope import apply_rope, cos_sin, inv_freq, layer_inv_freq


def complex_reference(x, freqs, pos, inverse=False):
    # independent formulation: trailing r channels as r/2 complex numbers, multiplied by e^{±i·pos·θ}
    r = 2 * freqs.numel()
    z = torch.view_as_complex(x[..., -r:].double().reshape(*x.shape[:-1], r // 2, 2).contiguous())
    ang = (pos.float()[..., None] * freqs).double()            # angles in fp32, as OFF and HF compute them
    rot = torch.polar(torch.ones_like(ang), -ang if inverse else ang)
    out = torch.view_as_real(z * rot).flatten(-2)
    return torch.cat([x[..., :-r].double(), out], -1)


@pytest.mark.parametrize("inverse", [False, True])
def test_matches_complex_reference_on_last_dims(inverse):
    torch.manual_seed(0)
    freqs = inv_freq(8, 10000.0)
    x = torch.randn(3, 5, 20)
    pos = torch.tensor([[0, 7, 100, 4095, 123456]] * 3)       # arbitrary int positions
    cos, sin = cos_sin(freqs, pos)
    got = apply_rope(x, cos, sin, inverse=inverse)
    torch.testing.assert_close(got.double(), complex_reference(x, freqs, pos, inverse), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[..., :12], x[..., :12])              # the leading nope dims are untouched


def test_first_dims_variant_would_fail():
    # rotating the FIRST r dims instead (the HF docstring's wording) is a different function
    freqs = inv_freq(8, 10000.0)
    x = torch.randn(4, 20)
    cos, sin = cos_sin(freqs, torch.arange(1, 5))
    flipped = apply_rope(x.flip(-1), cos, sin).flip(-1)
    assert not torch.allclose(flipped, apply_rope(x, cos, sin))


def test_inverse_undoes_and_relative_property():
    torch.manual_seed(0)
    freqs = inv_freq(16, 160000.0, get_config("tiny").rope_scaling)
    x = torch.randn(6, 32)
    pos = torch.tensor([0, 3, 17, 200, 1000, 4000])
    cos, sin = cos_sin(freqs, pos)
    torch.testing.assert_close(apply_rope(apply_rope(x, cos, sin), cos, sin, inverse=True), x, atol=1e-5, rtol=0)
    # q·k depends only on the offset: shift both positions by the same amount
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)

    def dot(tq, tk):
        cq, sq = cos_sin(freqs.double(), torch.tensor(tq))
        ck, sk = cos_sin(freqs.double(), torch.tensor(tk))
        return (apply_rope(q, cq.double(), sq.double()) * apply_rope(k, ck.double(), sk.double())).sum()

    torch.testing.assert_close(dot(50, 20), dot(1050, 1020), rtol=1e-4, atol=1e-4)   # fp32 angles
    assert abs(dot(50, 20) - dot(50, 21)) > 1e-3


def test_yarn_blend_for_released_values():
    # spec §3.3: dim 64, base 160000, factor 16, original 65536 → pairs ≤ 15 keep θ, ≥ 25 use θ/16
    plain = inv_freq(64, 160000.0)
    yarn = inv_freq(64, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536,
                                   "beta_fast": 32, "beta_slow": 1})
    assert torch.equal(yarn[:16], plain[:16])
    torch.testing.assert_close(yarn[25:], plain[25:] / 16)
    mid = (yarn[16:25] / plain[16:25])
    assert ((mid < 1) & (mid > 1 / 16)).all() and (mid[1:] < mid[:-1]).all()
    assert torch.equal(inv_freq(64, 10000.0), 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64))


def test_no_mscale_rotation_keeps_norm():
    freqs = layer_inv_freq(get_config("tiny"), 1)
    x = torch.randn(10, 64, dtype=torch.float64)
    cos, sin = cos_sin(freqs, torch.arange(10) * 997)
    torch.testing.assert_close(apply_rope(x, cos.double(), sin.double()).norm(dim=-1), x.norm(dim=-1))


def test_layer_kinds_pick_their_rope():
    cfg = get_config("tiny")
    r = cfg.qk_rope_head_dim
    assert torch.equal(layer_inv_freq(cfg, 0), inv_freq(r, cfg.rope_theta))                 # window
    assert torch.equal(layer_inv_freq(cfg, cfg.num_hidden_layers), inv_freq(r, cfg.rope_theta))  # MTP
    for lid in (1, 2):                                                                       # CSA, HCA
        assert torch.equal(layer_inv_freq(cfg, lid), inv_freq(r, cfg.compress_rope_theta, cfg.rope_scaling))
    assert not torch.equal(layer_inv_freq(cfg, 1), inv_freq(r, cfg.compress_rope_theta))
    # rope_scaling None → plain compress theta
    assert torch.equal(layer_inv_freq(cfg.replace(rope_scaling=None), 1), inv_freq(r, cfg.compress_rope_theta))


def test_rope_wider_than_x_raises():
    cos, sin = cos_sin(inv_freq(8, 1e4), torch.arange(2))
    with pytest.raises(ValueError, match="rope width"):
        apply_rope(torch.randn(2, 6), cos, sin)
