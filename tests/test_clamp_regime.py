"""The knobs of the SwiGLU-clamp experiment's regime: the static-scale FP8 cast of the experts' h
(``quant.fp8_static_cast``, ``expert_ffn(h_fp8_scale=)``, ``set_flags(expert_h_fp8=)``, TrainConfig
``expert_h_fp8``) and the routed experts' learning-rate multiplier (``make_optimizer(expert_lr_mult=)``,
TrainConfig ``expert_lr_mult``)."""
import math

import pytest
import torch

from v4lab import moe
from v4lab.model import V4Model
from v4lab.quant import fp8_static_cast
from v4lab.train import fit, is_routed_expert_weight, make_optimizer, micro_config
from v4lab.trainconfig import TrainConfig


# ---------------------------------------------------------------------------------------- the FP8 cast
def test_fp8_static_cast_rounds_to_e4m3_and_overflows_to_nan():
    x = torch.tensor([0.0, 1.0, 17.0, 19.0, 100.0, 448.0, 460.0, 463.9, 464.0, -464.0, 1e6])
    y = fp8_static_cast(x, 1.0)
    # E4M3 steps by 2 in [16, 32) and by 8 in [64, 128): ties go to the even mantissa (17 -> 16, 19 -> 20,
    # 100 -> 96); up to 464 the nearest value is 448
    assert y[:8].tolist() == [0.0, 1.0, 16.0, 20.0, 96.0, 448.0, 448.0, 448.0]
    assert torch.isnan(y[8:]).all()                       # no saturation: past the range is lost
    z = fp8_static_cast(torch.tensor([900.0, 930.0, -0.5]), 2.0)  # the scale stretches the range to 896
    assert z[0].item() == 896.0 and math.isnan(z[1].item()) and z[2].item() == -0.5


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, True, "1"])
def test_fp8_static_cast_rejects_a_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        fp8_static_cast(torch.ones(3), scale)


def _expert(seed=0, d=8, i=16, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * gain for s in ((i, d), (d, i), (i, d))]


def test_expert_ffn_casts_h_before_w2_with_a_straight_through_gradient():
    w1, w2, w3 = _expert()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    h = moe.swiglu(x @ w1.T, x @ w3.T, 0.0)
    assert h.abs().max() < 448                            # in range: the cast only rounds
    want = fp8_static_cast(h, 1.0) @ w2.T
    got = moe.expert_ffn(x, w1, w2, w3, limit=0.0, h_fp8_scale=1.0)
    assert torch.equal(got, want) and not torch.equal(got, moe.expert_ffn(x, w1, w2, w3))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    moe.expert_ffn(xs[0], w1, w2, w3, h_fp8_scale=1.0).sum().backward()
    moe.expert_ffn(xs[1], w1, w2, w3).sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)            # the cast is invisible to the gradient


def test_the_clamp_keeps_the_fp8_cast_of_h_finite():
    w1, w2, w3 = _expert(gain=30.0)                       # huge weights: |h| far beyond 448 without a clamp
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    assert torch.isnan(moe.expert_ffn(x, w1, w2, w3, limit=0.0, h_fp8_scale=1.0)).any()
    assert torch.isfinite(moe.expert_ffn(x, w1, w2, w3, limit=10.0, h_fp8_scale=1.0)).all()


def test_naive_and_grouped_dispatch_agree_with_the_cast():
    cfg = micro_config()
    layer = moe.MoE(cfg, 1)
    x = torch.randn(10, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    weights, idx, _ = layer.gate(x)
    ws = layer.expert_weights()
    a = moe.moe_naive(x, idx, weights, *ws, 10.0, 0.05)   # scale 0.05: a coarse grid, the cast shows
    b = moe.moe_grouped(x, idx, weights, *ws, 10.0, 0.05)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, moe.moe_grouped(x, idx, weights, *ws, 10.0))


def test_set_flags_expert_h_fp8_reaches_every_moe_and_is_validated():
    model = V4Model(micro_config())
    model.set_flags(expert_h_fp8=2.0)
    assert {b.ffn.h_fp8_scale for b in model.blocks()} == {2.0}
    for bad in (-1.0, math.inf, "x"):
        with pytest.raises(ValueError, match="expert_h_fp8"):
            model.set_flags(expert_h_fp8=bad)
    layer = model.blocks()[0].ffn
    layer.dispatch = "triton"
    with pytest.raises(ValueError, match="h_fp8_scale"):
        layer(torch.zeros(1, 2, layer.dim), torch.zeros(1, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------- expert LR
@pytest.mark.parametrize("key,value", [("expert_lr_mult", 0.0), ("expert_lr_mult", -2.0),
                                       ("expert_lr_mult", math.inf), ("expert_lr_mult", True),
                                       ("expert_h_fp8", -1.0), ("expert_h_fp8", math.nan),
                                       ("expert_h_fp8", "1")])
def test_trainconfig_rejects_bad_regime_values(key, value):
    with pytest.raises(ValueError, match=key):
        TrainConfig(micro_config(), **{key: value})


def test_routed_expert_names():
    assert is_routed_expert_weight("layers.1.ffn.experts.3.w2.weight")
    assert is_routed_expert_weight("mtp.0.ffn.experts.0.w1.weight")
    assert not is_routed_expert_weight("layers.1.ffn.shared_experts.w2.weight")
    assert not is_routed_expert_weight("layers.1.ffn.gate.weight")


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_make_optimizer_puts_the_routed_experts_in_their_own_group(kind):
    cfg = micro_config()
    model = V4Model(cfg)
    experts = {id(p) for n, p in model.named_parameters() if is_routed_expert_weight(n)}
    n_ffn = cfg.num_hidden_layers + len(model.mtp)
    assert len(experts) == 3 * cfg.n_routed_experts * n_ffn
    plain = make_optimizer(model, kind, 1e-3, 0.1)
    assert all("lr_mult" not in g for o in plain for g in o.param_groups)   # default: the groups as before
    groups = [g for o in make_optimizer(model, kind, 1e-3, 0.1, expert_lr_mult=7.0) for g in o.param_groups]
    special = [g for g in groups if g.get("lr_mult") == 7.0]
    assert len(special) == 1 and {id(p) for p in special[0]["params"]} == experts
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_the_trainer_applies_the_expert_lr_multiplier():
    cfg = micro_config()
    r = fit(TrainConfig(cfg, steps=2, batch_size=2, seq_len=16, warmup=1, lr=1e-3, expert_lr_mult=20.0,
                        progress=False, threads=1))
    lrs = sorted({g["lr"] for o in r["opts"] for g in o.param_groups})
    assert lrs == pytest.approx([r["log"][-1]["lr"], 20.0 * r["log"][-1]["lr"]])
