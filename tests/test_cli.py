"""`v4lab info` and `v4lab compare`, through v4lab.cli.main and once as a real process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v4lab import accounting as acc
from v4lab.cli import main
from v4lab.config import get_config

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_json(capsys):
    rc, out, err = run(capsys, "info", "v4-flash", "--json")
    assert rc == 0 and err == ""
    d = json.loads(out)
    for k in ("total_params", "active_params", "kv_cache_bytes", "decode_flops", "context"):
        assert k in d
    assert d["context"] == 2 ** 20
    assert d["total_params"] == acc.params("v4-flash")["total"]
    assert set(d["params"]["by_component"]) == set(acc.COMPONENTS)
    assert {p["part"] for p in d["kv_cache"]["parts"]} == {"window_kv", "compressed_kv", "indexer_keys"}
    assert d["decode_flops"] == pytest.approx(acc.decode_flops("v4-flash", 2 ** 20)["total"])


@pytest.mark.parametrize("ctx, n", [("128K", 131072), ("1M", 2 ** 20), ("65536", 65536), ("1m", 2 ** 20)])
def test_context_suffixes(capsys, ctx, n):
    rc, out, _ = run(capsys, "info", "v4-flash", "--context", ctx, "--json")   # contexts within its 1M
    assert rc == 0 and json.loads(out)["context"] == n
    assert json.loads(out)["kv_cache_bytes"] == acc.kv_cache("v4-flash", n)["total_bytes"]


def test_info_table(capsys):
    rc, out, _ = run(capsys, "info", "v4-pro", "--context", "128K")
    assert rc == 0
    for word in ("routed_experts", "compressor", "indexer", "mhc", "KV cache", "FP4", "448 FP8", "scheme B",
                 "core_attention", "131,072"):
        assert word in out, word
    assert not out.lstrip().startswith("{")


def test_info_from_a_config_file(tmp_path, capsys):
    get_config("v4-flash").to_json(tmp_path / "config.json")
    rc, out, _ = run(capsys, "info", str(tmp_path / "config.json"), "--json")
    assert rc == 0 and json.loads(out)["total_params"] == acc.params("v4-flash")["total"]
    rc, out, _ = run(capsys, "info", str(tmp_path), "--json")  # a checkpoint folder works too
    assert rc == 0 and json.loads(out)["name"] == tmp_path.name


def test_compare_json_ratios(capsys):
    rc, out, _ = run(capsys, "compare", "v4-pro", "v3.2", "--json")
    assert rc == 0
    d = json.loads(out)
    assert set(d["ratios"]) == {"total_params", "active_params", "kv_cache_bytes", "decode_flops"}
    assert abs(d["ratios"]["kv_cache_bytes"] - 0.10) < 0.01 and abs(d["ratios"]["decode_flops"] - 0.27) < 0.02
    assert d["a"]["name"] == "v4-pro" and d["b"]["name"] == "v3.2"


def test_compare_markdown(capsys):
    rc, out, _ = run(capsys, "compare", "v4-flash", "v3.2", "--context", "1M")
    lines = out.strip().splitlines()
    assert rc == 0 and lines[0].startswith("| | v4-flash | v3.2 |") and lines[1].startswith("|---")
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    kv = next(line for line in lines if line.startswith("| KV cache @ 1M"))
    assert kv.endswith("| 7.3% |")


BAD = [
    (["info", "v5"], "unknown preset"),
    (["info", "/nonexistent/config.json"], "cannot be read"),
    (["info", "tiny", "--context", "12X"], "--context"),
    (["info", "tiny", "--context", "0"], "--context"),
    (["info", "tiny", "--context", "-3"], "--context"),
    (["compare", "v4-pro", "nope"], "unknown preset"),
    (["compare", "v4-pro", "v3", "--context", "1.3K"], "whole number"),
]


@pytest.mark.parametrize("argv, fragment", BAD)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("v4lab: error:") and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("content, fragment", [
    ("{broken", "not valid JSON"),
    ('{"model_type": "deepseek_v4", "compress_ratios": [0, 0], "num_hidden_layers": 1, "num_hash_layers": 0, '
     '"o_groups": 3}', "o_groups"),
    ('{"model_type": "deepseek_v4", "compress_ratios": [0, 0], "num_hidden_layers": "one"}', "num_hidden_layers"),
    ('{"model_type": "deepseek_v4", "compress_ratios": "all"}', "compress_ratios"),
    ('{"model_type": "deepseek_v4", "compress_ratios": [0, 0], "num_hidden_layers": 1, "num_hash_layers": 0, '
     '"rope_scaling": {"factor": "x"}}',
     "rope_scaling.factor"),
    ('"just a string"', "JSON object"),
])
def test_malformed_file_is_one_line_and_exit_2(tmp_path, capsys, content, fragment):
    p = tmp_path / "bad.json"
    p.write_text(content)
    rc, out, err = run(capsys, "info", str(p))
    assert rc == 2 and out == "" and err.count("\n") == 1 and fragment in err, err


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "v4-pro"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_as_a_process():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run([sys.executable, "-m", "v4lab.cli", "compare", "v4-flash", "v3.2", "--json"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert abs(json.loads(ok.stdout)["ratios"]["decode_flops"] - 0.10) < 0.02
    bad = subprocess.run([sys.executable, "-m", "v4lab.cli", "info", "no-such-model"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("v4lab: error:") and bad.stderr.count("\n") == 1
