"""Train a tiny V4 with the V4 recipe (spec v4-moe-mhc-fp4.md §1.3, §3, §4, §6.8, §7, §9.4).

One optimiser step t:

    ids = data.batch(t)                                   [B, S+1]: inputs [:, :S], targets [:, 1:], MTP [:, 2:]
    routes = pending[t] if Anticipatory Routing is on      (chosen with θ_{t−Δt}; weights still from θ_t)
    logits, mtp = model(ids[:, :S], return_mtp=True, forced_routes=routes)
    loss = CE(logits, ids[:, 1:]) + 0.3 · CE(mtp, ids[:, 2:]) + Σ_learned-MoE-layers L_bal(α = 1e-4)
    backward, clip, AdamW (or Muon for the block matrices), warm-up + cosine LR
    aux-loss-free bias update  b += γ · sign(mean load − load)   once per step, from the loads really used

Anticipatory Routing (spec §4; Δt, the detector, the rollback and the duration are UNKNOWN in the report,
so they are arguments here). θ_t means the parameters (and router biases) *before* step t's update. While
AR is on, the routes of the batch of step t+Δt are computed at step t, before the update, with θ_t, and
cached: the routes used at step t are exactly those of θ_{t−Δt}. Only the top-k choice is frozen; the gate
weights come from θ_t at the cached ids, so the router keeps its gradient (the spec's reading). When AR
turns on at step t0 the routes of steps t0..t0+Δt−1 are all computed with θ_{t0} (there is nothing older).
Modes: "off", "always" (on from step 0), "spike" (an EMA loss detector: loss > ratio·EMA → restore the
snapshot of ``rollback`` steps earlier, turn AR on for ``ar_duration`` steps, then off again).

The parts: ``TrainConfig`` (``v4lab.trainconfig``) holds a run's settings; ``Trainer`` runs it, one ``step()``
at a time; AR's scheduler, the spike detector and the rollback buffer are ``v4lab.anticipatory``.
``train(cfg, **settings)`` is the same run with the settings as keywords.

Logged per step (JSONL, one object per line): loss and its parts, grad norm (before clipping), per-layer
expert load, routing churn (fraction of tokens whose expert set, for the same gate inputs, differs between
the routes used this step and the routes the updated router would choose), max |MoE output| per layer,
max |stream|, the composite mHC gain (max abs row/column sum of the product of the token-mean H^res of every
mHC site of the backbone), AR state, seconds.

Determinism: the batch of step t is a pure function of (seed, t); the model is built after
``torch.manual_seed(seed)``; ``torch.use_deterministic_algorithms(True)`` while training (``torch_settings``
puts the thread count and that flag back afterwards). Same seed, same thread count → bit-identical losses
and weights.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from v4lab import model as model_mod
from v4lab.anticipatory import AnticipatoryRouting, RollbackBuffer, SpikeDetector
from v4lab.config import V4Config, get_config
from v4lab.device import get_device
from v4lab.errors import OneLineParser, check_writable
from v4lab.errors import bad as _bad
from v4lab.mhc import composite_gains
from v4lab.model import V4Model
from v4lab.moe import bias_update, sequence_balance_loss
from v4lab.trainconfig import AR_MODES, OPTIMIZERS, TrainConfig

if TYPE_CHECKING:
    from v4lab.data import TokenData
    from v4lab.distributed import DataParallel
from v4lab.switches import ForwardRecord

HELDOUT_TEST_WINDOWS = 4          # the held-out subset tests/test_trained_weights.py re-measures
SPECIALISATION_WINDOWS = 16


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: ``step`` reached, ``checkpoint`` = the folder holding the last complete
    checkpoint this run wrote (None if none was written)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint


class SaveFailed(RuntimeError):
    """A checkpoint could not be written to its folder; the message says why and where it went instead."""


def save_or_rescue(model: V4Model, out_dir: str | os.PathLike[str], extra_files: dict | None = None) -> Path:
    """``model_mod.save(model, out_dir, overwrite=True)``; if the disk refuses (read-only, full, a file in
    the way), the model goes to a fresh ``NAME.rescued-*`` folder beside ``out_dir`` (else in the system
    temp folder) and ``SaveFailed`` says where. Bad input (ValueError) is raised as is."""
    import tempfile
    out_dir = Path(out_dir)
    try:
        return model_mod.save(model, out_dir, overwrite=True, extra_files=extra_files)
    except OSError as e:
        reason = e.strerror or str(e)
    for base in (out_dir.parent, Path(tempfile.gettempdir())):
        try:
            rescue = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.rescued-", dir=base))
            model_mod.save(model, rescue, overwrite=True, extra_files=extra_files)
        except OSError:
            continue
        raise SaveFailed(f"--out {str(out_dir)!r}: the checkpoint could not be written there ({reason}); "
                         f"the trained model was saved to {str(rescue)!r} instead")
    raise SaveFailed(f"--out {str(out_dir)!r}: the checkpoint could not be written there ({reason}), nor "
                     "beside it or in the temp folder; the trained model is lost")


# ---------------------------------------------------------------------------------------- schedule
def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` down to ``min_lr_ratio·lr`` at the end."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ---------------------------------------------------------------------------------------- Muon
def newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """V4's hybrid Newton–Schulz orthogonalisation (spec §9.4): 8 steps with (3.4445, −4.7750, 2.0315),
    then 2 steps with (2, −1.5, 0.5), which pull the singular values to 1 precisely."""
    x = g.float() / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for i in range(10):
        a, b, c = (3.4445, -4.7750, 2.0315) if i < 8 else (2.0, -1.5, 0.5)
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum 0.95 (Nesterov), orthogonalised update rescaled to RMS 0.18, decoupled weight decay."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, momentum: float = 0.95,
                 weight_decay: float = 0.1, rms: float = 0.18):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, rms=rms))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                buf = st.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])
                # an orthogonal m×n matrix has RMS 1/sqrt(max(m, n)): rescale to the target RMS
                u = newton_schulz(g) * (group["rms"] * math.sqrt(max(p.shape)))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])


def is_routed_expert_weight(name: str) -> bool:
    """True for a routed expert's w1 / w2 / w3 (``...ffn.experts.E.wK.weight``); not the shared expert's."""
    return ".ffn.experts." in f".{name}" and name.rsplit(".", 2)[-2] in ("w1", "w2", "w3")


def make_optimizer(model: V4Model, kind: str, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-20,
                   expert_lr_mult: float = 1.0) -> list[torch.optim.Optimizer]:
    """AdamW for everything (kind "adamw"), or V4's split (kind "muon"): Muon for the 2-D matrices of the
    blocks, AdamW for the embedding, head, norms, sinks and the mHC parameters. AdamW ε = 1e-20 (V4 technical
    report). ``expert_lr_mult`` != 1 puts the routed experts' w1/w2/w3 in a group of their own whose
    ``lr_mult`` the trainer applies to every step's learning rate (1: the same groups as always)."""
    if kind not in OPTIMIZERS:
        _bad("optimizer", kind, f"must be one of {OPTIMIZERS}")
    decay, no_decay, muon, experts = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hc = ".hc_" in f".{name}" or name.startswith("hc_")
        if expert_lr_mult != 1.0 and is_routed_expert_weight(name):
            experts.append(p)
        elif kind == "muon" and p.dim() == 2 and name.startswith(("layers.", "mtp.")) and not is_hc:
            muon.append(p)
        elif p.dim() >= 2 and not is_hc:
            decay.append(p)
        else:
            no_decay.append(p)
    expert_group = [{"params": experts, "weight_decay": weight_decay, "lr_mult": expert_lr_mult}]
    opts = [torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0},
                               *(expert_group if experts and kind == "adamw" else [])],
                              lr=lr, betas=betas, eps=eps)]
    if muon or (experts and kind == "muon"):
        opts.append(Muon([{"params": muon}, *(expert_group if experts and kind == "muon" else [])],
                         lr=lr, weight_decay=weight_decay))
    return opts


def micro_config(**changes: Any) -> V4Config:
    """A V4 small enough for a notebook experiment to train in seconds: 2 layers (window + hash MoE, CSA +
    learned MoE), a window MTP block, d = 32, 8 experts of width 32, top-2, mHC with 4 streams."""
    cfg = get_config("tiny").replace(
        name="micro", hidden_size=32, num_hidden_layers=2, compress_ratios=[0, 4, 0], num_hash_layers=1,
        num_attention_heads=2, head_dim=32, q_lora_rank=16, o_groups=1, o_lora_rank=16, sliding_window=16,
        index_n_heads=2, index_head_dim=16, index_topk=4, moe_intermediate_size=32)
    return cfg.replace(**changes) if changes else cfg


@torch.no_grad()
def swiglu_preact_max(block: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor) -> float:
    """max |W1 x| and |W3 x| over the tokens each routed expert really got (before the clamp), for gate
    inputs x [T, D] and the expert ids idx [T, K] they were routed to."""
    best = 0.0
    for e, ex in enumerate(block.ffn.experts):
        rows = (idx == e).any(-1)
        if rows.any():
            xe = x[rows].float()
            best = max(best, float((xe @ ex.w1.weight.float().T).abs().max()),
                       float((xe @ ex.w3.weight.float().T).abs().max()))
    return best


# ---------------------------------------------------------------------------------------- probes
class _Probe:
    """Forward hooks that keep what the log needs: gate inputs (for churn), max |MoE output| per layer;
    and, while ``recording_hc`` holds a ForwardRecord on the model, the routing of every MoE layer and the
    token-mean H^res of every mHC site of each forward."""

    def __init__(self, model: V4Model):
        self.model = model
        self.gate_in: dict[int, torch.Tensor] = {}
        self.moe_max: dict[int, float] = {}
        self.record: ForwardRecord = ForwardRecord(h_res=True)
        self.handles = []
        for j, b in enumerate(model.blocks()):
            self.handles.append(b.ffn.gate.register_forward_hook(self._gate_hook(j)))
            self.handles.append(b.ffn.register_forward_hook(self._moe_hook(j)))

    @property
    def h_res(self) -> list[torch.Tensor]:
        return self.record.h_res

    def _gate_hook(self, j):
        def hook(mod, args, out):
            self.gate_in[j] = args[0].detach()
        return hook

    def _moe_hook(self, j):
        def hook(mod, args, out):
            self.moe_max[j] = float(out.detach().abs().max())
        return hook

    def clear(self):
        self.gate_in.clear()
        self.moe_max.clear()
        self.record.h_res.clear()
        self.record.routing.clear()

    @contextlib.contextmanager
    def recording_hc(self):
        with self.model.recording(h_res=True) as rec:
            self.record = rec
            yield

    def remove(self):
        for h in self.handles:
            h.remove()


def composite_gain(h_res_list: list[torch.Tensor], n_sites: int) -> dict:
    """Composite gains by depth over the first ``n_sites`` recorded sites (the backbone, 2 per block)."""
    if len(h_res_list) < n_sites or n_sites == 0:
        return {}
    return composite_gains(torch.stack(h_res_list[:n_sites]))


def learned_moe_blocks(model: V4Model) -> list[int]:
    """Indices into model.blocks() of the MoE layers with a learned router (not hash)."""
    return [j for j, b in enumerate(model.blocks()) if not b.ffn.gate.is_hash]


def _sets_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.sort(-1).values != b.sort(-1).values).any(-1)


# ---------------------------------------------------------------------------------------- losses
def lm_losses(model: V4Model, ids: torch.Tensor, forced_routes: list | None = None,
              mtp: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main CE, MTP CE or None) on a batch ids [B, S+1]: logits for ids[:, :S] vs ids[:, 1:], MTP vs ids[:, 2:]."""
    ids = ids.to(model.device)
    x = ids[:, :-1]
    V = model.cfg.vocab_size
    if mtp and len(model.mtp):
        logits, mtp_logits = model(x, return_mtp=True, forced_routes=forced_routes)
        mtp_loss = F.cross_entropy(mtp_logits.float().reshape(-1, V), ids[:, 2:].reshape(-1))
    else:
        logits, mtp_loss = model(x, forced_routes=forced_routes), None
    return F.cross_entropy(logits.float().reshape(-1, V), ids[:, 1:].reshape(-1)), mtp_loss


def balance_loss(model: V4Model, batch_size: int, alpha: float, layers: list[int] | None = None,
                 record: ForwardRecord | None = None) -> torch.Tensor:
    """Σ over learned-router MoE layers (MTP included; ``layers`` = block indices, default all learned ones)
    of V3's sequence-wise balance loss, from the routing of the forward that filled ``record``
    (``with model.recording() as record: ...``)."""
    if not isinstance(record, ForwardRecord):
        _bad("record", record, "must be the ForwardRecord of the forward (with model.recording() as record)")
    total = torch.zeros((), device=model.device)
    for j in learned_moe_blocks(model) if layers is None else layers:
        m = model.blocks()[j].ffn
        r = record.routing_of(m)
        if r is None:
            continue
        T, E = r["scores"].shape
        S = T // batch_size
        total = total + sequence_balance_loss(r["scores"].view(batch_size, S, E),
                                              r["idx"].view(batch_size, S, -1), E, alpha)
    return total


@torch.no_grad()
def evaluate(model: V4Model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Mean held-out cross-entropy (nats/token) over windows [W, S+1]: {"loss", "mtp_loss", "tokens"}."""
    was = model.training
    model.eval()
    tot, tot_mtp, n, n_mtp = 0.0, 0.0, 0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        lm, mt = lm_losses(model, ids, mtp=len(model.mtp) > 0)
        k = ids[:, 1:].numel()
        tot, n = tot + float(lm) * k, n + k
        if mt is not None:
            k2 = ids[:, 2:].numel()
            tot_mtp, n_mtp = tot_mtp + float(mt) * k2, n_mtp + k2
    model.train(was)
    return {"loss": tot / n, "mtp_loss": tot_mtp / n_mtp if n_mtp else None, "tokens": n}


@torch.no_grad()
def class_expert_counts(tokens: torch.Tensor, idx: torch.Tensor, token_class: torch.Tensor, n_experts: int,
                        n_classes: int | None = None) -> torch.Tensor:
    """Joint counts [C, E] (float64, CPU) of (class of the token, expert) over every (token, top-k slot) pair:
    tokens [T] ids, idx [T, K] the experts they were sent to. ``token_class`` [V]: class of each id
    (``torch.arange(V)`` counts per token id)."""
    C = int(token_class.max()) + 1 if n_classes is None else n_classes
    joint = torch.zeros(C, n_experts, dtype=torch.float64)
    idx = idx.cpu()
    c = token_class.cpu()[tokens.cpu().reshape(-1)][:, None].expand_as(idx)
    joint.index_put_((c.reshape(-1), idx.reshape(-1)), torch.ones(idx.numel(), dtype=torch.float64), accumulate=True)
    return joint


def mutual_information_bits(joint: torch.Tensor) -> float:
    """I(C; E) = Σ p(c,e) log2 p(c,e)/(p(c)p(e)) of joint counts [C, E]."""
    p = joint.double() / joint.sum()
    pc, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / (pc * pe)[nz]).log2()).sum())


def expert_specialisation(model: V4Model, windows: torch.Tensor, token_class: torch.Tensor,
                          batch_size: int = 8) -> dict:
    """Mutual information (bits) between the class of the input token and the expert it is sent to,
    per MoE layer, counting every (token, top-k slot) pair: I(C; E) = Σ p(c,e) log2 p(c,e)/(p(c)p(e)).
    Returns {"layers": [block index], "hash": [bool], "mi_bits": [...], "mean_learned_mi_bits"}."""
    blocks = model.blocks()
    C, E = int(token_class.max()) + 1, model.cfg.n_routed_experts
    joint = torch.zeros(len(blocks), C, E, dtype=torch.float64, device="cpu")     # counted on the CPU
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size, :-1].cpu()
        with model.recording() as rec:
            model(ids, return_mtp=len(model.mtp) > 0)
        for j, b in enumerate(blocks):
            idx = rec.routing_of(b.ffn)["idx"].cpu()              # [T, K]; counted on the CPU with the ids
            tok = ids if j < model.cfg.num_hidden_layers else ids[:, 1:]   # MTP routes token i+1
            joint[j] += class_expert_counts(tok, idx, token_class, E, C)
    mi = [mutual_information_bits(joint[j]) for j in range(len(blocks))]
    hashed = [b.ffn.gate.is_hash for b in blocks]
    learned = [m for m, h in zip(mi, hashed) if not h]
    return {"layers": list(range(len(blocks))), "hash": hashed, "mi_bits": mi,
            "mean_learned_mi_bits": sum(learned) / max(1, len(learned))}


# ---------------------------------------------------------------------------------------- training
RUNTIME_KEYS = ("data", "model", "opt_state", "ddp", "extra_files", "callback", "on_checkpoint")


def _snapshot(model, opts, step):
    return {"step": step, "model": copy.deepcopy(model.state_dict()),
            "opts": [copy.deepcopy(o.state_dict()) for o in opts]}


def _restore(model, opts, snap):
    model.load_state_dict(snap["model"])
    for o, s in zip(opts, snap["opts"]):
        o.load_state_dict(s)
    return snap["step"]


@torch.no_grad()
def _routes_with(model, snap, ids: torch.Tensor, use_mtp: bool) -> list:
    """Routes of the batch ids [B, S+1] under an older snapshot's parameters (the model is restored after)."""
    now = copy.deepcopy(model.state_dict())
    model.load_state_dict(snap["model"])
    try:
        return model.route_only(ids[:, :-1], return_mtp=use_mtp)
    finally:
        model.load_state_dict(now)


@contextlib.contextmanager
def torch_settings(threads: int | None = None, deterministic: bool = False,
                   device: torch.device | None = None) -> Iterator[None]:
    """Within the block: ``threads`` torch threads (None: as they are) and, with ``deterministic``,
    deterministic algorithms (warn only; on CUDA with the fixed cuBLAS workspace determinism needs).
    Everything is put back as it was on the way out, an exception included."""
    n_threads = torch.get_num_threads()
    det, det_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        if deterministic:
            if device is not None and device.type == "cuda":   # read at cuBLAS's first use
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(n_threads)
        if deterministic:
            torch.use_deterministic_algorithms(det, warn_only=det_warn)
            if cublas is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


class Trainer:
    """One training run: ``Trainer(config, data, ...).run()`` -> {"model", "log", "evals", "summary", "opts"}.

    ``config`` (a ``TrainConfig``) holds the settings; the rest are objects: ``data`` (a
    ``v4lab.data.TokenData``; default: the CPython-docs corpus with a BPE of the model's vocabulary),
    ``model`` to continue (its weights; a new one is built after ``torch.manual_seed(seed)`` on the CPU and
    then moved, so a seed gives the same initial weights on every device), ``opt_state`` (optimiser state
    dicts, e.g. ``v4lab.labrun.optimizer_states``), ``ddp`` (a ``v4lab.distributed.DataParallel``: this
    process is one rank, the global batch is split over the ranks), ``extra_files`` ({name: bytes} written
    into every checkpoint, e.g. the tokenizer), ``callback(step, record, model)`` after each step and
    ``on_checkpoint(next_step, model, opts)`` every ``ckpt_seconds`` and after the last step.

    ``run`` sets up (under ``torch_settings``: the thread count and deterministic algorithms are restored
    after) and calls ``step`` until ``stop_step``. A checkpoint the disk refuses goes to a fallback folder
    (``save_or_rescue``, raises ``SaveFailed``); Ctrl-C raises ``Interrupted`` naming the last complete
    checkpoint. Anticipatory Routing's pending routes and rollback snapshots are not part of a resumable
    state: resume with it "off".
    """

    def __init__(self, config: TrainConfig, data: TokenData | None = None, *, model: V4Model | None = None,
                 opt_state: list | None = None, ddp: DataParallel | None = None,
                 extra_files: dict[str, bytes] | None = None, callback: Callable | None = None,
                 on_checkpoint: Callable | None = None):
        self.config, self.cfg = config, config.model_config
        self.data, self.model, self.opt_state, self.ddp = data, model, opt_state, ddp
        self.extra_files, self.callback, self.on_checkpoint = extra_files, callback, on_checkpoint
        if ddp is not None:
            ddp.check_batch(config.batch_size)
        self.dev = get_device(config.device)
        self.main_rank = ddp is None or ddp.is_main
        self.position = config.start_step          # the next step to run
        self.saved = None                          # folder of the last complete checkpoint this run wrote

    # ------------------------------------------------------------------------------------ set-up
    def run(self) -> dict:
        c = self.config
        with torch_settings(c.threads, c.deterministic, self.dev):
            self.setup()
            return self._loop()

    def setup(self) -> Trainer:
        """Build (or move) the model, the optimisers, the probes and Anticipatory Routing's parts. ``run``
        calls it; to drive ``step`` by hand, call it first (inside ``torch_settings`` for the same numbers)."""
        self._setup_model()
        self._setup_run()
        return self

    def _setup_model(self) -> None:
        from v4lab.data import load_data
        c, cfg = self.config, self.cfg
        if self.data is None:
            self.data = load_data(cfg.vocab_size)
        if self.data.vocab_size != cfg.vocab_size:
            _bad("data", f"vocab {self.data.vocab_size}", f"must match cfg.vocab_size = {cfg.vocab_size}")
        torch.manual_seed(c.seed)
        model = self.model
        if model is None:
            model = V4Model(cfg)
            if c.balanced_hash:                    # frequency-balanced hash tables (Roller et al.), see gate.py
                from v4lab.gate import balanced_hash_table
                counts = torch.bincount(self.data.train, minlength=cfg.vocab_size)
                for b in model.layers:
                    if b.ffn.gate.is_hash:
                        b.ffn.gate.tid2eid.copy_(balanced_hash_table(counts, cfg.n_routed_experts,
                                                                     cfg.num_experts_per_tok))
        self.model = model = model_mod.to_device(model, self.dev)
        self.qat_from = c.qat_from
        model.set_flags(hc_mode=c.hc_mode, qat=self.qat_from is not None and c.start_step >= self.qat_from,
                        expert_h_fp8=c.expert_h_fp8)
        model.train()
        self.opts = make_optimizer(model, c.optimizer, c.lr, c.weight_decay, expert_lr_mult=c.expert_lr_mult)
        self.fwd = model if self.ddp is None else self.ddp.wrap(model)     # what the loss forward goes through
        for o, st in zip(self.opts, self.opt_state or []):
            o.load_state_dict(st)

    def _setup_run(self) -> None:
        c, cfg, model = self.config, self.cfg, self.model
        self.csa = _csa_attns(model) if c.indexer_distill_weight > 0 else []
        # the indexer's loss must not rescale the LM step: its parameters are clipped on their own
        self.ix_ids = {id(p) for a in self.csa for p in a.indexer.parameters()}
        self.probe = _Probe(model)
        self.blocks = model.blocks()
        self.n_sites = 2 * cfg.num_hidden_layers
        self.use_mtp = len(model.mtp) > 0 and (c.mtp_weight > 0 or bool(c.mtp_weight_final))
        self.n_run = len(self.blocks) if self.use_mtp else cfg.num_hidden_layers   # MoE layers a forward runs
        self.learned = [j for j in learned_moe_blocks(model) if j < self.n_run]
        self.heldout = self.data.heldout_windows(c.seq_len, c.eval_windows) if c.eval_every else None
        self.log, self.evals = [], []
        self.log_f = (open(c.log_path, "a" if c.start_step else "w")
                      if c.log_path and self.main_rank else None)
        self.ar = AnticipatoryRouting(c.ar_lag, self._routes_now, self._routes_then)
        self.detector = SpikeDetector(c.spike_ratio, c.spike_beta, c.detector_min_step)
        self.snaps = RollbackBuffer(c.rollback_steps if c.spike_rollback else c.ar_lag)
        self.spike_done, self.n_rollbacks = False, 0
        if c.anticipatory == "always":
            self.ar.start(0)
        self.bar = None
        if c.progress and self.main_rank:
            from v4lab.progress import bar as _bar
            self.bar = _bar(c.last_step - c.start_step, "train", leave=False)   # drawn only on a terminal
        self.t_start, self.c_start = time.perf_counter(), time.process_time()
        self.t_ckpt = self.t_start

    def _batch(self, t: int) -> torch.Tensor:
        c = self.config
        ids = self.data.batch(t, c.batch_size, c.seq_len, c.seed)
        return ids if self.ddp is None else self.ddp.shard(ids)

    def _routes_now(self, t: int) -> list:
        return self.model.route_only(self._batch(t)[:, :-1], return_mtp=self.use_mtp)

    def _routes_then(self, snap: dict, t: int) -> list:
        c = self.config
        return _routes_with(self.model, snap, self.data.batch(t, c.batch_size, c.seq_len, c.seed), self.use_mtp)

    # ------------------------------------------------------------------------------------ the loop
    def _loop(self) -> dict:
        c = self.config
        try:
            while self.position < c.last_step:
                rec = self.step()
                if rec.get("event", "").startswith("spike"):
                    continue
                if self.on_checkpoint is not None and c.ckpt_seconds is not None and \
                        self.position < c.last_step and self.main_rank and \
                        time.perf_counter() - self.t_ckpt > c.ckpt_seconds:
                    self.on_checkpoint(self.position, self.model, self.opts)
                    self.t_ckpt = time.perf_counter()
                stop = c.max_seconds is not None and time.perf_counter() - self.t_start > c.max_seconds
                if stop if self.ddp is None or c.max_seconds is None else self.ddp.any(stop):
                    break
        except KeyboardInterrupt:
            raise Interrupted(self.position, self.saved) from None
        finally:
            self._close()
        return self._finish()

    def _close(self) -> None:
        self.probe.remove()
        if self.log_f:
            self.log_f.close()
        if self.bar is not None:
            self.bar.close()

    def _finish(self) -> dict:
        c, step = self.config, self.position
        if c.out_dir and self.main_rank:
            try:
                save_or_rescue(self.model, c.out_dir, self.extra_files)
            except KeyboardInterrupt:
                raise Interrupted(step, self.saved) from None
        if self.on_checkpoint is not None and self.main_rank:
            self.on_checkpoint(step, self.model, self.opts)
        summary = {"steps_done": step, "seconds": time.perf_counter() - self.t_start,
                   "cpu_seconds": time.process_time() - self.c_start, "threads": torch.get_num_threads(),
                   "rollbacks": self.n_rollbacks,
                   "final_loss": self.log[-1]["loss"] if self.log else None,
                   "tokens": step * c.batch_size * c.seq_len}
        return {"model": self.model, "log": self.log, "evals": self.evals, "summary": summary, "opts": self.opts}

    # ------------------------------------------------------------------------------------ one step
    def step(self) -> dict:
        """One optimiser step at ``position`` (the module docstring's recipe), then the spike detector, the
        held-out evaluation, the log and the checkpoint; ``position`` moves on (back, after a rollback).
        Returns the step's log record."""
        step, t0 = self.position, time.perf_counter()
        cur_lr = self._begin_step(step)
        ids = self._batch(step)
        routes = self.ar.routes(step)
        self.probe.clear()
        with self.probe.recording_hc():           # the forward's routing and H^res, owned by this step
            loss, parts = self._loss(step, ids, routes)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        norms = self._clip(bool(parts["dcsa"]))
        stats = self._routing_before_update(step)
        kicked = self._router_kick(step)
        for o in self.opts:
            o.step()
        kicked()
        loads = stats["loads"] if self.ddp is None else self.ddp.sum_loads(stats["loads"])  # the global load
        if self.config.bias_gamma > 0:                 # every rank makes the same bias update
            for j in self.learned:
                bias_update(self.blocks[j].ffn.gate.bias, loads[j], self.config.bias_gamma)
        rec = self._record(step, t0, cur_lr, loss, parts, norms, {**stats, "loads": loads})
        back = self._detect(step, rec)
        self._after_step(step, rec, back is None and "event" not in rec)
        self.position = back if back is not None else step + 1
        return rec

    def _begin_step(self, step: int) -> float:
        """Snapshot for a rollback (spike mode), the QAT switch, and the step's learning rate."""
        c = self.config
        if c.anticipatory == "spike" and (c.spike_rollback or c.spike_ar):
            # a rollback keeps `rollback` steps back; AR without a rollback keeps θ_{t−Δt} for its first routes
            self.snaps.push(_snapshot(self.model, self.opts, step))
        if self.qat_from is not None and step == self.qat_from:
            self.model.set_flags(qat=True)
        cur_lr = lr_at(step, c.steps, c.lr, c.warmup, c.min_lr_ratio)
        if c.spike_at is not None and step == c.spike_at and not self.spike_done and c.spike_scope == "all":
            cur_lr *= c.spike_lr_mult
            self.spike_done = True
        for o in self.opts:
            for g in o.param_groups:
                g["lr"] = cur_lr * g.get("lr_mult", 1.0)      # lr_mult: the experts' group (expert_lr_mult)
        return cur_lr

    def _router_kick(self, step: int) -> Callable[[], None]:
        """``spike_scope`` "router": at ``spike_at`` the learned routers' update is multiplied by
        ``spike_lr_mult`` (the same as that learning-rate multiplier for those weights alone: an AdamW or Muon
        update, decay included, is linear in the learning rate). Call before the optimiser step; call what
        it returns after it."""
        c = self.config
        if c.spike_scope != "router" or c.spike_at != step or self.spike_done:
            return lambda: None
        self.spike_done = True
        ws = [self.blocks[j].ffn.gate.weight for j in self.learned]
        before = [w.detach().clone() for w in ws]

        def scale() -> None:
            with torch.no_grad():
                for w, w0 in zip(ws, before):
                    w.copy_(w0 + c.spike_lr_mult * (w - w0))
        return scale

    def _loss(self, step: int, ids: torch.Tensor, routes) -> tuple[torch.Tensor, dict]:
        """The step's loss: LM + weighted MTP + balance (+ the indexer's KL on its steps)."""
        c = self.config
        dcsa = self.csa if step % c.indexer_distill_every == 0 else []
        for a in dcsa:
            a.distill = True
        try:
            lm, mt = lm_losses(self.fwd, ids, routes, mtp=self.use_mtp)
        finally:
            for a in dcsa:
                a.distill = False
        moe_max = dict(self.probe.moe_max)
        bal = (balance_loss(self.model, len(ids), c.balance_alpha, self.learned, self.probe.record)
               if c.balance_alpha > 0
               else torch.zeros(()))
        w_mtp = c.mtp_weight_at(step)
        loss = lm + (w_mtp * mt if mt is not None else 0.0) + bal
        kl = None
        if dcsa:
            kl = sum(a.last_distill[0] for a in dcsa) / max(1, sum(a.last_distill[1] for a in dcsa))
            loss = loss + float(c.indexer_distill_weight) * kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {float(loss)}")
        return loss, {"lm": lm, "mt": mt, "bal": bal, "w_mtp": w_mtp, "kl": kl, "dcsa": dcsa, "moe_max": moe_max}

    def _clip(self, distilled: bool) -> dict:
        """Gradient norms before clipping: the model's, and the indexers' (clipped apart) on KL steps."""
        limit = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        params = [p for p in self.model.parameters() if p.grad is not None and id(p) not in self.ix_ids]
        norms = {"grad": float(torch.nn.utils.clip_grad_norm_(params, limit)), "indexer": None}
        if distilled:
            norms["indexer"] = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None and id(p) in self.ix_ids], limit))
        return norms

    def _routing_before_update(self, step: int) -> dict:
        """Routes used, loads, gate inputs (and pre-activations) of this step; with AR on, how far the router
        is from the routes it was given, and the look-ahead routes of step t+Δt with θ_t."""
        blocks, learned = self.blocks, self.learned
        rec = self.probe.record
        used = {j: rec.routing_of(blocks[j].ffn)["idx"] for j in learned}
        loads = [rec.routing_of(blocks[j].ffn)["load"] for j in range(self.n_run)]
        gate_x = dict(self.probe.gate_in)
        preact = ([swiglu_preact_max(blocks[j], gate_x[j], rec.routing_of(blocks[j].ffn)["idx"])
                   for j in range(self.n_run)]
                  if self.config.log_preact else None)
        lag_mismatch = None
        if self.ar.on:
            lag_mismatch = [float(_sets_differ(used[j], _current_topk(blocks[j], gate_x[j])).float().mean())
                            for j in learned]
            self.ar.look_ahead(step)
        return {"used": used, "loads": loads, "gate_x": gate_x, "preact": preact, "lag_mismatch": lag_mismatch}

    def _record(self, step: int, t0: float, cur_lr: float, loss: torch.Tensor, parts: dict, norms: dict,
                stats: dict) -> dict:
        """The step's log record (after the update: churn is measured with the updated router)."""
        c, blocks, learned, n_run = self.config, self.blocks, self.learned, self.n_run
        used, gate_x, mt = stats["used"], stats["gate_x"], parts["mt"]
        churn = [float(_sets_differ(used[j], _current_topk(blocks[j], gate_x[j])).float().mean()) for j in learned]
        gains = composite_gain(self.probe.h_res, self.n_sites)
        rec = {"iter": len(self.log), "step": step, "lr": cur_lr, "loss": float(loss.detach()),
               "lm_loss": float(parts["lm"].detach()), "mtp_loss": float(mt.detach()) if mt is not None else None,
               "mtp_weight": parts["w_mtp"], "balance_loss": float(parts["bal"].detach()),
               "grad_norm": norms["grad"], "load": [x.tolist() for x in stats["loads"]],
               "learned_layers": learned, "churn": churn, "ar_lag_mismatch": stats["lag_mismatch"],
               "moe_max_abs": [parts["moe_max"].get(j) for j in range(n_run)],
               "swiglu_preact_max": stats["preact"],
               "mhc_gain": max(gains["fwd_max"][-1], gains["bwd_max"][-1]) if gains else None,
               "mhc_gain_min": min(gains["fwd_min"][-1], gains["bwd_min"][-1]) if gains else None,
               "ar_on": self.ar.on, "qat": bool(self.model.qat), "seconds": time.perf_counter() - t0,
               "cpu_seconds": time.process_time() - self.c_start,
               "tokens": (step + 1) * c.batch_size * c.seq_len}
        dcsa = parts["dcsa"]
        if dcsa:
            rec["indexer_kl"] = float(parts["kl"].detach())
            rec["indexer_grad_norm"] = norms["indexer"]
            rec["indexer_recall"] = (sum(a.last_recall[0] for a in dcsa)
                                     / max(1, sum(a.last_recall[1] for a in dcsa)))
        return rec if self.ddp is None else self.ddp.reduce_record(rec)

    def _detect(self, step: int, rec: dict) -> int | None:
        """Spike mode: a spike rolls back (and/or turns AR on), AR goes off when its time is up. Sets
        ``rec["event"]``; returns the step to continue from after a spike (None: the next one)."""
        c, lval, back = self.config, rec["lm_loss"], None
        if c.anticipatory == "spike":
            if self.detector.fires(step, lval) and (self.snaps.ready or not c.spike_rollback):
                back = _restore(self.model, self.opts, self.snaps.oldest) if c.spike_rollback else step + 1
                rec["event"] = (f"spike: rollback {step} -> {back}" if c.spike_rollback
                                else f"spike at {step}, no rollback") + (", AR on" if c.spike_ar else "")
                self.n_rollbacks += int(c.spike_rollback)
                taken = self.snaps.take()
                self.detector.quiet(back + c.ar_duration)
                if c.spike_ar:
                    older = [] if c.spike_rollback else taken
                    self.ar.start(back, {sn["step"]: sn for sn in older}, until=back + c.ar_duration)
            elif self.ar.expired(step):
                self.ar.stop()
                rec["event"] = "AR off"
        if back is None:                               # the EMA does not absorb a spike
            self.detector.absorb(lval)
        return back

    def _after_step(self, step: int, rec: dict, evaluate_now: bool) -> None:
        """Held-out evaluation (not on an event step), the log, the callback, the bar, the checkpoint."""
        c = self.config
        if self.heldout is not None and ((step + 1) % c.eval_every == 0 or step + 1 == c.last_step) \
                and evaluate_now:
            ev = evaluate(self.model, self.heldout, c.batch_size)
            rec["heldout_loss"] = ev["loss"]
            self.evals.append({"step": step, **ev})
        self.log.append(rec)
        if self.log_f:
            self.log_f.write(json.dumps(rec) + "\n")
            self.log_f.flush()
        if self.callback is not None:
            self.callback(step, rec, self.model)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", ar="on" if self.ar.on else "off")
            self.bar.update(1)
        if c.out_dir and c.ckpt_every and (step + 1) % c.ckpt_every == 0 and self.main_rank:
            self.saved = save_or_rescue(self.model, c.out_dir, self.extra_files)


def train(cfg: V4Config | str = "tiny", **kw: Any) -> dict:
    """Train and return {"model", "log": [per-step records], "evals": [...], "summary": {...}, "opts"}.

    ``cfg`` and every setting of ``TrainConfig`` (see ``v4lab.trainconfig``) as keywords, plus the objects
    ``Trainer`` takes (``data``, ``model``, ``opt_state``, ``ddp``, ``extra_files``, ``callback``,
    ``on_checkpoint``). Equivalent to ``Trainer(TrainConfig(cfg, **settings), **objects).run()``.
    """
    objects = {k: kw.pop(k) for k in RUNTIME_KEYS if k in kw}
    return Trainer(TrainConfig(cfg, **kw), **objects).run()


def fit(config: TrainConfig, data: TokenData | None = None, **objects: Any) -> dict:
    """``Trainer(config, data, **objects).run()``: what experiments call with ``dataclasses.replace(base, ...)``."""
    return Trainer(config, data, **objects).run()


@torch.no_grad()
def _current_topk(block, x: torch.Tensor) -> torch.Tensor:
    """The experts block.ffn.gate would choose now (current weight and bias) for gate inputs x [T, D]."""
    from v4lab.gate import select_topk
    g = block.ffn.gate
    return select_topk(g.scores(x), g.bias, g.topk, g.n_group, g.topk_group)


# ---------------------------------------------------------------------------------------- indexer warm-up
def _csa_attns(model: V4Model) -> list:
    return [b.attn for b in model.layers if b.attn.kind == "csa"]


def indexer_params(model: V4Model) -> list:
    """The parameters of every CSA layer's lightning indexer (``attn.indexer.*``)."""
    return [p for a in _csa_attns(model) for p in a.indexer.parameters()]


def _distill_forward(model: V4Model, ids: torch.Tensor):
    """One forward with the warm-up loss on: (mean KL over queries and layers, hits, possible)."""
    attns = _csa_attns(model)
    for a in attns:
        a.distill = True
    try:
        model(ids)
    finally:
        for a in attns:
            a.distill = False
    kl = sum(a.last_distill[0] for a in attns)
    n = sum(a.last_distill[1] for a in attns)
    hits = sum(a.last_recall[0] for a in attns)
    possible = sum(a.last_recall[1] for a in attns)
    return kl / max(1, n), hits, possible


def _random_recall(cfg, seq_len: int) -> float:
    """Expected recall of picking index_topk of the visible entries at random (per query k/n, capped at 1)."""
    k = cfg.index_topk
    m = next(cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) == "csa")
    hit = tot = 0.0
    for t in range(seq_len):
        n = (t + 1) // m
        if n:
            hit += min(k, n) * min(1.0, k / n)
            tot += min(k, n)
    return hit / tot if tot else 0.0


@torch.no_grad()
def indexer_quality(model: V4Model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """On windows [W, S+1]: mean distillation KL (nats per query) and top-k recall of the entries the main
    attention weighs most, against the recall of random picks."""
    was = model.training
    model.eval()
    kls, hits, possible = [], 0, 0
    for i in range(0, windows.shape[0], batch_size):
        kl, h, n = _distill_forward(model, windows[i:i + batch_size, :-1])
        kls.append(float(kl))
        hits, possible = hits + h, possible + n
    model.train(was)
    return {"kl": sum(kls) / len(kls), "recall": hits / max(1, possible),
            "random_recall": _random_recall(model.cfg, windows.shape[1] - 1)}


def _indexer_report(model: V4Model, heldout: torch.Tensor, batch_size: int) -> dict:
    return {**indexer_quality(model, heldout, batch_size), "heldout_loss": evaluate(model, heldout, batch_size)["loss"]}


def indexer_warmup(model: V4Model, data: TokenData | None = None, *, steps: int = 100, batch_size: int = 8,
                   seq_len: int = 512, lr: float = 1e-3, warmup: int = 5, seed: int = 0, eval_windows: int = 8,
                   progress: bool = True, device: str | torch.device | None = None) -> dict:
    """V4's indexer warm-up (spec §9.4; the recipe is V3.2's DSA warm-up): every parameter but the CSA
    indexers' is frozen, and the indexers learn to rank compressed entries as the main attention weighs
    them (``v4lab.indexer.distill_kl``) while the forward itself stays sparse (top-k). The language model
    is unchanged except through which entries the indexer now picks.

    Returns {"model", "log": [{"step", "kl", "recall", "lr"}], "before", "after"} with ``before`` / ``after``
    = :func:`indexer_quality` (plus the held-out LM loss) on ``eval_windows`` held-out windows."""
    from v4lab.data import load_data
    for name, v in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len), ("warmup", warmup)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _bad(name, v, "must be a positive integer")
    if not _csa_attns(model):
        _bad("model", model.cfg.name, "has no CSA layer, so no indexer to warm up")
    dev = get_device(device)
    model = model_mod.to_device(model, dev)
    data = data if data is not None else load_data(model.cfg.vocab_size)
    heldout = data.heldout_windows(seq_len, eval_windows)
    before = _indexer_report(model, heldout, batch_size)
    params = indexer_params(model)
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-20, weight_decay=0.0)
    log = []
    bar = None
    if progress:
        from v4lab.progress import bar as _bar
        bar = _bar(steps, "indexer warm-up", leave=False)
    model.eval()                       # no dropout anyway; eval keeps MoE bias/balance bookkeeping out
    try:
        for step in range(steps):
            cur = lr_at(step, steps, lr, warmup)
            for g in opt.param_groups:
                g["lr"] = cur
            ids = data.batch(step, batch_size, seq_len, seed)[:, :-1]
            kl, hits, possible = _distill_forward(model, ids)
            opt.zero_grad(set_to_none=True)
            kl.backward()
            opt.step()
            log.append({"step": step, "kl": float(kl.detach()), "recall": hits / max(1, possible), "lr": cur})
            if bar is not None:
                bar.set_postfix(kl=f"{log[-1]['kl']:.3f}", recall=f"{log[-1]['recall']:.2f}")
                bar.update(1)
    finally:
        for p, r in frozen.items():
            p.requires_grad_(r)
        if bar is not None:
            bar.close()
    after = _indexer_report(model, heldout, batch_size)
    return {"model": model, "log": log, "before": before, "after": after}


# ---------------------------------------------------------------------------------------- CLI
def _parser():
    p = OneLineParser(prog="v4lab train", description="Train a tiny V4 with the V4 recipe on the "
                                "CPython documentation corpus; write it in the official layout.")
    p.add_argument("--config", default="tiny", help="preset name or config.json (default tiny)")
    p.add_argument("--out", help="output directory (official layout + tokenizer.json + training log)")
    p.add_argument("--init", help="start from this saved model directory (and its tokenizer) instead of "
                                  "random weights; the optimiser starts fresh")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--mtp-weight-final", type=float, default=None,
                   help="MTP weight after --mtp-switch-at (V4: 0.3 -> 0.1); default: constant")
    p.add_argument("--mtp-switch-at", type=float, default=0.7, help="fraction of the run where it switches")
    p.add_argument("--bias-gamma", type=float, default=0.001, help="bias update speed (V4: 0.001)")
    p.add_argument("--balance-alpha", type=float, default=1e-4)
    p.add_argument("--swiglu-limit", type=float, default=None, help="override the config's clamp (<= 0: off)")
    p.add_argument("--qat-from", type=float, default=None,
                   help="fraction of the run after which routed experts train through FP4 QAT (0 = all)")
    p.add_argument("--hc-mode", choices=model_mod.HC_MODES, default="mhc")
    p.add_argument("--anticipatory", choices=AR_MODES, default="off")
    p.add_argument("--ar-lag", type=int, default=4)
    p.add_argument("--ar-duration", type=int, default=20)
    p.add_argument("--spike-ratio", type=float, default=1.5)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: $V4LAB_DEVICE, else auto)")
    p.add_argument("--indexer-warmup", type=int, default=None, metavar="STEPS",
                   help="with --init: only warm up the CSA indexers for STEPS steps (everything else frozen; "
                        "--lr, --batch-size, --seq-len, --warmup, --seed apply) and write OUT")
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--log", help="JSONL log path (default OUT/train_log.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (DDP; gloo on "
                   "CPU, NCCL on CUDA); --batch-size is the global batch. Under torchrun the job's world is used")
    return p


KEPT_FILES = ("training_summary.json", "train_log.jsonl", "heldout.txt")   # carried over by a warm-up


def _warmup_main(args, dev, argv=None) -> int:
    """``v4lab train --init DIR --indexer-warmup STEPS --out OUT``: the indexer warm-up of a trained model."""
    from v4lab.data import load_data, load_tokenizer
    if not args.init or not args.out:
        _bad("--indexer-warmup", args.indexer_warmup, "needs --init (a trained model) and --out")
    if args.indexer_warmup < 1:
        _bad("--indexer-warmup", args.indexer_warmup, "must be a positive number of steps")
    init, out = Path(args.init), check_writable(args.out, "--out")
    model = model_mod.load(init, device=dev)
    tok = load_tokenizer(init)
    kept = {f: (init / f).read_bytes() for f in KEPT_FILES if (init / f).is_file()}   # save() replaces OUT
    data = load_data(model.cfg.vocab_size, tokenizer=tok)
    res = indexer_warmup(model, data, steps=args.indexer_warmup,
                         batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                         seed=args.seed, eval_windows=args.eval_windows, progress=not args.no_progress,
                         device=dev)
    save_or_rescue(res["model"], out)
    for f, b in kept.items():
        (out / f).write_bytes(b)
    command = "v4lab train " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"before": res["before"], "after": res["after"], "log": res["log"], "command": command,
              "torch": torch.__version__}
    (out / "indexer_warmup.json").write_text(json.dumps(report, indent=1) + "\n")
    if "training_summary.json" in kept:   # the shipped numbers describe the shipped (saved, re-read) weights
        summary = json.loads(kept["training_summary.json"])
        loaded = model_mod.load(out, device=dev)
        windows = data.heldout_windows(args.seq_len)
        summary["before_indexer_warmup"] = {k: summary.get(k) for k in ("heldout", "heldout_subset")}
        summary["heldout"] = evaluate(loaded, windows, args.batch_size)
        sub = windows[:HELDOUT_TEST_WINDOWS]
        summary["heldout_subset"] = {"windows": int(sub.shape[0]), **evaluate(loaded, sub, args.batch_size)}
        summary["indexer_warmup"] = {"steps": args.indexer_warmup, "command": command,
                                     "before": res["before"], "after": res["after"],
                                     "eval_windows": args.eval_windows}
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"before": res["before"], "after": res["after"]}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``v4lab train``: bad arguments exit 2 with one line before any slow set-up; Ctrl-C exits 130 with one
    line saying where the last complete checkpoint is; a checkpoint the disk refuses exits 1 saying where
    the model was saved instead."""
    args = _parser().parse_args(argv)
    done: dict = {}                   # _main records here where the final checkpoint went
    try:
        return _main(args, argv, done)
    except Interrupted as e:
        where = (f"the last complete checkpoint is {str(e.checkpoint)!r}" if e.checkpoint else
                 "no checkpoint was written (--ckpt-every N saves one every N steps)")
        sys.stderr.write(f"v4lab train: interrupted at step {e.step}; {where}\n")
        return 130
    except KeyboardInterrupt:         # during set-up, or after the final save (while summarising)
        where = (f"the final checkpoint is {str(done['out'])!r} (its summary files may be missing)"
                 if done.get("out") else "no checkpoint was written")
        sys.stderr.write(f"v4lab train: interrupted; {where}\n")
        return 130
    except SaveFailed as e:
        sys.stderr.write(f"v4lab train: error: {e}\n")
        return 1


def _check_args(args) -> None:
    """The checks that must fail before any slow set-up."""
    for key in ("steps", "batch_size", "seq_len", "warmup"):
        v = getattr(args, key)
        if v < (2 if key == "seq_len" else 1):
            _bad(f"--{key.replace('_', '-')}", v, "must be a positive integer" + (" >= 2" if key == "seq_len" else ""))
    if not 0 <= args.seed < 2 ** 63:
        _bad("--seed", args.seed, "must be in [0, 2**63)")


def config_from_args(args: argparse.Namespace, cfg: V4Config, out: Path | None, log_path: str | None,
                     dev: torch.device) -> TrainConfig:
    """The ``TrainConfig`` of a ``v4lab train`` command line: the options named like its fields, plus
    ``--qat-from`` (qat), ``--no-progress``, ``--out``, the log path and the device."""
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**{**same, "cfg": cfg, "qat": False if args.qat_from is None else float(args.qat_from),
                          "progress": not args.no_progress, "out_dir": str(out) if out else None,
                          "log_path": log_path, "device": dev})


def _main(args, argv, done: dict) -> int:
    _check_args(args)
    dev = get_device(args.device)                 # a bad --device fails before the slow set-up too
    ddp = None
    if args.nproc != 1 or os.environ.get("WORLD_SIZE", "1") != "1":
        from v4lab.distributed import join_or_launch
        ddp, dev = join_or_launch(args, dev, main, argv)
        if ddp is None:                           # this was the launcher: the ranks have finished
            return 0
    if args.indexer_warmup is not None:
        with torch_settings(args.threads):
            return _warmup_main(args, dev, argv)
    out = check_writable(args.out, "--out") if args.out else None    # refuse before hours of training
    # the settings hold for the summary's evaluations too, as they did when train() left them set
    with torch_settings(args.threads, True, dev):
        return _train_main(args, argv, done, dev, ddp, out)


def _train_main(args, argv, done: dict, dev, ddp, out: Path | None) -> int:
    from v4lab.data import load_data, load_tokenizer, load_topics, split_topics, train_tokenizer
    init = None
    if args.init:                     # continue from a saved model (fresh optimiser), reuse its tokenizer
        init = model_mod.load(args.init, device=dev)
        cfg, tok = init.cfg, load_tokenizer(args.init)
    else:
        cfg = get_config(args.config)
        topics = load_topics()
        tok = train_tokenizer([topics[n] for n in split_topics(topics)[0]], cfg.vocab_size)
    data = load_data(cfg.vocab_size, tokenizer=tok)
    # save() replaces the whole output directory, so the log is written beside it and moved in at the end
    log_path = args.log or (str(out.with_name(out.name + ".train_log.jsonl")) if out else None)
    extra = {"tokenizer.json": tok.to_str(pretty=True).encode()}       # in every checkpoint written
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    config = config_from_args(args, cfg, out, log_path, dev)
    res = Trainer(config, data, model=init, extra_files=extra, ddp=ddp).run()
    done["out"] = out
    if ddp is not None and not ddp.is_main:       # rank 0 evaluates and writes everything
        return 0
    summary = dict(res["summary"])
    if out:
        if not args.log:
            Path(log_path).replace(out / "train_log.jsonl")
        summary.update(_release_numbers(args, res["model"], out, data, tok, dev))
        summary["command"] = "v4lab train " + " ".join(sys.argv[1:] if argv is None else argv)
        summary["args"] = vars(args)
        summary["torch"] = torch.__version__
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("corpus",)}, indent=1)[:4000])
    return 0


def _release_numbers(args, trained: V4Model, out: Path, data, tok, dev) -> dict:
    """The numbers the README and tests quote: held-out loss of the *saved* (FP8/FP4) weights and of the
    weights as trained (fp32 masters; experts through FP4 if QAT was on at the end), the bigram baseline,
    expert specialisation vs random weights. Writes OUT/heldout.txt."""
    from v4lab.data import bigram_loss, heldout_text, token_classes
    s: dict = {}
    (out / "heldout.txt").write_text(heldout_text())
    windows = data.heldout_windows(args.seq_len)
    s["heldout_loss_as_trained"] = evaluate(trained, windows, args.batch_size)["loss"]
    loaded = model_mod.load(out, device=dev)
    s["heldout"] = evaluate(loaded, windows, args.batch_size)
    s["bigram"] = bigram_loss(data.train, windows, loaded.cfg.vocab_size)
    classes = token_classes(tok)
    sub = windows[:HELDOUT_TEST_WINDOWS]
    s["heldout_subset"] = {"windows": int(sub.shape[0]), **evaluate(loaded, sub, args.batch_size)}
    windows = windows[:SPECIALISATION_WINDOWS]
    s["specialisation_windows"] = int(windows.shape[0])
    s["specialisation_trained"] = expert_specialisation(loaded, windows, classes, args.batch_size)
    torch.manual_seed(args.seed)
    rand = model_mod.to_device(V4Model(loaded.cfg), dev)
    for b, lb in zip(rand.layers, loaded.layers):      # same hash tables: compare routers only
        if b.ffn.gate.is_hash:
            b.ffn.gate.tid2eid.copy_(lb.ffn.gate.tid2eid)
    s["specialisation_random"] = expert_specialisation(rand, windows, classes, args.batch_size)
    s["corpus"] = data.fingerprint
    return s


if __name__ == "__main__":
    raise SystemExit(main())
