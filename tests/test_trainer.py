"""The trainer's parts: TrainConfig (one place of validation), the torch settings put back after a run,
Anticipatory Routing's scheduler, the spike detector and the rollback buffer, the CLI filling a TrainConfig."""
import dataclasses

import pytest
import torch

from v4lab import train as T
from v4lab.anticipatory import AnticipatoryRouting, RollbackBuffer, SpikeDetector
from v4lab.data import load_data
from v4lab.trainconfig import TrainConfig

# every keyword train() accepted before TrainConfig existed: the wrapper must keep taking all of them
TRAIN_KEYWORDS = {
    "data", "steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip",
    "optimizer", "seed", "mtp_weight", "bias_gamma", "balance_alpha", "swiglu_limit", "qat", "hc_mode",
    "anticipatory", "ar_lag", "spike_ratio", "spike_beta", "spike_min_step", "ar_duration", "rollback",
    "spike_rollback", "spike_ar", "balanced_hash", "spike_at", "spike_lr_mult", "model", "log_path", "out_dir",
    "ckpt_every", "eval_every", "eval_windows", "threads", "deterministic", "progress", "max_seconds",
    "callback", "log_preact", "device", "mtp_weight_final", "mtp_switch_at", "extra_files", "ddp",
    "indexer_distill_weight", "indexer_distill_every", "start_step", "stop_step", "opt_state", "on_checkpoint",
    "ckpt_seconds", "spike_scope", "expert_lr_mult", "expert_h_fp8"}


@pytest.fixture(scope="module")
def data():
    return load_data(512)


@pytest.fixture(scope="module")
def micro():
    return T.micro_config()


def _small(micro, **kw):
    return TrainConfig(micro, **{**dict(steps=2, batch_size=2, seq_len=32, warmup=1, progress=False), **kw})


# ---------------------------------------------------------------------------------------- TrainConfig
def test_train_keeps_every_keyword():
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"cfg"}
    assert fields | set(T.RUNTIME_KEYS) == TRAIN_KEYWORDS
    assert not fields & set(T.RUNTIME_KEYS)


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps = 0: must be a positive integer"),
    (dict(steps=True), "steps = True: must be a positive integer"),
    (dict(batch_size=2.0), "batch_size = 2.0: must be a positive integer"),
    (dict(seq_len=1), "seq_len = 1: must be a positive integer >= 2"),
    (dict(ar_lag=0), "ar_lag = 0: must be a positive integer"),
    (dict(anticipatory="sometimes"), "anticipatory = 'sometimes': must be one of"),
    (dict(spike_scope="experts"), "spike_scope = 'experts': must be one of"),
    (dict(optimizer="sgd"), "optimizer = 'sgd': must be one of"),
    (dict(lr=0.0), "lr = 0.0: must be > 0"),
    (dict(seq_len=10 ** 6), "seq_len = 1000000: must be <= max_position_embeddings"),
    (dict(mtp_switch_at=1.5), "mtp_switch_at = 1.5: must be a fraction of the run in"),
    (dict(mtp_weight_final=-0.1), "mtp_weight_final = -0.1: must be >= 0"),
    (dict(start_step=3), r"start_step = \(3, 2\): must satisfy 0 <= start_step <= stop_step <= steps = 2"),
    (dict(stop_step=5), r"start_step = \(0, 5\): must satisfy"),
    (dict(indexer_distill_weight=-1.0), "indexer_distill_weight = -1.0: must be >= 0"),
    (dict(indexer_distill_every=0), "indexer_distill_every = 0: must be an integer >= 1"),
    (dict(qat="yes"), "qat = 'yes': must be False, True, a start step"),
    (dict(qat=1.5), "qat = 1.5: must be False, True, a start step"),
])
def test_a_bad_setting_is_one_line_naming_it(micro, change, message):
    with pytest.raises(ValueError, match=message) as e:
        _small(micro, **change)
    assert "\n" not in str(e.value)
    good = _small(micro)
    with pytest.raises(ValueError, match=message):          # replace() validates too
        dataclasses.replace(good, **change)


def test_a_router_spike_multiplies_the_routers_update_and_nothing_else(micro, data):
    # spike_scope "router": at spike_at only the learned routers' update is spike_lr_mult times larger
    base = _small(micro, steps=2, lr=1e-3, seed=0, threads=1)
    params = {}
    for name, cfg in (("before", base.replace(stop_step=1)), ("plain", base),
                      ("kicked", base.replace(spike_at=1, spike_lr_mult=50.0, spike_scope="router"))):
        model = T.fit(cfg, data)["model"]
        params[name] = {k: v.detach().clone() for k, v in model.named_parameters()}
    router = {f"{k}.weight" for k, m in model.named_modules() if k.endswith("ffn.gate") and not m.is_hash}
    assert len(router) == 2                       # layer 1 and the MTP block; the hash layer's gate is not one
    for k in params["plain"]:
        w0, w1, w2 = params["before"][k], params["plain"][k], params["kicked"][k]
        if k in router:
            assert (w1 - w0).abs().max() > 0
            torch.testing.assert_close(w2 - w0, 50.0 * (w1 - w0), rtol=1e-3, atol=1e-6)
        else:
            assert torch.equal(w1, w2), k


def test_config_resolves_its_defaults(micro):
    c = _small(micro, steps=10, ar_lag=3, warmup=2, mtp_weight_final=0.1, mtp_switch_at=0.5, qat=0.25,
               swiglu_limit=0.0)
    assert c.rollback_steps == 6 and c.detector_min_step == 2 and c.last_step == 10
    assert [c.mtp_weight_at(s) for s in (4, 5)] == [0.3, 0.1]
    assert c.qat_from == 2 and c.model_config.swiglu_limit == 0.0 and micro.swiglu_limit != 0.0
    assert TrainConfig("tiny").model_config.name == "tiny"
    with pytest.raises(ValueError, match="nope"):
        TrainConfig("nope")


def test_train_wrapper_is_the_trainer(micro, data):
    """train(cfg, **kw) and Trainer(TrainConfig(cfg, ...), data).run() are the same run, bit for bit."""
    a = T.train(micro, data=data, steps=2, batch_size=2, seq_len=32, warmup=1, progress=False, threads=1, seed=5)
    b = T.Trainer(_small(micro, threads=1, seed=5), data).run()
    assert [r["loss"] for r in a["log"]] == [r["loss"] for r in b["log"]]
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_steps_driven_by_hand_are_the_run(micro, data):
    c = _small(micro, threads=1, seed=2, steps=3)
    ran = T.Trainer(c, data).run()
    with T.torch_settings(c.threads, c.deterministic):
        tr = T.Trainer(c, data).setup()
        recs = [tr.step() for _ in range(3)]
    assert tr.position == 3
    assert [r["loss"] for r in recs] == [r["loss"] for r in ran["log"]]
    assert [r["load"] for r in recs] == [r["load"] for r in ran["log"]]


# ---------------------------------------------------------------------------------------- torch settings
def _settings():
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.fixture(autouse=True)
def _nondeterministic():
    """Each test starts with deterministic algorithms off, so that a run leaving them on is seen."""
    was = _settings()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(was[1], warn_only=was[2])


def test_train_puts_the_torch_settings_back(micro, data):
    before = _settings()
    seen = []
    T.fit(_small(micro, steps=1, threads=before[0] + 1, deterministic=True), data,
          callback=lambda step, rec, model: seen.append(_settings()))
    assert seen == [(before[0] + 1, True, True)]              # set while training
    assert _settings() == before                              # and back after


def test_the_torch_settings_come_back_after_an_exception(micro, data):
    before = _settings()

    def boom(step, rec, model):
        assert _settings()[:2] == (before[0] + 1, True)
        raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        T.fit(_small(micro, steps=1, threads=before[0] + 1), data, callback=boom)
    assert _settings() == before


def test_torch_settings_restores_what_was_set_before():
    before = _settings()
    torch.use_deterministic_algorithms(True)                  # strict, not warn-only
    try:
        with T.torch_settings(threads=before[0] + 1, deterministic=True):
            assert _settings() == (before[0] + 1, True, True)
        assert _settings() == (before[0], True, False)
        with T.torch_settings():                                # nothing asked: nothing touched
            assert _settings() == (before[0], True, False)
    finally:
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


# ---------------------------------------------------------------------------------------- AR parts
def test_anticipatory_routing_uses_the_routes_of_lag_steps_ago():
    """Routes are tagged with (batch step, parameter version): step t must get (t, version at t − Δt)."""
    version = [0]
    ar = AnticipatoryRouting(2, lambda t: (t, version[0]), lambda snap, t: (t, snap["v"]))
    ar.start(0)                                               # nothing older: the current θ for steps 0, 1
    got = []
    for t in range(6):
        got.append(ar.routes(t))
        ar.look_ahead(t)
        version[0] += 1                                       # the optimiser step
    assert got == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    ar.start(10, older={8: {"v": "θ8"}}, until=13)            # AR after no rollback: θ_{t−Δt} where kept
    assert ar.routes(10) == (10, "θ8") and ar.routes(11) == (11, version[0])
    assert not ar.expired(11) and ar.expired(12)
    ar.stop()
    assert ar.routes(12) is None and ar.pending == {}


def test_spike_detector_compares_with_the_ema_before_the_loss():
    d = SpikeDetector(ratio=1.5, beta=0.5, min_step=2)
    assert not d.fires(0, 100.0)                              # no EMA yet
    d.absorb(2.0)
    assert not d.fires(1, 100.0)                              # before min_step
    assert d.fires(2, 3.1) and not d.fires(2, 3.0)            # 1.5 × EMA(2.0) = 3.0, strictly above
    d.absorb(4.0)
    assert d.ema == pytest.approx(3.0)                        # 0.5·2 + 0.5·4
    d.quiet(until=5)
    assert not d.fires(4, 100.0) and d.fires(5, 100.0)


def test_rollback_buffer_keeps_the_last_keep_plus_one():
    b = RollbackBuffer(keep=2)
    assert not b.ready
    for s in range(5):
        b.push({"step": s})
    assert b.ready and b.oldest == {"step": 2}
    assert [x["step"] for x in b.take()] == [2, 3, 4] and not b.ready


# ---------------------------------------------------------------------------------------- CLI
def test_the_cli_fills_a_train_config(micro):
    from pathlib import Path
    args = T._parser().parse_args(["--steps", "7", "--lr", "0.5", "--qat-from", "0.25", "--no-progress",
                                   "--anticipatory", "spike", "--ar-lag", "3", "--threads", "1"])
    c = T.config_from_args(args, micro, Path("/tmp/out"), "/tmp/log.jsonl", torch.device("cpu"))
    assert (c.steps, c.lr, c.qat, c.progress, c.anticipatory, c.ar_lag, c.threads) == (7, 0.5, 0.25, False,
                                                                                       "spike", 3, 1)
    assert (c.out_dir, c.log_path, c.device, c.cfg) == ("/tmp/out", "/tmp/log.jsonl", torch.device("cpu"), micro)
    assert c.batch_size == args.batch_size and c.mtp_switch_at == args.mtp_switch_at
