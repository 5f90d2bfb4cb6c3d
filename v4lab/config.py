"""One config type for the DeepSeek family v4lab knows: V3, V3.2, V4-Flash, V4-Pro and a tiny V4.

Keys follow the released Hugging Face ``config.json`` (``hidden_size``, ``compress_ratios``,
``num_hash_layers`` ...), so a downloaded ``config.json`` loads as is. V3/V3.2 keys (MLA ranks, dense
first layers, group-limited routing) live in the same type; ``arch`` tells the families apart.

Spec: docs/design/v4-attention.md §1, §6 and docs/design/v4-moe-mhc-fp4.md §9.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

# compress_ratios values: 0 = sliding window only, 4 = CSA (+ lightning indexer), 128 = HCA.
LAYER_KINDS = {0: "window", 4: "csa", 128: "hca"}
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


def _integral(r: Any) -> bool:
    """A number with an integer value (4.0 from a JSON file counts), not a bool."""
    return isinstance(r, (int, float)) and not isinstance(r, bool) and float(r).is_integer()


def _bad_key(key: str, value: Any, rule: str) -> NoReturn:
    """A config key that breaks its rule: ``ValueError("config key 'KEY' = VALUE: RULE")``."""
    raise ValueError(f"config key {key!r} = {value!r}: {rule}")


def _yarn(factor: float = 16.0, original: int = 65536) -> dict:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1}


@dataclass
class V4Config:
    # --- identity -----------------------------------------------------------------------------
    model_type: str = "deepseek_v4"          # deepseek_v4 | deepseek_v32 | deepseek_v3
    name: str = "custom"
    # --- trunk --------------------------------------------------------------------------------
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    # --- V4 attention -------------------------------------------------------------------------
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: list = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = field(default_factory=_yarn)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- V3 / V3.2 attention (MLA); unused by V4 ----------------------------------------------
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # --- MoE ----------------------------------------------------------------------------------
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    n_group: int = 1                         # V3 group-limited routing (1 = no limit)
    topk_group: int = 1
    first_k_dense_replace: int = 0           # V3 dense FFN layers at the bottom
    intermediate_size: int = 0               # V3 dense FFN width
    # --- mHC ----------------------------------------------------------------------------------
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- MTP / formats ------------------------------------------------------------------------
    num_nextn_predict_layers: int = 1
    expert_dtype: str | None = "fp4"
    quantization_config: dict | None = field(default_factory=lambda: {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "scale_fmt": "ue8m0", "weight_block_size": [128, 128]})

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived views
    @property
    def arch(self) -> str:
        return {"deepseek_v4": "v4", "deepseek_v32": "v3.2", "deepseek_v3": "v3"}[self.model_type]

    @property
    def is_v4(self) -> bool:
        return self.model_type == "deepseek_v4"

    def compress_ratio(self, layer_id: int) -> int:
        """Ratio of layer ``layer_id``; ``layer_id == num_hidden_layers`` is the MTP block."""
        if not self.is_v4:
            return 0
        return int(self.compress_ratios[layer_id])

    def layer_kind(self, layer_id: int) -> str:
        """'window' | 'csa' | 'hca' for V4, 'mla' for V3, 'mla+dsa' for V3.2."""
        if self.model_type == "deepseek_v3":
            return "mla"
        if self.model_type == "deepseek_v32":
            return "mla+dsa"
        return LAYER_KINDS[self.compress_ratio(layer_id)]

    @property
    def layer_kinds(self) -> list[str]:
        return [self.layer_kind(i) for i in range(self.num_hidden_layers)]

    def is_hash_layer(self, layer_id: int) -> bool:
        return self.is_v4 and layer_id < self.num_hash_layers

    def is_dense_layer(self, layer_id: int) -> bool:
        return layer_id < self.first_k_dense_replace

    @property
    def rope_factor(self) -> float:
        return float((self.rope_scaling or {}).get("factor", 1.0))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError("config key 'KEY' = VALUE: RULE")`` for the first key that breaks its rule
        (types first, then sizes, routing, the family's own rules, then the storage formats)."""
        if self.model_type not in ("deepseek_v4", "deepseek_v32", "deepseek_v3"):
            _bad_key("model_type", self.model_type, "must be deepseek_v4, deepseek_v32 or deepseek_v3")
        self._validate_types()
        self._validate_sizes()
        self._validate_routing()
        rd = self.qk_rope_head_dim
        if rd % 2:
            _bad_key("qk_rope_head_dim", rd, "RoPE pairs channels, so it must be even")
        if self.model_type == "deepseek_v32":
            for key in ("index_n_heads", "index_head_dim", "index_topk"):
                if getattr(self, key) <= 0:
                    _bad_key(key, getattr(self, key), "must be a positive integer (the V3.2 DSA indexer)")
            if rd > self.index_head_dim:
                _bad_key("qk_rope_head_dim", rd,
                         f"must be <= index_head_dim ({self.index_head_dim}); the indexer rotates it too")
        if not self.is_v4:
            return
        self._validate_v4_attention()
        self._validate_compress_ratios()
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                _bad_key("rope_scaling", self.rope_scaling, "must be a dict or null")
            f = self.rope_scaling.get("factor", 1.0)
            if not isinstance(f, (int, float)) or f < 1:
                _bad_key("rope_scaling.factor", f, "must be a number >= 1")
        if self.expert_dtype not in (None, "fp4", "fp8", "bf16"):
            _bad_key("expert_dtype", self.expert_dtype, "must be fp4, fp8, bf16 or absent")
        self._validate_formats()

    def _validate_types(self) -> None:
        """Types first, so a hand-written config.json with "hidden_size": "4096" gets a named error, not a
        TypeError from a comparison below. (Annotations are strings under ``from __future__ import annotations``.)"""
        for f in dataclasses.fields(self):
            v, t = getattr(self, f.name), f.type
            if t == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                _bad_key(f.name, v, "must be an integer")
            if t == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                _bad_key(f.name, v, "must be a number")
            if t == "float" and not math.isfinite(v):
                _bad_key(f.name, v, "must be a finite number")
            if t == "bool" and not isinstance(v, bool):
                _bad_key(f.name, v, "must be true or false")
            if t == "str" and not isinstance(v, str):
                _bad_key(f.name, v, "must be a string")

    def _validate_sizes(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "q_lora_rank", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "max_position_embeddings", "n_group", "topk_group"]
        if self.is_v4:
            positive += ["num_key_value_heads", "o_groups", "o_lora_rank", "sliding_window",
                         "index_n_heads", "index_head_dim", "index_topk", "hc_mult",
                         "hc_sinkhorn_iters", "qk_rope_head_dim"]
        else:
            positive += ["kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "qk_rope_head_dim"]
        for key in positive:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                _bad_key(key, v, "must be a positive integer")
        for key in ("rms_norm_eps", "rope_theta", "compress_rope_theta"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                _bad_key(key, v, "must be a positive finite number")
        if self.hc_eps < 0 or not math.isfinite(self.hc_eps):
            _bad_key("hc_eps", self.hc_eps, "must be a finite number >= 0")
        for key in ("n_shared_experts", "num_hash_layers"):
            if getattr(self, key) < 0:
                _bad_key(key, getattr(self, key), "must be >= 0")
        if self.num_hash_layers > self.num_hidden_layers:
            _bad_key("num_hash_layers", self.num_hash_layers,
                     f"must be <= num_hidden_layers ({self.num_hidden_layers})")
        if self.num_nextn_predict_layers < 0:
            _bad_key("num_nextn_predict_layers", self.num_nextn_predict_layers, "must be >= 0")

    def _validate_routing(self) -> None:
        """The router and the experts: top-k, groups, scoring, scale, the dense first layers."""
        if self.num_experts_per_tok > self.n_routed_experts:
            _bad_key("num_experts_per_tok", self.num_experts_per_tok,
                     f"top-k must be <= n_routed_experts ({self.n_routed_experts})")
        if self.scoring_func not in SCORING_FUNCS:
            _bad_key("scoring_func", self.scoring_func, f"must be one of {SCORING_FUNCS}")
        if self.routed_scaling_factor <= 0:
            _bad_key("routed_scaling_factor", self.routed_scaling_factor, "must be > 0")
        if self.initializer_range < 0:
            _bad_key("initializer_range", self.initializer_range, "must be >= 0")
        if not 0 <= self.attention_dropout < 1:
            _bad_key("attention_dropout", self.attention_dropout, "must be in [0, 1)")
        if not isinstance(self.swiglu_limit, (int, float)) or not math.isfinite(self.swiglu_limit):
            _bad_key("swiglu_limit", self.swiglu_limit, "must be a finite number (<= 0 disables the clamp)")
        if self.n_routed_experts % self.n_group:
            _bad_key("n_group", self.n_group, f"must divide n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            _bad_key("topk_group", self.topk_group, f"must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            _bad_key("num_experts_per_tok", self.num_experts_per_tok,
                     "top-k must fit in the experts of the topk_group chosen groups")
        if self.first_k_dense_replace < 0 or self.first_k_dense_replace > self.num_hidden_layers:
            _bad_key("first_k_dense_replace", self.first_k_dense_replace, "must be in [0, num_hidden_layers]")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            _bad_key("intermediate_size", self.intermediate_size, "dense first layers need a positive width")

    def _validate_v4_attention(self) -> None:
        rd = self.qk_rope_head_dim
        if self.sliding_window > self.max_position_embeddings:
            _bad_key("sliding_window", self.sliding_window,
                     f"must be <= max_position_embeddings ({self.max_position_embeddings})")
        if rd > self.head_dim:
            _bad_key("qk_rope_head_dim", rd, f"must be <= head_dim ({self.head_dim})")
        if rd > self.index_head_dim:
            _bad_key("qk_rope_head_dim", rd,
                     f"must be <= index_head_dim ({self.index_head_dim}); the indexer rotates it too")
        if self.num_key_value_heads != 1:
            _bad_key("num_key_value_heads", self.num_key_value_heads, "V4 has one shared K=V head (must be 1)")
        if self.num_attention_heads % self.o_groups:
            _bad_key("o_groups", self.o_groups, f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.hc_mult < 1:
            _bad_key("hc_mult", self.hc_mult, "must be >= 1")

    def _validate_compress_ratios(self) -> None:
        """One entry per layer plus the MTP block's (0); entries normalised to int."""
        want = self.num_hidden_layers + self.num_nextn_predict_layers
        if not isinstance(self.compress_ratios, (list, tuple)) or len(self.compress_ratios) not in (
                want, self.num_hidden_layers + 1):
            n = len(self.compress_ratios) if isinstance(self.compress_ratios, (list, tuple)) else None
            _bad_key("compress_ratios", self.compress_ratios if n is None else f"<list of {n}>",
                     f"needs num_hidden_layers + 1 = {self.num_hidden_layers + 1} entries (last one: the MTP block)")
        self.compress_ratios = [int(r) if _integral(r) else r for r in self.compress_ratios]
        for i, r in enumerate(self.compress_ratios):
            if r not in LAYER_KINDS:
                _bad_key(f"compress_ratios[{i}]", r, "must be 0 (window), 4 (CSA) or 128 (HCA)")
        for i in range(self.num_hidden_layers, len(self.compress_ratios)):  # entries past the backbone: MTP
            if self.compress_ratios[i] != 0:
                _bad_key(f"compress_ratios[{i}]", self.compress_ratios[i],
                         "the MTP block (last entry) is sliding-window only and must be 0")

    def _validate_formats(self) -> None:
        """``quantization_config`` is null or an object the FP8/FP4 writers can use. (Whether the widths fit
        the FP4 blocks is a storage question: ``checkpoint.expected_keys`` answers it.)"""
        qc = self.quantization_config
        if qc is None:
            return
        if not isinstance(qc, dict):
            _bad_key("quantization_config", qc, "must be an object (the release's FP8 settings) or null")
        b = qc.get("weight_block_size", [128, 128])
        if (not isinstance(b, (list, tuple)) or len(b) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b)):
            _bad_key("quantization_config.weight_block_size", b, "must be two positive integers, e.g. [128, 128]")
        fmt = qc.get("expert_dtype") or self.expert_dtype or "fp4"
        if fmt not in ("fp4", "fp8", "bf16"):
            _bad_key("quantization_config.expert_dtype", fmt, "must be fp4, fp8 or bf16")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("name")
        # Keys of the other family stay out of the file: e.g. transformers reads a V4 config's
        # ``intermediate_size: 0`` as the expert width.
        for k in (_V3_ONLY if self.is_v4 else ()):
            d.pop(k, None)
        d["architectures"] = ["DeepseekV4ForCausalLM" if self.is_v4 else
                              ("DeepseekV32ForCausalLM" if self.arch == "v3.2" else "DeepseekV3ForCausalLM")]
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "V4Config":
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.update(changes)
        return V4Config(**d)

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "custom", strict: bool = False) -> "V4Config":
        """Build from a released HF ``config.json`` dict. Keys of other tools are ignored unless strict."""
        d = dict(d)
        aliases = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                   "moe_inter_dim": "moe_intermediate_size", "n_activated_experts": "num_experts_per_tok",
                   "n_hash_layers": "num_hash_layers", "score_func": "scoring_func",
                   "route_scale": "routed_scaling_factor", "rope_head_dim": "qk_rope_head_dim",
                   "window_size": "sliding_window", "norm_eps": "rms_norm_eps",
                   "n_mtp_layers": "num_nextn_predict_layers", "first_k_dense": "first_k_dense_replace"}
        for a, k in aliases.items():
            if a in d and k not in d:
                d[k] = d.pop(a)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"architectures", "transformers_version", "use_cache"})
        if strict and unknown:
            raise ValueError(f"config key {unknown[0]!r}: unknown key (strict mode)")
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["name"] = name
        mt = kwargs.get("model_type", "deepseek_v4")
        if mt not in ("deepseek_v4", "deepseek_v32", "deepseek_v3"):
            raise ValueError(f"config key 'model_type' = {mt!r}: must be deepseek_v4, deepseek_v32 or deepseek_v3")
        if mt == "deepseek_v4" and "compress_ratios" not in kwargs:
            raise ValueError("config key 'compress_ratios' is missing: a V4 config needs one ratio per layer "
                             "plus one for the MTP block")
        if mt != "deepseek_v4":
            kwargs.setdefault("compress_ratios", [])
            kwargs.setdefault("expert_dtype", None)
        try:
            return cls(**kwargs)
        except TypeError as e:  # wrong value types that slipped past validate
            raise ValueError(f"config: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "V4Config":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        from v4lab.errors import read_json_file
        d = read_json_file(p, "config file")       # regular file, bounded size, one-line errors
        if not isinstance(d, dict):
            raise ValueError(f"config file {str(p)!r}: top level must be a JSON object")
        return cls.from_dict(d, name=p.parent.name if p.name == "config.json" else p.stem)


_V3_ONLY = ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_group", "topk_group",
            "first_k_dense_replace", "intermediate_size")


# ---------------------------------------------------------------------------------------- presets
def _v4_flash() -> V4Config:
    return V4Config(name="v4-flash")


def _v4_pro() -> V4Config:
    return V4Config(name="v4-pro", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                    q_lora_rank=1536, o_groups=16, o_lora_rank=1024, index_topk=1024,
                    moe_intermediate_size=3072, n_routed_experts=384, routed_scaling_factor=2.5,
                    compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])


def _v3(dsa: bool) -> V4Config:
    # Values of the released config.json of deepseek-ai/DeepSeek-V3 (V3.2: DeepSeek-V3.2-Exp, the same plus
    # index_n_heads / index_head_dim / index_topk). MLA; V3.2 adds the DSA token-level indexer
    # (64 heads x 128, top-2048). Sigmoid routing with groups.
    return V4Config(
        model_type="deepseek_v32" if dsa else "deepseek_v3", name="v3.2" if dsa else "v3",
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        head_dim=192, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=1536,
        kv_lora_rank=512, o_groups=1, o_lora_rank=0, sliding_window=0, compress_ratios=[],
        rope_scaling=_yarn(40.0, 4096), max_position_embeddings=163840,
        index_n_heads=64 if dsa else 0, index_head_dim=128 if dsa else 0, index_topk=2048 if dsa else 0,
        n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048, scoring_func="sigmoid",
        routed_scaling_factor=2.5, num_hash_layers=0, swiglu_limit=0.0, n_group=8, topk_group=4,
        first_k_dense_replace=3, intermediate_size=18432, hc_mult=1, hc_sinkhorn_iters=0, expert_dtype=None)


def _tiny() -> V4Config:
    # Same structure at CPU size: window, CSA and HCA layers, hash layers, mHC, MTP.
    # HCA ratio stays 128 (the released value) so short sequences only see it past 128 tokens;
    # the window is shrunk so the compressed branches matter early.
    return V4Config(
        name="tiny", vocab_size=512, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
        head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64, sliding_window=16,
        compress_ratios=[0, 4, 128, 4, 128, 4, 0], index_n_heads=4, index_head_dim=32, index_topk=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
        routed_scaling_factor=1.5, num_hash_layers=2, max_position_embeddings=4096,
        rope_scaling=_yarn(16.0, 1024), hc_mult=4, hc_sinkhorn_iters=20)


def _lab() -> V4Config:
    # The trained weights in data/ (v4lab.train): tiny's structure cut to what 20 CPU-minutes can train —
    # 4 layers (window+hash, CSA, HCA, CSA) + a window MTP block, d = 96, 8 experts of width 64, top-2.
    return _tiny().replace(
        name="lab", hidden_size=96, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1,
        num_attention_heads=2, head_dim=32, q_lora_rank=48, o_groups=1, o_lora_rank=48, sliding_window=32,
        index_n_heads=2, index_head_dim=32, index_topk=16, moe_intermediate_size=64)


def _lab_v4() -> V4Config:
    # data/lab-v4 (v4lab.labrun): big enough to show the ideas at 2048 tokens, small enough to train in
    # 3 CPU-hours and to run a 2048-token forward in < 3 s on one thread. Layers as the released configs
    # interleave them (window first, then CSA/HCA alternating, CSA last, window MTP block); 16 experts,
    # top-2 + shared; HCA ratio 128 and YaRN as released. Why each number: data/README.md.
    return _tiny().replace(
        name="lab-v4", vocab_size=4096, hidden_size=256, q_lora_rank=128, o_lora_rank=128, sliding_window=64,
        index_topk=32, n_routed_experts=16, num_hash_layers=1, max_position_embeddings=65536,
        rope_scaling=_yarn(16.0, 4096))


def _lab_v4_2k() -> V4Config:
    # The lab model's second shape (trained by v4lab.labrun --recipe lab-v4-2k, not yet shipped): a 2048-entry
    # vocabulary (the smallest the lab model's brief allows; at 4096 the output head is 2.10 of a token's
    # 10.03 MFLOP, v4lab.accounting, and training runs it twice with MTP)
    # and a wider indexer, 8 heads x 64 (after 120 warm-up steps on the first release: recall 0.677 against
    # 0.648 for 4 x 32, for ~8 % more warm-up time). Why each number: data/README.md.
    return _lab_v4().replace(name="lab-v4-2k", vocab_size=2048, index_n_heads=8, index_head_dim=64)


PRESETS = {"v4-flash": _v4_flash, "v4-pro": _v4_pro, "v3": lambda: _v3(False), "v3.2": lambda: _v3(True),
           "tiny": _tiny, "lab": _lab, "lab-v4": _lab_v4, "lab-v4-2k": _lab_v4_2k}


def get_config(name_or_path: str | Path) -> V4Config:
    """A preset name (``v4-flash``, ``v4-pro``, ``v3``, ``v3.2``, ``tiny``, ``lab``) or a ``config.json`` path."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]()
    p = Path(key)
    if p.suffix == ".json" or p.is_dir() or p.exists():
        return V4Config.from_json(p)
    raise ValueError(f"unknown preset or config file {key!r}: presets are {', '.join(PRESETS)}; "
                     "or give a path to a config.json")
