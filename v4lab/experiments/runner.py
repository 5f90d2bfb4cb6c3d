"""``v4lab experiment NAME [--quick] [--json] [--out FILE] [--device D] [--no-progress]``: one experiment, side by side.

NAME = clamp | ar | qat | subfp4 | mhc. Each runs a baseline and a treatment from the same seed on the same
data in one process and prints (or with ``--json`` writes to stdout) one object:

    {"name", "metric", "baseline": {metric, curves...}, "treatment": {...}, "effect", "settings",
     "quick", "command", "details"}

``effect`` is one number, > 0 when the treatment does what V4 uses it for (for subfp4: the held-out loss
lost going from FP4 to the best 3-bit format). ``--quick`` is sized for ≤ 3 minutes on 2 shared CPU cores;
the default is the full run stored under ``benchmarks/experiments/NAME.json``. ``--out`` writes the JSON
to a file (atomically: a temporary file renamed into place).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

from v4lab.progress import add_argument as add_progress_flag

# NAME -> module in v4lab.experiments exposing experiment(quick: bool, device) -> dict
EXPERIMENTS = {"clamp": "swiglu_clamp", "ar": "anticipatory", "qat": "qat", "subfp4": "subfp4",
               "mhc": "mhc_stability"}
REQUIRED = ("metric", "baseline", "treatment", "effect", "settings")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"v4lab experiment: error: {message}\n")
        raise SystemExit(2)


def run_experiment(name: str, quick: bool = False, device: str | None = None, command: str | None = None,
                   progress: bool = False) -> dict:
    """Run experiment ``name`` and return its result object (see the module docstring); ``command`` is
    recorded as the command line that made it (default: the equivalent ``v4lab experiment`` call);
    ``progress``: a tqdm bar with ETA over the experiment's training steps / evaluations, on a terminal."""
    if name not in EXPERIMENTS:
        raise ValueError(f"NAME = {name!r}: must be one of {tuple(EXPERIMENTS)}")
    mod = importlib.import_module(f"v4lab.experiments.{EXPERIMENTS[name]}")
    res = mod.experiment(quick=quick, device=device, progress=progress)
    missing = [k for k in REQUIRED if k not in res]
    if missing:                                   # a programming error in the experiment, not bad input
        raise RuntimeError(f"experiment {name} returned no {missing}")
    cmd = command or f"v4lab experiment {name}" + (" --quick" if quick else "") + " --json"
    return {"name": name, **res, "quick": bool(quick), "command": cmd}


def summary(res: dict) -> str:
    b, t = res["baseline"], res["treatment"]
    m = res["metric"]
    return (f"{res['name']}{' (quick)' if res['quick'] else ''}: {m}  baseline ({b.get('label', '')}) = "
            f"{b[m]:.4g}  treatment ({t.get('label', '')}) = {t[m]:.4g}  effect = {res['effect']:+.4g}")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="v4lab experiment")
    p.add_argument("name", choices=tuple(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="small settings (<= 3 min on 2 CPU cores)")
    p.add_argument("--json", action="store_true", help="print the result object as JSON")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto")
    add_progress_flag(p)
    args = p.parse_args(argv)
    if args.device is not None:
        from v4lab.device import get_device
        get_device(args.device)                   # bad value -> ValueError -> one line, exit 2
    import torch
    torch.set_num_threads(1)                      # deterministic and fastest on a shared machine
    argv = sys.argv[1:] if argv is None else argv
    res = run_experiment(args.name, args.quick, args.device, command=" ".join(["v4lab experiment", *argv]),
                         progress=not args.no_progress)
    text = json.dumps(res, indent=1)
    if args.out:
        _write_atomic(Path(args.out), text + "\n")
    print(text if args.json else summary(res))
    return 0
