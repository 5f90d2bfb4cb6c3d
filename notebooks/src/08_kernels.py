# Source of notebooks/08_kernels.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 08 · Kernels: each Triton kernel beside its reference
#
# **What you will learn**
# - which V4 operations v4lab implements as [Triton](glossary.md#triton) kernels, and the slow, obvious PyTorch reference each
#   one must equal (same signature, compared in `tests/test_kernel_<op>.py`);
# - how to run them on a CPU with Triton's interpreter, and what that run does and does not tell you;
# - what changes on a GPU: compilation, block sizes, and where each kernel sits on the [roofline](glossary.md#roofline);
# - benchmark results, and which path produced them.
#
# **You need** [02 · Compressed attention](02_compressed_attention.ipynb) (sparse attention, the indexer, the
# sink), [03 · mHC](03_mhc.ipynb), [05 · FP4](05_fp4.ipynb) (MXFP4) and, for the last section,
# [07 · The whole tiny V4, trained](07_tiny_v4.ipynb).

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA (before any kernel import)
print(describe())

import inspect

from v4lab.device import kernel_mode
from v4lab.viz import kernels

print("Triton kernels run in", kernel_mode(), "mode")

# %% [markdown]
# ## The kernels and their references
#
# | kernel (`v4lab.kernels.…`) | reference | the V4 idea |
# |---|---|---|
# | `sparse_attn.sparse_attn` | `v4lab.attention.sparse_attn` | every query (window, [CSA](glossary.md#csa), [HCA](glossary.md#hca)) attends one shared K=V head through an index list, with a per-head [sink](glossary.md#sink) in the softmax denominator |
# | `compressor.compress_pool` | `v4lab.compressor.compress_pool` | $m$ tokens pooled into one KV entry by a channel-wise softmax (CSA overlaps two windows) |
# | `indexer.index_scores` | `v4lab.indexer.index_scores` | [lightning indexer](glossary.md#lightning-indexer) $I_{t,s} = \sum_h w_{t,h}\,\mathrm{ReLU}(q_{t,h}\cdot k_s)$ |
# | `mhc.hc_pre_coeffs` | `v4lab.mhc.hc_pre_coeffs` | [mHC](glossary.md#mhc)'s projection, 1/RMS, sigmoids and 20 [Sinkhorn](glossary.md#sinkhorn) iterations, fused |
# | `moe.grouped_expert_mlp` | `v4lab.moe.grouped_expert_mlp` | experts over tokens sorted by expert, the [SwiGLU clamp](glossary.md#swiglu-clamp) fused |
# | `fp4_gemm.fp4_gemm` | `v4lab.quant.fp4_gemm_ref` | $y = x\,\mathrm{deq}(W)^\top$ with [MXFP4](glossary.md#mxfp4) weights decoded in registers |
# | `quant.fp4_act_quant` | `v4lab.quant.fp4_act_quant` | MXFP4 activation fake-quant, bit-exact |
#
# A kernel is a program run by many instances at once (`tl.program_id`), each owning a tile. Read one —
# the indexer: each program takes a tile of queries × keys and loops over the indexer heads, because the
# ReLU sits between the per-head dot product and the head sum (so it is not one matmul):

# %%
import v4lab.kernels.indexer as indexer_kernel

print(inspect.getsource(indexer_kernel._index_scores_fwd.fn))

# %% [markdown]
# ## Run them beside their references
#
# `kernels.compare(name)` builds seeded inputs at small shapes, runs the kernel and the reference, and
# reports $\max|\text{kernel} - \text{reference}|$ against the tolerance its test uses (relative to the
# output's magnitude; 0 = bit-exact). Under the interpreter every program runs one after another in
# NumPy, so the times below measure the interpreter, not the kernel: they say nothing about a GPU.

# %%
rows = kernels.compare_all()
print(kernels.compare_table(rows))

# %%
# NBVAL_CHECK_OUTPUT
for r in rows:
    print(f"{r['kernel']:<12} {r['shapes']:<58} equal to {r['reference']}: {'yes' if r['ok'] else 'NO'}")
assert all(r["ok"] for r in rows)

# %% [markdown]
# **Live:** pick a kernel; left its reference's output, middle the kernel's, right $\log_{10}$ of their
# difference (fp32 summation order differs; the quantiser is identical bit for bit).

# %%
kernels.CompareWidget().display()

# %% [markdown]
# ## What changes on a GPU
#
# - **Compiled, not interpreted.** With CUDA present `v4lab.kernels` leaves `TRITON_INTERPRET` unset and
#   Triton compiles each kernel to PTX; the same source runs. The kernels avoid interpreter-only tricks,
#   and the comparison above runs on CUDA tensors there (`kernel_mode()` says `compiled`).
# - **Block sizes.** Under the interpreter the kernels use big blocks and few programs (each program and
#   each op costs time). On a GPU the tile sizes trade occupancy against reuse; `sparse_attn` and `indexer`
#   autotune over a few configurations, only when compiled (the interpreter cannot autotune).
# - **Precision.** On CUDA with bf16 inputs the attention dots run in bf16 with fp32 accumulation, like the
#   official kernel; here everything is fp32 ("ieee") so the comparison is tight. The official expert GEMM
#   feeds FP8 (H200) or FP4 (B200) tensor cores; v4lab's `fp4_gemm` keeps the memory-traffic idea (4-bit
#   weights decoded in registers) but multiplies in fp32 so it runs everywhere.
# - **The roofline.** A kernel is memory-bound when it does fewer FLOPs per HBM byte than the GPU's
#   ridge point (peak FLOP/s ÷ bandwidth; H200 FP8: ~410). The estimates below use V4-Flash shapes
#   (`kernels._cost`): decode (1 token per call) leaves every kernel memory-bound — which is why V4 cuts
#   bytes (FP8 KV cache, FP4 experts and indexer keys) rather than FLOPs. Batching tokens amortises the
#   weights of the GEMMs (`fp4_gemm`, `moe`) but not the per-query gathers of `sparse_attn`, whose
#   intensity comes from 64 heads sharing each KV entry.

# %%
kernels.RooflineWidget().display()

# %%
# NBVAL_CHECK_OUTPUT
for gpu, m in (("H200", 1), ("H200", 4096), ("B200", 4096)):
    pts = kernels.roofline_points(gpu, m)
    print(f"{gpu} {m:>4} tokens: " + ", ".join(f"{p['kernel']} {p['intensity']:.3g} ({p['bound'][0]})" for p in pts))

# %% [markdown]
# ## The whole model through the kernels
#
# `model.use_kernels()` points every hot op of a model at its kernel at once — sparse attention with the
# sink, compressor pooling, indexer scores, the mHC pre-mix and the grouped expert MLP (forward only; the
# references stay the training path). Here the trained tiny model reads a short text both ways. Under the
# interpreter the kernel pass takes seconds (a Python loop per program); compiled on a GPU it is the fast
# path. `v4lab generate --kernels` decodes this way, and `v4lab bench device` checks it on any device.

# %%
res = kernels.whole_model()
print(f"{res['tokens']} tokens, kernels {res['mode']}: max |logit difference| {res['max_abs_diff']:.1e}, "
      f"same greedy next tokens: {res['same_next_tokens']}; reference {res['seconds_reference']:.2f} s, "
      f"kernels {res['seconds_kernels']:.2f} s")

# %%
# NBVAL_CHECK_OUTPUT
print("logits agree within 1e-4:", res["max_abs_diff"] < 1e-4, "| same next tokens:", res["same_next_tokens"])

# %% [markdown]
# ## Benchmark results
#
# `kernels.bench_records()` is the quick run of `v4lab bench kernels`: every kernel against its reference
# on this device, with the bytes/s and FLOP/s it reached and, on a known GPU, the fraction of that GPU's
# roofline; each row also carries the kernel's max |difference| from the reference in the same run. On a
# CPU the kernels run in Triton's interpreter at small shapes, so the times say nothing about speed: the
# run checks that the benchmark path works and that the kernels still agree. The attention and MoE
# benchmarks (`v4lab bench attention --quick`, `v4lab bench moe --quick`) build real-width layers and take
# minutes, so they are not run here.

# %%
source, records = kernels.bench_records()
print(kernels.bench_table(source, records))

# %% [markdown]
# ## What it means for V4
#
# V4's efficiency claims (27% of V3.2's FLOPs and 10% of its KV cache at 1M tokens for V4-Pro) only pay
# off with kernels that touch exactly the bytes the architecture promises: sparse attention that gathers
# only the selected entries, an indexer that streams 4-bit keys, experts read as FP4. Each kernel here is
# checked against a reference that is easy to read, so the semantics stay V4's while the kernels get fast.
#
# ## Check it yourself
#
# Change a shape and compare again: e.g. the indexer with more heads and keys.

# %%
# NBVAL_CHECK_OUTPUT
import torch
from v4lab import indexer
from v4lab.kernels.indexer import index_scores

g = torch.Generator().manual_seed(7)
q, k, w = torch.randn(1, 4, 8, 32, generator=g), torch.randn(1, 70, 32, generator=g), torch.randn(1, 4, 8, generator=g)
if kernel_mode() == "compiled":
    q, k, w = q.cuda(), k.cuda(), w.cuda()
diff = (index_scores(q, k, w) - indexer.index_scores(q, k, w)).abs().max().item()
print("indexer kernel == reference within 1e-4:", diff < 1e-4)

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right and why. Each exercise is followed by a collapsed solution cell that computes the answer with
# v4lab and checks it a second way.

# %%
from v4lab import attention, hardware, quant
from v4lab.exercises import answer, check, nb08

# %% [markdown]
# **1 · When does a GEMM become compute-bound?** On an H200, at how many tokens per call (a power of two)
# does `fp4_gemm` (one V4-Flash expert projection with FP4 weights) stop being memory-bound? Use the
# roofline widget only after you have guessed.

# %%
guess = None  # your prediction
check("08.fp4_gemm_compute_bound", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("08.fp4_gemm_compute_bound")
ridge = hardware.peak_flops("H200", "fp4") / hardware.bandwidth("H200")      # FLOP per byte
ai = {m: nb08.bound_at("fp4_gemm", m)["flops"] / nb08.bound_at("fp4_gemm", m)["bytes"] for m in (a.value // 2, a.value)}
assert ai[a.value // 2] < ridge <= ai[a.value]
print(a.value, "-", a.why)

# %% [markdown]
# **2 · Does batching help sparse attention?** By what factor does the arithmetic intensity of
# `sparse_attn` change between 1 token per call and 4096 tokens per call? Within 5 %.

# %%
guess = None  # your prediction
check("08.sparse_attn_batching", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("08.sparse_attn_batching")
one, many = nb08.bound_at("sparse_attn", 1), nb08.bound_at("sparse_attn", 4096)
assert abs(a.value - (many["flops"] / many["bytes"]) / (one["flops"] / one["bytes"])) < 1e-9
print(f"{a.value:.3g} -", a.why)

# %% [markdown]
# **3 · What an FP4 expert costs in memory.** How many bytes does one [2048, 4096] expert weight take in
# MXFP4, counting everything that must be stored to decode it? Within 2 %.

# %%
guess = None  # your prediction
check("08.mxfp4_bytes", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("08.mxfp4_bytes")
assert a.value == quant.bits_per_weight("e2m1") * 2048 * 4096 / 8
print(f"{a.value:,} -", a.why)

# %% [markdown]
# **4 · Attention over nothing.** Give `sparse_attn` a query whose index list is all −1 (no key to attend
# to). What is the largest |value| of that query's output? Any number is a valid guess, `float("nan")`
# included.

# %%
guess = None  # your prediction
check("08.empty_row", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("08.empty_row")
ref = attention.sparse_attn(*nb08.empty_row_inputs())           # the PyTorch reference on the same inputs
assert a.value == float(ref[:, 0].abs().max())
print(a.value, "-", a.why)

# %% [markdown]
# ← [07 · The whole tiny V4, trained](07_tiny_v4.ipynb) · [glossary](glossary.md) · [09 · Hardware and cost](09_hardware_and_cost.ipynb) →
