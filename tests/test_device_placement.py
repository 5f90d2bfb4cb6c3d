"""Device placement without a GPU.

1. Hygiene: every tensor the model makes for itself must be made on its inputs' / weights' device. Run
   each path with the model and inputs on the CPU but the *default* device set to ``meta``: a tensor created
   without ``device=`` lands on meta and the first op mixing it with a CPU tensor raises. On a GPU the same
   omission would put a CPU tensor next to CUDA ones. A deliberately wrong RoPE shows the harness catches it.
2. Entry points (load, load_layer, train, generate, experiments, stream_forward, the notebooks' model)
   consult the one setting: asking for CUDA on a machine without it fails there, with the setting named.
"""
import re

import pytest
import torch

import v4lab
from v4lab import generate as gen_mod
from v4lab import real, rope
from v4lab import train as T
from v4lab.checkpoint import make_synthetic_checkpoint
from v4lab.config import get_config
from v4lab.model import V4Model, load_layer, to_device
from v4lab.moe import bias_update

S = 140                      # past one HCA entry (m' = 128) and many CSA entries of the tiny config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    return V4Model(cfg).eval(), torch.randint(0, cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(1))


def _on_meta_default(fn):
    with torch.device("meta"):
        return fn()


def _paths(model, ids):
    """name -> a callable running one device-sensitive path of the model (inference and training)."""
    def decode():
        c = model.new_cache(2)
        model(ids[:, :S - 3], cache=c, return_mtp=True)
        for t in range(S - 3, S):
            model(ids[:, t:t + 1], cache=c, return_mtp=True)

    def forced():
        routes = model.route_only(ids, return_mtp=True)
        model(ids, return_mtp=True, forced_routes=routes)

    def low_precision():
        model.set_flags(low_precision=True, qat=True)
        try:
            model(ids[:, :40], return_mtp=True)
        finally:
            model.set_flags(low_precision=False, qat=False)

    def training_step():
        model.train()
        try:
            with model.recording() as rec:
                lm, mt = T.lm_losses(model, ids[:, :41])
            learned = T.learned_moe_blocks(model)
            loss = lm + 0.3 * mt + T.balance_loss(model, 2, 1e-4, learned, rec)
            loss.backward()
            for j in learned:
                b = model.blocks()[j]
                bias_update(b.ffn.gate.bias.clone(), b.ffn.last_routing["load"], 1e-3)
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    def evaluation():
        T.evaluate(model, ids[:, :33], batch_size=2)
        classes = torch.arange(model.cfg.vocab_size, device="cpu") % 5
        T.expert_specialisation(model, ids[:, :33], classes, batch_size=2)

    return {
        "forward+mtp": lambda: model(ids, return_mtp=True, return_hidden=True),
        "prefill+decode": decode,
        "generate-sampled": lambda: model.generate(ids[:1, :20], 4, temperature=0.8, top_k=5, seed=0),
        "forced-routes": forced,
        "fp8/fp4-simulation": low_precision,
        "training-step": training_step,
        "evaluate": evaluation,
    }


PATHS = ["forward+mtp", "prefill+decode", "generate-sampled", "forced-routes", "fp8/fp4-simulation",
         "training-step", "evaluate"]


@pytest.mark.parametrize("path", PATHS)
def test_model_makes_its_tensors_on_the_right_device(tiny, path):
    model, ids = tiny
    paths = _paths(model, ids)
    assert sorted(paths) == sorted(PATHS)
    fn = paths[path]
    ref = fn()                                       # runs at all
    out = _on_meta_default(fn)                       # and creates nothing on the default device
    for a, b in zip(ref if isinstance(ref, tuple) else [ref], out if isinstance(out, tuple) else [out]):
        if isinstance(a, torch.Tensor):
            assert b.device.type == "cpu" and torch.equal(a, b)


def test_harness_catches_a_tensor_made_without_device(tiny, monkeypatch):
    model, ids = tiny
    good = rope.cos_sin

    def sloppy(freqs, positions):                   # positions rebuilt without device=: the classic bug
        return good(freqs, torch.arange(positions.numel()).reshape(positions.shape) + positions.min())

    monkeypatch.setattr("v4lab.attention.cos_sin", sloppy)
    model(ids[:, :20])                               # identical on a single-device run...
    with pytest.raises(RuntimeError, match="device"):
        _on_meta_default(lambda: model(ids[:, :20]))     # ...but caught here


def test_inputs_follow_the_model(tiny):
    """ids (and forced routes) may come from anywhere; they are moved to the model's device."""
    model, ids = tiny
    assert model.device == torch.device("cpu")
    assert model(ids[:, :10].to(torch.int32)).device == model.device


def test_to_device_leaves_unloaded_layers_alone(tmp_path):
    cfg = get_config("tiny")
    make_synthetic_checkpoint(cfg, tmp_path / "ck", seed=0)
    m = v4lab.load(tmp_path / "ck", layers=[1], device="cpu")
    assert m.layers[0].attn.wkv.weight.is_meta and not m.layers[1].attn.wkv.weight.is_meta
    moved = to_device(m, torch.device("meta"))       # a second device that exists everywhere
    assert all(t.is_meta for t in moved.state_dict().values())
    assert load_layer(tmp_path / "ck", 2, device="cpu").attn.wkv.weight.device.type == "cpu"


# ------------------------------------------------------------------------------------------ one setting
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev") / "tiny"
    make_synthetic_checkpoint(get_config("tiny"), d, seed=0)
    return d


@no_cuda
@pytest.mark.parametrize("via", ["env", "argument"])
def test_entry_points_consult_the_setting(ckpt, monkeypatch, via):
    from v4lab.experiments import mhc_stability
    kw = {}
    if via == "env":
        monkeypatch.setenv("V4LAB_DEVICE", "cuda")
    else:
        monkeypatch.setenv("V4LAB_DEVICE", "cpu")
        kw = {"device": "cuda"}
    calls = {
        "load": lambda: v4lab.load(ckpt, **kw),
        "load_layer": lambda: load_layer(ckpt, 1, **kw),
        "train": lambda: T.train(T.micro_config(), steps=1, batch_size=1, seq_len=8, progress=False, **kw),
        "generate": lambda: gen_mod.run(ckpt, prompt_ids=[1, 2], max_new_tokens=1, **kw),
        "mhc_stability": lambda: mhc_stability.run(n_sublayers=2, steps=1, **kw),
        "stream_forward": lambda: real.stream_forward([1, 2, 3], ckpt, progress=False, **kw),
    }
    where = "$V4LAB_DEVICE" if via == "env" else "device"
    for call in calls.values():
        with pytest.raises(ValueError, match=re.escape(f"{where} = 'cuda': CUDA is not available")):
            call()


def test_experiments_pass_the_device_to_train(monkeypatch):
    from v4lab.experiments import anticipatory, qat, swiglu_clamp
    seen = []

    class Stop(Exception):
        pass

    def fake_fit(config, *a, **kw):                 # experiments run TrainConfig variants through train.fit
        seen.append(config.device)
        raise Stop

    for mod in (anticipatory, qat, swiglu_clamp):
        monkeypatch.setattr(mod, "fit", fake_fit)
        with pytest.raises(Stop):
            mod.run(steps=1, data=_FakeData(), device="cpu:0")
    assert seen == ["cpu:0"] * 3


class _FakeData:
    vocab_size = 512

    def heldout_windows(self, *a):
        return torch.zeros(1, 9, dtype=torch.long)


def test_notebook_model_uses_the_setting(ckpt, monkeypatch):
    from v4lab.viz import trained
    trained.byte_tokenizer().save(str(ckpt / "tokenizer.json"))
    monkeypatch.setenv("V4LAB_DEVICE", "cpu")
    model, _, _ = trained.load_dir(ckpt)
    assert model.device == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("V4LAB_DEVICE", "cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            trained.load_dir(ckpt)


@no_cuda
@pytest.mark.parametrize("cmd", [["train", "--steps", "1"], ["generate", "X", "--prompt-ids", "1"]])
def test_cli_device_flag(cmd, capsys, tmp_path):
    from v4lab import cli
    if cmd[0] == "generate":
        cmd[1] = str(tmp_path)
        make_synthetic_checkpoint(get_config("tiny"), tmp_path, seed=0, overwrite=True)
    rc = cli.main(cmd + ["--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "CUDA is not available" in err[0]
