"""The settings of one training run, in one dataclass, validated in one place.

``TrainConfig`` holds every setting of ``v4lab.train.train`` that is a value (numbers, names, paths):
the recipe, Anticipatory Routing and the spike detector, the schedule of a resumed stage, logging and the
run's environment. What is an object rather than a setting (the data, a model to continue, optimiser
state, a data-parallel group, callbacks, the files written into each checkpoint) is given to
``v4lab.train.Trainer`` beside it. ``dataclasses.replace(base, lr=...)`` makes a variant; every
construction (``replace`` included) is validated, and a bad value is one ``ValueError`` naming the key,
the value and the rule.

Fields (defaults are the recipe of the tiny model):

* model and data shape: ``cfg`` (a ``V4Config`` or preset name; ``swiglu_limit`` overrides its clamp,
  <= 0 turns it off), ``steps``, ``batch_size`` (the global batch), ``seq_len``, ``seed``.
* optimiser: ``optimizer`` ("adamw" | "muon"), ``lr`` with ``warmup`` steps of linear warm-up then cosine
  down to ``min_lr_ratio``·lr, ``weight_decay``, ``grad_clip`` (<= 0: none); ``expert_lr_mult``: the routed
  experts' w1/w2/w3 train at ``expert_lr_mult``·lr (1: the same lr as the rest; the clamp experiment raises
  it so that the experts' SwiGLU is the only unstable part of the model).
* losses: ``mtp_weight``, or V4's "MTP weight 0.3 → 0.1": from step ``int(mtp_switch_at · steps)`` on
  ``mtp_weight_final`` (None: constant); ``balance_alpha`` (sequence-wise balance loss),
  ``bias_gamma`` (aux-loss-free bias update speed); ``indexer_distill_weight`` > 0 keeps V4's indexer loss
  on during training, every ``indexer_distill_every``-th step (the indexer's gradients are clipped apart
  from the rest, so the KL does not rescale the LM step).
* model modes: ``qat`` (False | True | a start step | a fraction of the run after which the routed experts
  train through the FP4 straight-through estimator), ``hc_mode``, ``balanced_hash`` (frequency-balanced hash
  tables for a new model), ``expert_h_fp8`` (> 0: the routed experts' intermediate h goes through a
  static-scale FP8 E4M3 cast with that scale, NaN beyond 448·scale; 0: off; a regime that provokes the
  failure the SwiGLU clamp prevents, not V4's recipe, see ``v4lab.experiments.swiglu_clamp``).
* Anticipatory Routing (``v4lab.anticipatory``): ``anticipatory`` ("off" | "always" | "spike"), ``ar_lag``
  = Δt in steps, ``ar_duration``; the spike detector's ``spike_ratio``, ``spike_beta`` (EMA decay),
  ``spike_min_step`` (default: ``warmup``), ``rollback`` (default 2·Δt), and what a detected spike triggers:
  ``spike_rollback`` / ``spike_ar`` (both off: the detector only logs). ``spike_at`` / ``spike_lr_mult``: a
  one-off learning-rate multiplier at one step, to induce a spike for the experiments; ``spike_scope``
  ("all" | "router"): which parameters that step's multiplier applies to ("router": the learned routers'
  weights only, a spike whose cause is a jump of the routing).
* resumed stages (``v4lab.labrun``): steps [``start_step``, ``stop_step``) of a ``steps``-long schedule;
  ``ckpt_seconds``: how often the trainer's ``on_checkpoint`` is called.
* output: ``log_path`` (JSONL), ``out_dir`` (a checkpoint every ``ckpt_every`` steps and at the end),
  ``eval_every`` / ``eval_windows`` (held-out loss), ``log_preact`` (max pre-clamp |W1 x|, |W3 x|, ~10 %).
* environment: ``threads`` (torch threads while training; 1 was ~10× faster than 2 on a busy shared
  machine), ``deterministic`` (deterministic algorithms while training), ``device`` (as
  ``v4lab.device.get_device``), ``progress`` (a bar on a terminal), ``max_seconds`` (stop early).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from v4lab.config import V4Config, get_config
from v4lab.errors import bad

AR_MODES = ("off", "always", "spike")
SPIKE_SCOPES = ("all", "router")
OPTIMIZERS = ("adamw", "muon")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings (see the module docstring); validated on construction."""

    cfg: V4Config | str = "tiny"
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    seed: int = 0
    optimizer: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    expert_lr_mult: float = 1.0
    mtp_weight: float = 0.3
    mtp_weight_final: float | None = None
    mtp_switch_at: float = 0.7
    bias_gamma: float = 0.001
    balance_alpha: float = 1e-4
    indexer_distill_weight: float = 0.0
    indexer_distill_every: int = 1
    swiglu_limit: float | None = None
    qat: bool | int | float | None = False
    hc_mode: str = "mhc"
    expert_h_fp8: float = 0.0
    balanced_hash: bool = True
    anticipatory: str = "off"
    ar_lag: int = 4
    ar_duration: int = 20
    spike_ratio: float = 1.5
    spike_beta: float = 0.9
    spike_min_step: int | None = None
    rollback: int | None = None
    spike_rollback: bool = True
    spike_ar: bool = True
    spike_at: int | None = None
    spike_lr_mult: float = 1.0
    spike_scope: str = "all"
    start_step: int = 0
    stop_step: int | None = None
    ckpt_seconds: float | None = None
    log_path: str | None = None
    out_dir: str | None = None
    ckpt_every: int = 0
    eval_every: int = 0
    eval_windows: int = 8
    log_preact: bool = False
    threads: int | None = None
    deterministic: bool = True
    progress: bool = True
    max_seconds: float | None = None
    device: object = None            # str | torch.device | None

    def __post_init__(self) -> None:
        self.validate()

    def replace(self, **changes: object) -> TrainConfig:
        """``dataclasses.replace(self, **changes)`` (validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------ resolved
    @property
    def model_config(self) -> V4Config:
        """``cfg`` as a V4Config (a preset name looked up), with ``swiglu_limit`` applied."""
        cfg = get_config(self.cfg) if isinstance(self.cfg, str) else self.cfg
        return cfg if self.swiglu_limit is None else cfg.replace(swiglu_limit=float(self.swiglu_limit))

    @property
    def last_step(self) -> int:
        """The step the run stops before (``stop_step``, default ``steps``)."""
        return self.steps if self.stop_step is None else self.stop_step

    @property
    def rollback_steps(self) -> int:
        return 2 * self.ar_lag if self.rollback is None else self.rollback

    @property
    def detector_min_step(self) -> int:
        return self.warmup if self.spike_min_step is None else self.spike_min_step

    @property
    def mtp_switch(self) -> int | None:
        """The first step weighted ``mtp_weight_final`` (None: a constant MTP weight)."""
        return int(float(self.mtp_switch_at) * self.steps) if self.mtp_weight_final is not None else None

    def mtp_weight_at(self, step: int) -> float:
        s = self.mtp_switch
        return self.mtp_weight if s is None or step < s else float(self.mtp_weight_final)

    @property
    def qat_from(self) -> int | None:
        """The first step that trains the routed experts through FP4 (None: never)."""
        return qat_start(self.qat, self.steps)

    # ------------------------------------------------------------------------------------ rules
    def validate(self) -> None:
        """Raise a one-line ValueError for the first setting that breaks its rule."""
        cfg = self.model_config
        for name in ("steps", "batch_size", "seq_len", "warmup", "ar_lag"):
            v = getattr(self, name)
            if not _is_int(v) or not v >= (2 if name == "seq_len" else 1):
                bad(name, v, "must be a positive integer" + (" >= 2" if name == "seq_len" else ""))
        if self.anticipatory not in AR_MODES:
            bad("anticipatory", self.anticipatory, f"must be one of {AR_MODES}")
        if self.spike_scope not in SPIKE_SCOPES:
            bad("spike_scope", self.spike_scope, f"must be one of {SPIKE_SCOPES}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        if not self.lr > 0:
            bad("lr", self.lr, "must be > 0")
        for name in ("expert_lr_mult", "expert_h_fp8"):
            _check_number(name, getattr(self, name), allow_zero=name == "expert_h_fp8")
        if self.seq_len > cfg.max_position_embeddings:
            bad("seq_len", self.seq_len, f"must be <= max_position_embeddings = {cfg.max_position_embeddings}")
        self._validate_schedule()
        if self.out_dir:
            from v4lab.checkpoint import expected_keys
            expected_keys(cfg)       # a config the release layout cannot store fails now, not after training

    def _validate_schedule(self) -> None:
        if not 0.0 <= float(self.mtp_switch_at) <= 1.0:
            bad("mtp_switch_at", self.mtp_switch_at, "must be a fraction of the run in [0, 1]")
        if self.mtp_weight_final is not None and not float(self.mtp_weight_final) >= 0:
            bad("mtp_weight_final", self.mtp_weight_final, "must be >= 0 (or None for a constant weight)")
        start, stop = self.start_step, self.last_step
        if not _is_int(start) or not 0 <= start <= stop <= self.steps:
            bad("start_step", (start, stop), f"must satisfy 0 <= start_step <= stop_step <= steps = {self.steps}")
        if not float(self.indexer_distill_weight) >= 0:
            bad("indexer_distill_weight", self.indexer_distill_weight, "must be >= 0")
        if not _is_int(self.indexer_distill_every) or self.indexer_distill_every < 1:
            bad("indexer_distill_every", self.indexer_distill_every, "must be an integer >= 1")
        qat_start(self.qat, self.steps)


def _check_number(name: str, v: object, allow_zero: bool) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v if allow_zero else 0 < v) \
            or not v < float("inf"):
        bad(name, v, f"must be a finite number {'>= 0' if allow_zero else '> 0'}")


def qat_start(qat: object, steps: int) -> int | None:
    """The first QAT step of a ``steps``-long run for ``qat`` = False / None (never), True (from 0), a start
    step (int) or a fraction of the run (float in [0, 1])."""
    if qat is False or qat is None:
        return None
    if qat is True:
        return 0
    if isinstance(qat, float) and 0 <= qat <= 1:
        return int(round(qat * steps))
    if isinstance(qat, int) and qat >= 0:
        return qat
    bad("qat", qat, "must be False, True, a start step (int) or a fraction of the run in [0, 1]")
