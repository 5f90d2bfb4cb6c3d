"""The catalogue of bad inputs, table-driven: command line, config, checkpoint, model API.

Every case runs in a fresh workspace (a micro checkpoint ``ck``, a user's folder ``mine`` with a file in
it, a plain file ``notes.txt``, a valid ``micro.json``) after its own ``prep`` has planted the bad input.
For each case the test asserts: the exit code (2) or the exception type (ValueError); one line (no
traceback, no usage dump); the argument or key named in it; and that nothing in the workspace changed
(every path, file hash and link target is the same before and after). README, "Bad input", states the
guarantee these cases check.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from v4lab import checkpoint as C
from v4lab import model as M
from v4lab import train as T
from v4lab.cli import main as cli_main
from v4lab.config import get_config

S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


# ------------------------------------------------------------------------------------------ workspace
@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    return C.make_synthetic_checkpoint(T.micro_config(), tmp_path_factory.mktemp("cat") / "ck", seed=0)


@pytest.fixture(scope="module")
def micro_model(micro_ckpt):
    return M.load(micro_ckpt).eval()


@pytest.fixture
def ws(micro_ckpt, tmp_path):
    shutil.copytree(micro_ckpt, tmp_path / "ck")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work\n")
    (tmp_path / "notes.txt").write_text("keep me\n")
    T.micro_config().to_json(tmp_path / "micro.json")
    return tmp_path


BIG = 64 << 20


def snapshot(root: Path) -> dict:
    """Every path under root: ('dir',) | ('file', sha256) | ('link', target) | ('special', type), and for
    files over 64 MiB (the sparse "huge file" cases) size, mtime and inode instead of a hash. Never opens
    anything but regular files (a FIFO would block)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif stat.S_ISREG(p.lstat().st_mode) and p.lstat().st_size > BIG:    # the planted sparse files
                st = p.lstat()
                out[rel] = ("big file", st.st_size, st.st_mtime_ns, st.st_ino)
            elif stat.S_ISREG(p.lstat().st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("special", stat.S_IFMT(p.lstat().st_mode))
    return out


# ------------------------------------------------------------------------------------------ preps
def _index(ws):
    return json.loads((ws / "ck" / C.INDEX_FILE).read_text())


def _set_index(ws, change):
    idx = _index(ws)
    change(idx["weight_map"])
    (ws / "ck" / C.INDEX_FILE).write_text(json.dumps(idx))


def _remap(shard_to):
    """Point every key of the second (MTP) shard at ``shard_to``."""
    def prep(ws):
        _set_index(ws, lambda wm: wm.update({k: shard_to for k, v in wm.items() if v == S2}))
    return prep


def _outside_link(ws):
    shutil.move(ws / "ck" / S2, ws / "elsewhere.safetensors")
    (ws / "ck" / S2).symlink_to(ws / "elsewhere.safetensors")


def _poke(name, change):
    def prep(ws):
        shard = _index(ws)["weight_map"][name]
        with safe_open(str(ws / "ck" / shard), "pt") as f:
            ts = {k: f.get_tensor(k) for k in f.keys()}
        ts[name] = change(ts[name].clone())
        save_file(ts, str(ws / "ck" / shard), metadata={"format": "pt"})
    return prep


def _at(i, v):
    def change(t):
        t.view(-1)[i] = v
        return t
    return change


def _fp8_nan(t):
    b = t.view(torch.uint8).clone()
    b.view(-1)[0] = 0x7F
    return b.view(torch.float8_e4m3fn)


def _e8m0_nan(t):
    b = t.view(torch.uint8).clone()
    b.view(-1)[0] = 255
    return b.view(torch.float8_e8m0fnu)


def _write(rel, data):
    def prep(ws):
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return prep


def _fifo(rel):
    def prep(ws):
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists():
            p.unlink()
        os.mkfifo(p)
    return prep


def _link(rel, target):
    def prep(ws):
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)
    return prep


def _sparse(rel, size):
    def prep(ws):
        with open(ws / rel, "wb") as f:
            f.truncate(size)
    return prep


def _truncate_shard(ws):
    f = ws / "ck" / S1
    f.write_bytes(f.read_bytes()[:-100])


def _header_length(n):
    def prep(ws):
        with open(ws / "ck" / S2, "r+b") as f:
            f.write(n.to_bytes(8, "little"))
    return prep


def _cfg(**change):
    d = T.micro_config().to_dict()
    d.update(change)
    return _write("c/config.json", json.dumps(d))


def _both(*preps):
    def prep(ws):
        for p in preps:
            p(ws)
    return prep


# ------------------------------------------------------------------------------------------ the table
# (category, id, prep or None, action, named). action: a list = v4lab argv ({ws} is the workspace), or a
# callable(ws, model) for the API. Every CLI case must exit 2; every API case must raise ValueError.
LONG = ",".join(["1"] * 5000)
CASES = [
    # ---- command line: info / compare
    ("cli", "info-unknown-preset", None, ["info", "v5"], "'v5'"),
    ("cli", "info-missing-file", None, ["info", "{ws}/nope.json"], "nope.json"),
    ("cli", "info-dev-zero", None, ["info", "/dev/zero"], "/dev/zero"),
    ("cli", "info-fifo-config", _fifo("f/config.json"), ["info", "{ws}/f/config.json"], "config.json"),
    ("cli", "info-link-to-dev-zero", _link("z/config.json", "/dev/zero"), ["info", "{ws}/z/config.json"],
     "config.json"),
    ("cli", "info-huge-config", _sparse("big.json", 300 << 20), ["info", "{ws}/big.json"], "big.json"),
    ("cli", "info-user-folder", None, ["info", "{ws}/mine"], "config.json"),
    ("cli", "info-context-letters", None, ["info", "tiny", "--context", "12X"], "--context"),
    ("cli", "info-context-zero", None, ["info", "tiny", "--context", "0"], "--context"),
    ("cli", "info-context-fraction", None, ["info", "tiny", "--context", "1.3K"], "--context"),
    ("cli", "info-context-too-long", None, ["info", "tiny", "--context", "4097"], "--context"),
    ("cli", "info-context-absurd", None, ["info", "v4-flash", "--context", "9" * 40], "--context"),
    ("cli", "info-unknown-flag", None, ["info", "tiny", "--bogus"], "--bogus"),
    ("cli", "info-no-config", None, ["info"], "config"),
    ("cli", "compare-one-missing", None, ["compare", "v4-pro"], "b"),
    ("cli", "compare-bad-second", None, ["compare", "v4-pro", "nope"], "'nope'"),
    ("cli", "unknown-command", None, ["frobnicate"], "'frobnicate'"),
    # ---- command line: bench
    ("cli", "bench-unknown", None, ["bench", "nope"], "nope"),
    ("cli", "bench-moe-flag", None, ["bench", "moe", "--bogus"], "--bogus"),
    ("cli", "bench-quant-flag", None, ["bench", "quant", "--bogus"], "--bogus"),
    ("cli", "bench-kernels-flag", None, ["bench", "kernels", "--bogus"], "--bogus"),
    ("cli", "bench-device-flag", None, ["bench", "device", "--bogus"], "--bogus"),
    ("cli", "bench-widgets-flag", None, ["bench", "widgets", "--bogus"], "--bogus"),
    ("cli", "bench-attention-flag", None, ["bench", "attention", "--bogus"], "--bogus"),
    ("cli", "bench-worker-bare", None, ["bench", "attention", "--worker"], "--worker"),
    ("cli", "bench-worker-garbage", None, ["bench", "attention", "--worker", "decode", "x", "a,b", "y"], "--worker"),
    ("cli", "bench-bad-device", None, ["bench", "moe", "--device", "tpu"], "tpu"),
    # ---- command line: generate
    ("cli", "gen-missing-dir", None, ["generate", "{ws}/absent", "--prompt-ids", "1"], "absent"),
    ("cli", "gen-user-folder", None, ["generate", "{ws}/mine", "--prompt-ids", "1"], "config.json"),
    ("cli", "gen-no-prompt", None, ["generate", "{ws}/ck"], "--prompt"),
    ("cli", "gen-two-prompts", None, ["generate", "{ws}/ck", "--prompt", "a", "--prompt-ids", "1"], "--prompt"),
    ("cli", "gen-ids-not-numbers", None, ["generate", "{ws}/ck", "--prompt-ids", "1,x"], "--prompt-ids"),
    ("cli", "gen-ids-empty", None, ["generate", "{ws}/ck", "--prompt-ids", ","], "--prompt-ids"),
    ("cli", "gen-id-beyond-vocab", None, ["generate", "{ws}/ck", "--prompt-ids", "512"], "vocab_size"),
    ("cli", "gen-id-huge", None, ["generate", "{ws}/ck", "--prompt-ids", "9" * 20], "--prompt-ids"),
    ("cli", "gen-seed-huge", None, ["generate", "{ws}/ck", "--prompt-ids", "1", "--seed", "9" * 20], "--seed"),
    ("cli", "gen-prompt-not-utf8", None, ["generate", "{ws}/ck", "--prompt", "caf\udce9"], "--prompt"),
    ("cli", "gen-prompt-too-long", None, ["generate", "{ws}/ck", "--prompt-ids", LONG], "--prompt-ids"),
    ("cli", "gen-context-full", None, ["generate", "{ws}/ck", "--prompt-ids", "1,2", "--max-new-tokens", "4095"],
     "max_new_tokens"),
    ("cli", "gen-negative-new", None, ["generate", "{ws}/ck", "--prompt-ids", "1", "--max-new-tokens", "-1"],
     "max_new_tokens"),
    ("cli", "gen-negative-temperature", None, ["generate", "{ws}/ck", "--prompt-ids", "1", "--temperature", "-1"],
     "temperature"),
    ("cli", "gen-nan-temperature", None, ["generate", "{ws}/ck", "--prompt-ids", "1", "--temperature", "nan"],
     "temperature"),
    ("cli", "gen-top-k-zero", None, ["generate", "{ws}/ck", "--prompt-ids", "1", "--top-k", "0"], "top_k"),
    ("cli", "gen-bad-device", None, ["generate", "{ws}/ck", "--prompt-ids", "1", "--device", "tpu"], "tpu"),
    ("cli", "gen-nan-head", _poke("head.weight", _at(3, float("nan"))),
     ["generate", "{ws}/ck", "--prompt-ids", "1"], "'head.weight'"),
    ("cli", "gen-tokenizer-fifo", _fifo("ck/tokenizer.json"), ["generate", "{ws}/ck", "--prompt", "hi"],
     "tokenizer.json"),
    ("cli", "gen-tokenizer-garbage", _write("ck/tokenizer.json", "{not a tokenizer"),
     ["generate", "{ws}/ck", "--prompt", "hi"], "tokenizer.json"),
    # ---- command line: train (every one fails before the slow set-up)
    ("cli", "train-unknown-flag", None, ["train", "--bogus"], "--bogus"),
    ("cli", "train-steps-zero", None, ["train", "--steps", "0"], "--steps"),
    ("cli", "train-seq-len-one", None, ["train", "--seq-len", "1"], "--seq-len"),
    ("cli", "train-steps-not-int", None, ["train", "--steps", "ten"], "--steps"),
    ("cli", "train-seed-huge", None, ["train", "--seed", "9" * 20], "--seed"),
    ("cli", "train-bad-device", None, ["train", "--device", "tpu"], "tpu"),
    ("cli", "train-out-user-folder", None, ["train", "--config", "{ws}/micro.json", "--out", "{ws}/mine"], "--out"),
    ("cli", "train-out-file", None, ["train", "--config", "{ws}/micro.json", "--out", "{ws}/notes.txt"], "--out"),
    ("cli", "train-out-under-file", None, ["train", "--config", "{ws}/micro.json", "--out", "{ws}/notes.txt/run"],
     "--out"),
    ("cli", "train-out-dotdot", None, ["train", "--config", "{ws}/micro.json", "--out", "{ws}/mine/.."], "--out"),
    ("cli", "train-out-symlink", _link("lnk", "mine"), ["train", "--config", "{ws}/micro.json", "--out", "{ws}/lnk"],
     "--out"),
    ("cli", "train-unknown-config", None, ["train", "--config", "v5"], "'v5'"),
    ("cli", "train-warmup-without-init", None, ["train", "--indexer-warmup", "5"], "--indexer-warmup"),
    ("cli", "train-init-user-folder", None, ["train", "--init", "{ws}/mine", "--out", "{ws}/run"], "config.json"),
    # ---- config files and values
    ("config", "file-not-json", _write("c/config.json", "{broken"), lambda ws, m: get_config(ws / "c/config.json"),
     "config.json"),
    ("config", "file-not-utf8", _write("c/config.json", b"\xff\xfe{}"), lambda ws, m: get_config(ws / "c/config.json"),
     "UTF-8"),
    ("config", "file-nested-deep", _write("c/config.json", '{"a": ' + "[" * 50000 + "]" * 50000 + "}"),
     lambda ws, m: get_config(ws / "c/config.json"), "nested"),
    ("config", "file-top-level-list", _write("c/config.json", "[1, 2]"), lambda ws, m: get_config(ws / "c/config.json"),
     "JSON object"),
    ("config", "file-hidden-size-string", _cfg(hidden_size="big"), lambda ws, m: get_config(ws / "c/config.json"),
     "'hidden_size'"),
    ("config", "file-no-compress-ratios",
     _write("c/config.json", '{"model_type": "deepseek_v4"}'), lambda ws, m: get_config(ws / "c/config.json"),
     "'compress_ratios'"),
    ("config", "file-model-type", _cfg(model_type="llama"), lambda ws, m: get_config(ws / "c/config.json"),
     "'model_type'"),
    ("config", "file-qc-string", _cfg(quantization_config="fp8"), lambda ws, m: get_config(ws / "c/config.json"),
     "'quantization_config'"),
    ("config", "scaling-nan", None, lambda ws, m: T.micro_config(routed_scaling_factor=float("nan")),
     "'routed_scaling_factor'"),
    ("config", "scaling-inf", None, lambda ws, m: T.micro_config(routed_scaling_factor=float("inf")),
     "'routed_scaling_factor'"),
    ("config", "init-range-nan", None, lambda ws, m: T.micro_config(initializer_range=float("nan")),
     "'initializer_range'"),
    ("config", "dropout-two", None, lambda ws, m: T.micro_config(attention_dropout=2.0), "'attention_dropout'"),
    ("config", "block-size-zero", None,
     lambda ws, m: T.micro_config(quantization_config={"weight_block_size": [0, 0]}),
     "'quantization_config.weight_block_size'"),
    ("config", "window-huge", None, lambda ws, m: T.micro_config(sliding_window=10 ** 18), "'sliding_window'"),
    ("config", "fp4-width", None, lambda ws, m: C.expected_keys(T.micro_config(moe_intermediate_size=48)),
     "'moe_intermediate_size'"),
    ("config", "unknown-preset", None, lambda ws, m: get_config("v5"), "'v5'"),
    # ---- checkpoint reading
    ("checkpoint", "shard-dotdot", _both(lambda ws: shutil.copy(ws / "ck" / S2, ws / "up.safetensors"),
                                         _remap("../up.safetensors")),
     lambda ws, m: M.load(ws / "ck"), "../up.safetensors"),
    ("checkpoint", "shard-absolute", _remap("/etc/passwd"), lambda ws, m: M.load(ws / "ck"), "/etc/passwd"),
    ("checkpoint", "shard-link-outside", _outside_link, lambda ws, m: M.load(ws / "ck"), S2),
    ("checkpoint", "shard-is-number", lambda ws: _set_index(ws, lambda wm: wm.update({"norm.weight": 5})),
     lambda ws, m: M.load(ws / "ck"), "'norm.weight'"),
    ("checkpoint", "shard-is-null", lambda ws: _set_index(ws, lambda wm: wm.update({"norm.weight": None})),
     lambda ws, m: M.load(ws / "ck"), "'norm.weight'"),
    ("checkpoint", "index-not-utf8", _write("ck/" + C.INDEX_FILE, b'{"weight_map": {"\xff": 1}}'),
     lambda ws, m: M.load(ws / "ck"), C.INDEX_FILE),
    ("checkpoint", "index-fifo", _fifo("ck/" + C.INDEX_FILE), lambda ws, m: M.load(ws / "ck"), C.INDEX_FILE),
    ("checkpoint", "index-huge", _sparse("ck/" + C.INDEX_FILE, 300 << 20), lambda ws, m: M.load(ws / "ck"),
     C.INDEX_FILE),
    ("checkpoint", "config-fifo", _fifo("ck/config.json"), lambda ws, m: M.load(ws / "ck"), "config.json"),
    ("checkpoint", "shard-truncated", _truncate_shard, lambda ws, m: M.load(ws / "ck"), S1),
    ("checkpoint", "shard-fifo", _both(lambda ws: (ws / "ck" / S2).unlink(), _fifo("ck/" + S2)),
     lambda ws, m: M.load(ws / "ck"), S2),
    ("checkpoint", "shard-header-length-huge", _header_length(2 << 30), lambda ws, m: M.load(ws / "ck"), S2),
    ("checkpoint", "shard-missing", lambda ws: (ws / "ck" / S2).unlink(), lambda ws, m: M.load(ws / "ck"), S2),
    ("checkpoint", "nan-head", _poke("head.weight", _at(0, float("nan"))), lambda ws, m: M.load(ws / "ck"),
     "'head.weight'"),
    ("checkpoint", "inf-norm", _poke("norm.weight", _at(0, float("inf"))), lambda ws, m: M.load(ws / "ck"),
     "'norm.weight'"),
    ("checkpoint", "nan-router-bias", _poke("layers.1.ffn.gate.bias", _at(0, float("nan"))),
     lambda ws, m: M.load(ws / "ck"), "'layers.1.ffn.gate.bias'"),
    ("checkpoint", "nan-fp8-weight", _poke("layers.1.attn.wkv.weight", _fp8_nan), lambda ws, m: M.load(ws / "ck"),
     "'layers.1.attn.wkv.weight'"),
    ("checkpoint", "nan-scale", _poke("layers.1.ffn.experts.0.w1.scale", _e8m0_nan), lambda ws, m: M.load(ws / "ck"),
     "'layers.1.ffn.experts.0.w1.scale'"),
    ("checkpoint", "tid2eid-range", _poke("layers.0.ffn.gate.tid2eid", _at(0, 8)), lambda ws, m: M.load(ws / "ck"),
     "'layers.0.ffn.gate.tid2eid'"),
    ("checkpoint", "tid2eid-duplicate", _poke("layers.0.ffn.gate.tid2eid", lambda t: t[:, :1].repeat(1, 2)),
     lambda ws, m: M.load(ws / "ck"), "'layers.0.ffn.gate.tid2eid'"),
    ("checkpoint", "tokenizer-huge", _sparse("ck/tokenizer.json", 300 << 20),
     lambda ws, m: _load_tokenizers(ws / "ck"), "tokenizer.json"),
    ("checkpoint", "load-none", None, lambda ws, m: M.load(None), "path"),
    ("checkpoint", "load-int-dtype", None, lambda ws, m: M.load(ws / "ck", dtype="int8"), "dtype"),
    ("checkpoint", "load-layer-out-of-range", None, lambda ws, m: M.load_layer(ws / "ck", 9), "layer"),
    # ---- checkpoint writing
    ("checkpoint", "save-over-user-folder", None, lambda ws, m: M.save(m, ws / "mine", overwrite=True), "mine"),
    ("checkpoint", "save-over-file", None, lambda ws, m: M.save(m, ws / "notes.txt", overwrite=True), "notes.txt"),
    ("checkpoint", "save-dotdot", None, lambda ws, m: M.save(m, f"{ws}/mine/..", overwrite=True), ".."),
    ("checkpoint", "save-exists", None, lambda ws, m: M.save(m, ws / "ck"), "already exists"),
    ("checkpoint", "save-extra-file-escapes", None,
     lambda ws, m: M.save(m, ws / "new", extra_files={"../evil": b"x"}), "'../evil'"),
    ("checkpoint", "save-extra-file-is-a-shard", None,
     lambda ws, m: M.save(m, ws / "new", extra_files={S1: b"x"}), S1),
    ("checkpoint", "save-non-finite", None, lambda ws, m: _save_nan(ws, m), "'norm.weight'"),
    ("checkpoint", "save-not-a-model", None, lambda ws, m: M.save({"a": 1}, ws / "new"), "model"),
    # ---- model API
    ("model", "empty-batch", None, lambda ws, m: m(torch.zeros(0, 3, dtype=torch.long)), "input_ids"),
    ("model", "id-beyond-vocab", None, lambda ws, m: m(torch.tensor([[512]])), "input_ids"),
    ("model", "float-ids", None, lambda ws, m: m(torch.tensor([[1.0]])), "input_ids"),
    ("model", "start-pos-no-cache", None, lambda ws, m: m(torch.tensor([[1]]), start_pos=3), "start_pos"),
    ("model", "cache-other-model", None, lambda ws, m: m(torch.tensor([[1]]), cache=_other(m).new_cache(1)), "cache"),
    ("model", "cache-batch", None, lambda ws, m: m(torch.tensor([[1]]), cache=m.new_cache(2)), "cache"),
    ("model", "forced-float", None,
     lambda ws, m: m(torch.tensor([[1]]), forced_routes=[None, torch.tensor([[0.0, 1.0]])]),
     "forced_routes[1]"),
    ("model", "forced-range", None, lambda ws, m: m(torch.tensor([[1]]), forced_routes=[None, torch.tensor([[0, 8]])]),
     "forced_routes[1]"),
    ("model", "forced-duplicate", None,
     lambda ws, m: m(torch.tensor([[1]]), forced_routes=[None, torch.tensor([[2, 2]])]),
     "forced_routes[1]"),
    ("model", "forced-hash-layer", None,
     lambda ws, m: m(torch.tensor([[1]]), forced_routes=[torch.tensor([[0, 1]]), None]),
     "forced_routes[0]"),
    ("model", "new-cache-zero", None, lambda ws, m: m.new_cache(0), "batch_size"),
    ("model", "generate-negative", None, lambda ws, m: m.generate([1], -1), "max_new_tokens"),
    ("model", "generate-seed-huge", None, lambda ws, m: m.generate([1], 1, seed=10 ** 30), "seed"),
    ("model", "generate-prompt-too-long", None, lambda ws, m: m.generate([1] * 4097, 0), "prompt_ids"),
    ("model", "hc-mode", None, lambda ws, m: M.V4Model(T.micro_config(), hc_mode="mhc2"), "hc_mode"),
]


def _save_nan(ws, m):
    bad = M.load(ws / "ck")
    with torch.no_grad():
        bad.norm.weight[1] = float("nan")
    M.save(bad, ws / "new")


def _load_tokenizers(path):
    """Every reader of a tokenizer.json: training/generation's, the real-weights one, the notebooks' one."""
    from v4lab import data, real
    from v4lab.viz import trained
    for load in (data.load_tokenizer, real.load_tokenizer, lambda p: trained.load_dir(p)):
        try:
            load(path)
        except ValueError as e:
            assert "larger than" in str(e), e
        else:
            raise AssertionError(f"{load} read a 300 MiB tokenizer.json")
    raise ValueError(f"tokenizer {str(path / 'tokenizer.json')!r}: every reader refused it (larger than the cap)")


def _other(m):
    return M.V4Model(m.cfg)


def _ids(cases):
    return [f"{c[0]}:{c[1]}" for c in cases]


def test_catalogue_ids_are_unique():
    assert len(set(_ids(CASES))) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bad_input(case, ws, micro_model, capsys):
    category, _, prep, action, named = case
    if prep is not None:
        prep(ws)
    before = snapshot(ws)
    capsys.readouterr()
    if isinstance(action, list):
        argv = [a.replace("{ws}", str(ws)) for a in action]
        try:
            rc = cli_main(argv)
        except SystemExit as e:                       # argparse's exit, one line (OneLineParser)
            rc = e.code
        out, err = capsys.readouterr()
        assert rc == 2, (rc, err)
        assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert named in err, err
    else:
        with pytest.raises(ValueError) as e:
            action(ws, micro_model)
        msg = str(e.value)
        assert "\n" not in msg and named in msg, msg
    assert snapshot(ws) == before                     # nothing created, changed or deleted


def test_catalogue_covers_every_category():
    counts = {}
    for c in CASES:
        counts[c[0]] = counts.get(c[0], 0) + 1
    assert set(counts) == {"cli", "config", "checkpoint", "model"} and min(counts.values()) >= 10, counts
