"""Past one device with torch.distributed: process groups, a launcher, and data-parallel training glue.

Environment contract (torchrun's): ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``. :func:`launch` starts N local processes with it (``torch.multiprocessing``, spawn), so
``v4lab train --nproc N`` and ``torchrun --nproc-per-node N -m v4lab.cli train`` run the same code.
Backend: gloo on the CPU, NCCL on CUDA. Every collective has a timeout (``init_process_group(timeout=)``)
and the launcher a deadline, after which it kills its processes: a failed rank never leaves the others
hanging.

:class:`DataParallel` is what ``v4lab.train.train(ddp=...)`` needs to be one rank of a data-parallel run:

* each rank takes its contiguous slice of the global batch (``shard``), so N ranks see the same
  sequences as one process with the same ``batch_size``;
* the model runs under ``DistributedDataParallel``; gradients are averaged, which equals the gradient of
  the global mean loss because the slices are equal (the sequence balance loss is a mean over sequences
  too, so it reduces the same way);
* the per-expert loads are all-reduced (summed) BEFORE the aux-loss-free sign rule, so every rank applies
  the same bias update, the one a single process would (buffers are not broadcast: equal biases are a
  consequence, which the tests check);
* logged scalars are averaged over ranks (maxima maxed); only rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    import argparse

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
COLLECTIVE_TIMEOUT_S = 120.0


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from the environment contract, or None outside a launched job."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = COLLECTIVE_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group described by the environment (gloo on CPU, NCCL on CUDA)."""
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _entry(local_rank, fn, nproc, port, args, device, timeout_s, err_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank))
    torch.set_num_threads(1)
    failed_at = None               # the first rank to fail is the cause; the others then fail at its socket
    try:
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(local_rank)
        init_from_env(device, timeout_s)
        try:
            fn(*args)
        except BaseException:
            failed_at = time.time()
            raise
        finally:
            dist.destroy_process_group()
    except BaseException:
        import traceback
        with open(os.path.join(err_dir, f"rank{local_rank}.err"), "w") as f:
            f.write(f"{failed_at or time.time()!r}\n{traceback.format_exc()}")
        raise


def _first_failure(err_dir) -> str:
    recs = []
    for name in os.listdir(err_dir):
        with open(os.path.join(err_dir, name)) as f:
            when, _, tb = f.read().partition("\n")
        recs.append((float(when), name[4:-4], tb))
    if not recs:
        return "no traceback recorded"
    when, rank, tb = min(recs)
    return f"rank {rank} failed first: {tb.strip().splitlines()[-1]}\n{tb}"


def launch(fn: Callable[..., object], nproc: int, args: tuple = (), *, device: str | torch.device = "cpu",
           timeout_s: float = 300.0,
           collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Run ``fn(*args)`` in ``nproc`` spawned processes, each inside the process group (rank = its index).

    ``fn`` must be importable (module level). Raises RuntimeError naming the rank that failed (the others
    are terminated), or TimeoutError after ``timeout_s`` (all are killed)."""
    import shutil
    import tempfile

    import torch.multiprocessing as mp
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        _bad("nproc", nproc, "must be a positive integer")
    err_dir = tempfile.mkdtemp(prefix="v4lab-launch-")
    ctx = mp.start_processes(_entry, (fn, nproc, free_port(), args, str(device), collective_timeout_s, err_dir),
                             nprocs=nproc, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"launch: {nproc} processes still running after {timeout_s:.0f} s; killed")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        time.sleep(0.2)                # let a rank that is dying of the first one's failure write its record
        raise RuntimeError(f"launch: {_first_failure(err_dir) if os.listdir(err_dir) else e}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
        shutil.rmtree(err_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------- data parallel
class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose attribute look-ups fall through to the wrapped model (``cfg``, ``mtp``, ``device``...),
    so the training code calls the wrapper exactly as it calls the model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class DataParallel:
    """One rank's view of a data-parallel run over the default group (see the module docstring)."""

    MEAN_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss")

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            _bad("ddp", "no process group", "start one first (v4lab.distributed.launch or torchrun)")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        # NCCL reduces GPU tensors only: the log's scalars travel on this rank's GPU there
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            _bad("batch_size", batch_size, f"must be divisible by the number of processes ({self.world})")

    def shard(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global batch [B, ...]."""
        n = ids.shape[0] // self.world
        return ids[self.rank * n:(self.rank + 1) * n]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # unused parameters: experts no local token picked. Buffers (router biases) are not synced after
        # construction: equal biases on every rank follow from the all-reduced loads (tested), not from a copy.
        import inspect
        ids = [model.device.index] if model.device.type == "cuda" else None
        params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return _DDP(model, device_ids=ids, find_unused_parameters=True, process_group=self.group, **sync)

    def sum_loads(self, loads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer expert loads [E] summed over ranks (one all-reduce)."""
        if not loads:
            return loads
        flat = torch.stack([load.float() for load in loads]).to(self.device)
        dist.all_reduce(flat, group=self.group)
        return list(flat.to(loads[0].device).unbind(0))

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()

    def reduce_record(self, rec: dict) -> dict:
        """Log record with losses and churn averaged over ranks and max |MoE output| maxed."""
        keys = [k for k in self.MEAN_KEYS if rec.get(k) is not None]
        churn = list(rec.get("churn") or [])
        means = self._reduce([rec[k] for k in keys] + churn, dist.ReduceOp.SUM)
        out = dict(rec, **{k: v / self.world for k, v in zip(keys, means)})
        out["churn"] = [v / self.world for v in means[len(keys):]]
        mx = rec.get("moe_max_abs")
        if mx and all(v is not None for v in mx):
            out["moe_max_abs"] = self._reduce(mx, dist.ReduceOp.MAX)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a shared stop decision)."""
        return bool(self._reduce([float(flag)], dist.ReduceOp.MAX)[0])


# --------------------------------------------------------------------------------------- v4lab train --nproc
def _rerun(main, argv):
    main(argv)


def join_or_launch(args: argparse.Namespace, dev: torch.device, main: Callable[[list[str]], object],
                   argv: Sequence[str] | None) -> tuple[DataParallel, torch.device] | tuple[None, None]:
    """For ``v4lab train``: outside a job with ``--nproc N`` > 1, launch N ranks that re-run ``main(argv)``
    and return (None, None) when they are done; inside a job (launched here or by torchrun), join the group
    and return (DataParallel, this rank's device)."""
    import sys
    world = env_world()
    nproc = args.nproc
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        _bad("--nproc", nproc, "must be a positive integer")
    if args.indexer_warmup is not None or args.anticipatory == "spike":
        what = "--indexer-warmup" if args.indexer_warmup is not None else "--anticipatory spike"
        _bad("--nproc", nproc, f"{what} runs in one process only")
    if args.batch_size % (world[1] if world else nproc):
        _bad("--batch-size", args.batch_size, f"must be divisible by the number of processes "
                                             f"({world[1] if world else nproc})")
    if world is None:
        if dev.type == "cuda" and nproc > torch.cuda.device_count():
            _bad("--nproc", nproc, f"needs one GPU per process; {torch.cuda.device_count()} visible")
        try:
            launch(_rerun, nproc, (main, list(sys.argv[1:] if argv is None else argv)), device=dev,
                   timeout_s=float("inf"))
        except RuntimeError as e:           # bad input found inside the ranks: one line, like the rest of the CLI
            first = str(e).split("\n")[0]
            if ": ValueError: " in first:
                raise ValueError(first.split(": ValueError: ", 1)[1]) from None
            raise
        return None, None
    rank, size, local = world
    if nproc not in (1, size):
        _bad("--nproc", nproc, f"disagrees with WORLD_SIZE = {size} set by the launcher")
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    init_from_env(dev)
    return DataParallel(), dev
