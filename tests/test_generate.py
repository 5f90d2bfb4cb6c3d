"""``v4lab generate``: token-id and text prompts, JSON output, seeded sampling, one-line errors."""
import json

import pytest
import torch

from v4lab import cli
from v4lab.checkpoint import make_synthetic_checkpoint
from v4lab.config import get_config
from v4lab.generate import ByteTokenizer, main
from v4lab.model import load


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = get_config("tiny").replace(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
    return make_synthetic_checkpoint(cfg, tmp_path_factory.mktemp("gen") / "m", seed=0)


def test_prompt_ids_json_equals_the_python_api(ckpt, capsys):
    assert cli.main(["generate", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    want = load(ckpt).eval().generate(torch.tensor([[1, 2, 3]]), 5)
    assert res["prompt_ids"] == [1, 2, 3] and res["new_ids"] == want[0, 3:].tolist()


def test_text_prompt_uses_bytes_without_a_tokenizer_and_sampling_is_seeded(ckpt, capsys):
    args = [str(ckpt), "--prompt", "hé", "--max-new-tokens", "4", "--temperature", "1.0", "--seed", "3", "--json"]
    assert main(args) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["prompt_ids"] == [104, 195, 169] and len(a["new_ids"]) == 4
    assert a["text"] == ByteTokenizer(512).decode(a["new_ids"])
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == a
    assert ByteTokenizer(512).decode([104, 300, 195, 169]) == "h<300>é"


def test_text_prompt_uses_the_checkpoint_tokenizer(ckpt, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path / "with_tok"
    shutil.copytree(ckpt, d)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 7, "world": 9}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    assert main([str(d), "--prompt", "hello world", "--max-new-tokens", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_ids"] == [7, 9] and isinstance(res["text"], str)


@pytest.mark.parametrize("args,msg", [
    (["/nonexistent/dir", "--prompt-ids", "1"], "not a directory"),
    (["CK", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["CK", "--prompt-ids", "1,99999"], "vocab_size"),
    (["CK", "--prompt-ids", "1", "--max-new-tokens", "5000"], "max_position_embeddings"),
    (["CK", "--prompt-ids", "1", "--temperature", "-1"], "temperature"),
    (["CK"], "one of the arguments"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(ckpt, capsys, args, msg):
    args = [str(ckpt) if a == "CK" else a for a in args]
    with pytest.raises(SystemExit) as e:
        rc = main(args)
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
