"""Context-parallel FoX attention on real gloo process groups (CPU) against the fp64 reference.

Each world size (2, 3, 4) is spawned ONCE; every configuration runs as a check inside that spawn
(see ``dist_utils``) and each test below asserts on one check's measured errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import Check, DistributedTestError, DistSuite, run_distributed

from foxdist.ops import AcpStats, forgetting_attention, naive_forgetting_attention
from foxdist.parallel.context import CPContext, context_parallel_attention
from foxdist.parallel.layout import Layout
from foxdist.parallel.ring import RingPlan

TOL = 1e-10  # fp64 agreement with the single-device reference
ACP_EPS = math.exp(-10.0)


# ------------------------------------------------------------------------------------------- data

def _inputs(seed, t, h=4, hkv=4, d=8, b=1, dtype=torch.float64, qk_scale=1.0):
    """Full tensors, identical on every rank: q, k, v, g (mixed per-head forgetting rates), do."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64) * qk_scale
    k = torch.randn(b, t, hkv, d, generator=gen, dtype=torch.float64) * qk_scale
    v = torch.randn(b, t, hkv, d, generator=gen, dtype=torch.float64)
    bias = torch.linspace(-2.0, 5.0, h, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=torch.float64) + bias)
    do = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, g, do)]


def _max_over_ranks(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _run_pair(ctx, full, ref_fn, **kw):
    """CP output and grads (this rank) vs the reference on the full sequence; errors max over ranks."""
    q, k, v, g, do = full
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o_ref = ref_fn(*leaves)
    (o_ref * do).sum().backward()
    loc = [ctx.shard(x.detach()).requires_grad_() for x in (q, k, v, g)]
    o = context_parallel_attention(*loc, ctx, **kw)
    (o * ctx.shard(do)).sum().backward()
    errs = {"o": (o - ctx.shard(o_ref.detach())).abs().max().item()}
    for name, a, r in zip("qkvg", loc, leaves):
        errs["d" + name] = (a.grad - ctx.shard(r.grad)).abs().max().item()
    return {key: _max_over_ranks(val) for key, val in errs.items()}


# ------------------------------------------------------------------------------------------ checks

def check_attention(rank, world, mode="ring", layout="zigzag", ulysses_degree=1, t=48, h=4, hkv=4,
                    docs=None, acp=False, tile=128, seed=0):
    """Output and all four gradients against the single-device reference.

    Without ACP the reference is the fp64 textbook ``naive_forgetting_attention``. With ACP it is
    ``forgetting_attention`` with the same eps and tile size (same pruning decisions), and the
    distance to the unpruned textbook result is also reported.
    """
    import torch.distributed as dist

    ctx = CPContext(dist.group.WORLD, layout=layout, mode=mode, ulysses_degree=ulysses_degree)
    full = _inputs(seed, t, h, hkv, qk_scale=0.5 if acp else 1.0)
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int64)
    kw = dict(cu_seqlens=cu, tile=tile)
    out = {}
    if acp:
        stats = AcpStats()
        errs = _run_pair(ctx, full, lambda q, k, v, g: forgetting_attention(
            q, k, v, g, cu_seqlens=cu, acp_eps=ACP_EPS, tile=tile), acp_eps=ACP_EPS, stats=stats, **kw)
        with torch.no_grad():
            o_true = naive_forgetting_attention(*full[:4], cu_seqlens=cu)
            o_cp = context_parallel_attention(*(ctx.shard(x) for x in full[:4]), ctx, acp_eps=ACP_EPS, **kw)
        out["vs_unpruned"] = _max_over_ranks((o_cp - ctx.shard(o_true)).abs().max().item())
        pr = torch.tensor([stats.tiles_pruned, stats.tiles_total], dtype=torch.float64)
        dist.all_reduce(pr)
        out["pruned_fraction"] = float(pr[0] / pr[1])
    else:
        errs = _run_pair(ctx, full, lambda q, k, v, g: naive_forgetting_attention(q, k, v, g, cu_seqlens=cu), **kw)
    out.update(errs)
    return out


def check_subgroup(rank, world, mode="ring", layout="zigzag", t=48):
    """cp groups that are strided subgroups of the world (tp=2 innermost: cp groups {0, 2} and {1, 3}),
    each running its own problem: P2P peers and collectives must stay inside the group."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # collective: every rank creates both
    ctx = CPContext(groups[rank % 2], layout=layout, mode=mode)
    assert ctx.world == 2 and ctx.rank == rank // 2
    full = _inputs(100 + rank % 2, t)  # different data in the two groups
    errs = _run_pair(ctx, full, lambda q, k, v, g: naive_forgetting_attention(q, k, v, g))
    return errs


def check_precision(rank, world, layout="zigzag", t=64):
    """fp32 inputs, prefix sum reaching -1e6 in the first chunk, near-1 gates afterwards.

    Returns the max output error over the later positions for the CP path (chunk-local fp32 prefix
    sums + fp64 offsets) and for a global fp32 cumsum, both against the fp64 textbook result.
    """
    import torch.distributed as dist

    ctx = CPContext(dist.group.WORLD, layout=layout, mode="ring")
    q, k, v, _, _ = _inputs(7, t, dtype=torch.float32)
    first = t // ctx.layout.n_chunks
    gen = torch.Generator().manual_seed(8)
    g = F.logsigmoid(torch.randn(1, t, 4, generator=gen) + 3.0)  # ~ -0.05 per token
    g[:, :first] = -1e6 / first  # c reaches -1e6 before the compared chunks
    c32 = g.cumsum(dim=1)  # global fp32 prefix sums
    later = slice(first, t)
    with torch.no_grad():
        ref = naive_forgetting_attention(q.double(), k.double(), v.double(), g.double())
        # the same attention with c taken from the global fp32 cumsum (fed as exact fp64 differences)
        g_eff = torch.diff(c32.double(), dim=1, prepend=torch.zeros_like(c32[:, :1]).double())
        glob = naive_forgetting_attention(q.double(), k.double(), v.double(), g_eff)
        o = context_parallel_attention(ctx.shard(q), ctx.shard(k), ctx.shard(v), ctx.shard(g), ctx)
        o_full = ctx.gather(o)
    return {
        "cp_fp32_err": (o_full.double() - ref)[:, later].abs().max().item(),
        "global_fp32_cumsum_err": (glob - ref)[:, later].abs().max().item(),
        "c_min": float(c32.min()),
        "dtype": str(o.dtype),
    }


def check_layout_ops(rank, world, layout="zigzag"):
    """shard/gather round trip (values and gradient), positions, prev_token halo (values and gradient),
    reduce_loss."""
    import torch.distributed as dist

    ctx = CPContext(dist.group.WORLD, layout=layout, mode="ring")
    t = 4 * ctx.layout.n_chunks
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, t, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(2, t, 3, generator=gen, dtype=torch.float64)
    out = {}
    xl = ctx.shard(x)
    out["local_len"] = xl.shape[1] == ctx.local_len(t)
    out["roundtrip"] = (ctx.gather(xl) - x).abs().max().item()
    pos = ctx.positions(t)
    out["positions"] = bool((x[:, pos] == xl).all())
    # gather gradient: every rank computes the same loss of the full tensor
    xg = xl.clone().requires_grad_()
    (ctx.gather(xg) * w).sum().backward()
    out["gather_grad"] = (xg.grad - world * ctx.shard(w)).abs().max().item()
    # halo exchange: previous token in global order, zero at position 0; gradient routed home
    prev_full = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    xh = xl.clone().requires_grad_()
    yl = ctx.prev_token(xh, dim=1)
    out["prev_token"] = (yl - ctx.shard(prev_full)).abs().max().item()
    (yl * ctx.shard(w)).sum().backward()  # d/dx_t of sum_t w_t x_{t-1} = w_{t+1}
    w_next = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], dim=1)
    out["prev_token_grad"] = (xh.grad - ctx.shard(w_next)).abs().max().item()
    # loss averaged over all tokens of the group
    ll = (xl ** 2).sum().requires_grad_()
    loss = ctx.reduce_loss(ll, xl.numel())
    out["reduce_loss"] = abs(loss.item() - (x ** 2).mean().item())
    return {k: _max_over_ranks(float(v)) if not isinstance(v, bool) else v for k, v in out.items()}


def check_errors(rank, world):
    """Clear ValueErrors (with the arithmetic) for invalid configurations."""
    import torch.distributed as dist

    msgs = {}
    ctx = CPContext(dist.group.WORLD, layout="zigzag", mode="ring")
    q = torch.zeros(1, 5, 4, 8)
    try:
        context_parallel_attention(q, q, q, torch.zeros(1, 5, 4), ctx)
    except ValueError as e:
        msgs["indivisible_T"] = str(e)
    try:
        ctx.shard(torch.zeros(1, 2 * world + 1, 2))
    except ValueError as e:
        msgs["shard"] = str(e)
    if world > 1:
        uly = CPContext(dist.group.WORLD, layout="zigzag", mode="ulysses")
        h = world + 1
        q = torch.zeros(1, 2, h, 8)
        try:
            context_parallel_attention(q, q, q, torch.zeros(1, 2, h), uly)
        except ValueError as e:
            msgs["heads"] = str(e)
    try:
        CPContext(dist.group.WORLD, mode="ring", ulysses_degree=2)
    except ValueError as e:
        msgs["ring_degree"] = str(e)
    try:
        CPContext(dist.group.WORLD, mode="hybrid", ulysses_degree=world + 1)
    except ValueError as e:
        msgs["hybrid_degree"] = str(e)
    return msgs


def check_model(rank, world, layout="contiguous", mode="ring", docs=None, t=32, ulysses_degree=1):
    """The whole FoX Pro model (token shift with halo, QK-norm, gates) on cp ranks vs one device in
    fp64: loss, logits and every parameter gradient (summed over the cp group, as the gradient
    all-reduce would; relative to the largest entry of each gradient)."""
    import copy

    import torch.distributed as dist

    from foxdist.config import ModelConfig
    from foxdist.model import FoxLM

    ctx = CPContext(dist.group.WORLD, layout=layout, mode=mode, ulysses_degree=ulysses_degree)
    cfg = ModelConfig(vocab_size=61, vocab_multiple=8, d_model=32, n_layers=2, n_heads=4, head_dim=8)
    torch.manual_seed(0)
    ref = FoxLM(cfg).double()
    cp_model = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (1, t), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (1, t), generator=gen)
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int64)
    logits = ref(tokens, cu_seqlens=cu)
    loss_ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss_ref.backward()
    logits_l = cp_model(ctx.shard(tokens), seq=ctx.sequence(), cu_seqlens=cu)
    loss_sum = F.cross_entropy(logits_l.flatten(0, 1), ctx.shard(targets).flatten(), reduction="sum")
    loss = ctx.reduce_loss(loss_sum, ctx.shard(targets).numel())
    loss.backward()
    worst, worst_name = 0.0, ""
    for (name, p_ref), p_cp in zip(ref.named_parameters(), cp_model.parameters()):
        grad = p_cp.grad.clone()
        dist.all_reduce(grad)
        err = ((grad - p_ref.grad).abs().max() / p_ref.grad.abs().max().clamp_min(1e-30)).item()
        if err > worst:
            worst, worst_name = err, name
    return {"loss_err": _max_over_ranks(abs(loss.item() - loss_ref.item())), "grad_rel_err": _max_over_ranks(worst),
            "worst_param": worst_name, "logits_err": _max_over_ranks(
                (logits_l - ctx.shard(logits.detach())).abs().max().item())}


# ------------------------------------------------------------------------------------------ suites

def _attn(name, **kw):
    return Check(name, check_attention, kw)


# documents crossing shard boundaries (T = 48: chunks of 24 / 12 / 8 / 6 tokens), a one-token doc,
# a doc starting exactly on a chunk boundary; *_ACP docs start on multiples of the tile (4)
DOCS_48 = [0, 5, 17, 18, 24, 41, 48]
DOCS_48_ACP = [0, 8, 20, 36, 48]
DOCS_96 = [0, 7, 30, 31, 48, 90, 96]

CHECKS_2 = [
    _attn("ring_contiguous", mode="ring", layout="contiguous"),
    _attn("ring_zigzag", mode="ring", layout="zigzag"),
    _attn("ring_zigzag_gqa", mode="ring", layout="zigzag", hkv=2),
    _attn("ring_contiguous_docs", mode="ring", layout="contiguous", docs=DOCS_48),
    _attn("ring_zigzag_docs", mode="ring", layout="zigzag", docs=DOCS_48),
    _attn("ring_zigzag_acp", mode="ring", layout="zigzag", acp=True, tile=4),
    _attn("ring_contiguous_acp_docs", mode="ring", layout="contiguous", acp=True, tile=4, docs=DOCS_48_ACP),
    _attn("ulysses_contiguous", mode="ulysses", layout="contiguous"),
    _attn("ulysses_zigzag_gqa_docs", mode="ulysses", layout="zigzag", hkv=2, docs=DOCS_48),
    _attn("ulysses_zigzag_acp", mode="ulysses", layout="zigzag", acp=True, tile=4),
    Check("precision_zigzag", check_precision, {"layout": "zigzag"}),
    Check("precision_contiguous", check_precision, {"layout": "contiguous"}),
    Check("layout_ops_zigzag", check_layout_ops, {"layout": "zigzag"}),
    Check("layout_ops_contiguous", check_layout_ops, {"layout": "contiguous"}),
    Check("errors", check_errors),
    Check("model_ring_contiguous", check_model, {"layout": "contiguous", "mode": "ring"}),
    Check("model_ring_contiguous_docs", check_model, {"layout": "contiguous", "mode": "ring", "docs": [0, 5, 20, 32]}),
    Check("model_ulysses_contiguous", check_model, {"layout": "contiguous", "mode": "ulysses"}),
    Check("model_ring_zigzag", check_model, {"layout": "zigzag", "mode": "ring"}),
    Check("model_ulysses_zigzag_docs", check_model, {"layout": "zigzag", "mode": "ulysses", "docs": [0, 5, 20, 32]}),
]

CHECKS_3 = [
    _attn("ring_contiguous", mode="ring", layout="contiguous"),
    _attn("ring_zigzag", mode="ring", layout="zigzag"),
    _attn("ring_zigzag_docs_gqa", mode="ring", layout="zigzag", docs=DOCS_48, hkv=1),
    _attn("ring_contiguous_acp", mode="ring", layout="contiguous", acp=True, tile=4),
    _attn("ulysses_zigzag", mode="ulysses", layout="zigzag", h=6, hkv=3),
    Check("layout_ops_zigzag", check_layout_ops, {"layout": "zigzag"}),
    Check("errors", check_errors),
]

CHECKS_4 = [
    _attn("ring_contiguous", mode="ring", layout="contiguous"),
    _attn("ring_zigzag", mode="ring", layout="zigzag", t=96),
    _attn("ring_zigzag_docs_gqa", mode="ring", layout="zigzag", t=96, docs=DOCS_96, hkv=2),
    _attn("ring_zigzag_acp", mode="ring", layout="zigzag", t=96, acp=True, tile=4),
    _attn("ulysses_zigzag_gqa", mode="ulysses", layout="zigzag", hkv=2),  # kv heads expanded (2 % 4)
    _attn("hybrid_zigzag", mode="hybrid", layout="zigzag", ulysses_degree=2, t=96),
    _attn("hybrid_contiguous_gqa", mode="hybrid", layout="contiguous", ulysses_degree=2, hkv=2),
    _attn("hybrid_zigzag_gqa1_docs", mode="hybrid", layout="zigzag", ulysses_degree=2, t=96, hkv=1, docs=DOCS_96),
    _attn("hybrid_zigzag_acp", mode="hybrid", layout="zigzag", ulysses_degree=2, t=96, acp=True, tile=4),
    Check("subgroup_ring_zigzag", check_subgroup, {"mode": "ring", "layout": "zigzag"}),
    Check("subgroup_ulysses_contiguous", check_subgroup, {"mode": "ulysses", "layout": "contiguous"}),
    Check("layout_ops_zigzag", check_layout_ops, {"layout": "zigzag"}),
    Check("errors", check_errors),
    Check("model_hybrid_zigzag_docs", check_model, {"layout": "zigzag", "mode": "hybrid", "ulysses_degree": 2,
                                                    "docs": [0, 5, 20, 21, 32]}),
]

SUITES = {2: DistSuite(2, CHECKS_2), 3: DistSuite(3, CHECKS_3), 4: DistSuite(4, CHECKS_4)}
ALL = [(w, c.name) for w, s in SUITES.items() for c in s.checks]
ATTN = [(w, n) for w, n in ALL if not n.startswith(("precision", "layout_ops", "errors", "model"))]
MODEL = [(w, n) for w, n in ALL if n.startswith("model")]


@pytest.fixture(scope="module")
def suites():
    return {}


def _results(suites, world):
    if world not in suites:
        suites[world] = SUITES[world].run()
    return suites[world]


# -------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("world,name", ATTN, ids=[f"cp{w}-{n}" for w, n in ATTN])
def test_attention_matches_reference(suites, world, name):
    res = _results(suites, world).get(name)
    for key in ("o", "dq", "dk", "dv", "dg"):
        assert res[key] < TOL, f"{name} on cp={world}: max |error| of {key} = {res[key]:.3g} ({res})"
    if "pruned_fraction" in res:
        assert res["pruned_fraction"] > 0.005, res  # the ACP checks really prune tiles
        assert res["vs_unpruned"] < 2 * ACP_EPS * 10, res  # and stay within the ACP error bound


@pytest.mark.parametrize("name", ["precision_zigzag", "precision_contiguous"])
def test_prefix_sum_precision(suites, name):
    res = _results(suites, 2).get(name)
    assert res["dtype"] == "torch.float32"
    assert res["c_min"] < -0.99e6
    assert res["cp_fp32_err"] < 2e-5, res  # fp32 accuracy despite |c| ~ 1e6
    assert res["global_fp32_cumsum_err"] > 1e-3, res  # what a global fp32 cumsum would give


@pytest.mark.parametrize("world,name", [(w, n) for w, n in ALL if n.startswith("layout_ops")])
def test_layout_ops(suites, world, name):
    res = _results(suites, world).get(name)
    assert res["local_len"] and res["positions"], res
    for key in ("roundtrip", "gather_grad", "prev_token", "prev_token_grad"):
        assert res[key] == 0.0, res
    assert res["reduce_loss"] < 1e-12, res


@pytest.mark.parametrize("world", [2, 3])
def test_validation_errors(suites, world):
    msgs = _results(suites, world).get("errors")
    assert "not divisible by" in msgs["indivisible_T"] and f"{2 * world}" in msgs["indivisible_T"], msgs
    assert "not divisible by" in msgs["shard"], msgs
    assert "heads %" in msgs["heads"], msgs
    assert "ulysses_degree" in msgs["ring_degree"] and "ulysses_degree" in msgs["hybrid_degree"], msgs


@pytest.mark.parametrize("world,name", MODEL, ids=[f"cp{w}-{n}" for w, n in MODEL])
def test_model_matches_single_device(suites, world, name):
    res = _results(suites, world).get(name)
    assert res["loss_err"] < TOL and res["logits_err"] < TOL, res
    assert res["grad_rel_err"] < TOL, res


def test_world_one_is_single_device():
    """Without a group, CP reduces exactly to the single-device path."""
    ctx = CPContext(None)
    q, k, v, g, _ = _inputs(1, 24)
    assert ctx.world == 1 and ctx.shard(q) is q and ctx.gather(q) is q
    o = context_parallel_attention(q, k, v, g, ctx, acp_eps=ACP_EPS)
    assert torch.equal(o, forgetting_attention(q, k, v, g, acp_eps=ACP_EPS))
    assert torch.equal(ctx.prev_token(q)[:, 1:], q[:, :-1]) and not ctx.prev_token(q)[:, 0].any()


# ------------------------------------------------------------------------------ schedule (no spawn)

def _work(plan: RingPlan, rank: int, step: int) -> int:
    """Score entries rank computes at step (causal diagonal blocks count their lower triangle)."""
    w = plan.layout.world
    if not plan.holds(rank, step):
        return 0
    total = 0
    for *_, blocks in plan.pairs.get((rank, (rank - step) % w), []):
        for q0, q1, k0, k1, causal in blocks:
            total += (q1 - q0) * (q1 - q0 + 1) // 2 if causal else (q1 - q0) * (k1 - k0)
    return total


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_schedule_is_balanced(world):
    plan = RingPlan.build(Layout("zigzag", world), 2 * world * 16)
    assert plan.steps == world and all(m == world - 1 for m in plan.last)  # everyone needs every block
    for s in range(plan.steps):  # equal work on every rank at every step: nobody waits in the ring
        assert len({_work(plan, r, s) for r in range(world)}) == 1, s
    # the whole causal triangle is covered exactly once
    t = 2 * world * 16
    assert sum(_work(plan, r, s) for r in range(world) for s in range(plan.steps)) == t * (t + 1) // 2


@pytest.mark.parametrize("world", [2, 4, 8])
def test_contiguous_schedule_does_not_wrap(world):
    plan = RingPlan.build(Layout("contiguous", world), world * 16)
    # a block travels only towards later ranks: origin p is last used by rank world-1
    assert plan.last == [world - 1 - p for p in range(world)]
    assert sum(plan.last) == world * (world - 1) // 2  # KV hops, vs world*(world-1) for a full ring
    t = world * 16
    assert sum(_work(plan, r, s) for r in range(world) for s in range(plan.steps)) == t * (t + 1) // 2


def test_documents_prune_the_schedule():
    # documents that never cross a chunk boundary: no pair outside the diagonal, no communication
    plan = RingPlan.build(Layout("zigzag", 4), 64, cu_seqlens=[0, 3, 8, 16, 24, 30, 32, 40, 48, 56, 64])
    assert plan.steps == 1 and set(plan.pairs) == {(r, r) for r in range(4)}
    # one document spanning chunks 1..3 (tokens 8..32 with chunks of 8): only its pairs remain
    plan = RingPlan.build(Layout("contiguous", 8), 64, cu_seqlens=[0, 8, 32, 64])
    assert plan.last[1] == 2 and plan.last[0] == 0 and plan.last[3] == 0
    assert sum(_work(plan, r, s) for r in range(8) for s in range(plan.steps)) == \
        sum(n * (n + 1) // 2 for n in (8, 24, 32))


# --------------------------------------------------------------------------- the harness itself

def _fail_on_rank1(rank, world):
    import torch.distributed as dist

    if rank == 1:
        raise KeyError("deliberate failure on rank 1")
    dist.all_reduce(torch.ones(1))  # rank 0 waits for a collective rank 1 never joins
    return rank


def _sleep(rank, world):
    import time

    time.sleep(60)


def test_harness_reports_worker_tracebacks_and_timeouts():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank1, 2, timeout_s=60, pg_timeout_s=3)
    assert "deliberate failure on rank 1" in str(info.value) and "--- rank 1 ---" in str(info.value)
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(_sleep, 2, timeout_s=3)
