"""The V4 training recipe in v4lab.train: determinism, bias update, balance loss, MTP loss, Anticipatory
Routing lag, spike mode, QAT switch. A micro V4 (2 layers, d = 32) on 2×32-token batches keeps it fast."""
import copy

import pytest
import torch

from v4lab import train as T
from v4lab.data import load_data
from v4lab.model import V4Model
from v4lab.moe import sequence_balance_loss

B, S = 2, 32


@pytest.fixture(scope="module")
def data():
    return load_data(512)


@pytest.fixture(scope="module")
def cfg():
    return T.micro_config()


def _run(cfg, data, **kw):
    kw.setdefault("steps", 3)
    return T.train(cfg, data=data, batch_size=B, seq_len=S, warmup=1, progress=False, threads=1, **kw)


def test_same_seed_bit_identical(cfg, data):
    a = _run(cfg, data, seed=3, lr=1e-2)
    b = _run(cfg, data, seed=3, lr=1e-2)
    assert [r["loss"] for r in a["log"]] == [r["loss"] for r in b["log"]]
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _run(cfg, data, seed=4, lr=1e-2)                      # a different seed really differs
    assert [r["loss"] for r in c["log"]] != [r["loss"] for r in a["log"]]


def test_lr_schedule_warmup_then_cosine():
    lrs = [T.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))    # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("wrong", [False, True])
def test_bias_update_sign_rule(cfg, data, monkeypatch, wrong):
    """After one step from b = 0: b = γ·sign(mean load − load) for every learned layer, none for hash layers.
    The wrong variant (sign flipped) must be caught."""
    if wrong:
        def flipped(bias, load, gamma=0.001):
            bias.add_(gamma * torch.sign(load.float() - load.float().mean()))
        monkeypatch.setattr(T, "bias_update", flipped)
    gamma = 0.01
    r = _run(cfg, data, steps=1, bias_gamma=gamma)
    m, rec = r["model"], r["log"][0]
    blocks = m.blocks()
    assert rec["learned_layers"] == [j for j, b in enumerate(blocks) if not b.ffn.gate.is_hash]
    ok = True
    for j in rec["learned_layers"]:
        load = torch.tensor(rec["load"][j])
        want = gamma * torch.sign(load.mean() - load)
        assert want.abs().sum() > 0
        ok &= torch.allclose(blocks[j].ffn.gate.bias, want)
    for b in blocks:
        if b.ffn.gate.is_hash:
            assert b.ffn.gate.bias is None
    assert ok != wrong


def test_bias_frozen_with_gamma_zero(cfg, data):
    m = _run(cfg, data, steps=2, bias_gamma=0.0)["model"]
    assert all(float(b.ffn.gate.bias.abs().sum()) == 0 for b in m.blocks() if not b.ffn.gate.is_hash)


def test_balance_loss_formula_and_layers(cfg, data):
    torch.manual_seed(0)
    m = V4Model(cfg)
    ids = data.batch(0, B, S)
    with m.recording() as rec:
        T.lm_losses(m, ids)
    got = T.balance_loss(m, B, 1e-4, record=rec)
    want = 0.0
    for b in m.blocks():
        if b.ffn.gate.is_hash:                               # hash layers are left out
            continue
        r = b.ffn.last_routing
        s, idx = r["scores"].view(B, -1, 8), r["idx"].view(B, -1, 2)
        for bi in range(B):                                  # V3's formula, one sequence at a time
            Tn = s.shape[1]
            f = torch.bincount(idx[bi].reshape(-1), minlength=8).float() * 8 / (2 * Tn)
            p = (s[bi] / s[bi].sum(-1, keepdim=True)).mean(0)
            want += 1e-4 * float((f * p).sum().detach()) / B
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    n_learned = len(T.learned_moe_blocks(m))
    assert n_learned == 2                                     # layer 1 and the MTP block, not hash layer 0
    # perfectly even routing and uniform scores give exactly alpha
    E, K = 8, 2
    idx = torch.arange(E).repeat(4).view(16, K)
    assert float(sequence_balance_loss(torch.ones(16, E), idx, E, 1e-4)) == pytest.approx(1e-4)
    # it trains the router: gradient reaches the gate weights of learned layers
    got.backward()
    assert all(b.ffn.gate.weight.grad is not None and b.ffn.gate.weight.grad.abs().sum() > 0
               for b in m.blocks() if not b.ffn.gate.is_hash)


def test_mtp_loss_alignment_and_weight(cfg, data):
    torch.manual_seed(0)
    m = V4Model(cfg)
    ids = data.batch(1, B, S)
    lm, mt = T.lm_losses(m, ids)
    logits, mtp = m(ids[:, :-1], return_mtp=True)
    assert mtp.shape[1] == S - 1
    ce = torch.nn.functional.cross_entropy
    assert float(mt) == pytest.approx(float(ce(mtp.reshape(-1, 512), ids[:, 2:].reshape(-1))), rel=1e-6)
    assert float(lm) == pytest.approx(float(ce(logits.reshape(-1, 512), ids[:, 1:].reshape(-1))), rel=1e-6)
    wrong = float(ce(mtp.reshape(-1, 512), ids[:, 1:-1].reshape(-1)))     # token i+1 instead of i+2
    assert abs(wrong - float(mt)) > 1e-4
    rec = _run(cfg, data, steps=1, mtp_weight=0.3)["log"][0]
    assert rec["loss"] == pytest.approx(rec["lm_loss"] + 0.3 * rec["mtp_loss"] + rec["balance_loss"], rel=1e-6)
    rec0 = _run(cfg, data, steps=1, mtp_weight=0.0)["log"][0]
    assert rec0["mtp_loss"] is None and rec0["loss"] == pytest.approx(rec0["lm_loss"] + rec0["balance_loss"])


def test_mtp_weight_switches_from_03_to_01(cfg, data):
    log = _run(cfg, data, steps=4, mtp_weight=0.3, mtp_weight_final=0.1, mtp_switch_at=0.5)["log"]
    assert [r["mtp_weight"] for r in log] == [0.3, 0.3, 0.1, 0.1]
    for r in log:
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["mtp_weight"] * r["mtp_loss"] + r["balance_loss"], rel=1e-6)
    assert [r["mtp_weight"] for r in _run(cfg, data, steps=2)["log"]] == [0.3, 0.3]     # default: constant
    with pytest.raises(ValueError, match="mtp_switch_at = 1.5: must be a fraction"):
        _run(cfg, data, steps=1, mtp_weight_final=0.1, mtp_switch_at=1.5)


def test_anticipatory_routes_come_from_lagged_parameters(cfg, data):
    """AR always on, Δt = 2: the routes used at step t are those θ_{t−2} chooses for step t's batch
    (θ_s = parameters and router biases before step s's update); the first Δt steps use θ_0."""
    lag, steps = 2, 5
    torch.manual_seed(0)
    model = V4Model(cfg)
    snaps = [copy.deepcopy(model.state_dict())]              # snaps[s] = θ_s
    used = []
    orig = model.forward

    def spy(*a, **kw):
        if kw.get("forced_routes") is not None and torch.is_grad_enabled():
            used.append([None if r is None else r.clone() for r in kw["forced_routes"]])
        return orig(*a, **kw)
    model.forward = spy
    T.train(cfg, data=data, model=model, steps=steps, batch_size=B, seq_len=S, warmup=1, lr=3e-2,
            anticipatory="always", ar_lag=lag, bias_gamma=0.01, progress=False, threads=1,
            callback=lambda s, rec, m: snaps.append(copy.deepcopy(m.state_dict())))
    assert len(used) == steps
    probe = V4Model(cfg)

    def routes(theta, t):
        probe.load_state_dict(theta)
        return probe.route_only(data.batch(t, B, S)[:, :-1], return_mtp=True)

    def same(a, b):
        return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))
    discriminated = False
    for t in range(steps):
        assert same(used[t], routes(snaps[max(0, t - lag)], t)), f"step {t}"
        if t >= lag:
            discriminated |= not same(used[t], routes(snaps[t], t))      # θ_t itself would route differently
    assert discriminated


def test_spike_mode_rolls_back_and_turns_ar_on_then_off(cfg, data):
    r = _run(cfg, data, steps=10, lr=5e-3, anticipatory="spike", ar_lag=1, rollback=2, ar_duration=3,
             spike_at=5, spike_lr_mult=400.0, spike_ratio=1.2, spike_min_step=1)
    log = r["log"]
    events = [x["event"] for x in log if "event" in x]
    assert events and events[0].startswith("spike")
    assert r["summary"]["rollbacks"] >= 1
    i = next(i for i, x in enumerate(log) if "event" in x)
    back = int(log[i]["event"].split("-> ")[1].split(",")[0])
    assert back <= log[i]["step"] - 1 and log[i + 1]["step"] == back and log[i + 1]["ar_on"]
    assert any(x.get("event") == "AR off" for x in log[i + 1:])
    assert log[-1]["step"] == 9


def test_qat_switches_on_at_the_given_fraction(cfg, data):
    log = _run(cfg, data, steps=4, qat=0.5)["log"]
    assert [x["qat"] for x in log] == [False, False, True, True]


def test_bad_arguments_name_the_argument(cfg, data):
    with pytest.raises(ValueError, match="anticipatory"):
        _run(cfg, data, anticipatory="sometimes")
    with pytest.raises(ValueError, match="steps"):
        _run(cfg, data, steps=0)
    with pytest.raises(ValueError, match="qat"):
        _run(cfg, data, qat="yes")


def test_log_has_the_documented_fields(cfg, data, tmp_path):
    import json
    r = _run(cfg, data, steps=2, log_path=tmp_path / "log.jsonl", log_preact=True)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for key in ("loss", "grad_norm", "load", "churn", "moe_max_abs", "mhc_gain", "swiglu_preact_max"):
        assert key in lines[0]
    assert len(lines[0]["load"]) == len(r["model"].blocks())
    assert sum(lines[0]["load"][0]) == B * S * 2              # every token, top-2
    assert 0.5 < lines[0]["mhc_gain"] < 2.0


def test_newton_schulz_orthogonalises():
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(T.newton_schulz(g))
    assert sv.min() > 0.6 and sv.max() < 1.25                 # singular values pulled to ~1
    sv_t = torch.linalg.svdvals(T.newton_schulz(g.T))        # tall input: same treatment
    assert torch.allclose(sv_t, sv, atol=1e-4)


def test_muon_split_and_step(cfg, data):
    torch.manual_seed(0)
    m = V4Model(cfg)
    opts = T.make_optimizer(m, "muon", 1e-3, 0.1)
    muon = opts[1].param_groups[0]["params"]
    names = {id(p): n for n, p in m.named_parameters()}
    got = {names[id(p)] for p in muon}
    assert "layers.1.attn.wq_a.weight" in got and "layers.0.ffn.experts.0.w1.weight" in got
    assert not any(n.startswith(("embed", "head")) or ".hc_" in n or "norm" in n for n in got)
    r = _run(cfg, data, steps=2, optimizer="muon", lr=1e-3)
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in r["log"])


def test_cli_bad_argument_exits_2(capsys):
    from v4lab import cli
    assert cli.main(["train", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "positive" in err
