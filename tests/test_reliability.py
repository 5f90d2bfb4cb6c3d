"""Issue 14's regressions, one test (or a few) per defect: nothing a user owns is deleted, nothing
non-finite or outside the checkpoint folder is loaded, every bad input is one line. The whole catalogue
of bad inputs runs table-driven in test_bad_inputs.py; these are the defects found, each checked in the
way it was found."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from v4lab import checkpoint as C
from v4lab import model as M
from v4lab import train as T
from v4lab.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def micro():
    return T.micro_config()


@pytest.fixture(scope="module")
def ckpt(micro, tmp_path_factory):
    """A micro checkpoint (FP8 + FP4, MTP), written once; tests copy it before changing anything."""
    return C.make_synthetic_checkpoint(micro, tmp_path_factory.mktemp("ck") / "micro", seed=0)


@pytest.fixture
def copy_ckpt(ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    return d


@pytest.fixture(scope="module")
def micro_json(micro, tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "micro.json"
    micro.to_json(p)
    return p


def _stored(path):
    r = C.CheckpointReader(path)
    return {k: r.get(k) for k in r.keys()}


def _cli(capsys, *argv):
    rc = cli_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err):
    return err.count("\n") == 1 and "Traceback" not in err


# ======================================================================== 1. --out never deletes user files
def test_write_refuses_a_folder_that_is_not_a_checkpoint(ckpt, micro, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"'.*mine'.*not a v4lab checkpoint"):
        C.write_checkpoint(_stored(ckpt), micro, user, overwrite=True)
    assert (user / "thesis.tex").read_text() == "years of work"
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    with pytest.raises(ValueError, match=r"'.*notes.txt'.*is a file"):
        C.write_checkpoint(_stored(ckpt), micro, plain, overwrite=True)
    assert plain.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]   # no temporaries left


def test_save_replaces_its_own_checkpoint_only(ckpt, copy_ckpt, tmp_path):
    model = M.load(ckpt)
    M.save(model, copy_ckpt, overwrite=True)                # a checkpoint: replaced
    assert C.CheckpointReader(copy_ckpt).keys() == C.CheckpointReader(ckpt).keys()
    user = tmp_path / "photos"
    user.mkdir()
    (user / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="not a v4lab checkpoint"):
        M.save(model, user, overwrite=True)
    assert [p.name for p in user.iterdir()] == ["a.jpg"]


def test_train_cli_refuses_a_user_folder_before_training(capsys, tmp_path, micro_json):
    user = tmp_path / "out"
    user.mkdir()
    (user / "data.csv").write_text("1,2,3\n")
    rc, out, err = _cli(capsys, "train", "--config", str(micro_json), "--out", str(user), "--steps", "1",
                        "--seq-len", "16", "--batch-size", "1", "--no-progress")
    assert rc == 2 and _one_line(err) and "--out" in err and "not a v4lab checkpoint" in err, err
    assert [p.name for p in user.iterdir()] == ["data.csv"]


# ======================================================================== 11. litter
def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_a_killed_writer_are_cleaned(ckpt, micro, tmp_path):
    dead = _dead_pid()
    stale_tmp = tmp_path / f".out.tmp-{dead}-abc123"
    stale_old = tmp_path / f".out.old-{dead}-xyz_9"
    live = tmp_path / f".out.tmp-{os.getpid()}-live00"       # a writer still running: left alone
    other = tmp_path / ".out.tmp-notes"                        # not our pattern: left alone
    for d in (stale_tmp, stale_old, live, other):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    C.write_checkpoint(_stored(ckpt), micro, tmp_path / "out")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out", live.name, other.name]), names


def test_out_ending_in_dotdot_is_refused(ckpt, micro, tmp_path):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for target in (f"{inner}/..", f"{inner}/../", f"{inner}/."):
        with pytest.raises(ValueError, match=r"must name a folder, not end in '\.' or '\.\.'"):
            C.write_checkpoint(_stored(ckpt), micro, target, overwrite=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before          # no '....old-*' folder


# ======================================================================== 2. unbounded reads
_LIMITED = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from v4lab.cli import main; sys.exit(main(sys.argv[1:]))")


def _cli_process(*argv, timeout=60):
    """The CLI in a child with 3 GB of address space and a time limit: an unbounded read fails the test
    instead of taking the machine down."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), V4LAB_DEVICE="cpu", OMP_NUM_THREADS="1")
    try:
        return subprocess.run([sys.executable, "-c", _LIMITED, *argv], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"v4lab {' '.join(argv)}: still running after {timeout} s (an unbounded read)")


def test_info_refuses_a_device_file():
    p = _cli_process("info", "/dev/zero")
    assert p.returncode == 2 and _one_line(p.stderr) and "'/dev/zero': not a regular file" in p.stderr, p.stderr


def test_config_that_is_a_fifo_or_a_link_to_dev_zero(tmp_path):
    fifo = tmp_path / "fifo" / "config.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    link = tmp_path / "link" / "config.json"
    link.parent.mkdir()
    link.symlink_to("/dev/zero")
    for d in (fifo.parent, link.parent):
        p = _cli_process("info", str(d / "config.json"), timeout=30)
        assert p.returncode == 2 and _one_line(p.stderr) and "not a regular file" in p.stderr, p.stderr


def test_huge_json_files_are_refused_unread(copy_ckpt, tmp_path):
    big = tmp_path / "config.json"
    with open(big, "wb") as f:                     # sparse: 300 MiB of nothing on disk
        f.truncate(300 << 20)
    with pytest.raises(ValueError, match=r"config file '.*config.json': 314572800 bytes, larger than"):
        M.get_config(big)
    idx = copy_ckpt / C.INDEX_FILE
    with open(idx, "r+b") as f:
        f.truncate(300 << 20)
    with pytest.raises(ValueError, match=r"index '.*model.safetensors.index.json': 314572800 bytes"):
        C.CheckpointReader(copy_ckpt)


def test_tokenizer_fifo_does_not_hang_generate(copy_ckpt):
    os.mkfifo(copy_ckpt / "tokenizer.json")
    p = _cli_process("generate", str(copy_ckpt), "--prompt", "hi", "--max-new-tokens", "1", timeout=60)
    assert p.returncode == 2 and _one_line(p.stderr) and "tokenizer.json': not a regular file" in p.stderr, p.stderr


# ======================================================================== 3. shard paths stay inside
def _map_all(d, shard_from, shard_to):
    p = d / C.INDEX_FILE
    idx = json.loads(p.read_text())
    idx["weight_map"] = {k: (shard_to if v == shard_from else v) for k, v in idx["weight_map"].items()}
    p.write_text(json.dumps(idx))


S2 = "model-00002-of-00002.safetensors"


def test_index_cannot_point_outside_the_folder(copy_ckpt, tmp_path):
    shutil.copy(copy_ckpt / S2, tmp_path / "outside.safetensors")      # a real shard, one level up
    _map_all(copy_ckpt, S2, "../outside.safetensors")
    with pytest.raises(ValueError, match=r"index '.*': key 'mtp\.0\..*' points to '\.\./outside\.safetensors', "
                                         r"outside the checkpoint folder"):
        C.CheckpointReader(copy_ckpt)
    _map_all(copy_ckpt, "../outside.safetensors", "/etc/passwd")
    with pytest.raises(ValueError, match=r"key 'mtp\.0\..*' points to '/etc/passwd', outside the checkpoint"):
        C.CheckpointReader(copy_ckpt)


def test_a_symlinked_shard_leading_outside_is_refused(copy_ckpt, tmp_path):
    shutil.move(copy_ckpt / S2, tmp_path / "elsewhere.safetensors")
    (copy_ckpt / S2).symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match=rf"points to '{S2}', outside the checkpoint folder"):
        C.CheckpointReader(copy_ckpt)


@pytest.mark.parametrize("value", [5, None, ["a"], {"x": 1}])
def test_weight_map_values_must_be_file_names(copy_ckpt, value):
    p = copy_ckpt / C.INDEX_FILE
    idx = json.loads(p.read_text())
    idx["weight_map"]["norm.weight"] = value
    p.write_text(json.dumps(idx))
    with pytest.raises(ValueError, match=r"index '.*': key 'norm\.weight' maps to .*: must be a shard file name"):
        C.CheckpointReader(copy_ckpt)


def test_non_utf8_index_is_one_line(copy_ckpt):
    (copy_ckpt / C.INDEX_FILE).write_bytes(b'{"weight_map": {"\xff": 1}}')
    with pytest.raises(ValueError, match=r"index '.*index.json': not valid JSON \(not UTF-8"):
        C.CheckpointReader(copy_ckpt)


# ======================================================================== 4. non-finite weights
def _poke(d, name, change):
    from safetensors import safe_open
    from safetensors.torch import save_file
    shard = json.loads((d / C.INDEX_FILE).read_text())["weight_map"][name]
    with safe_open(str(d / shard), "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    ts[name] = change(ts[name].clone())
    save_file(ts, str(d / shard), metadata={"format": "pt"})
    return shard


def _set(idx, value):
    def change(t):
        t.view(-1)[idx] = value
        return t
    return change


def _fp8_nan(t):
    b = t.view(torch.uint8).clone()
    b.view(-1)[3] = 0x7F                            # E4M3 NaN
    return b.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("name, change", [
    ("head.weight", _set(5, float("nan"))),
    ("norm.weight", _set(0, float("inf"))),
    ("layers.1.ffn.gate.bias", _set(2, float("-inf"))),
    ("layers.0.attn.wq_a.weight", _fp8_nan),
    ("mtp.0.hc_head_fn", _set(1, float("nan"))),
], ids=["head-bf16-nan", "norm-inf", "router-bias", "fp8-weight", "mtp-hc"])
def test_non_finite_weights_are_refused_at_load(copy_ckpt, name, change):
    shard = _poke(copy_ckpt, name, change)
    with pytest.raises(ValueError, match=rf"shard '.*{shard}', key '{name}': .*non-finite"):
        M.load(copy_ckpt)


def test_generate_with_a_nan_head_exits_2(copy_ckpt, capsys):
    _poke(copy_ckpt, "head.weight", _set(0, float("nan")))
    rc, out, err = _cli(capsys, "generate", str(copy_ckpt), "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert rc == 2 and out == "" and _one_line(err) and "'head.weight'" in err, err


@pytest.mark.parametrize("change, rule", [
    (_set(4, 8), r"\[0, 8\)"), (_set(6, -1), r"\[0, 8\)"),
    (lambda t: torch.cat([t[:, :1], t[:, :1]], 1), "same expert twice"),
])
def test_tid2eid_range_and_duplicates(copy_ckpt, change, rule):
    _poke(copy_ckpt, "layers.0.ffn.gate.tid2eid", change)
    with pytest.raises(ValueError, match=rf"key 'layers\.0\.ffn\.gate\.tid2eid': .*{rule}"):
        M.load(copy_ckpt)


def test_save_refuses_non_finite_weights(ckpt, tmp_path):
    model = M.load(ckpt)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'norm\.weight': has NaN/inf values"):
        M.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ======================================================================== 5. checkpoints during training, Ctrl-C
def _train_process(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), V4LAB_DEVICE="cpu", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "v4lab.cli", "train", *extra, "--out", str(out),
                             "--no-progress", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.mark.slow
def test_ctrl_c_leaves_the_last_checkpoint_loadable_with_its_tokenizer(tmp_path, micro_json):
    import signal
    import time
    out = tmp_path / "run"
    proc = _train_process(out, "--config", str(micro_json), "--steps", "100000", "--ckpt-every", "2",
                          "--seq-len", "32", "--batch-size", "2")
    try:
        deadline = time.time() + 240
        while not (out / C.INDEX_FILE).is_file():               # the first --ckpt-every checkpoint
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        time.sleep(1.0)                                          # somewhere in later steps or a later save
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert _one_line(err) and "interrupted" in err and str(out) in err, err
    assert (out / "tokenizer.json").is_file()                    # every checkpoint carries its tokenizer
    M.load(out)                                                  # complete and loadable
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # nothing half-written
    from tokenizers import Tokenizer

    from v4lab.generate import run
    res = run(out, prompt="def main():", max_new_tokens=3)       # decoded with the checkpoint's tokenizer,
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))       # not the byte fallback
    assert res["prompt_ids"] == tok.encode("def main():").ids != list(b"def main():")
    assert res["text"] == tok.decode(res["new_ids"])


def test_periodic_checkpoints_carry_the_tokenizer(micro, tmp_path):
    from v4lab.data import load_data
    seen = []

    def look(step, rec, model):                   # step 1 runs after step 0's checkpoint (ckpt_every=1)
        run = tmp_path / "run"
        seen.append(sorted(p.name for p in run.iterdir()) if run.exists() else [])
    T.train(micro, data=load_data(512), steps=2, batch_size=1, seq_len=16, warmup=1, progress=False,
            out_dir=tmp_path / "run", ckpt_every=1, extra_files={"tokenizer.json": b"{}"}, callback=look)
    assert "tokenizer.json" in seen[1] and (tmp_path / "run" / "tokenizer.json").read_bytes() == b"{}"


# ======================================================================== 6. a failing save keeps the model
def test_unwritable_out_is_refused_before_training(capsys, tmp_path, micro_json):
    (tmp_path / "afile").write_text("x")
    rc, out, err = _cli(capsys, "train", "--config", str(micro_json), "--out", str(tmp_path / "afile" / "run"),
                        "--steps", "1", "--seq-len", "16", "--batch-size", "1", "--no-progress")
    assert rc == 2 and _one_line(err) and "--out" in err and "is a file, not a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_final_save_failure_writes_a_fallback(micro, tmp_path, monkeypatch):
    from v4lab.data import load_data
    real = C.write_checkpoint
    target = tmp_path / "run"

    def disk_full(tensors, cfg, path, **kw):
        if Path(path) == target:
            raise OSError(28, "No space left on device")
        return real(tensors, cfg, path, **kw)
    monkeypatch.setattr(C, "write_checkpoint", disk_full)
    with pytest.raises(T.SaveFailed) as e:
        T.train(micro, data=load_data(512), steps=1, batch_size=1, seq_len=16, warmup=1, progress=False,
                out_dir=target, extra_files={"tokenizer.json": b"{}"})
    msg = str(e.value)
    assert "No space left on device" in msg and "\n" not in msg
    rescued = [p for p in tmp_path.iterdir() if p.name.startswith("run.rescued-")]
    assert len(rescued) == 1 and str(rescued[0]) in msg
    assert M.load(rescued[0]).cfg.hidden_size == micro.hidden_size
    assert (rescued[0] / "tokenizer.json").read_bytes() == b"{}"


# ======================================================================== 9. model API
@pytest.fixture(scope="module")
def model(micro):
    torch.manual_seed(0)
    return M.V4Model(micro).eval()


def _cache_state(cache):
    return (cache.pos, cache.mtp_pos, [c.length for c in cache.layers])


@pytest.mark.parametrize("route, rule", [
    (torch.tensor([[1, 99]] * 3), r"expert ids must be in \[0, 8\)"),
    (torch.tensor([[1.0, 2.0]] * 3), "integer"),
    (torch.tensor([[3, 3]] * 3), "same expert twice"),
], ids=["out-of-range", "float", "duplicate"])
def test_bad_forced_routes_leave_the_cache_untouched(model, route, rule):
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        ref = model(torch.tensor([[5, 6, 7, 8]]))
        cache = model.new_cache(1)
        model(ids, cache=cache)
        before = _cache_state(cache)
        with pytest.raises(ValueError, match=rf"forced_routes\[1\].*{rule}"):
            model(ids, cache=model.new_cache(1), forced_routes=[None, route])
        with pytest.raises(ValueError, match=rf"forced_routes\[1\].*{rule}"):
            model(torch.tensor([[8]]), cache=cache, forced_routes=[None, route[:1]])
        assert _cache_state(cache) == before
        nxt = model(torch.tensor([[8]]), cache=cache)             # decoding continues correctly
    torch.testing.assert_close(nxt[0, -1], ref[0, -1], rtol=1e-4, atol=1e-4)


def test_a_failed_forward_poisons_its_cache(model, monkeypatch):
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache=cache)

        def boom(*a, **k):
            raise RuntimeError("out of memory (simulated)")
        monkeypatch.setattr(model.layers[1], "forward", boom)
        with pytest.raises(RuntimeError):
            model(torch.tensor([[3]]), cache=cache)
        monkeypatch.undo()
        with pytest.raises(ValueError, match=r"cache = .*: a previous call failed part-way.*new_cache"):
            model(torch.tensor([[3]]), cache=cache)


def test_a_cache_from_another_model_is_refused(model, micro):
    other = M.V4Model(micro.replace(num_hash_layers=0)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"cache = .*: made by another model"):
        model(torch.tensor([[1]]), cache=other.new_cache(1))


def test_model_input_errors_are_value_errors(model, ckpt):
    with pytest.raises(ValueError, match=r"input_ids = \(0, 3\): .*batch"):
        model(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"start_pos = 3: .*without a cache"):
        model(torch.tensor([[1]]), start_pos=3)
    with pytest.raises(ValueError, match=r"path = None: must be a checkpoint folder"):
        M.load(None)
    with pytest.raises(ValueError, match=r"dtype = 'int8': must be a floating"):
        M.load(ckpt, dtype="int8")
    assert M.load(ckpt, dtype="bfloat16").embed.weight.dtype == torch.bfloat16


# ======================================================================== 7. config validation gaps
CONFIG_GAPS = [
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor", "finite"),
    (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor", "finite"),
    (dict(initializer_range=float("nan")), "initializer_range", "finite"),
    (dict(initializer_range=-0.02), "initializer_range", ">= 0"),
    (dict(quantization_config="fp8"), "quantization_config", "object"),
    (dict(quantization_config={"weight_block_size": [0, 0]}), "quantization_config.weight_block_size",
     "two positive integers"),
    (dict(quantization_config={"weight_block_size": "128"}), "quantization_config.weight_block_size",
     "two positive integers"),
    (dict(sliding_window=10 ** 18), "sliding_window", "<= max_position_embeddings"),
]


@pytest.mark.parametrize("change, key, rule", CONFIG_GAPS, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(CONFIG_GAPS)])
def test_config_gaps_are_named_errors(micro, change, key, rule):
    with pytest.raises(ValueError) as e:
        micro.replace(**change)
    msg = str(e.value)
    assert f"'{key}'" in msg and rule in msg and "\n" not in msg, msg


@pytest.mark.parametrize("key", ["hidden_size", "moe_intermediate_size"])
def test_widths_fp4_cannot_store_fail_before_training(micro, tmp_path, key):
    from v4lab.data import load_data
    cfg = micro.replace(**{key: 100})
    steps = []
    with pytest.raises(ValueError, match=rf"config key '{key}' = 100: must be a multiple of 32 to store FP4"):
        T.train(cfg, data=load_data(512), steps=1, batch_size=1, seq_len=16, warmup=1, progress=False,
                out_dir=tmp_path / "run", callback=lambda *a: steps.append(a[0]))
    assert steps == [] and list(tmp_path.iterdir()) == []
    C.expected_keys(cfg.replace(quantization_config=None))           # unquantised (BF16): storable
    C.expected_keys(cfg.replace(expert_dtype="fp8"))                  # FP8 blocks pad: storable


def test_deeply_nested_config_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"rope_scaling": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ValueError, match=r"config file '.*config.json': .*nested too deeply"):
        M.get_config(p)


@pytest.mark.parametrize("context", ["4097", "99999999999999999999999999"])
def test_info_context_beyond_the_model(capsys, context):
    rc, out, err = _cli(capsys, "info", "tiny", "--context", context)
    assert rc == 2 and out == "" and _one_line(err) and "--context" in err and "max_position_embeddings" in err, err


# ======================================================================== 8. CLI output is one line
@pytest.mark.parametrize("argv, named", [
    (["train", "--bogus"], "--bogus"),
    (["bench", "moe", "--bogus"], "--bogus"),
    (["bench", "attention", "--worker"], "--worker"),
    (["bench", "attention", "--worker", "decode", "x", "1,2", "y"], "--worker"),
    (["train", "--seed", "99999999999999999999"], "--seed"),
])
def test_cli_errors_are_one_line(capsys, argv, named):
    try:
        rc = cli_main(argv)
    except SystemExit as e:
        rc = e.code
    _, err = capsys.readouterr()
    assert rc == 2 and _one_line(err) and named in err, err


@pytest.mark.parametrize("args, named", [
    (["--prompt", "caf\udce9"], "--prompt"),                               # argv bytes that are not UTF-8
    (["--prompt-ids", "99999999999999999999"], "--prompt-ids"),
    (["--prompt-ids", "1,2", "--seed", "99999999999999999999"], "--seed"),
    (["--prompt-ids", ",".join(["1"] * 5000)], "--prompt-ids"),            # longer than the model's context
    (["--prompt-ids", ",".join(["1"] * 5000), "--max-new-tokens", "0"], "--prompt-ids"),
])
def test_generate_errors_are_one_line(ckpt, capsys, args, named):
    rc, out, err = _cli(capsys, "generate", str(ckpt), *args)
    assert rc == 2 and out == "" and _one_line(err) and f"error: {named}" in err, err


def test_a_shard_header_beyond_the_safetensors_limit_is_not_read(copy_ckpt):
    import struct
    f = copy_ckpt / S2
    with open(f, "r+b") as fh:                       # a header length of 2 GB in a 2 GB sparse file
        fh.write(struct.pack("<Q", 2 << 30))
        fh.truncate((2 << 30) + 8)
    with pytest.raises(ValueError, match=rf"shard '.*{S2}': header length 2147483648 is over the 100000000"):
        C.CheckpointReader(copy_ckpt)


def test_a_shard_that_is_a_fifo_is_named_as_such(copy_ckpt):
    (copy_ckpt / S2).unlink()
    os.mkfifo(copy_ckpt / S2)
    with pytest.raises(ValueError, match=rf"points to '.*{S2}', which is not a regular file"):
        C.CheckpointReader(copy_ckpt)


def test_replacing_a_checkpoint_keeps_the_users_other_files(ckpt, copy_ckpt):
    (copy_ckpt / "notes.md").write_text("what I tried")
    (copy_ckpt / "phase1").mkdir()
    (copy_ckpt / "phase1" / "config.json").write_text("{}")
    (copy_ckpt / "tokenizer.json").write_text("{}")                  # a companion of the old checkpoint
    model = M.load(ckpt)                                              # no tokenizer of its own
    M.save(model, copy_ckpt, overwrite=True)
    assert (copy_ckpt / "notes.md").read_text() == "what I tried"
    assert (copy_ckpt / "phase1" / "config.json").read_text() == "{}"
    assert not (copy_ckpt / "tokenizer.json").exists()               # the old model's tokenizer went with it
    C.CheckpointReader(copy_ckpt).validate()
    assert [p.name for p in copy_ckpt.parent.iterdir() if p.name.startswith(".")] == []


def test_a_replace_interrupted_at_the_swap_restores_everything(ckpt, copy_ckpt, monkeypatch):
    (copy_ckpt / "notes.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in copy_ckpt.iterdir()}
    real = os.replace

    def ctrl_c_at_swap(src, dst):
        if Path(dst) == copy_ckpt and Path(src).name.startswith(".ck.tmp-"):
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(C.os, "replace", ctrl_c_at_swap)
    with pytest.raises(KeyboardInterrupt):
        M.save(M.load(ckpt), copy_ckpt, overwrite=True)
    assert {p.name: p.read_bytes() for p in copy_ckpt.iterdir()} == before
    assert [p.name for p in copy_ckpt.parent.iterdir() if p.name.startswith(".")] == []
