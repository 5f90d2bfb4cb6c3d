"""V3 → V4, side by side: what two DeepSeek configs change, read off the configs and the module trees.

:func:`diff` compares two presets (``v3``, ``v3.2``, ``v4-flash``, ``v4-pro``, or any config):

* ``table``: every config key, its value on each side and a status — ``unchanged``, ``changed``,
  ``added`` (unset/zero on the first side: a new mechanism) or ``removed`` — with the part of the
  model it belongs to (backbone, attention, moe, mhc, formats);
* ``block``: the parameters of one block built on the meta device (shapes, no storage): V4 blocks are
  ``v4lab.model.Block``, V3/V3.2 blocks :class:`MLABlock` with the checkpoint's names; the routed experts
  are folded into one ``ffn.experts.*`` row with their count;
* ``attribution``: the parameter delta (``accounting.params``, backbone without MTP) split over the
  changes: the routed-expert growth by ``accounting.moe_expansion``'s Shapley split (more experts, wider
  experts, wider model, more MoE layers), every other component by its own delta. The parts add up to
  the total delta exactly.

Nothing here is typed by hand: every value comes from ``v4lab.config`` and the modules.
"""
from __future__ import annotations

import re

from torch import nn

from v4lab import accounting
from v4lab.config import V4Config, get_config

GROUPS = {
    "backbone": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
                 "max_position_embeddings", "tie_word_embeddings", "rope_theta", "rope_scaling", "q_lora_rank"),
    "attention": ("num_key_value_heads", "head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                  "kv_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "compress_ratios",
                  "compress_rope_theta", "index_n_heads", "index_head_dim", "index_topk"),
    "moe": ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
            "scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor", "num_hash_layers",
            "n_group", "topk_group", "first_k_dense_replace", "intermediate_size", "swiglu_limit"),
    "mhc": ("hc_mult", "hc_sinkhorn_iters", "hc_eps"),
    "formats": ("expert_dtype", "quantization_config", "num_nextn_predict_layers", "torch_dtype"),
}
_SKIP = ("name", "model_type", "bos_token_id", "eos_token_id", "initializer_range", "hidden_act",
         "attention_bias", "attention_dropout")
STATUSES = ("unchanged", "changed", "added", "removed")
ConfigLike = V4Config | str            # a config or a preset name
# Keys that only mean something when their mechanism exists: when the mechanism is added or removed they
# are too (V3's config object carries V4's default compress_rope_theta / hc_eps, which V3 does not use).
DEPENDS = {"compress_rope_theta": "compress_ratios", "hc_eps": "hc_mult", "hc_sinkhorn_iters": "hc_mult",
           "num_hash_layers": "compress_ratios"}


def _cfg(c) -> V4Config:
    return c if isinstance(c, V4Config) else get_config(c)


def _unset(v) -> bool:
    # hc_mult = 1 is "one residual stream", i.e. no hyper-connections: a V3 block has none.
    return v is None or v == 0 or v == [] or v == {} or v is False


def _status(key: str, a, b) -> str:
    if a == b:
        return "unchanged"
    if key == "hc_mult":
        return "added" if a == 1 else ("removed" if b == 1 else "changed")
    if _unset(a) and not _unset(b):
        return "added"
    if _unset(b) and not _unset(a):
        return "removed"
    return "changed"


def _short(v) -> str:
    if isinstance(v, list) and len(v) > 6:
        kinds = {x: v.count(x) for x in dict.fromkeys(v)}
        return f"{len(v)} entries: " + ", ".join(f"{n}×{x}" for x, n in kinds.items())
    if isinstance(v, dict) and v.get("type") == "yarn":
        return f"yarn ×{v['factor']:g} from {v['original_max_position_embeddings']}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def config_table(a: ConfigLike, b: ConfigLike) -> list[dict]:
    """One row per config key: ``{"key", "group", "a", "b", "status"}`` (values as shown, short)."""
    a, b = _cfg(a), _cfg(b)
    group_of = {k: g for g, keys in GROUPS.items() for k in keys}
    rows = []
    for k in a.__dataclass_fields__:
        if k in _SKIP:
            continue
        va, vb = getattr(a, k), getattr(b, k)
        if k == "compress_ratios":                # the MTP entry is not a layer of the backbone
            va, vb = va[:a.num_hidden_layers], vb[:b.num_hidden_layers]
        rows.append({"key": k, "group": group_of.get(k, "other"), "a": _short(va), "b": _short(vb),
                     "status": _status(k, va, vb)})
    status = {r["key"]: r["status"] for r in rows}
    for r in rows:
        parent = status.get(DEPENDS.get(r["key"]))
        if parent in ("added", "removed"):
            r["status"] = parent
        if r["status"] == "added":                # the side without the mechanism shows no value
            r["a"] = "—"
        elif r["status"] == "removed":
            r["b"] = "—"
    return rows


# ------------------------------------------------------------------------------------------ blocks
class MLABlock(nn.Module):
    """One V3 / V3.2 MoE decoder layer, for its parameter shapes: ``attn_norm``, ``attn`` (MLA: ``wq_a``,
    ``q_norm``, ``wq_b``, ``wkv_a``, ``kv_norm``, ``wkv_b``, ``wo``; V3.2 adds the DSA ``indexer``), ``ffn_norm``,
    ``ffn`` (``v4lab.moe.MoE``: gate, routed and shared experts). Names as in the V3 checkpoints."""

    def __init__(self, cfg: V4Config, layer_id: int):
        super().__init__()
        from v4lab.baselines import MLADSA
        from v4lab.moe import MoE
        from v4lab.norm import RMSNorm
        if cfg.is_v4:
            raise ValueError(f"config model_type {cfg.model_type!r}: MLABlock is the V3 / V3.2 block")
        d = cfg.hidden_size
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        if cfg.arch == "v3.2":
            self.attn = MLADSA(cfg)
        else:
            H, nope, rope, vd, kvr, qr = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                          cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank)
            self.attn = nn.Module()
            self.attn.wq_a, self.attn.q_norm = nn.Linear(d, qr, bias=False), RMSNorm(qr, cfg.rms_norm_eps)
            self.attn.wq_b = nn.Linear(qr, H * (nope + rope), bias=False)
            self.attn.wkv_a = nn.Linear(d, kvr + rope, bias=False)
            self.attn.kv_norm = RMSNorm(kvr, cfg.rms_norm_eps)
            self.attn.wkv_b = nn.Linear(kvr, H * (nope + vd), bias=False)
            self.attn.wo = nn.Linear(H * vd, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, layer_id)


def default_layer(cfg: V4Config) -> int:
    """The block compared: V4 — the first CSA layer with a learned router (the richest block); V3 — the
    first MoE layer."""
    if cfg.is_v4:
        return next(i for i in range(cfg.num_hidden_layers)
                    if cfg.layer_kind(i) == "csa" and not cfg.is_hash_layer(i))
    return cfg.first_k_dense_replace


def block_params(cfg: ConfigLike, layer: int | None = None) -> dict:
    """``{name: shape}`` of one block built on the meta device; routed experts folded into
    ``ffn.experts.*.<w>`` (shape of one expert) with ``n_experts``; buffers (gate bias) included."""
    from v4lab.loading import no_init
    from v4lab.model import Block
    cfg = _cfg(cfg)
    layer = default_layer(cfg) if layer is None else layer
    with no_init("meta"):
        blk = Block(cfg, layer) if cfg.is_v4 else MLABlock(cfg, layer)
    out = {}
    for name, t in list(blk.named_parameters()) + list(blk.named_buffers()):
        name = re.sub(r"^ffn\.experts\.\d+\.", "ffn.experts.*.", name)
        out[name] = tuple(t.shape)
    return {"layer": layer, "kind": cfg.layer_kind(layer), "params": out, "n_experts": cfg.n_routed_experts}


_STAGES = ("hc_attn", "attn_norm", "attn.", "hc_ffn", "ffn_norm", "ffn.")


def _stage(name: str) -> int:
    """Where a parameter sits in the block's forward order (mHC pre-mix, norm, attention, ... MoE)."""
    return next(i for i, p in enumerate(_STAGES) if name.startswith(p))


def block_diff(a: ConfigLike, b: ConfigLike, layer_a: int | None = None, layer_b: int | None = None) -> list[dict]:
    """Rows ``{"name", "a", "b", "status"}`` over the union of both blocks' parameter names, in forward
    order (mHC, norm, attention, mHC, norm, MoE; the first block's order within a stage, then the new
    names); shapes are None where a side has no such parameter."""
    pa, pb = block_params(a, layer_a)["params"], block_params(b, layer_b)["params"]
    rows = []
    names = list(pa) + [n for n in pb if n not in pa]
    for name in sorted(names, key=lambda n: (_stage(n), names.index(n))):
        sa, sb = pa.get(name), pb.get(name)
        status = ("added" if sa is None else "removed" if sb is None else
                  "unchanged" if sa == sb else "changed")
        rows.append({"name": name, "a": sa, "b": sb, "status": status})
    return rows


# ------------------------------------------------------------------------------------------ params
def attribution(a: ConfigLike, b: ConfigLike) -> list[dict]:
    """The total-parameter delta b − a split over the changes: ``[{"change", "params"}]``, summing to it.

    Routed experts: ``accounting.moe_expansion``'s Shapley split of their growth. Other components: their
    own delta (``accounting.params``), e.g. hybrid attention (attention + compressor + indexer), mHC."""
    a, b = _cfg(a), _cfg(b)
    pa, pb = accounting.params(a)["by_component"], accounting.params(b)["by_component"]
    same = pa["routed_experts"] == pb["routed_experts"]        # no growth to split (log ratio 0)
    shap = ({"experts": 0.0, "expert_width": 0.0, "hidden_size": 0.0, "moe_layers": 0.0} if same
            else accounting.moe_expansion(a, b)["shapley_params"])
    names = {"experts": "routed experts: more experts per layer", "expert_width": "routed experts: wider experts",
             "hidden_size": "routed experts: wider model", "moe_layers": "routed experts: more MoE layers"}
    rows = [{"change": names[k], "params": v} for k, v in shap.items()]
    for comp in accounting.COMPONENTS:
        if comp in ("routed_experts", "mtp"):
            continue
        delta = pb[comp] - pa[comp]
        rows.append({"change": comp, "params": float(delta)})
    total = accounting.params(b)["total"] - accounting.params(a)["total"]
    assert abs(sum(r["params"] for r in rows) - total) <= 1e-6 * max(1, abs(total))
    return rows


def diff(a: ConfigLike = "v3", b: ConfigLike = "v4-pro") -> dict:
    """Everything above for two configs (``a`` the older one)."""
    ca, cb = _cfg(a), _cfg(b)
    pa, pb = accounting.params(ca), accounting.params(cb)
    return {"a": ca.name, "b": cb.name, "table": config_table(ca, cb), "block": block_diff(ca, cb),
            "layer_a": default_layer(ca), "layer_b": default_layer(cb),
            "n_experts": (ca.n_routed_experts, cb.n_routed_experts),
            "attribution": attribution(ca, cb), "total_a": pa["total"], "total_b": pb["total"]}


def _shape(s) -> str:
    return "—" if s is None else "×".join(map(str, s))


def format_diff(d: dict) -> str:
    """The three tables as markdown (what ``v4lab compare A B --diff`` prints)."""
    a, b = d["a"], d["b"]
    out = [f"## {a} → {b}: config", "", f"| part | key | {a} | {b} | |", "|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(STATUSES)}
    for r in sorted(d["table"], key=lambda r: (order[r["status"]], list(GROUPS).index(r["group"])
                                               if r["group"] in GROUPS else 99)):
        out.append(f"| {r['group']} | {r['key']} | {r['a']} | {r['b']} | {r['status']} |")
    out += ["", f"## one block: {a} layer {d['layer_a']} vs {b} layer {d['layer_b']} (parameter shapes)", "",
            f"routed experts per block (ffn.experts.*): {d['n_experts'][0]} → {d['n_experts'][1]}", "",
            f"| parameter | {a} | {b} | |", "|---|---|---|---|"]
    for r in d["block"]:
        out.append(f"| {r['name']} | {_shape(r['a'])} | {_shape(r['b'])} | {r['status']} |")
    tot = d["total_b"] - d["total_a"]
    out += ["", f"## parameters: {accounting._h(d['total_a'])} → {accounting._h(d['total_b'])} "
                f"(+{accounting._h(tot)}), by change", "", "| change | params | share |", "|---|---:|---:|"]
    for r in sorted(d["attribution"], key=lambda r: -abs(r["params"])):
        if r["params"]:
            out.append(f"| {r['change']} | {'+' if r['params'] > 0 else '−'}{accounting._h(abs(r['params']))} "
                       f"| {100 * r['params'] / tot:.1f}% |")
    return "\n".join(out)


def diff_report(a: ConfigLike, b: ConfigLike) -> tuple[dict, str]:
    """(``diff(a, b)``, its terminal text): what ``v4lab compare A B --diff`` prints."""
    d = diff(a, b)
    return d, format_diff(d)
