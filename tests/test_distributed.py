"""Data parallel training and expert parallelism on torch.distributed, with real processes on gloo.

Each multi-process test spawns its own group on 127.0.0.1 at a free port (``v4lab.distributed.launch``:
collective timeout, launcher deadline, survivors killed) and compares with one process. Tolerances are
stated beside each comparison with the value measured when they were set."""
import json
import os
import time

import dist_workers as W
import pytest
import torch
from safetensors.torch import load_file

from v4lab import accounting
from v4lab import distributed as D
from v4lab import expert_parallel as EP
from v4lab.moe import expert_ffn, moe_grouped
from v4lab.quant import act_quant_fp8

EP_TOL = 2e-6      # outputs and gradients, EP vs single-process MoE (fp32), relative; measured max 4.1e-7 (W = 2 and 4)


def _read(tmp, world):
    return ([load_file(str(tmp / f"rank{r}.safetensors")) for r in range(world)],
            [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)])


def _diff(a, b):
    """max |a - b| relative to the reference's scale: / max(1, max |b|)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max()))) if a.numel() else 0.0


# ------------------------------------------------------------------------------------ expert parallelism
def _check_ep(tmp, world, layers=(0, 3)):
    outs, recs = _read(tmp, world)
    cfg = W.ep_cfg()
    n_local = cfg.n_routed_experts // world
    worst = 0.0
    for layer in layers:
        full = W.full_moe(cfg, layer)
        xs, idss, cs = zip(*(W.rank_inputs(cfg, r) for r in range(world)))
        x = torch.cat(xs).requires_grad_(True)
        y = full(x, torch.cat(idss))
        (y * torch.cat(cs)).sum().backward()
        B = xs[0].shape[0]
        idx = full.last_routing["idx"].view(world, -1, cfg.num_experts_per_tok)
        for r in range(world):
            o, rec = outs[r], recs[r][f"L{layer}"]
            worst = max(worst, _diff(o[f"L{layer}.y"], y[r * B:(r + 1) * B].detach()),
                        _diff(o[f"L{layer}.x_grad"], x.grad[r * B:(r + 1) * B]))
            local = range(r * n_local, (r + 1) * n_local)
            assert recs[r][f"L{layer}.local_keys"] == sorted(f"experts.{e}.{w}.weight" for e in local
                                                              for w in ("w1", "w2", "w3"))
            for e in local:
                for w in ("w1", "w2", "w3"):
                    worst = max(worst, _diff(o[f"L{layer}.grad.experts.{e}.{w}.weight"],
                                             getattr(full.experts[e], w).weight.grad))
            # bytes: every (token, slot) pair whose expert lives elsewhere, one fp32 row each way
            remote = int((idx[r] // n_local != r).sum())
            assert rec["remote_pairs"] == remote
            assert rec["dispatch_bytes"] == accounting.ep_message_bytes(remote, cfg.hidden_size, "fp32")
            assert sum(recs[j][f"L{layer}"]["recv_rows"][r] for j in range(world)) == rec["pairs"]
        # replicated parts: the per-rank gradients add up to the single-process gradient
        for n in ("gate.weight", "shared_experts.w1.weight", "shared_experts.w2.weight"):
            worst = max(worst, _diff(sum(o[f"L{layer}.grad.{n}"] for o in outs), dict(full.named_parameters())[n].grad))
        # the simulated world (the notebook's code path) gives the same outputs and the same records
        with torch.no_grad():
            ws = full.last_routing["weights"].view(world, -1, cfg.num_experts_per_tok)
            sim, sim_recs = EP.simulate([xx.reshape(-1, cfg.hidden_size) for xx in xs], list(idx), list(ws),
                                        *full.expert_weights(), full.limit, world, ffn=expert_ffn)
        for r in range(world):
            shared = full.shared_experts(xs[r].reshape(-1, cfg.hidden_size))
            worst = max(worst, _diff(sim[r] + shared, outs[r][f"L{layer}.y"].reshape(-1, cfg.hidden_size)))
            assert sim_recs[r] == recs[r][f"L{layer}"]
    assert worst < EP_TOL, worst
    for r in range(world):       # all pairs off-rank: exactly tokens x top-k x hidden x 4 bytes, each way
        rec, T = recs[r]["all_remote"], 10
        assert rec["dispatch_bytes"] == rec["combine_bytes"] == T * cfg.num_experts_per_tok * cfg.hidden_size * 4
        assert rec["count_bytes"] == (world - 1) * n_local * 8
    return worst


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(world, tmp_path):
    t0 = time.perf_counter()
    D.launch(W.ep_worker, world, (str(tmp_path), [0, 3], 128 if world == 2 else 0), timeout_s=120)
    worst = _check_ep(tmp_path, world)
    print(f"EP world {world}: max |diff| {worst:.2e}, {time.perf_counter() - t0:.1f} s")
    if world == 2:               # FP8 dispatch: the experts see act_quant_fp8(x); the rest is unchanged
        outs, recs = _read(tmp_path, world)
        cfg = W.ep_cfg(128)
        full = W.full_moe(cfg, 3)
        x = torch.cat([W.rank_inputs(cfg, r)[0] for r in range(world)])
        ids = torch.cat([W.rank_inputs(cfg, r)[1] for r in range(world)])
        with torch.no_grad():
            full(x, ids)
            flat = x.reshape(-1, 128)
            r_ = full.last_routing
            want = moe_grouped(act_quant_fp8(flat), r_["idx"], r_["weights"], *full.expert_weights(), full.limit)
            want = (want + full.shared_experts(flat)).view_as(x)
            plain = full(x, ids)
        got = torch.cat([outs[r]["fp8.y"] for r in range(world)])
        assert _diff(got, want) < EP_TOL and _diff(got, plain) > 1e-3      # FP8 really changed the rows
        for r in range(world):
            rec = recs[r]["fp8"]
            assert rec["dispatch_bytes"] == accounting.ep_message_bytes(rec["remote_pairs"], 128, "fp8")
            assert rec["dispatch_bytes"] == rec["remote_pairs"] * (128 + 1)


def test_fp8_rows_round_trip_like_act_quant():
    torch.manual_seed(0)
    x = torch.randn(7, 256) * torch.logspace(-3, 3, 7)[:, None]
    packed = EP.fp8_pack(x)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 256 + 2)
    assert torch.equal(EP.fp8_unpack(packed, 256), act_quant_fp8(x))
    with pytest.raises(ValueError, match="hidden_size = 100"):
        EP.fp8_pack(torch.randn(2, 100))


def test_plan_and_receive_layout_by_hand():
    idx = torch.tensor([[5, 0], [1, 6], [7, 2]])                 # E = 8, ep = 2: experts 0-3 | 4-7
    plan = EP.dispatch_plan(idx, 8, 2)
    assert plan.order.tolist() == [1, 2, 5, 0, 3, 4]             # by expert: 0, 1, 2, 5, 6, 7
    assert plan.token.tolist() == [0, 1, 2, 0, 1, 2]
    assert plan.send_counts.tolist() == [3, 3]
    assert plan.counts_by_rank.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    # rows from src 0 (experts 0, 2) then src 1 (experts 0, 0, 1) -> grouped by expert: 0,0,0 | 1 | 2
    perm, off = EP.receive_layout(torch.tensor([[1, 0, 1, 0], [2, 1, 0, 0]]))
    assert perm.tolist() == [0, 2, 3, 4, 1] and off.tolist() == [0, 3, 4, 5, 5]
    with pytest.raises(ValueError, match="ep_size = 3"):
        EP.dispatch_plan(idx, 8, 3)


def test_simulated_world_equals_moe_on_skewed_and_empty_routing():
    """Ranks as a loop, with ranks that receive nothing and a rank without tokens."""
    cfg = W.ep_cfg()
    m = W.full_moe(cfg, 3)
    torch.manual_seed(1)
    xs = [torch.randn(6, 32), torch.randn(0, 32), torch.randn(3, 32), torch.randn(5, 32)]
    idxs = [torch.tensor([[0, 1]] * 6), torch.zeros(0, 2, dtype=torch.long), torch.tensor([[1, 0]] * 3),
            torch.randint(0, 2, (5, 1)) + torch.tensor([[0, 4]])]
    ws = [torch.rand(i.shape) for i in idxs]
    w1s, w2s, w3s = m.expert_weights()
    with torch.no_grad():
        outs, recs = EP.simulate(xs, idxs, ws, w1s, w2s, w3s, m.limit, 4, ffn=expert_ffn)
        for x, i, w, o in zip(xs, idxs, ws, outs):
            assert o.shape == x.shape
            if x.shape[0]:
                assert _diff(o, moe_grouped(x, i, w, w1s, w2s, w3s, m.limit)) < 1e-5
    assert [r["send_rows"] for r in recs] == [[12, 0, 0, 0], [0, 0, 0, 0], [6, 0, 0, 0], [5, 0, 5, 0]]
    assert recs[0]["dispatch_bytes"] == 0 and recs[2]["dispatch_bytes"] == 6 * 32 * 4
    assert recs[0]["combine_bytes"] == 11 * 32 * 4                # 6 rows back to rank 2, 5 to rank 3
    with pytest.raises(ValueError, match="ranks = 3"):
        EP.simulate(xs[:3], idxs[:3], ws[:3], w1s, w2s, w3s, m.limit, 4, ffn=expert_ffn)


@pytest.fixture
def one_process_world():
    """A gloo group of one process (this one), torn down afterwards."""
    import torch.distributed as dist
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_all_to_all_gradcheck_float64(one_process_world):
    """The custom autograd all-to-all inside the whole EP layer (plan, dispatch, experts, combine)."""
    torch.manual_seed(0)
    T, Dm, I, E, K = 5, 6, 4, 4, 2
    x = torch.randn(T, Dm, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w1 = [torch.randn(I, Dm, dtype=torch.float64, requires_grad=True) for _ in range(E)]
    w2 = [torch.randn(Dm, I, dtype=torch.float64, requires_grad=True) for _ in range(E)]
    w3 = [torch.randn(I, Dm, dtype=torch.float64, requires_grad=True) for _ in range(E)]

    def ffn64(x, w1, w2, w3, weight, limit):      # expert_ffn computes in fp32; gradcheck needs float64
        return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T

    def layer(x, w, *ws):
        return EP.ep_forward(x, idx, w, ws[:E], ws[E:2 * E], ws[2 * E:], 0.0, E, ffn=ffn64)[0].double()

    assert torch.autograd.gradcheck(layer, (x, w, *w1, *w2, *w3))
    y = EP.AllToAll.apply(x, [T], [T], None, False)
    assert torch.autograd.gradcheck(lambda t: EP.AllToAll.apply(t, [T], [T], None, False), (x,))
    assert torch.equal(y, x)


def test_moe_ep_size_needs_a_matching_group():
    cfg = W.ep_cfg()
    from v4lab.moe import MoE
    with pytest.raises(ValueError, match="ep_size = 3.*dividing"):
        MoE(cfg, 3, ep_size=3)
    with pytest.raises(ValueError, match="ep_size = 2.*process group"):
        MoE(cfg, 3, ep_size=2)


# ------------------------------------------------------------------------------------ data parallel
DDP_GRAD_TOL = 1e-6     # step-0 gradients, max |diff| / max |grad| over the model; measured 2.6e-7
DDP_LOSS_TOL = 1e-5     # relative, losses / grad norm over 3 steps; measured max 5e-6
DDP_WEIGHT_TOL = 3e-5   # absolute, weights after 3 steps (AdamW eps 1e-6, see below); measured 8.5e-6
ADAM_EPS = 1e-6


def test_ddp_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """Same global batch on 2 gloo ranks and in 1 process: same gradients, losses, loads, biases, weights.

    Weights are compared with AdamW eps = 1e-6 instead of V4's 1e-20: some mHC head parameters have
    gradients of ~1e-9 that are mostly cancellation, and their 1-vs-2-process round-off (~1e-12) decides
    the sign of a full +-lr Adam step when eps is 1e-20 (measured: weight differences of 2 lr = 0.02)."""
    import functools

    from v4lab import train as T
    from v4lab.data import load_data
    data = load_data(512)
    kw = dict(steps=3, batch_size=4, seq_len=32, warmup=1, lr=1e-2, seed=0, bias_gamma=0.01, progress=False,
              threads=1)
    t0 = time.perf_counter()
    D.launch(W.ddp_worker, 2, (str(tmp_path), data, kw, ADAM_EPS), timeout_s=150)
    t_ddp = time.perf_counter() - t0
    monkeypatch.setattr(T, "make_optimizer", functools.partial(T.make_optimizer, eps=ADAM_EPS))
    grads = {}
    ref = T.train(T.micro_config(), data=data, callback=W.first_grads(grads), **kw)
    outs, recs = _read(tmp_path, 2)
    # the ranks agree bit for bit (same averaged gradients, same global loads -> same bias updates) ...
    local = [k for k in outs[0] if k.startswith("local_bias.")]
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0]
                                                    if k not in local)
    # ... which they would not with each rank's own loads (the all-reduce switched off for one step)
    assert local and any(not torch.equal(outs[0][k], outs[1][k]) for k in local)
    assert {k for k in outs[0] if k.startswith("grad0.")} == set(grads)
    assert all(r["repeat_identical"] for r in recs)                   # deterministic for a seed and N
    assert len((tmp_path / "log_rank0.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "log_rank1.jsonl").exists()                 # rank 0 alone writes the log
    gscale = max(float(g.abs().max()) for g in grads.values())
    grad_err = max(float((outs[0][k] - g).abs().max()) for k, g in grads.items()) / gscale
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm"):
        got, want = [r[key] for r in recs[0]["log"]], [r[key] for r in ref["log"]]
        assert got == pytest.approx(want, rel=DDP_LOSS_TOL), key
    assert [r["load"] for r in recs[0]["log"]] == [r["load"] for r in ref["log"]]     # global loads, exactly
    blocks = ref["model"].blocks()
    biases = {k: blocks[int(k.split(".")[1])].ffn.gate.bias for k in outs[0] if k.startswith("bias.")}
    assert len(biases) == 2 and all(torch.equal(outs[0][k], b) for k, b in biases.items())
    assert all(float(b.abs().sum()) > 0 for b in biases.values())                 # the biases did move
    sd = {k: v for k, v in ref["model"].state_dict().items() if v.is_floating_point()}
    assert set(sd) <= set(outs[0])
    w_err = max(float((outs[0][k] - v).abs().max()) for k, v in sd.items())
    loss_err = max(abs(a["loss"] / b["loss"] - 1) for a, b in zip(recs[0]["log"], ref["log"]))
    print(f"DDP 2 ranks vs 1: grads {grad_err:.2e} (of max |g|), losses {loss_err:.2e} (rel), "
          f"weights {w_err:.2e} (abs); {t_ddp:.1f} s")
    assert grad_err < DDP_GRAD_TOL and w_err < DDP_WEIGHT_TOL


# ------------------------------------------------------------------------------------ the launcher
def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:          # a zombie is gone too
        return f.read().split()[2] == "Z"


def test_launch_failure_names_the_rank_and_leaves_no_process(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 1 failed on purpose"):
        D.launch(W.failing_worker, 2, (str(tmp_path),), timeout_s=60, collective_timeout_s=30)
    assert time.perf_counter() - t0 < 30                      # the waiting rank was killed, not timed out
    pid = int((tmp_path / "pid0").read_text())
    assert _gone(pid)


def test_launch_deadline_kills_hung_ranks(tmp_path):
    import multiprocessing
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="after 4 s"):
        D.launch(W.sleeping_worker, 2, (str(tmp_path),), timeout_s=4)
    assert time.perf_counter() - t0 < 15
    assert not multiprocessing.active_children()
    for f in tmp_path.glob("pid*"):               # the ranks that got as far as writing their pid
        assert _gone(int(f.read_text()))


def test_launch_and_cli_bad_input():
    with pytest.raises(ValueError, match="nproc = 0"):
        D.launch(W.sleeping_worker, 0)
    from v4lab.cli import main
    assert main(["train", "--nproc", "3", "--batch-size", "8", "--steps", "1"]) == 2
    assert main(["train", "--nproc", "2", "--anticipatory", "spike"]) == 2


def test_accounting_ep_formula():
    assert accounting.ep_message_bytes(10, 256, "fp8") == 10 * (256 + 2)       # + one UE8M0 byte per 128
    assert accounting.ep_message_bytes(10, 256, "bf16") == 10 * 512
    assert accounting.ep_message_bytes(10, 256, "fp32") == 10 * 1024
    pro = accounting.ep_all_to_all("v4-pro", 32)                                  # FP8 dispatch, BF16 combine
    assert (pro["moe_layers"], pro["topk"], pro["hidden"], pro["experts_per_rank"]) == (61, 6, 7168, 12)
    assert pro["upper_per_layer"] == {"dispatch": 6 * (7168 + 56), "combine": 6 * 7168 * 2}
    assert pro["remote_per_layer"]["dispatch"] == pytest.approx(6 * 7224 * 31 / 32)
    assert pro["remote_all_layers_total"] == pytest.approx(61 * 31 / 32 * 6 * (7224 + 14336))
    assert accounting.ep_all_to_all("v4-flash", 8)["moe_layers"] == 43
    assert accounting.ep_all_to_all("v4-pro", 1)["remote_per_layer_total"] == 0      # one rank: nothing leaves
    with pytest.raises(ValueError, match="ep_size = 5.*dividing"):
        accounting.ep_all_to_all("v4-pro", 5)
    with pytest.raises(ValueError, match="dtype = 'fp16'"):
        accounting.ep_message_bytes(1, 128, "fp16")


@pytest.mark.parametrize("fp8", [False, True])
def test_bench_ep_worker_and_tables(one_process_world, tmp_path, fp8, capsys):
    """The bench's per-rank timing code in a one-process world (its 2- and 4-process runs are the same
    code under v4lab.distributed.launch), and the analytic table against accounting."""
    import json as _json

    from v4lab.bench import ep as B
    out = tmp_path / "rec.json"
    B._worker(str(out), 8, 1, "cpu", fp8)
    rec = _json.loads(out.read_text())
    assert rec["ranks"] == 1 and rec["backend"] == "gloo" and rec["dispatch_dtype"] == ("fp8" if fp8 else "fp32")
    assert rec["remote_pairs"] == 0 and rec["dispatch_bytes"] == rec["analytic_dispatch_bytes"] == 0
    assert set(rec["seconds"]) == {"counts", "dispatch", "experts", "combine", "layer"}
    rows = B.analytic()
    assert [(r["model"], r["ep_size"]) for r in rows] == [(m, e) for m in B.PRESETS for e in B.EP_SIZES]
    pro32 = next(r for r in rows if r["model"] == "v4-pro" and r["ep_size"] == 32)
    assert pro32["fp8_total_all_layers"] == accounting.ep_all_to_all("v4-pro", 32)["remote_all_layers_total"]
    assert pro32["bf16_total_all_layers"] > pro32["fp8_total_all_layers"]
    text = B.format_records([rec] + rows)
    assert "= meas." in text and "v4-pro  32" in text
    assert B.main(["--analytic-only"]) == 0 and "v4-flash" in capsys.readouterr().out


def test_fp8_all_to_all_is_straight_through(one_process_world):
    """FP8 rows forward, full-precision gradients backward (the quantiser's straight-through estimator)."""
    x = (torch.randn(4, 128) * 3).requires_grad_(True)
    y = EP.AllToAll.apply(x, [4], [4], None, True)
    assert torch.equal(y.detach(), act_quant_fp8(x.detach())) and not torch.equal(y.detach(), x.detach())
    g = torch.randn(4, 128)
    y.backward(g)
    assert torch.equal(x.grad, g)
