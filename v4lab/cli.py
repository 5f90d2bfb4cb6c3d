"""The ``v4lab`` command line.

    v4lab info PRESET_OR_CONFIG_JSON [--context N] [--json]
    v4lab compare A B [--context N] [--json] [--diff]
    v4lab bench {attention,moe,quant,kernels,widgets,device,ep,trace,train,all} [--quick] [--json] [--device D]
    v4lab train ...        (see v4lab.train)
    v4lab generate ...     (see v4lab.generate)
    v4lab cost [--turns N] [--context 32K] [--output 1K] [--pro-share F] [--hard-share F] [--thinking] [--json]
    v4lab remind --ics FILE [--force]     (the V4 migration reminder, an RFC 5545 calendar file)
    v4lab experiment {clamp,ar,qat,subfp4,mhc} [--quick] [--json] [--out F] [--device D]
    v4lab labrun ...       train data/lab-v4, resumably (see v4lab.labrun)
    v4lab labeval DIR      the lab model's targets from its shipped files (see v4lab.labeval)

Where things run: ``--device`` (cpu, cuda, cuda:N, auto) on bench/train/generate, else $V4LAB_DEVICE,
else CUDA when present (``v4lab.device``).

Bad input (unknown preset, unreadable or malformed file, invalid value) prints one line on stderr and
exits with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

BENCHES = ("attention", "moe", "quant", "kernels", "widgets", "device", "ep", "trace", "train")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention, without the usage dump)
        sys.stderr.write(f"v4lab: error: {message}\n")
        raise SystemExit(2)


def _delegate(module: str, argv: list[str]) -> int:
    mod = importlib.import_module(module)
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd in ("info", "compare"):
            from v4lab import accounting, diff
            return accounting.cli(cmd, rest, parser_cls=_Parser, differ=diff.diff_report)
        if cmd == "bench":
            p = _Parser(prog="v4lab bench")
            p.add_argument("name", choices=BENCHES + ("all",))
            p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto, for every bench run")
            args, more = p.parse_known_args(rest)
            if args.device is not None:          # one setting for every bench (and the subprocesses they start)
                from v4lab.device import ENV, get_device
                os.environ[ENV] = str(get_device(args.device))
            names = BENCHES if args.name == "all" else (args.name,)
            rc = 0
            for n in names:
                rc |= _delegate(f"v4lab.bench.{n}", more)
            return rc
        if cmd in ("cost", "remind"):
            from v4lab import deploy
            return deploy.cli(cmd, rest, parser_cls=_Parser)
        if cmd == "train":
            return _delegate("v4lab.train", rest)
        if cmd == "generate":
            return _delegate("v4lab.generate", rest)
        if cmd == "experiment":
            return _delegate("v4lab.experiments.runner", rest)
        if cmd in ("labrun", "labeval"):
            return _delegate(f"v4lab.{cmd}", rest)
        sys.stderr.write(f"v4lab: error: unknown command {cmd!r} "
                         "(info, compare, bench, train, generate, cost, remind, experiment, labrun, labeval)\n")
        return 2
    except ValueError as e:
        sys.stderr.write(f"v4lab: error: {e}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
