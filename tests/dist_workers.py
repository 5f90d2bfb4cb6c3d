"""Functions the multi-process tests run in each rank (v4lab.distributed.launch spawns them, so they live in
an importable module). Each writes what it measured to OUT/rank{r}.safetensors + OUT/rank{r}.json; the
test process reads them back and compares with a single-process run."""
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from v4lab.config import get_config
from v4lab.moe import MoE

LIMIT = 2.0


def ep_cfg(hidden=32):
    return get_config("tiny").replace(hidden_size=hidden, moe_intermediate_size=16, vocab_size=64,
                                      swiglu_limit=LIMIT, routed_scaling_factor=1.5, n_routed_experts=8,
                                      num_experts_per_tok=2)


def full_moe(cfg, layer_id, seed=0):
    """The single-process MoE every rank and the test build the same way."""
    torch.manual_seed(seed)
    m = MoE(cfg, layer_id)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        if m.gate.bias is not None:
            m.gate.bias.copy_(torch.randn(cfg.n_routed_experts) * 0.5)
    return m


def rank_inputs(cfg, rank, B=2, S=5):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, S, cfg.hidden_size, generator=g) * 3
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    c = torch.randn(B, S, cfg.hidden_size, generator=g)           # loss = (y * c).sum()
    return x, ids, c


def all_remote_routing(cfg, rank, world, T):
    """Every token of ``rank`` picks K experts held by rank+1: all traffic leaves the rank."""
    n = cfg.n_routed_experts // world
    dst = (rank + 1) % world
    K = cfg.num_experts_per_tok
    return torch.tensor([[dst * n + (t + k) % n for k in range(K)] for t in range(T)])


def ep_worker(out_dir, layers, fp8_hidden):
    rank, world = dist.get_rank(), dist.get_world_size()
    out, rec = {}, {"world": world}
    cfg = ep_cfg()
    for layer in layers:
        full = full_moe(cfg, layer)
        m = MoE(cfg, layer, ep_size=world)
        sd = m.state_dict()
        m.load_state_dict({k: full.state_dict()[k] for k in sd})
        x, ids, c = rank_inputs(cfg, rank)
        x.requires_grad_(True)
        y = m(x, ids)
        (y * c).sum().backward()
        out[f"L{layer}.y"], out[f"L{layer}.x_grad"] = y.detach(), x.grad
        for n, p in m.named_parameters():
            out[f"L{layer}.grad.{n}"] = p.grad if p.grad is not None else torch.zeros_like(p)
        rec[f"L{layer}"] = m.last_ep
        rec[f"L{layer}.local_keys"] = sorted(k for k in sd if k.startswith("experts."))
    # every pair sent off-rank: the bytes are exactly tokens x top-k x hidden x 4 (fp32 rows)
    m = MoE(cfg, 3, ep_size=world)
    x, _, _ = rank_inputs(cfg, rank)
    with torch.no_grad():
        m(x, forced_idx=all_remote_routing(cfg, rank, world, x.shape[0] * x.shape[1]))
    rec["all_remote"] = m.last_ep
    if fp8_hidden:                                   # FP8 dispatch (forward) at a hidden size of 128
        cfg8 = ep_cfg(fp8_hidden)
        full = full_moe(cfg8, 3)
        m = MoE(cfg8, 3, ep_size=world, ep_fp8=True)
        m.load_state_dict({k: full.state_dict()[k] for k in m.state_dict()})
        x, ids, _ = rank_inputs(cfg8, rank)
        with torch.no_grad():
            out["fp8.y"] = m(x, ids)
        rec["fp8"] = m.last_ep
    _write(out_dir, rank, out, rec)


def _write(out_dir, rank, tensors, record):
    out_dir = Path(out_dir)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out_dir / f"rank{rank}.safetensors"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


def ddp_worker(out_dir, data, kw, adam_eps=None):
    import functools

    from v4lab import train as T
    from v4lab.distributed import DataParallel
    from v4lab.train import micro_config, train
    rank = dist.get_rank()
    if adam_eps is not None:            # see test_ddp_two_ranks_equal_one_process for why
        T.make_optimizer = functools.partial(T.make_optimizer, eps=adam_eps)
    grads = {}
    log_path = Path(out_dir) / f"log_rank{rank}.jsonl"             # only rank 0 may create its file
    res = train(micro_config(), data=data, ddp=DataParallel(), callback=first_grads(grads), log_path=log_path,
                **kw)
    again = train(micro_config(), data=data, ddp=DataParallel(), **kw)       # same seed, same N: same run
    sa, sb = res["model"].state_dict(), again["model"].state_dict()
    # the wrong variant: each rank's bias update from its own loads (no all-reduce) -> biases of its own
    ddp = DataParallel()
    ddp.sum_loads = lambda loads: loads
    local = train(micro_config(), data=data, ddp=ddp, **dict(kw, steps=1))
    local_biases = {f"local_bias.{j}": b.ffn.gate.bias.clone() for j, b in enumerate(local["model"].blocks())
                    if not b.ffn.gate.is_hash}
    same = ([r["loss"] for r in again["log"]] == [r["loss"] for r in res["log"]]
            and all(torch.equal(sa[k], sb[k]) for k in sa))
    biases = {f"bias.{j}": b.ffn.gate.bias.clone() for j, b in enumerate(res["model"].blocks())
              if not b.ffn.gate.is_hash}
    sd = {k: v for k, v in res["model"].state_dict().items() if v.is_floating_point()}
    log_keys = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "load")
    _write(out_dir, rank, {**sd, **biases, **grads, **local_biases},
           {"log": [{k: r[k] for k in log_keys} for r in res["log"]], "repeat_identical": same})


def first_grads(store):
    """A train() callback keeping the gradients of step 0 (DDP-averaged under DDP) as ``grad0.<name>``."""
    def cb(step, rec, model):
        if step == 0:
            store.update({f"grad0.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return cb


def failing_worker(out_dir):
    """Rank 1 raises while rank 0 waits in a collective that will never complete."""
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 failed on purpose")
    Path(out_dir, f"pid{dist.get_rank()}").write_text(str(__import__("os").getpid()))
    dist.barrier()


def sleeping_worker(out_dir):
    import os
    Path(out_dir, f"pid{dist.get_rank()}").write_text(str(os.getpid()))
    time.sleep(600)
