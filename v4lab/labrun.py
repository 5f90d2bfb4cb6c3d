"""Train ``data/lab-v4`` with the V4 recipe, resumably: ``python -m v4lab.labrun`` (= ``v4lab labrun``).

Stages (one fixed recipe, ``RECIPE``; every number is explained in data/README.md):

1. ``lm1``    ``lm1_steps`` language-model steps on ``lm1_seq_len``-token sequences (``v4lab.train.train``),
              warm-up then a constant lr: next-token + MTP + balance loss, aux-loss-free bias update,
              hash-routed layer 0. Short sequences first, as V4 lengthens its sequences in stages; on this
              CPU a 512-token step costs a quarter of a 2048-token one, so it makes 4x the updates.
2. ``warmup`` the CSA indexer warm-up (``v4lab.train.indexer_warmup``): everything but the indexers frozen,
              KL from the main attention's weights on the compressed entries to the indexer's softmax.
3. ``lm2``    ``lm2_steps`` steps on ``seq_len``-token sequences, cosine from ``lr`` to ``min_lr_ratio``·lr,
              the indexer loss kept on (``indexer_distill_weight``, every ``indexer_distill_every`` steps),
              FP4 QAT of the routed experts from ``qat_from`` of the stage. Each stage logs its own steps
              (``train_log_lm1.jsonl``, ``train_log.jsonl``).
4. ``final``  the official layout (FP8 attention, FP4 experts) + tokenizer + heldout.txt + logs +
              training_summary.json (with the targets of ``v4lab.labeval``) written to OUT.

Resuming: the run folder (default ``runs/lab-v4``, git-ignored) holds ``ckpt/`` = the model's fp32 state
(``model.safetensors``), the optimiser's state tensors (``optim.safetensors``) and its scalars
(``optim.json``), and ``state.json`` (stage, next step, CPU seconds spent) written last. A checkpoint is
written to ``ckpt.tmp/`` and swapped in with renames, so a kill at any moment leaves a complete one
(``ckpt/`` or, during the swap, ``ckpt.old/``). Checkpoints every ``ckpt_seconds`` of wall time and at
every stage boundary. The same command resumes from the last complete checkpoint; the batch of a step is
a pure function of (seed, step), so a resumed run computes the same weights as an uninterrupted one
(one thread, deterministic algorithms). Optimiser state is never unpickled: tensors go through
safetensors, the rest through JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from v4lab.config import V4Config
    from v4lab.data import TokenData
    from v4lab.model import V4Model

RECIPE = {
    "config": "lab-v4", "seed": 0, "batch_size": 1,
    # lm1, the short-sequence stage (V4 also starts short and lengthens): constant lr after the warm-up
    "lm1_steps": 3000, "lm1_seq_len": 512, "warmup": 30,
    # lm2, the 2048-token stage: cosine from lr to 10 %, indexer loss on, FP4 QAT of the experts at the end
    "lm2_steps": 700, "seq_len": 2048, "lm2_seed": 1, "lr": 3e-3, "min_lr_ratio": 0.1,
    "weight_decay": 0.1, "grad_clip": 1.0, "bias_gamma": 0.01, "balance_alpha": 1e-4,
    "mtp_weight": 0.3, "mtp_weight_final": 0.1, "mtp_switch_at": 0.7, "qat_from": 0.75,
    "indexer_warmup_steps": 60, "indexer_warmup_lr": 3e-3, "indexer_warmup_batch": 1,
    "indexer_distill_weight": 1.0, "indexer_distill_every": 4, "eval_every": 100, "eval_windows": 4,
}
# The continuation that made the shipped data/lab-v4 (data/README.md): the release RECIPE wrote (run A), read
# back from its files, then ``lm2_steps`` more 2048-token steps (stage "lm3" in the release's logs) with a new
# data seed, a short re-warm-up and a cosine to ``min_lr_ratio``; the indexer loss every second step, FP4
# QAT over the last quarter. ``indexer_warmup_steps`` = 0: the indexers carry over trained.
CONTINUE = dict(RECIPE, init="runs/lab-v4-a", lm1_steps=0, indexer_warmup_steps=0, lm2_steps=900, lm2_seed=2,
                lm2_warmup=20, lr=2e-3, min_lr_ratio=0.05, indexer_distill_every=2)
# The successor, from scratch in one run (data/README.md, "Trained, not yet shipped"): the lab-v4-2k shape, a longer
# constant-lr stage, a longer indexer warm-up, the indexer loss on every step and one cosine to 5 %.
# Sized to 3 CPU-hours with ~9 % to spare at the step costs this run met (0.60-0.92 CPU-s a 512-token step,
# varying with the machine; ~3.4 s a 2048-token one with the indexer loss). It started as 5,800 / 1,500 steps;
# lm1 was cut to 5,000 at its step 2,221 and lm2 set to 1,500 at the end of the warm-up, each before the
# count had any effect (lm1's lr is constant and a step's batch depends only on (seed, step)), so the
# weights are those of a run given these counts from the start.
RECIPE_2K = dict(RECIPE, config="lab-v4-2k", lm1_steps=5000, indexer_warmup_steps=200, lm2_steps=1500,
                 min_lr_ratio=0.05, indexer_distill_every=1)
RECIPES = {"lab-v4": RECIPE, "lab-v4-continue": CONTINUE, "lab-v4-2k": RECIPE_2K}
STAGES = ("lm1", "warmup", "lm2", "final", "done")
# the logs of the release a continuation starts from, renamed in the run folder and the new release
INIT_FILES = {"train_log_lm1.jsonl": "train_log_lm1.jsonl", "train_log.jsonl": "train_log_lm2.jsonl",
              "indexer_warmup.json": "indexer_warmup.json"}
RUN_FILES = ("train_log_lm1.jsonl", "train_log.jsonl", "indexer_warmup.json", "tokenizer.json", "corpus.json")


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


# ---------------------------------------------------------------------------------------- optimiser state
def optimizer_tensors(opts: Sequence[torch.optim.Optimizer]) -> tuple[dict, dict]:
    """(tensors, meta) of a list of optimisers: every tensor of every state dict under
    ``opt{i}.{param id}.{key}``; ``meta`` = the param groups and the non-tensor state, JSON-safe."""
    tensors, meta = {}, {"opts": []}
    for i, o in enumerate(opts):
        sd = o.state_dict()
        scal = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt{i}.{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scal.setdefault(str(pid), {})[k] = v
        meta["opts"].append({"param_groups": sd["param_groups"], "scalars": scal,
                             "tensor_state": sorted({f"{pid}" for pid in sd["state"]}, key=int)})
    return tensors, meta


def optimizer_states(tensors: dict, meta: dict) -> list[dict]:
    """The inverse of :func:`optimizer_tensors`: a list of ``state_dict``s for ``Optimizer.load_state_dict``."""
    out = []
    for i, m in enumerate(meta["opts"]):
        state = {}
        for pid in m["tensor_state"]:
            state[int(pid)] = dict(m["scalars"].get(pid, {}))
        for name, v in tensors.items():
            o, pid, key = name.split(".", 2)
            if o == f"opt{i}":
                state.setdefault(int(pid), {})[key] = v
        # JSON turned tuples (AdamW's betas) into lists; "params" stays a list of ids
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in m["param_groups"]]
        out.append({"state": state, "param_groups": groups})
    return out


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Path, model: V4Model, opts: Sequence[torch.optim.Optimizer] | None,
                    state: dict) -> None:
    """Write ``run/ckpt`` atomically (tmp folder, then renames); ``state.json`` is written last."""
    from safetensors.torch import save_file
    tmp, cur, old = run / "ckpt.tmp", run / "ckpt", run / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    tensors, meta = optimizer_tensors(opts or [])
    save_file(tensors, str(tmp / "optim.safetensors"))
    (tmp / "optim.json").write_text(json.dumps(meta) + "\n")
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        cur.rename(old)
    tmp.rename(cur)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run: Path) -> Path | None:
    """The last complete checkpoint folder (one with state.json), or None."""
    for d in (run / "ckpt", run / "ckpt.old"):
        if (d / "state.json").is_file():
            return d
    return None


def load_checkpoint(ckpt: Path, cfg: V4Config) -> tuple[V4Model, list[dict], dict]:
    """(model, optimiser state dicts, state) from a checkpoint folder."""
    from safetensors.torch import load_file

    from v4lab.model import V4Model
    model = V4Model(cfg)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    opt = optimizer_states(load_file(str(ckpt / "optim.safetensors")),
                           json.loads((ckpt / "optim.json").read_text()))
    return model, opt, json.loads((ckpt / "state.json").read_text())


def truncate_log(path: Path, next_step: int) -> None:
    """Drop log records of steps at or after ``next_step`` (done after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < next_step]
    path.write_text("".join(ln + "\n" for ln in keep))


# ---------------------------------------------------------------------------------------- data
def build_data(run: Path, root: str | Path, vocab_size: int) -> tuple[TokenData, dict[str, str]]:
    """Corpus → (TokenData, documents). The tokenizer is trained once on the training documents and kept in
    the run folder; a resumed run checks that the corpus is the one it started with."""
    from v4lab import corpus
    from v4lab.data import TokenData, encode_docs, load_tokenizer, train_tokenizer
    docs = corpus.load_documents(root)
    fp = corpus.fingerprint(docs)
    train_names, held_names = corpus.split_documents(docs)
    cj = run / "corpus.json"
    if cj.is_file():
        old = json.loads(cj.read_text())
        if old["sha256"] != fp["sha256"]:
            _bad("corpus sha256", fp["sha256"], f"differs from the one this run started with ({old['sha256']}); "
                 "use a new run folder")
    tp = run / "tokenizer.json"
    if tp.is_file():
        tok = load_tokenizer(tp)
    else:
        tok = train_tokenizer([docs[n] for n in train_names], vocab_size)
        tok.save(str(tp))
    train = encode_docs(tok, [docs[n] for n in train_names])
    held = encode_docs(tok, [docs[n] for n in held_names])
    fp.update(train_documents=len(train_names), heldout_documents=held_names,
              heldout_chars=sum(len(docs[n]) for n in held_names),
              train_tokens=int(train.numel()), heldout_tokens=int(held.numel()))
    if not cj.is_file():
        cj.write_text(json.dumps(fp, indent=1) + "\n")
    return TokenData(train, held, tok, fp), docs


# ---------------------------------------------------------------------------------------- stages
def run(run_dir: str | Path = "runs/lab-v4", out: str | Path = "data/lab-v4", root: str | Path | None = None,
        recipe: dict | None = None,
        ckpt_seconds: float = 600.0, progress: bool = True, stop_after: str | None = None) -> dict:
    """Run (or resume) the recipe; returns the final state. ``stop_after``: a stage name to stop after
    (tests use it to interrupt a run)."""
    from v4lab import corpus
    from v4lab.config import get_config
    r = dict(RECIPE if recipe is None else recipe)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = corpus.DEFAULT_ROOT if root is None else Path(root)
    if stop_after is not None and stop_after not in STAGES:
        _bad("stop_after", stop_after, f"must be one of {STAGES}")
    torch.set_num_threads(1)
    cfg = get_config(r["config"]) if isinstance(r["config"], str) else r["config"]
    _check_recipe(run_dir, r, cfg)
    if (run_dir / "done.json").is_file():            # finished: rerunning the command changes nothing
        print(f"{run_dir} is complete (done.json); the model is in {out}", file=sys.stderr)
        return json.loads((run_dir / "done.json").read_text())
    job = _Job(r, cfg, run_dir, Path(out), root, ckpt_seconds, progress)
    for stage, do in (("lm1", job.lm1), ("warmup", job.warmup), ("lm2", job.lm2), ("final", job.final)):
        if job.state["stage"] == stage:
            do()
            if stop_after == stage:
                break
    return job.state


class _Job:
    """One run's moving parts: data, model, optimiser state, the run state (stage, next step, CPU seconds
    at the last checkpoint) and one method per stage, each ending with a checkpoint of the next stage."""

    def __init__(self, r: dict, cfg: V4Config, run_dir: Path, out: Path, root: Path, ckpt_seconds: float,
                 progress: bool):
        self.r, self.cfg, self.run_dir, self.out, self.root = r, cfg, run_dir, out, root
        self.ckpt_seconds, self.progress = ckpt_seconds, progress
        self.c0 = time.process_time()
        self.data, self.docs = build_data(run_dir, root, cfg.vocab_size)
        ck = find_checkpoint(run_dir)
        if ck is None and r.get("init"):
            self.model, self.opt_state = init_model(Path(r["init"]), cfg, run_dir), None
            self.state = {"stage": "warmup", "next_step": 0, "cpu_seconds": 0.0}
        elif ck is None:
            self.model, self.opt_state = None, None
            self.state = {"stage": "lm1", "next_step": 0, "cpu_seconds": 0.0}
        else:
            self.model, self.opt_state, self.state = load_checkpoint(ck, cfg)
            print(f"resuming from {ck}: stage {self.state['stage']}, step {self.state['next_step']}",
                  file=sys.stderr)
        self.base_cpu = self.state["cpu_seconds"]
        self.logs = {"lm1": run_dir / "train_log_lm1.jsonl", "lm2": run_dir / "train_log.jsonl"}
        if self.state["stage"] in self.logs:
            truncate_log(self.logs[self.state["stage"]], self.state["next_step"])

    def cpu(self) -> float:
        return self.base_cpu + time.process_time() - self.c0

    def checkpoint(self, stage: str, next_step: int, model: V4Model, opts) -> None:
        self.state.update(stage=stage, next_step=next_step, cpu_seconds=self.cpu())
        save_checkpoint(self.run_dir, model, opts, self.state)

    def _lm(self, stage: str) -> dict:
        from v4lab.train import train
        return train(self.cfg, model=self.model, opt_state=self.opt_state, start_step=self.state["next_step"],
                     on_checkpoint=lambda s, m, o: self.checkpoint(stage, s, m, o),
                     **_train_kwargs(self.r, stage, self.data, self.logs[stage], self.ckpt_seconds, self.progress))

    def lm1(self) -> None:
        res = self._lm("lm1")
        self.model, self.opt_state = res["model"], [o.state_dict() for o in res["opts"]]
        self.checkpoint("warmup", 0, self.model, res["opts"])

    def warmup(self) -> None:
        from v4lab.train import indexer_warmup
        r = self.r
        if not r["indexer_warmup_steps"]:
            self.checkpoint("lm2", 0, self.model, _opts_for(self.model, self.opt_state, r))
            return
        res = indexer_warmup(self.model, self.data, steps=r["indexer_warmup_steps"],
                             batch_size=r["indexer_warmup_batch"], seq_len=r["seq_len"], lr=r["indexer_warmup_lr"],
                             warmup=5, seed=r["seed"] + 1, eval_windows=r["eval_windows"], progress=self.progress,
                             device="cpu")
        (self.run_dir / "indexer_warmup.json").write_text(json.dumps(
            {k: res[k] for k in ("before", "after", "log")}, indent=1) + "\n")
        # the LM optimiser's state is carried through the warm-up unchanged
        self.checkpoint("lm2", 0, self.model, _opts_for(self.model, self.opt_state, r))

    def lm2(self) -> None:
        res = self._lm("lm2")
        self.model = res["model"]
        self.checkpoint("final", self.r["lm2_steps"], self.model, res["opts"])

    def final(self) -> None:
        write_release(self.model, self.data, self.docs, self.run_dir, self.out, self.r, self.state, self.cpu,
                      self.root)
        self.state.update(stage="done", cpu_seconds=self.cpu())
        (self.run_dir / "done.json").write_text(json.dumps(self.state, indent=1) + "\n")


def init_model(init: Path, cfg: V4Config, run_dir: Path) -> V4Model:
    """A continuation's starting model: the release at ``init`` read back (FP8/FP4 dequantised to fp32) into
    ``cfg``'s model. Its logs are copied into ``run_dir`` (``INIT_FILES``) and its weights' fingerprint and
    CPU seconds recorded in ``init.json``, so the run states exactly what it continued."""
    from v4lab import model as model_mod
    from v4lab.checkpoint import shards_fingerprint
    if not (init / "config.json").is_file():
        _bad("init", str(init), "is not a release directory (no config.json); run the release recipe first")
    model = model_mod.V4Model(cfg)
    try:
        model.load_state_dict(model_mod.load(init, keep_quantized=False).state_dict(), strict=True)
    except RuntimeError as e:
        _bad("init", str(init), f"does not fit config {cfg.name!r}: {str(e).splitlines()[0]}")
    for name, new in INIT_FILES.items():
        if (init / name).is_file():
            shutil.copyfile(init / name, run_dir / new)
    sj = init / "training_summary.json"
    summ = json.loads(sj.read_text()) if sj.is_file() else {}
    (run_dir / "init.json").write_text(json.dumps({
        "init": str(init), "weights_sha256": shards_fingerprint(init),
        "cpu_seconds_training": summ.get("cpu_seconds_training", 0.0),
        "cpu_seconds_total": summ.get("cpu_seconds_total", 0.0)}, indent=1) + "\n")
    return model


def _check_recipe(run_dir: Path, r: dict, cfg) -> None:
    """Record the recipe (config expanded) in the run folder; refuse a folder that holds another one."""
    rj = run_dir / "recipe.json"
    rec_json = json.loads(json.dumps({**r, "config": cfg.to_dict()}))
    if rj.is_file() and json.loads(rj.read_text()) != rec_json:
        _bad("recipe", str(rj), "differs from this run's recipe; use a new run folder")
    rj.write_text(json.dumps(rec_json, indent=1) + "\n")


def _train_kwargs(r: dict, stage: str, data, log_path: Path, ckpt_seconds: float, progress: bool) -> dict:
    """The ``v4lab.train.train`` arguments of a language-model stage: ``lm1`` (short sequences, constant lr,
    no QAT, no indexer loss) or ``lm2`` (``seq_len`` tokens, cosine, indexer loss, QAT at the end)."""
    kw = dict(data=data, batch_size=r["batch_size"], lr=r["lr"], weight_decay=r["weight_decay"],
              grad_clip=r["grad_clip"], mtp_weight=r["mtp_weight"], bias_gamma=r["bias_gamma"],
              balance_alpha=r["balance_alpha"], eval_every=r["eval_every"], eval_windows=r["eval_windows"],
              threads=1, progress=progress, log_path=str(log_path), ckpt_seconds=ckpt_seconds, device="cpu")
    if stage == "lm1":
        return dict(kw, steps=r["lm1_steps"], seq_len=r["lm1_seq_len"], seed=r["seed"], warmup=r["warmup"],
                    min_lr_ratio=1.0)
    return dict(kw, steps=r["lm2_steps"], seq_len=r["seq_len"], seed=r["lm2_seed"], warmup=r.get("lm2_warmup", 1),
                min_lr_ratio=r["min_lr_ratio"], mtp_weight_final=r["mtp_weight_final"],
                mtp_switch_at=r["mtp_switch_at"], qat=float(r["qat_from"]),
                indexer_distill_weight=r["indexer_distill_weight"], indexer_distill_every=r["indexer_distill_every"])


def _opts_for(model, opt_state, r):
    """The LM optimisers rebuilt around ``model`` with a saved state (so a checkpoint can store them)."""
    from v4lab.train import make_optimizer
    opts = make_optimizer(model, "adamw", r["lr"], r["weight_decay"])
    for o, st in zip(opts, opt_state or []):
        o.load_state_dict(st)
    return opts


def write_release(model: V4Model, data: TokenData, docs: dict[str, str], run_dir: Path, out: Path, r: dict,
                  state: dict, cpu: Callable[[], float], root: str | Path | None = None) -> None:
    """OUT = official layout + tokenizer.json + heldout.txt + logs + training_summary.json (targets measured
    by ``v4lab.labeval`` on the saved files). Written to OUT.tmp first, then swapped in."""
    from v4lab import corpus
    from v4lab import model as model_mod
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_mod.save(model, tmp, overwrite=True)
    data.tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "heldout.txt").write_text(corpus.heldout_text(docs), encoding="utf-8")
    for f in ("train_log_lm1.jsonl", "train_log_lm2.jsonl", "train_log.jsonl", "indexer_warmup.json", "init.json"):
        if (run_dir / f).is_file():
            shutil.copyfile(run_dir / f, tmp / f)
    recipe = {**r, "config": r["config"] if isinstance(r["config"], str) else r["config"].to_dict()}
    init = json.loads((run_dir / "init.json").read_text()) if (run_dir / "init.json").is_file() else None
    before = init["cpu_seconds_total"] if init else 0.0          # the release this one continued, evaluation incl.
    summary = {"recipe": recipe, "corpus": data.fingerprint, "cpu_seconds_training": cpu() + before,
               "cpu_seconds_this_stage": cpu(), "init": init,
               "command": "OMP_NUM_THREADS=1 python -m v4lab.labrun --run-dir RUN --out OUT"
               + (" --recipe lab-v4-continue --init INIT" if init else ""),
               "torch": torch.__version__, "threads": 1}
    from v4lab import labeval  # imported late: the evaluation can be fixed while training runs
    summary["targets"] = labeval.evaluate_release(tmp, progress=True, root=root)
    summary["cpu_seconds_total"] = cpu() + before
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def status(run_dir: str | Path, recent: int = 20) -> dict:
    """Where a run stands, from its files only (safe while it runs): stage, steps done, CPU seconds at the
    last checkpoint, and a rough ETA for the language-model steps left from the recent steps' wall time
    (the warm-up and the final evaluation come on top)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.json").is_file():
        _bad("run_dir", str(run_dir), "holds no run (no recipe.json)")
    r = json.loads((run_dir / "recipe.json").read_text())
    if (run_dir / "done.json").is_file():
        return {"stage": "done", **json.loads((run_dir / "done.json").read_text())}
    ck = find_checkpoint(run_dir)
    st = json.loads((ck / "state.json").read_text()) if ck else {"stage": "lm1", "next_step": 0, "cpu_seconds": 0.0}
    stage = "lm1" if st["stage"] == "lm1" else "lm2"
    path = run_dir / ("train_log_lm1.jsonl" if stage == "lm1" else "train_log.jsonl")
    log = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    done = log[-1]["step"] + 1 if log else 0
    tail = [x["seconds"] for x in log[-recent:]]
    per = sum(tail) / len(tail) if tail else None
    left = r[f"{stage}_steps"] - done
    return {"stage_at_checkpoint": st["stage"], "checkpoint_step": st["next_step"],
            "cpu_seconds_at_checkpoint": st["cpu_seconds"], "lm_stage": stage, "steps_logged": done,
            "steps": r[f"{stage}_steps"], "wall_seconds_per_step_recent": per, "lm_steps_left": left,
            "eta_stage": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + per * left)) if per else None}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="v4lab labrun", description="Train data/lab-v4 with the V4 recipe "
                                "(resumable: rerun the same command after an interruption).")
    p.add_argument("--run-dir", default="runs/lab-v4", help="checkpoints and logs (default runs/lab-v4)")
    p.add_argument("--out", default="data/lab-v4", help="the model directory written at the end")
    p.add_argument("--root", default=None, help="CPython HTML docs root (default: python3.11-doc's)")
    p.add_argument("--ckpt-seconds", type=float, default=600.0, help="wall seconds between checkpoints")
    p.add_argument("--recipe", default="lab-v4", choices=sorted(RECIPES),
                   help="lab-v4: from scratch; lab-v4-continue: more steps from the release in --init; lab-v4-2k: the "
                        "successor shape, from scratch")
    p.add_argument("--init", default=None, help="the release a continuation starts from (default runs/lab-v4-a)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--status", action="store_true", help="only print where the run in --run-dir stands")
    args = p.parse_args(argv)
    if args.status:
        try:
            print(json.dumps(status(args.run_dir), indent=1))
        except ValueError as e:
            print(f"v4lab labrun: error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.ckpt_seconds > 0:
        print(f"v4lab labrun: error: --ckpt-seconds = {args.ckpt_seconds}: must be > 0", file=sys.stderr)
        return 2
    try:
        recipe = dict(RECIPES[args.recipe])
        if args.init is not None:
            if "init" not in recipe:
                raise ValueError(f"--init = {args.init!r}: recipe {args.recipe} trains from scratch; only a "
                                 "continuation (lab-v4-continue) starts from a release")
            recipe["init"] = args.init
        state = run(args.run_dir, args.out, args.root, recipe=recipe, ckpt_seconds=args.ckpt_seconds,
                    progress=not args.no_progress)
    except ValueError as e:
        print(f"v4lab labrun: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(state, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
