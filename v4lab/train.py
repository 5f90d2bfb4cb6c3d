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

Logged per step (JSONL, one object per line): loss and its parts, grad norm (before clipping), per-layer
expert load, routing churn (fraction of tokens whose expert set, for the same gate inputs, differs between
the routes used this step and the routes the updated router would choose), max |MoE output| per layer,
max |stream|, the composite mHC gain (max abs row/column sum of the product of the token-mean H^res of every
mHC site of the backbone), AR state, seconds.

Determinism: the batch of step t is a pure function of (seed, t); the model is built after
``torch.manual_seed(seed)``; ``torch.use_deterministic_algorithms(True)``. Same seed, same thread count →
bit-identical losses and weights.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from v4lab import model as model_mod
from v4lab.config import V4Config, get_config
from v4lab.device import get_device
from v4lab.errors import OneLineParser, check_writable
from v4lab.errors import bad as _bad
from v4lab.mhc import composite_gains
from v4lab.model import V4Model
from v4lab.moe import bias_update, sequence_balance_loss
from v4lab.switches import ForwardRecord

AR_MODES = ("off", "always", "spike")
HELDOUT_TEST_WINDOWS = 4          # the held-out subset tests/test_trained_weights.py re-measures
SPECIALISATION_WINDOWS = 16
OPTIMIZERS = ("adamw", "muon")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: ``step`` reached, ``checkpoint`` = the folder holding the last complete
    checkpoint this run wrote (None if none was written)."""

    def __init__(self, step: int, checkpoint):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint


class SaveFailed(RuntimeError):
    """A checkpoint could not be written to its folder; the message says why and where it went instead."""


def save_or_rescue(model: V4Model, out_dir, extra_files: dict | None = None) -> Path:
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

    def __init__(self, params, lr=1e-3, momentum=0.95, weight_decay=0.1, rms=0.18):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, rms=rms))

    @torch.no_grad()
    def step(self):
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


def make_optimizer(model: V4Model, kind: str, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-20):
    """AdamW for everything (kind "adamw"), or V4's split (kind "muon"): Muon for the 2-D matrices of the
    blocks, AdamW for the embedding, head, norms, sinks and the mHC parameters. AdamW ε = 1e-20 (V4 technical report)."""
    if kind not in OPTIMIZERS:
        _bad("optimizer", kind, f"must be one of {OPTIMIZERS}")
    decay, no_decay, muon = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hc = ".hc_" in f".{name}" or name.startswith("hc_")
        if kind == "muon" and p.dim() == 2 and name.startswith(("layers.", "mtp.")) and not is_hc:
            muon.append(p)
        elif p.dim() >= 2 and not is_hc:
            decay.append(p)
        else:
            no_decay.append(p)
    opts = [torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)]
    if muon:
        opts.append(Muon(muon, lr=lr, weight_decay=weight_decay))
    return opts


def micro_config(**changes) -> V4Config:
    """A V4 small enough for a notebook experiment to train in seconds: 2 layers (window + hash MoE, CSA +
    learned MoE), a window MTP block, d = 32, 8 experts of width 32, top-2, mHC with 4 streams."""
    cfg = get_config("tiny").replace(
        name="micro", hidden_size=32, num_hidden_layers=2, compress_ratios=[0, 4, 0], num_hash_layers=1,
        num_attention_heads=2, head_dim=32, q_lora_rank=16, o_groups=1, o_lora_rank=16, sliding_window=16,
        index_n_heads=2, index_head_dim=16, index_topk=4, moe_intermediate_size=32)
    return cfg.replace(**changes) if changes else cfg


@torch.no_grad()
def swiglu_preact_max(block, x: torch.Tensor, idx: torch.Tensor) -> float:
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
def lm_losses(model: V4Model, ids: torch.Tensor, forced_routes=None, mtp: bool = True):
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
            c = token_class.cpu()[tok.reshape(-1)][:, None].expand_as(idx)
            joint[j].index_put_((c.reshape(-1), idx.reshape(-1)), torch.ones(idx.numel(), dtype=torch.float64,
                                                                                   device="cpu"), accumulate=True)
    mi = []
    for j in range(len(blocks)):
        p = joint[j] / joint[j].sum()
        pc, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
        nz = p > 0
        mi.append(float((p[nz] * (p[nz] / (pc * pe)[nz]).log2()).sum()))
    hashed = [b.ffn.gate.is_hash for b in blocks]
    learned = [m for m, h in zip(mi, hashed) if not h]
    return {"layers": list(range(len(blocks))), "hash": hashed, "mi_bits": mi,
            "mean_learned_mi_bits": sum(learned) / max(1, len(learned))}


# ---------------------------------------------------------------------------------------- training
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


def _qat_start(qat, steps: int) -> int | None:
    if qat is False or qat is None:
        return None
    if qat is True:
        return 0
    if isinstance(qat, float) and 0 <= qat <= 1:
        return int(round(qat * steps))
    if isinstance(qat, int) and qat >= 0:
        return qat
    _bad("qat", qat, "must be False, True, a start step (int) or a fraction of the run in [0, 1]")


def train(cfg: V4Config | str = "tiny", *, data=None, steps: int = 100, batch_size: int = 8, seq_len: int = 512,
          lr: float = 3e-3, min_lr_ratio: float = 0.1, warmup: int = 10, weight_decay: float = 0.1,
          grad_clip: float = 1.0, optimizer: str = "adamw", seed: int = 0, mtp_weight: float = 0.3,
          bias_gamma: float = 0.001, balance_alpha: float = 1e-4, swiglu_limit: float | None = None,
          qat=False, hc_mode: str = "mhc", anticipatory: str = "off", ar_lag: int = 4,
          spike_ratio: float = 1.5, spike_beta: float = 0.9, spike_min_step: int | None = None,
          ar_duration: int = 20, rollback: int | None = None, spike_rollback: bool = True,
          spike_ar: bool = True, balanced_hash: bool = True,
          spike_at: int | None = None, spike_lr_mult: float = 1.0, model: V4Model | None = None,
          log_path=None, out_dir=None, ckpt_every: int = 0, eval_every: int = 0, eval_windows: int = 8,
          threads: int | None = None, deterministic: bool = True, progress: bool = True,
          max_seconds: float | None = None, callback=None, log_preact: bool = False,
          device: str | torch.device | None = None, mtp_weight_final: float | None = None,
          mtp_switch_at: float = 0.7, extra_files: dict[str, bytes] | None = None,
          ddp=None, indexer_distill_weight: float = 0.0, indexer_distill_every: int = 1, start_step: int = 0,
          stop_step: int | None = None, opt_state: list | None = None, on_checkpoint=None,
          ckpt_seconds: float | None = None) -> dict:
    """Train and return {"model", "log": [per-step records], "evals": [...], "summary": {...}}.

    cfg: a V4Config or preset name (``swiglu_limit`` overrides its clamp). data: a v4lab.data.TokenData
    (default: the CPython-docs corpus with a BPE of cfg.vocab_size). qat: False | True | start step |
    fraction of the run after which the routed experts train through the FP4 straight-through estimator.
    anticipatory: "off" | "always" | "spike" (see the module docstring); ar_lag = Δt in steps; rollback
    defaults to 2·Δt. spike_rollback / spike_ar (spike mode only): what a detected spike triggers — the
    rollback and AR are separate switches (with both off the detector only logs; after a detection it stays
    quiet for ar_duration steps either way). AR without a rollback routes its first Δt steps with the
    snapshots of θ_{t−Δt} (taken every step while armed), so the lagged routes reach back before the spike. spike_at / spike_lr_mult: a one-off learning-rate multiplier at one step (the first
    time it is reached, not again after a rollback), to induce a spike for the experiments.
    callback(step, record, model) is called after each step. threads: torch.set_num_threads (on a busy
    shared machine 1 thread was ~10× faster than 2). max_seconds: stop early (a safety net).
    log_preact: also log max |W1 x|, |W3 x| of the routed experts per layer before the clamp (costs ~10 %).
    mtp_weight_final / mtp_switch_at: V4's "MTP weight 0.3 → 0.1" (spec §9.4; V3 switched after 10T of its
    14.8T tokens): from step ``int(mtp_switch_at * steps)`` on, the MTP loss is weighted ``mtp_weight_final``
    instead of ``mtp_weight`` (None: constant). The log records the weight used at every step.
    indexer_distill_weight: > 0 keeps V4's indexer loss on during training (after the warm-up): every CSA
    layer runs with ``attn.distill`` (the indexer reads detached inputs, so the KL trains the indexer only and
    the LM loss does not) and ``weight · mean KL`` is added to the loss; the indexer's gradients are clipped
    apart from the rest, so the KL does not rescale the LM step; the log records the KL and recall.
    indexer_distill_every: that loss on every k-th step only (``step % k == 0``): the dense attention
    probabilities it needs cost ~35 % of a lab-v4 step, and the indexer follows a slowly moving target.
    Resuming (v4lab.labrun): ``start_step`` / ``stop_step`` run steps [start_step, stop_step) of a ``steps``-long
    schedule; ``opt_state`` (a list of optimiser state dicts, e.g. ``v4lab.labrun.optimizer_states``) restores
    the optimiser; ``model`` carries the weights. ``on_checkpoint(next_step, model, opts)`` is called every
    ``ckpt_seconds`` of wall time and after the last step. The result holds ``opts`` too. (Anticipatory
    Routing's pending routes and rollback snapshots are not part of that state: resume with it "off".)
    device: as ``v4lab.device.get_device`` (argument, else $V4LAB_DEVICE, else CUDA when present). A new
    model is initialised on the CPU and then moved, so a seed gives the same initial weights on every device;
    a given ``model`` is moved there too.
    out_dir: every checkpoint (each ``ckpt_every`` steps, and at the end) replaces it atomically, with
    ``extra_files`` ({name: bytes}, e.g. the tokenizer) inside, so each one is self-contained. A save the
    disk refuses goes to a fallback folder (``save_or_rescue``, raises ``SaveFailed``). Ctrl-C raises
    ``Interrupted`` (a KeyboardInterrupt) naming the last complete checkpoint.
    ddp: a ``v4lab.distributed.DataParallel`` to run as one rank of a data-parallel job (global batch
    ``batch_size`` split over the ranks; see that module).
    """
    from v4lab.data import load_data
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    if swiglu_limit is not None:
        cfg = cfg.replace(swiglu_limit=float(swiglu_limit))
    for name, v, ok in (("steps", steps, steps >= 1), ("batch_size", batch_size, batch_size >= 1),
                        ("seq_len", seq_len, seq_len >= 2), ("warmup", warmup, warmup >= 1),
                        ("ar_lag", ar_lag, ar_lag >= 1)):
        if isinstance(v, bool) or not isinstance(v, int) or not ok:
            _bad(name, v, "must be a positive integer" + (" >= 2" if name == "seq_len" else ""))
    if anticipatory not in AR_MODES:
        _bad("anticipatory", anticipatory, f"must be one of {AR_MODES}")
    if not lr > 0:
        _bad("lr", lr, "must be > 0")
    if seq_len > cfg.max_position_embeddings:
        _bad("seq_len", seq_len, f"must be <= max_position_embeddings = {cfg.max_position_embeddings}")
    if not 0.0 <= float(mtp_switch_at) <= 1.0:
        _bad("mtp_switch_at", mtp_switch_at, "must be a fraction of the run in [0, 1]")
    if mtp_weight_final is not None and not float(mtp_weight_final) >= 0:
        _bad("mtp_weight_final", mtp_weight_final, "must be >= 0 (or None for a constant weight)")
    mtp_switch = int(float(mtp_switch_at) * steps) if mtp_weight_final is not None else None
    stop_step = steps if stop_step is None else stop_step
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= stop_step <= steps:
        _bad("start_step", (start_step, stop_step), f"must satisfy 0 <= start_step <= stop_step <= steps = {steps}")
    if not float(indexer_distill_weight) >= 0:
        _bad("indexer_distill_weight", indexer_distill_weight, "must be >= 0")
    if isinstance(indexer_distill_every, bool) or not isinstance(indexer_distill_every, int) or indexer_distill_every < 1:
        _bad("indexer_distill_every", indexer_distill_every, "must be an integer >= 1")
    rollback = 2 * ar_lag if rollback is None else rollback
    spike_min_step = warmup if spike_min_step is None else spike_min_step
    qat_from = _qat_start(qat, steps)
    if out_dir:
        from v4lab.checkpoint import expected_keys
        expected_keys(cfg)             # a config the release layout cannot store fails now, not after training
    if ddp is not None:
        ddp.check_batch(batch_size)
    dev = get_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    if deterministic:
        if dev.type == "cuda":       # cuBLAS is deterministic only with a fixed workspace (read at its first use)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if data is None:
        data = load_data(cfg.vocab_size)
    if data.vocab_size != cfg.vocab_size:
        _bad("data", f"vocab {data.vocab_size}", f"must match cfg.vocab_size = {cfg.vocab_size}")

    torch.manual_seed(seed)
    if model is None:
        model = V4Model(cfg)
        if balanced_hash:                       # frequency-balanced hash tables (Roller et al.), see gate.py
            from v4lab.gate import balanced_hash_table
            counts = torch.bincount(data.train, minlength=cfg.vocab_size)
            for b in model.layers:
                if b.ffn.gate.is_hash:
                    b.ffn.gate.tid2eid.copy_(balanced_hash_table(counts, cfg.n_routed_experts,
                                                                 cfg.num_experts_per_tok))
    model = model_mod.to_device(model, dev)
    model.set_flags(hc_mode=hc_mode, qat=qat_from is not None and start_step >= qat_from)
    model.train()
    opts = make_optimizer(model, optimizer, lr, weight_decay)
    fwd = model if ddp is None else ddp.wrap(model)           # what the loss forward goes through
    main_rank = ddp is None or ddp.is_main
    for o, st in zip(opts, opt_state or []):
        o.load_state_dict(st)
    csa = _csa_attns(model) if indexer_distill_weight > 0 else []
    # the indexer's loss must not rescale the LM step: its parameters are clipped on their own
    ix_ids = {id(p) for a in csa for p in a.indexer.parameters()}
    probe = _Probe(model)
    blocks = model.blocks()
    n_sites = 2 * cfg.num_hidden_layers
    use_mtp = len(model.mtp) > 0 and (mtp_weight > 0 or bool(mtp_weight_final))
    n_run = len(blocks) if use_mtp else cfg.num_hidden_layers          # MoE layers a training forward runs
    learned = [j for j in learned_moe_blocks(model) if j < n_run]
    heldout = data.heldout_windows(seq_len, eval_windows) if eval_every else None

    log, evals = [], []
    log_f = open(log_path, "a" if start_step else "w") if log_path and main_rank else None
    ar_on = anticipatory == "always"
    ar_until = -1
    quiet_until = -1                  # spike mode: no new detection before this step
    pending: dict[int, list] = {}
    snaps: list[dict] = []
    ema = None
    spike_done = False
    n_rollbacks = 0

    def routes_for(t):
        ids = data.batch(t, batch_size, seq_len, seed)
        ids = ids if ddp is None else ddp.shard(ids)
        return model.route_only(ids[:, :-1], return_mtp=use_mtp)

    def start_ar(t, older=None):
        # routes of steps t..t+Δt−1 with θ_{t+j−Δt} where a snapshot of it is at hand (AR without a rollback),
        # else with the current θ (after a rollback, or at step 0: there is nothing older)
        pending.clear()
        for j in range(ar_lag):
            snap = (older or {}).get(t + j - ar_lag)
            pending[t + j] = (routes_for(t + j) if snap is None else
                              _routes_with(model, snap, data.batch(t + j, batch_size, seq_len, seed), use_mtp))

    if ar_on:
        start_ar(0)
    bar = None
    if progress and main_rank:
        from v4lab.progress import bar as _bar
        bar = _bar(stop_step - start_step, "train", leave=False)   # drawn only when stderr is a terminal
    t_start, c_start = time.perf_counter(), time.process_time()
    t_ckpt = t_start
    step = start_step
    saved = None                        # folder of the last complete checkpoint this run wrote
    try:
        with probe.recording_hc():
            while step < stop_step:
                t0 = time.perf_counter()
                if anticipatory == "spike" and (spike_rollback or spike_ar):
                    snaps.append(_snapshot(model, opts, step))
                    # rollback keeps `rollback` steps back; AR without a rollback keeps θ_{t−Δt} for its first routes
                    snaps = snaps[-((rollback if spike_rollback else ar_lag) + 1):]
                if qat_from is not None and step == qat_from:
                    model.set_flags(qat=True)
                cur_lr = lr_at(step, steps, lr, warmup, min_lr_ratio)
                if spike_at is not None and step == spike_at and not spike_done:
                    cur_lr *= spike_lr_mult
                    spike_done = True
                for o in opts:
                    for g in o.param_groups:
                        g["lr"] = cur_lr
                ids = data.batch(step, batch_size, seq_len, seed)
                ids = ids if ddp is None else ddp.shard(ids)
                routes = pending.pop(step) if ar_on else None
                probe.clear()
                dcsa = csa if step % indexer_distill_every == 0 else []
                for a in dcsa:
                    a.distill = True
                try:
                    lm, mt = lm_losses(fwd, ids, routes, mtp=use_mtp)
                finally:
                    for a in dcsa:
                        a.distill = False
                moe_max = dict(probe.moe_max)
                bal = (balance_loss(model, len(ids), balance_alpha, learned, probe.record) if balance_alpha > 0
                       else torch.zeros(()))
                w_mtp = mtp_weight if mtp_switch is None or step < mtp_switch else float(mtp_weight_final)
                loss = lm + (w_mtp * mt if mt is not None else 0.0) + bal
                if dcsa:
                    kl = sum(a.last_distill[0] for a in dcsa) / max(1, sum(a.last_distill[1] for a in dcsa))
                    loss = loss + float(indexer_distill_weight) * kl
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: loss is {float(loss)}")
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for p in model.parameters() if p.grad is not None and id(p) not in ix_ids]
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
                if dcsa:
                    ix_norm = float(torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.grad is not None and id(p) in ix_ids],
                        grad_clip if grad_clip > 0 else float("inf")))
                used = {j: probe.record.routing_of(blocks[j].ffn)["idx"] for j in learned}
                loads = [probe.record.routing_of(blocks[j].ffn)["load"] for j in range(n_run)]
                gate_x = dict(probe.gate_in)
                preact = ([swiglu_preact_max(blocks[j], gate_x[j], probe.record.routing_of(blocks[j].ffn)["idx"])
                           for j in range(n_run)] if log_preact else None)
                lag_mismatch = None
                if ar_on:                    # how far the current router is from the routes it was given
                    lag_mismatch = [float(_sets_differ(used[j], _current_topk(blocks[j], gate_x[j])).float().mean())
                                    for j in learned]
                    # look ahead: the batch of step t+Δt routed now with θ_t (before this step's update)
                    if step + ar_lag not in pending:
                        pending[step + ar_lag] = routes_for(step + ar_lag)
                for o in opts:
                    o.step()
                if ddp is not None:              # the global load: every rank makes the same bias update
                    loads = ddp.sum_loads(loads)
                if bias_gamma > 0:
                    for j in learned:
                        bias_update(blocks[j].ffn.gate.bias, loads[j], bias_gamma)
                churn = [float(_sets_differ(used[j], _current_topk(blocks[j], gate_x[j])).float().mean())
                         for j in learned]
                gains = composite_gain(probe.h_res, n_sites)
                rec = {"iter": len(log), "step": step, "lr": cur_lr, "loss": float(loss.detach()), "lm_loss": float(lm.detach()),
                       "mtp_loss": float(mt.detach()) if mt is not None else None, "mtp_weight": w_mtp,
                       "balance_loss": float(bal.detach()),
                       "grad_norm": gnorm, "load": [l.tolist() for l in loads],
                       "learned_layers": learned, "churn": churn, "ar_lag_mismatch": lag_mismatch,
                       "moe_max_abs": [moe_max.get(j) for j in range(n_run)], "swiglu_preact_max": preact,
                       "mhc_gain": max(gains["fwd_max"][-1], gains["bwd_max"][-1]) if gains else None,
                       "mhc_gain_min": min(gains["fwd_min"][-1], gains["bwd_min"][-1]) if gains else None,
                       "ar_on": ar_on, "qat": bool(model.qat), "seconds": time.perf_counter() - t0,
                       "cpu_seconds": time.process_time() - c_start,
                       "tokens": (step + 1) * batch_size * seq_len}
                if dcsa:
                    rec["indexer_kl"] = float(kl.detach())
                    rec["indexer_grad_norm"] = ix_norm
                    rec["indexer_recall"] = (sum(a.last_recall[0] for a in dcsa)
                                             / max(1, sum(a.last_recall[1] for a in dcsa)))
                if ddp is not None:
                    rec = ddp.reduce_record(rec)
                # spike detector (spike mode): compare with the EMA *before* it absorbs this loss
                lval = rec["lm_loss"]
                event = None
                if anticipatory == "spike":
                    if (step >= quiet_until and ema is not None and step >= spike_min_step
                            and lval > spike_ratio * ema and (len(snaps) > 1 or not spike_rollback)):
                        back = _restore(model, opts, snaps[0]) if spike_rollback else step + 1
                        rec["event"] = event = (f"spike: rollback {step} -> {back}" if spike_rollback
                                                else f"spike at {step}, no rollback") + (", AR on" if spike_ar else "")
                        n_rollbacks += int(spike_rollback)
                        snaps_before, snaps = ([] if spike_rollback else snaps), []
                        quiet_until = back + ar_duration
                        if spike_ar:
                            ar_on, ar_until = True, back + ar_duration
                            start_ar(back, {sn["step"]: sn for sn in snaps_before})
                    elif ar_on and step + 1 >= ar_until:
                        ar_on = False
                        pending.clear()
                        rec["event"] = event = "AR off"
                if event is None or not event.startswith("spike"):
                    ema = lval if ema is None else spike_beta * ema + (1 - spike_beta) * lval
                if heldout is not None and ((step + 1) % eval_every == 0 or step + 1 == stop_step) and event is None:
                    ev = evaluate(model, heldout, batch_size)
                    rec["heldout_loss"] = ev["loss"]
                    evals.append({"step": step, **ev})
                log.append(rec)
                if log_f:
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                if callback is not None:
                    callback(step, rec, model)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", ar="on" if ar_on else "off")
                    bar.update(1)
                if out_dir and ckpt_every and (step + 1) % ckpt_every == 0 and main_rank:
                    saved = save_or_rescue(model, out_dir, extra_files)
                if event is not None and event.startswith("spike"):
                    step = back
                    continue
                step += 1
                if on_checkpoint is not None and ckpt_seconds is not None and step < stop_step and main_rank \
                        and time.perf_counter() - t_ckpt > ckpt_seconds:
                    on_checkpoint(step, model, opts)
                    t_ckpt = time.perf_counter()
                stop = max_seconds is not None and time.perf_counter() - t_start > max_seconds
                if stop if ddp is None or max_seconds is None else ddp.any(stop):
                    break
    except KeyboardInterrupt:
        raise Interrupted(step, saved) from None
    finally:
        probe.remove()
        if log_f:
            log_f.close()
        if bar is not None:
            bar.close()
    if out_dir and main_rank:
        try:
            save_or_rescue(model, out_dir, extra_files)
        except KeyboardInterrupt:
            raise Interrupted(step, saved) from None
    if on_checkpoint is not None and main_rank:
        on_checkpoint(step, model, opts)
    summary = {"steps_done": step, "seconds": time.perf_counter() - t_start,
               "cpu_seconds": time.process_time() - c_start, "threads": torch.get_num_threads(),
               "rollbacks": n_rollbacks,
               "final_loss": log[-1]["loss"] if log else None,
               "tokens": step * batch_size * seq_len}
    return {"model": model, "log": log, "evals": evals, "summary": summary, "opts": opts}


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


def indexer_warmup(model: V4Model, data=None, *, steps: int = 100, batch_size: int = 8, seq_len: int = 512,
                   lr: float = 1e-3, warmup: int = 5, seed: int = 0, eval_windows: int = 8, progress: bool = True,
                   device: str | torch.device | None = None) -> dict:
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
    before = {**indexer_quality(model, heldout, batch_size), "heldout_loss": evaluate(model, heldout, batch_size)["loss"]}
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
    after = {**indexer_quality(model, heldout, batch_size), "heldout_loss": evaluate(model, heldout, batch_size)["loss"]}
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
    if args.threads is not None:
        torch.set_num_threads(int(args.threads))
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


def main(argv=None) -> int:
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


def _main(args, argv, done: dict) -> int:
    from v4lab.data import (
        bigram_loss,
        heldout_text,
        load_data,
        load_topics,
        split_topics,
        token_classes,
        train_tokenizer,
    )
    for key in ("steps", "batch_size", "seq_len", "warmup"):        # fail before the slow set-up
        v = getattr(args, key)
        if v < (2 if key == "seq_len" else 1):
            _bad(f"--{key.replace('_', '-')}", v, "must be a positive integer" + (" >= 2" if key == "seq_len" else ""))
    if not 0 <= args.seed < 2 ** 63:
        _bad("--seed", args.seed, "must be in [0, 2**63)")
    dev = get_device(args.device)                 # a bad --device fails before the slow set-up too
    ddp = None
    if args.nproc != 1 or os.environ.get("WORLD_SIZE", "1") != "1":
        from v4lab.distributed import join_or_launch
        ddp, dev = join_or_launch(args, dev, main, argv)
        if ddp is None:                           # this was the launcher: the ranks have finished
            return 0
    if args.indexer_warmup is not None:
        return _warmup_main(args, dev, argv)
    out = check_writable(args.out, "--out") if args.out else None    # refuse before hours of training
    init = None
    if args.init:                     # continue from a saved model (fresh optimiser), reuse its tokenizer
        from v4lab.data import load_tokenizer
        init = model_mod.load(args.init, device=dev)
        cfg = init.cfg
        tok = load_tokenizer(args.init)
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
    argv_used = list(sys.argv[1:] if argv is None else argv)
    res = train(cfg, data=data, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
                grad_clip=args.grad_clip, optimizer=args.optimizer, seed=args.seed, mtp_weight=args.mtp_weight,
                mtp_weight_final=args.mtp_weight_final, mtp_switch_at=args.mtp_switch_at,
                bias_gamma=args.bias_gamma, balance_alpha=args.balance_alpha, swiglu_limit=args.swiglu_limit,
                qat=False if args.qat_from is None else float(args.qat_from), hc_mode=args.hc_mode,
                anticipatory=args.anticipatory, ar_lag=args.ar_lag, ar_duration=args.ar_duration,
                spike_ratio=args.spike_ratio, eval_every=args.eval_every, eval_windows=args.eval_windows,
                ckpt_every=args.ckpt_every, out_dir=str(out) if out else None, log_path=log_path,
                threads=args.threads, progress=not args.no_progress, max_seconds=args.max_seconds, model=init,
                device=dev, extra_files=extra, ddp=ddp)
    done["out"] = out
    if ddp is not None and not ddp.is_main:       # rank 0 evaluates and writes everything
        return 0
    summary = dict(res["summary"])
    if out:
        if not args.log:
            Path(log_path).replace(out / "train_log.jsonl")
        (out / "heldout.txt").write_text(heldout_text())
        # the numbers the README and tests quote: held-out loss of the *saved* (FP8/FP4) weights, of the
        # weights as trained (fp32 masters; experts through FP4 if QAT was on at the end), the bigram baseline, expert specialisation vs random weights
        windows = data.heldout_windows(args.seq_len)
        summary["heldout_loss_as_trained"] = evaluate(res["model"], windows, args.batch_size)["loss"]
        loaded = model_mod.load(out, device=dev)
        summary["heldout"] = evaluate(loaded, windows, args.batch_size)
        summary["bigram"] = bigram_loss(data.train, windows, cfg.vocab_size)
        classes = token_classes(tok)
        sub = windows[:HELDOUT_TEST_WINDOWS]
        summary["heldout_subset"] = {"windows": int(sub.shape[0]), **evaluate(loaded, sub, args.batch_size)}
        windows = windows[:SPECIALISATION_WINDOWS]
        summary["specialisation_windows"] = int(windows.shape[0])
        summary["specialisation_trained"] = expert_specialisation(loaded, windows, classes, args.batch_size)
        torch.manual_seed(args.seed)
        rand = model_mod.to_device(V4Model(loaded.cfg), dev)
        for b, lb in zip(rand.layers, loaded.layers):      # same hash tables: compare routers only
            if b.ffn.gate.is_hash:
                b.ffn.gate.tid2eid.copy_(lb.ffn.gate.tid2eid)
        summary["specialisation_random"] = expert_specialisation(rand, windows, classes, args.batch_size)
        summary["corpus"] = data.fingerprint
        summary["command"] = "v4lab train " + " ".join(argv_used)
        summary["args"] = vars(args)
        summary["torch"] = torch.__version__
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("corpus",)}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
