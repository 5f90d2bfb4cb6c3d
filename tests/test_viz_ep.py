"""Notebook 01's expert-parallel figure: every control swept, each panel checked against an independent
recomputation (the single-process MoE, per-rank bincounts of the routing, the accounting formula)."""
import pytest
import torch

from v4lab import accounting
from v4lab.gate import select_topk
from v4lab.moe import bias_update, expert_load, moe_grouped
from v4lab.viz import ep as V
from v4lab.viz.common import sweep


def _rank_rows(idx, ranks):
    """Rows each rank receives and the [src, dst] row matrix, counted directly from idx [R*T, K]."""
    owner = idx // (V.SIM_E // ranks)                                           # [R*T, K]
    src = torch.arange(idx.shape[0])[:, None].expand_as(idx) // V.SIM_T
    m = torch.zeros(ranks, ranks, dtype=torch.long)
    m.index_put_((src.reshape(-1), owner.reshape(-1)), torch.ones(idx.numel(), dtype=torch.long), accumulate=True)
    return m.sum(0), m


def _check_state(traces, ranks, bias_steps, skew):
    s, x, ws = V.toy_world(ranks, skew)
    bias = torch.zeros(V.SIM_E)
    for _ in range(bias_steps):                           # the sign rule, written out again here
        bias_update(bias, expert_load(select_topk(s, bias, V.SIM_K), V.SIM_E), 0.001)
    assert torch.allclose(bias, V.bias_after(ranks, skew, bias_steps))
    idx_none, idx_bias = select_topk(s, None, V.SIM_K), select_topk(s, bias, V.SIM_K)
    flow, load_none, load_bias = traces[0], traces[1], traces[2]
    assert load_none["y"] == _rank_rows(idx_none, ranks)[0].tolist()
    loads, matrix = _rank_rows(idx_bias, ranks)
    assert load_bias["y"] == loads.tolist()
    got = torch.zeros(ranks, ranks, dtype=torch.long)
    for a, b, v in zip(flow["link"]["source"], flow["link"]["target"], flow["link"]["value"]):
        got[a, b - ranks] += v
    assert torch.equal(got, matrix) and int(got.sum()) == ranks * V.SIM_T * V.SIM_K
    # the simulated world's outputs are the single-process MoE's
    world = V.ep_world(ranks, bias_steps, skew)
    w = world["bias"]["weights"]
    want = moe_grouped(x, idx_bias, w, *ws, 0.0)
    assert torch.allclose(torch.cat(world["bias"]["outs"]), want, atol=1e-5)


@pytest.mark.parametrize("static", [True, False])
def test_ep_widget_sweeps_match_recomputation(static):
    w = V.EPWidget(static=static)
    for control in w.control_names:
        for value, traces in sweep(w, control):
            st = w.state
            assert st[control] == value
            _check_state(traces, st["ranks"], st["bias_steps"], st["skew"])
            assert len(traces) == 6


def test_bias_update_evens_out_the_ranks():
    data = V.ep_data(ranks=4, bias_steps=400, skew=1.0)
    none, bias = data["traces"][1]["y"], data["traces"][2]["y"]
    assert max(none) / (sum(none) / 4) > 2.0                      # the skewed batch crowds rank 0
    assert max(bias) / (sum(bias) / 4) < 0.6 * max(none) / (sum(none) / 4)
    flat = V.ep_data(ranks=4, bias_steps=0, skew=0.0)["traces"][1]["y"]
    assert max(flat) / (sum(flat) / 4) < 1.3                      # no skew: roughly even already


def test_wire_bytes_v4_pro_ep32():
    wire = V.wire_per_token()
    d = 7168
    assert wire["layers"] == 61
    # counted rows: FP8 = 7168 payload + 56 scale bytes per row, BF16 = 2 x 7168, combine BF16
    ratio = wire["fp8"]["dispatch"] / wire["bf16"]["dispatch"]
    assert ratio == pytest.approx((d + d // 128) / (2 * d))
    assert wire["fp8"]["combine"] == wire["bf16"]["combine"]
    an = accounting.ep_all_to_all("v4-pro", 32, dispatch="fp8", combine="bf16")["remote_per_layer"]
    assert an["dispatch"] == pytest.approx(6 * (d + 56) * 31 / 32)
    for part in ("dispatch", "combine"):                          # uniform routing: close to (ep-1)/ep
        assert wire["fp8"][part] == pytest.approx(an[part], rel=0.03)


def test_bad_state_names_the_key():
    with pytest.raises(ValueError, match="ranks"):
        V.EPWidget(static=True, ranks=3)
    with pytest.raises(ValueError, match="bias_steps"):
        V.EPWidget(static=True).on_bias_steps(7)
