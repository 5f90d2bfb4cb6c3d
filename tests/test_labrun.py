"""v4lab.labrun: optimiser state through safetensors + JSON, resumed runs equal uninterrupted ones, and
train()'s indexer loss during training reaches the indexers only."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from v4lab import labrun
from v4lab.data import TokenData
from v4lab.model import V4Model
from v4lab.train import indexer_params, make_optimizer, micro_config, train


def _site(root, n_pages=24, seed=0):
    """A synthetic Sphinx site with varied words (enough for a 300-entry BPE)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    (root / "library").mkdir(parents=True)
    for i in range(n_pages):
        body = "".join(f"<p>{' '.join(rng.choice(words) for _ in range(60))}.</p>" for _ in range(12))
        (root / "library" / f"p{i:02d}.html").write_text(f'<div class="body" role="main">{body}</div>')
    return root


def _recipe():
    return dict(labrun.RECIPE, config=micro_config(vocab_size=300, index_topk=2), lm1_steps=2, lm1_seq_len=32,
                lm2_steps=4, seq_len=64, warmup=2, indexer_warmup_steps=2, indexer_distill_every=2, eval_every=3,
                eval_windows=1)


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    m = V4Model(micro_config(vocab_size=300))
    opts = make_optimizer(m, "adamw", 1e-3, 0.1)
    m(torch.randint(0, 300, (1, 16)))[0].float().pow(2).mean().backward()
    for o in opts:
        o.step()
    tensors, meta = labrun.optimizer_tensors(opts)
    json.dumps(meta)                                                   # scalars are JSON
    back = labrun.optimizer_states(tensors, json.loads(json.dumps(meta)))
    for o, st in zip(opts, back):
        ref = o.state_dict()
        assert st["param_groups"] == ref["param_groups"]
        assert set(st["state"]) == set(ref["state"])
        for pid, s in ref["state"].items():
            for k, v in s.items():
                assert torch.equal(st["state"][pid][k], v) if torch.is_tensor(v) else st["state"][pid][k] == v


def _final(run_dir):
    ck = labrun.find_checkpoint(run_dir)
    state = json.loads((ck / "state.json").read_text())
    log = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return load_file(str(ck / "model.safetensors")), load_file(str(ck / "optim.safetensors")), state, log


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    root = _site(tmp_path / "html")
    labrun.run(tmp_path / "a", tmp_path / "outa", root, recipe=_recipe(), progress=False, stop_after="lm2")
    # the same run, killed right after its 5th checkpoint (mid-lm2; one per step), then restarted twice
    orig, calls = labrun.save_checkpoint, []

    def crashing(*a, **k):
        orig(*a, **k)
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
    monkeypatch.setattr(labrun, "save_checkpoint", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        labrun.run(tmp_path / "b", tmp_path / "outb", root, recipe=_recipe(), progress=False, ckpt_seconds=0.0)
    monkeypatch.setattr(labrun, "save_checkpoint", orig)
    st = json.loads((labrun.find_checkpoint(tmp_path / "b") / "state.json").read_text())
    assert st["stage"] == "lm2" and 0 < st["next_step"] < 4                 # really resumed mid-stage
    labrun.run(tmp_path / "b", tmp_path / "outb", root, recipe=_recipe(), progress=False, stop_after="lm2")
    ma, oa, sa, la = _final(tmp_path / "a")
    mb, ob, sb, lb = _final(tmp_path / "b")
    assert sa["stage"] == sb["stage"] == "final" and sa["next_step"] == sb["next_step"] == 4
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert [r["step"] for r in lb] == list(range(4))                       # the log has each step once
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    l1 = [json.loads(ln) for ln in (tmp_path / "a" / "train_log_lm1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in l1] == [0, 1] and l1[0]["tokens"] == 32    # the short-sequence stage
    assert all("indexer_kl" not in r and not r["qat"] for r in l1)       # no indexer loss, no QAT in lm1
    assert ["indexer_kl" in r for r in la] == [True, False, True, False]  # every 2nd step of lm2
    assert la[-1]["qat"] and not la[0]["qat"]                             # QAT at the end
    assert json.loads((tmp_path / "a" / "indexer_warmup.json").read_text())["log"]


def test_changed_recipe_is_refused(tmp_path):
    root = _site(tmp_path / "html")
    labrun.run(tmp_path / "r", tmp_path / "o", root, recipe=_recipe(), progress=False, stop_after="lm1")
    st = labrun.status(tmp_path / "r")
    assert st["stage_at_checkpoint"] == "warmup" and st["checkpoint_step"] == 0 and st["steps_logged"] == 0
    assert st["lm_stage"] == "lm2" and st["lm_steps_left"] == 4 and st["wall_seconds_per_step_recent"] is None
    with pytest.raises(ValueError, match="no run"):
        labrun.status(tmp_path / "o")
    with pytest.raises(ValueError, match="recipe.*differs"):
        labrun.run(tmp_path / "r", tmp_path / "o", root, recipe=dict(_recipe(), lr=1.0), progress=False)


def _data(V=300, seed=0):
    g = torch.Generator().manual_seed(seed)

    class Tok:
        def get_vocab_size(self):
            return V
    return TokenData(torch.randint(0, V, (4000,), generator=g), torch.randint(0, V, (600,), generator=g), Tok(), {})


def test_indexer_distillation_trains_the_indexer_only():
    cfg = micro_config(vocab_size=300, index_topk=2)
    # one step: after it the indexer picks other entries, so later LM steps differ legitimately; a clip
    # that is always active shows that the indexer's gradients do not change the LM's clipping
    kw = dict(data=_data(), steps=1, batch_size=2, seq_len=64, warmup=1, grad_clip=1e-3, progress=False,
              balanced_hash=False)
    off = train(cfg, indexer_distill_weight=0.0, **kw)
    on = train(cfg, indexer_distill_weight=1.0, **kw)
    idx = {id(p) for p in indexer_params(on["model"])}
    names_idx = {n for n, p in on["model"].named_parameters() if id(p) in idx}
    assert names_idx and all(".attn.indexer." in n for n in names_idx)
    so, sn = off["model"].state_dict(), on["model"].state_dict()
    torch.manual_seed(0)
    init = V4Model(cfg).state_dict()
    for k in so:
        if k in names_idx:
            assert torch.equal(so[k], init[k]) and not torch.equal(sn[k], init[k]), k   # only "on" moves them
        else:
            assert torch.equal(so[k], sn[k]), k                                          # LM untouched
    assert [r["lm_loss"] for r in off["log"]] == [r["lm_loss"] for r in on["log"]]
    assert all(r["indexer_kl"] > 0 and 0 <= r["indexer_recall"] <= 1 for r in on["log"])
    assert on["log"][-1]["loss"] > on["log"][-1]["lm_loss"]


def test_start_stop_steps_are_checked():
    with pytest.raises(ValueError, match="start_step"):
        train(micro_config(vocab_size=300), data=_data(), steps=4, start_step=3, stop_step=2, progress=False)
    with pytest.raises(ValueError, match="indexer_distill_weight"):
        train(micro_config(vocab_size=300), data=_data(), steps=4, indexer_distill_weight=-1.0, progress=False)
    with pytest.raises(ValueError, match="indexer_distill_every"):
        train(micro_config(vocab_size=300), data=_data(), steps=4, indexer_distill_every=0, progress=False)


@pytest.mark.slow
def test_full_run_writes_the_release_and_a_rerun_changes_nothing(tmp_path):
    root = _site(tmp_path / "html")
    out = tmp_path / "out"
    st = labrun.run(tmp_path / "run", out, root, recipe=_recipe(), progress=False)
    assert st["stage"] == "done"
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "heldout.txt", "train_log.jsonl",
              "train_log_lm1.jsonl",
              "indexer_warmup.json", "training_summary.json", "bigram_counts.safetensors"):
        assert (out / f).is_file(), f
    s = json.loads((out / "training_summary.json").read_text())
    assert s["targets"]["heldout"]["tokens"] > 0 and set(s["targets"]["passed"]) >= {"below_bigram", "indexer_recall"}
    assert s["corpus"]["documents"] == 24 and s["cpu_seconds_total"] >= s["cpu_seconds_training"] > 0
    assert not (tmp_path / "out.tmp").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert labrun.run(tmp_path / "run", out, root, recipe=_recipe(), progress=False)["stage"] == "done"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
def test_continuation_starts_from_the_release_and_adds_its_cpu(tmp_path):
    from v4lab import model as model_mod
    from v4lab.checkpoint import shards_fingerprint
    root = _site(tmp_path / "html")
    a = tmp_path / "a_out"
    labrun.run(tmp_path / "a", a, root, recipe=_recipe(), progress=False)
    cont = dict(_recipe(), init=str(a), lm1_steps=0, indexer_warmup_steps=0, lm2_steps=3, lm2_seed=2, lm2_warmup=2)
    b = tmp_path / "b_out"
    # stop before any step: the starting model is the release's weights, read back
    labrun.run(tmp_path / "b", b, root, recipe=cont, progress=False, stop_after="warmup")
    start = labrun.find_checkpoint(tmp_path / "b")
    want = model_mod.load(a, keep_quantized=False).state_dict()
    got = load_file(str(start / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    st = labrun.run(tmp_path / "b", b, root, recipe=cont, progress=False)
    assert st["stage"] == "done"
    sa = json.loads((a / "training_summary.json").read_text())
    sb = json.loads((b / "training_summary.json").read_text())
    assert sb["init"]["weights_sha256"] == shards_fingerprint(a)
    assert sb["cpu_seconds_training"] > sa["cpu_seconds_total"] and sb["cpu_seconds_this_stage"] > 0
    # the release keeps the history: run A's lm1 and lm2 logs beside this run's own
    assert (b / "train_log_lm1.jsonl").read_bytes() == (a / "train_log_lm1.jsonl").read_bytes()
    assert (b / "train_log_lm2.jsonl").read_bytes() == (a / "train_log.jsonl").read_bytes()
    assert len((b / "train_log.jsonl").read_text().splitlines()) == 3


def test_continuation_refuses_a_folder_without_a_release(tmp_path):
    root = _site(tmp_path / "html")
    cont = dict(_recipe(), init=str(tmp_path / "nothing"), lm1_steps=0, indexer_warmup_steps=0)
    with pytest.raises(ValueError, match="init.*not a release directory"):
        labrun.run(tmp_path / "b", tmp_path / "o", root, recipe=cont, progress=False)


@pytest.mark.slow
def test_continuation_refuses_a_release_of_another_shape(tmp_path):
    root = _site(tmp_path / "html")
    a = tmp_path / "a_out"
    labrun.run(tmp_path / "a", a, root, recipe=_recipe(), progress=False)
    other = micro_config(vocab_size=300, index_topk=2).replace(hidden_size=48)
    cont = dict(_recipe(), config=other, init=str(a), lm1_steps=0, indexer_warmup_steps=0)
    with pytest.raises(ValueError, match="init.*does not fit config"):
        labrun.run(tmp_path / "b", tmp_path / "o", root, recipe=cont, progress=False)
    assert not (tmp_path / "o").exists()
