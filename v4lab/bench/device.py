"""``v4lab bench device [--quick] [--json] [--device D]``: does everything run where the setting says?

The one prepared end-to-end check for a GPU box (it runs the same on the CPU, where the tests run it):

1. ``model``: the notebooks' trained tiny V4 (``data/tiny-v4``, else the synthetic stand-in) loaded on the
   device; prefill + MTP, cached decode against the full forward, greedy generation; then the same through
   the Triton kernels (``model.use_kernels()``: compiled on CUDA, interpreted on the CPU) against the torch
   references. Max |difference| of the logits is recorded.
2. ``train``: a few steps of ``v4lab.train`` on the device (micro config, Anticipatory Routing off) and the
   loss of the first step against the same run on the CPU (same seed, same initial weights).
3. ``stream``: the real-weights streaming forward of a synthetic release on the device against the
   in-memory model on the CPU.
4. ``widgets``: every notebook widget fed by the model built once and swept through its first two values.

Each record: ``{"check", "device", "ok", "max_abs_diff" (where it applies), "seconds", "detail"}``; a
check that raises is recorded with ``ok: false`` and the error, and the others still run. Differences on a
GPU come from TF32/reduction order, so the bounds are 1e-3 on logits there and 2e-5 on the CPU.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from v4lab.errors import OneLineParser

CHECKS = ("model", "train", "stream", "widgets")


def _bound(dev: torch.device) -> float:
    return 1e-3 if dev.type == "cuda" else 2e-5


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


@torch.no_grad()
def check_model(dev: torch.device, quick: bool) -> dict:
    from v4lab.device import kernel_mode
    from v4lab.viz import trained
    path = trained.checkpoint_path() or trained.synthetic_checkpoint()
    model, tok, _ = trained.load_dir(path, synthetic=trained.checkpoint_path() is None, device=dev)
    S = 24 if quick or kernel_mode() == "interpreter" else 160
    ids = torch.tensor([tok.encode("def fib(n):\n    a, b = 0, 1\n    while a < n:\n" * 8).ids[:S]])
    ref, ref_mtp = model(ids, return_mtp=True)
    cache = model.new_cache(1)
    model(ids[:, :S - 2], cache=cache)
    dec = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in (S - 2, S - 1)], 1)
    gen = model.generate(ids[:, :8], 4)
    detail = {"tokens": S, "where": str(model.device), "decode_vs_full": _diff(dec, ref[:, S - 2:]),
              "generated": gen[0, 8:].tolist()}
    try:
        model.use_kernels()
        out, mtp = model(ids, return_mtp=True)
        gen_k = model.generate(ids[:, :8], 4)
    finally:
        model.use_kernels(False)
    d = max(_diff(out, ref), _diff(mtp, ref_mtp))
    detail.update(kernels=kernel_mode(), kernels_vs_reference=d, kernel_generation_same=bool(torch.equal(gen, gen_k)))
    ok = d <= _bound(dev) and detail["decode_vs_full"] <= _bound(dev) and str(model.device).startswith(dev.type)
    return {"ok": ok, "max_abs_diff": d, "detail": detail}


def check_train(dev: torch.device, quick: bool) -> dict:
    from v4lab.data import load_data
    from v4lab.train import micro_config, train
    data = load_data(512)
    kw = dict(data=data, steps=2 if quick else 5, batch_size=2, seq_len=32, warmup=1, progress=False, seed=0)
    run = train(micro_config(), device=dev, **kw)
    cpu = train(micro_config(), device="cpu", **dict(kw, steps=1))
    first = abs(run["log"][0]["loss"] - cpu["log"][0]["loss"])
    where = {p.device.type for p in run["model"].parameters()}
    detail = {"losses": [r["loss"] for r in run["log"]], "first_loss_vs_cpu": first, "parameters_on": sorted(where)}
    return {"ok": where == {dev.type} and first <= 10 * _bound(dev), "max_abs_diff": first, "detail": detail}


def check_stream(dev: torch.device, quick: bool) -> dict:
    import v4lab
    from v4lab import real
    from v4lab.checkpoint import make_synthetic_checkpoint
    from v4lab.config import get_config
    with tempfile.TemporaryDirectory(prefix="v4lab-device-") as tmp:
        p = Path(tmp) / "release"
        make_synthetic_checkpoint(get_config("tiny"), p, seed=0)
        ids = list(range(1, 14 if quick else 40))
        res = real.stream_forward(ids, p, device=dev, progress=False)
        with torch.no_grad():
            ref = v4lab.load(p, device="cpu")(torch.tensor([ids]))
    d = _diff(res.logits, ref)
    return {"ok": d <= _bound(dev) and res.device.startswith(dev.type), "max_abs_diff": d,
            "detail": {"tokens": len(ids), "device": res.device, "peak_weight_bytes": res.ledger.peak_bytes}}


def check_widgets(dev: torch.device, quick: bool) -> dict:
    from v4lab.viz import MODEL_WIDGETS, load_all
    reg = load_all()
    swept = {}
    for name in MODEL_WIDGETS:
        w = reg[name](static=True)
        n = 0
        for c in w.control_names:
            for v in list(w.sweep_values(c))[:2]:
                getattr(w, f"on_{c}")(v)
                n += 1
        swept[name] = n
    return {"ok": True, "detail": {"callbacks": swept}}


def run(quick: bool = False, device: str | torch.device | None = None, checks: tuple[str, ...] = CHECKS,
        progress: bool = False) -> list[dict]:
    """One record per check (see the module docstring)."""
    import os

    from v4lab.device import ENV, describe, get_device
    dev = get_device(device)
    desc = describe(device)             # says where the choice came from (argument, $V4LAB_DEVICE, auto)
    out = []
    saved = os.environ.get(ENV)
    os.environ[ENV] = str(dev)          # what the notebooks' model (and anything else) picks up meanwhile
    try:
        _run_checks(dev, quick, checks, out, desc, progress)
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
    return out


def _run_checks(dev, quick, checks, out, desc, progress=False):
    from v4lab.progress import bar
    with bar(len(checks), "device checks", progress) as pb:
        for name in checks:
            pb.set_postfix_str(name)
            _run_check(name, dev, quick, out, desc)
            pb.update(1)


def _run_check(name, dev, quick, out, desc):
    if name not in CHECKS:
        raise ValueError(f"check = {name!r}: must be one of {CHECKS}")
    t0 = time.perf_counter()
    try:
        rec = globals()[f"check_{name}"](dev, quick)
    except Exception as e:                           # record and go on: one run should report every check
        rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    out.append({"check": name, "device": str(dev), "describe": desc,
                "seconds": round(time.perf_counter() - t0, 2), **rec})


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="v4lab bench device", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter prompts and runs")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: $V4LAB_DEVICE, else auto)")
    p.add_argument("--check", action="append", choices=CHECKS, help="run only these (repeatable)")
    from v4lab.progress import add_argument, enabled
    add_argument(p)
    a = p.parse_args(argv)
    recs = run(a.quick, a.device, tuple(a.check) if a.check else CHECKS, enabled(not a.no_progress))
    if a.json:
        print(json.dumps(recs, indent=1))
    else:
        print(recs[0]["describe"])
        for r in recs:
            diff = f"max |diff| {r['max_abs_diff']:.2e}" if r.get("max_abs_diff") is not None else ""
            print(f"{r['check']:8} {'ok' if r['ok'] else 'FAILED':6} {r['seconds']:7.1f} s  {diff}  "
                  f"{r.get('error') or json.dumps(r.get('detail', {}))[:160]}")
    return 0 if all(r["ok"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
