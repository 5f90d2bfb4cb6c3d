"""``V4Model.use_kernels``: the whole model through the Triton kernels equals the torch references.

Under the interpreter (tests) the kernels are slow, so a short prompt: window and CSA layers with
compressed entries and indexer picks, the hash and learned MoE layers, mHC and the MTP block. Each kernel's
own test covers its edge cases; this one checks the wiring (every kernel is really called) and the model-level
contract (same logits, same cached decode, forward-only).
"""
import pytest
import torch

from v4lab.config import get_config
from v4lab.model import V4Model

S = 24


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = V4Model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, return_mtp=True)
    return model, ids, ref


def _spy(monkeypatch):
    import v4lab.kernels.compressor as kc
    import v4lab.kernels.indexer as ki
    import v4lab.kernels.mhc as km
    import v4lab.kernels.moe as kmoe
    import v4lab.kernels.sparse_attn as ks
    calls = {}
    for mod, name in ((ks, "sparse_attn"), (kc, "compress_pool"), (ki, "index_scores"), (km, "hc_pre"),
                      (kmoe, "grouped_expert_mlp")):
        fn = getattr(mod, name)

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)
        monkeypatch.setattr(mod, name, counted)
    return calls


def test_kernels_equal_references_through_the_whole_model(setup, monkeypatch):
    model, ids, (ref, ref_mtp) = setup
    calls = _spy(monkeypatch)
    try:
        model.use_kernels()
        with torch.no_grad():
            out, mtp = model(ids, return_mtp=True)
            cache = model.new_cache(1)
            model(ids[:, :S - 2], cache=cache)
            steps = [model(ids[:, t:t + 1], cache=cache) for t in (S - 2, S - 1)]
    finally:
        model.use_kernels(False)
    assert set(calls) == {"sparse_attn", "compress_pool", "index_scores", "hc_pre", "grouped_expert_mlp"}
    assert (out - ref).abs().max() < 2e-5 and (mtp - ref_mtp).abs().max() < 2e-5
    for t, y in zip((S - 2, S - 1), steps):
        assert (y[0, -1] - ref[0, t]).abs().max() < 2e-5


def test_switching_back_restores_the_references(setup):
    model = setup[0]
    model.use_kernels().use_kernels(False)
    for m in model.modules():                     # every layer reads the model's one switch object
        if hasattr(m, "switches"):
            assert m.switches is model.switches
    assert not model.kernels and not model.switches.kernels


def test_kernels_are_forward_only(setup):
    model, ids, _ = setup
    model.use_kernels()
    try:
        with pytest.raises(ValueError, match="use_kernels = True: the Triton kernels are forward-only"):
            model(ids[:, :8])
    finally:
        model.use_kernels(False)
    model(ids[:, :8]).sum().backward()                  # the references train
    model.zero_grad(set_to_none=True)


def test_kernel_mode_must_fit_the_device(setup, monkeypatch):
    monkeypatch.setattr("v4lab.device.kernel_mode", lambda: "compiled")
    with pytest.raises(ValueError, match="compiled for CUDA"):
        setup[0].use_kernels()
    assert not setup[0].kernels
