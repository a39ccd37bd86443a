"""Tensor / sequence parallelism on megatron-core layers, checked against the single-device fp64 model.

One spawn of 4 gloo ranks runs every distributed check (tp=4, tp=4 + sequence parallel, two tp=2
replicas x dp=2 with and without sequence parallel, the Transformer baseline with tied embeddings,
the megatron-core CPU compatibility layer). Layout validation is checked without any process group.

Precision. The models run in fp64 (the reference keeps fp64 in its "at least fp32" steps), and
every parameter gradient is compared at 1e-10 through an fp64 cotangent on the logits. The loss goes
through ``vocab_parallel_cross_entropy``, which always works in fp32: the loss and the gradients of
the loss are compared at fp32 tolerance, against the fp64 cross entropy of the reference logits.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("megatron.core")

from dist_utils import Check, DistSuite  # noqa: E402

from foxdist.config import Config, ModelConfig  # noqa: E402
from foxdist.parallel.dims import ParallelDims  # noqa: E402

SEED = 1234
BASE = dict(d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=257)
B, T = 2, 32


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def _max_over_world(metrics: dict) -> dict:
    import torch.distributed as dist

    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def _compare(rank, world, *, tp, sp=False, model=None, acp_eps=None, docs=False):
    """Build ref + TP model, compare logits, loss and every gradient; returns max metrics over ranks."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from foxdist.model.fox import FoxLM, document_cu_seqlens
    from foxdist.parallel.tensor import build_tp_model, gather_full, gather_logits, grad_norm, reference_config

    cfg = ModelConfig(**{**BASE, **(model or {})})
    dims = ParallelDims(world, tp=tp, sequence_parallel=sp).init_groups()
    dp, dpr = dims.dp, dims.dp_rank
    torch.manual_seed(SEED)
    ref = FoxLM(reference_config(cfg, tp), acp_eps=acp_eps).double()
    tpm = build_tp_model(cfg, dims, seed=SEED, dtype=torch.float64, acp_eps=acp_eps)
    vp = ref.vocab
    gen = torch.Generator().manual_seed(7)  # the same data on every rank; dp rank r uses slice r
    toks = torch.randint(0, cfg.vocab_size, (dp, B, T), generator=gen)
    tgts = torch.randint(0, cfg.vocab_size, (dp, B, T), generator=gen)
    tgts[torch.rand(tgts.shape, generator=gen) < 0.2] = -100
    cot = torch.randn(dp, B, T, vp, generator=gen, dtype=torch.float64)
    m = {}

    # same function at start: gathered parameters equal the reference's
    full = gather_full(tpm)
    m["init"] = max(_rel(full[n], p) for n, p in ref.named_parameters())
    m["num_params"] = abs(tpm.num_params() - ref.num_params())
    m["flops"] = abs(tpm.flops_per_token(T) - ref.flops_per_token(T))

    # logits of this replica's batch
    local = tpm(toks[dpr])
    m["logits"] = _rel(gather_logits(tpm, local.detach()), ref(toks[dpr]).detach())

    # every gradient through an fp64 cotangent on the logits: this replica alone (tp only) ...
    (ref(toks[dpr]) * cot[dpr]).sum().backward()
    (local * cot[dpr].chunk(tp, dim=-1)[dims.tp_rank]).sum().backward()
    got = gather_full(tpm, grads=True)
    m["grads_replica"] = max(_rel(got[n], p.grad) for n, p in ref.named_parameters())
    ref_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ref.parameters()))
    m["grad_norm"] = abs((grad_norm(tpm, dims) - ref_norm) / ref_norm).item()

    # ... and averaged over dp, against the reference on the concatenated batch
    if dp > 1:
        for p in tpm.parameters():
            dist.all_reduce(p.grad, group=dims.dp_group)
            p.grad /= dp
        ref.zero_grad()
        (ref(toks.flatten(0, 1)) * cot.flatten(0, 1)).sum().div(dp).backward()
        got = gather_full(tpm, grads=True)
        m["grads_dp"] = max(_rel(got[n], p.grad) for n, p in ref.named_parameters())

    # loss via vocab_parallel_cross_entropy: exact token-weighted mean over dp
    ref.zero_grad()
    tpm.zero_grad()
    total, count = tpm(toks[dpr], tgts[dpr], reduction="sum")
    n_all = count.clone()
    dist.all_reduce(n_all, group=dims.dp_group)
    (total / n_all).backward()
    for p in tpm.parameters():
        dist.all_reduce(p.grad, group=dims.dp_group)
    loss = (total / n_all).detach()
    dist.all_reduce(loss, group=dims.dp_group)
    ref_logits = ref(toks.flatten(0, 1))
    ref_loss32 = F.cross_entropy(ref_logits.float().flatten(0, 1), tgts.flatten(), ignore_index=-100)
    ref_loss32.backward()
    ref_loss64 = F.cross_entropy(ref_logits.detach().flatten(0, 1), tgts.flatten(), ignore_index=-100)
    m["loss_vs_fp64"] = _rel(loss, ref_loss64)
    m["loss_vs_ref"] = _rel(loss, ref_loss32.detach())
    got = gather_full(tpm, grads=True)
    m["loss_grads"] = max(_rel(got[n], p.grad) for n, p in ref.named_parameters())

    if docs:  # document masking: packed rows with cu_seqlens
        doc_toks = toks[dpr].clone()
        doc_toks[0, 9] = doc_toks[1, 20] = 0
        cu = document_cu_seqlens(doc_toks, 0)
        with torch.no_grad():
            m["logits_docs"] = _rel(gather_logits(tpm, tpm(doc_toks, cu_seqlens=cu)), ref(doc_toks, cu_seqlens=cu))
    dims.destroy_groups()
    return _max_over_world(m)


def _compare_cp(rank, world, *, tp, cp, sp, layout="zigzag", mode="ring"):
    """tp x cp: the TP model on context-parallel shards (``seq`` = the CP adapter) vs the reference."""
    import torch.distributed as dist

    from foxdist.model.fox import FoxLM
    from foxdist.parallel.context import CPContext
    from foxdist.parallel.tensor import build_tp_model, gather_full, gather_logits

    cfg = ModelConfig(**BASE)
    dims = ParallelDims(world, tp=tp, cp=cp, sequence_parallel=sp).init_groups()
    ctx = CPContext(dims.cp_group, layout=layout, mode=mode)
    seq = ctx.sequence()
    torch.manual_seed(SEED)
    ref = FoxLM(cfg).double()
    tpm = build_tp_model(cfg, dims, seed=SEED, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    toks = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    cot = torch.randn(B, T, ref.vocab, generator=gen, dtype=torch.float64)
    local = tpm(ctx.shard(toks, dim=1), seq=seq)
    rl = ref(toks)
    m = {"logits": _rel(ctx.gather(gather_logits(tpm, local.detach()), dim=1), rl.detach())}
    (rl * cot).sum().backward()
    (local * ctx.shard(cot, dim=1).chunk(tp, dim=-1)[dims.tp_rank]).sum().backward()
    for p in tpm.parameters():  # each cp rank holds the gradient of its own tokens: sum over cp
        dist.all_reduce(p.grad, group=dims.cp_group)
    got = gather_full(tpm, grads=True)
    m["grads"] = max(_rel(got[n], p.grad) for n, p in ref.named_parameters())
    dims.destroy_groups()
    return _max_over_world(m)


def _check_bf16_autocast(rank, world, *, tp=2, sp=True):
    """fp32 parameters under ``torch.autocast("cpu", bf16)`` (the trainer's mixed precision): runs, and
    agrees with the single-device model under the same autocast to bf16 accuracy."""
    from foxdist.model.fox import FoxLM
    from foxdist.parallel.tensor import build_tp_model, gather_full

    cfg = ModelConfig(**BASE)
    dims = ParallelDims(world, tp=tp, sequence_parallel=sp).init_groups()
    torch.manual_seed(SEED)
    ref = FoxLM(cfg)
    tpm = build_tp_model(cfg, dims, seed=SEED)
    gen = torch.Generator().manual_seed(9 + dims.dp_rank)
    toks = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    tgts = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rl = ref(toks, tgts)
        tl = tpm(toks, tgts)
    rl.backward()
    tl.backward()
    got = gather_full(tpm, grads=True)
    m = {"loss": _rel(tl.detach(), rl.detach()),
         # bf16 rounding differs (tp all-reduces bf16 partial sums): compare in norm per tensor
         "grads": max(((got[n] - p.grad).norm() / p.grad.norm()).item() for n, p in ref.named_parameters()),
         "grad_dtype_fp32": float(all(p.grad.dtype == torch.float32 for p in tpm.parameters()))}
    dims.destroy_groups()
    out = _max_over_world(m)
    return out


def _check_groups(rank, world):
    """megatron-core's groups follow our layout; the plain-torch fallback builds the same groups."""
    import torch.distributed as dist

    out = {}
    for tp, cp in ((2, 2), (2, 1), (1, 2), (4, 1)):
        dims = ParallelDims(world, tp=tp, cp=cp).init_groups()
        mega = {k: dist.get_process_group_ranks(getattr(dims, f"{k}_group")) for k in ("tp", "cp", "dp", "dp_cp")}
        dims.destroy_groups()
        plain = ParallelDims(world, tp=tp, cp=cp)._init_torch_groups()
        mine = {k: dist.get_process_group_ranks(getattr(plain, f"{k}_group")) for k in ("tp", "cp", "dp", "dp_cp")}
        coords = [plain.coords(r) for r in range(world)]
        me = coords[rank]
        expect = {"tp": [r for r, c in enumerate(coords) if c[1:] == me[1:]],
                  "cp": [r for r, c in enumerate(coords) if (c[0], c[2]) == (me[0], me[2])],
                  "dp": [r for r, c in enumerate(coords) if c[:2] == me[:2]],
                  "dp_cp": [r for r, c in enumerate(coords) if c[0] == me[0]]}
        out[f"tp{tp}cp{cp}"] = (mega == expect) and (mine == expect) and (plain.tp_rank, plain.cp_rank, plain.dp_rank) == me
        plain.destroy_groups()
    return out


def _check_compat(rank, world):
    """The megatron-core CPU layer: RNG tracker and the sequence-parallel mappings on gloo."""
    from megatron.core import tensor_parallel as mtp
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from foxdist.parallel import megatron_compat

    out = {}
    dims = ParallelDims(world, tp=2).init_groups()
    out["applied"] = megatron_compat.is_applied()
    out["proxy_device"] = str(mappings.torch.cuda.current_device())
    out["torch_untouched"] = torch.cuda.current_device is type(torch.cuda).__dict__.get(
        "current_device", torch.cuda.current_device) and not hasattr(torch.cuda.current_device, "__self__")
    out["global_torch_cuda_is_real"] = "megatron_compat" not in getattr(torch.cuda.current_device, "__module__", "")

    # RNG tracker: default stream seeded with the data-parallel seed, the model-parallel stream per tp rank
    model_parallel_cuda_manual_seed(SEED)
    expect = torch.Generator().manual_seed(SEED)
    a = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    c = torch.rand(3)
    e = torch.rand(6, generator=expect)
    out["default_stream_ok"] = bool(torch.equal(a, e[:3]) and torch.equal(c, e[3:]))
    import torch.distributed as dist

    allb = [torch.empty(3) for _ in range(world)]
    dist.all_gather(allb, b)
    same_tp = [dims.coords(r)[0] for r in range(world)]
    out["fork_same_within_tp_rank"] = all(torch.equal(allb[r], allb[s]) for r in range(world) for s in range(world)
                                          if same_tp[r] == same_tp[s])
    out["fork_differs_across_tp"] = not torch.equal(allb[0], allb[1])
    with get_cuda_rng_tracker().fork():  # the tracker state advances between forks
        b2 = torch.rand(3)
    out["fork_advances"] = not torch.equal(b, b2)

    # sequence-parallel mappings (the ones that called torch.cuda.current_device)
    r = dims.tp_rank
    x = torch.full((2, 3), float(r + 1), dtype=torch.float64, requires_grad=True)
    y = mtp.gather_from_sequence_parallel_region(x, group=dims.tp_group)
    out["gather"] = bool(torch.equal(y.detach(), torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]).double()))
    (y * torch.arange(4.0, dtype=torch.float64)[:, None]).sum().backward()  # backward: reduce-scatter
    out["gather_backward"] = bool(torch.equal(x.grad, 2 * torch.arange(4.0, dtype=torch.float64)[2 * r:2 * r + 2, None]
                                              .expand(2, 3)))
    z = torch.arange(12.0).view(4, 3) * (r + 1)
    rs = mtp.reduce_scatter_to_sequence_parallel_region(z, group=dims.tp_group)
    out["reduce_scatter"] = bool(torch.equal(rs, (torch.arange(12.0).view(4, 3) * 3)[2 * r:2 * r + 2]))
    dims.destroy_groups()
    return out


SUITE = DistSuite(world_size=4, timeout_s=600, checks=[
    Check("compat", _check_compat),
    Check("groups", _check_groups),
    Check("tp4", _compare, dict(tp=4, docs=True)),
    Check("tp4_sp_actckpt", _compare, dict(tp=4, sp=True, model=dict(activation_checkpointing=True))),
    Check("tp2_dp2", _compare, dict(tp=2, docs=True)),
    Check("tp2_dp2_sp_acp", _compare, dict(tp=2, sp=True, acp_eps=math.exp(-10))),
    Check("tp2_dp2_sp_transformer_tied", _compare,
          dict(tp=2, sp=True, model=dict(arch="transformer", tie_embeddings=True), docs=True)),
    Check("bf16_autocast_tp2_sp", _check_bf16_autocast),
    Check("tp2_cp2_sp_zigzag_ring", _compare_cp, dict(tp=2, cp=2, sp=True)),
    Check("tp2_cp2_contiguous_ulysses", _compare_cp, dict(tp=2, cp=2, sp=False, layout="contiguous", mode="ulysses")),
])


@pytest.fixture(scope="module")
def world4():
    return SUITE.run()


EXACT = 1e-10  # relative to the largest magnitude of each tensor
FP32 = 2e-5  # where a step is fp32 by design (the cross entropy)


def test_report_metrics(world4):
    """Print every check's metrics and timing (run with -s to see them)."""
    for name in [c.name for c in SUITE.checks]:
        print(f"{name} ({world4.seconds(name):.1f} s): {world4.get(name)}")


@pytest.mark.parametrize("name", ["tp2_cp2_sp_zigzag_ring", "tp2_cp2_contiguous_ulysses"])
def test_tp_with_context_parallel(world4, name):
    m = world4.get(name)
    assert m["logits"] < EXACT and m["grads"] < EXACT, m


def test_bf16_autocast(world4):
    m = world4.get("bf16_autocast_tp2_sp")
    assert m["grad_dtype_fp32"] == 1.0
    # bf16 rounding: the row-parallel all-reduce sums bf16 partial products (as in Megatron), which
    # the single-device matmul accumulates in fp32; small, cancelling gradients (forget-gate bias)
    # differ by ~5-10% in norm, a wrong slice or reduction would be O(1)
    assert m["loss"] < 1e-3 and m["grads"] < 0.25, m


def test_process_groups_follow_the_layout(world4):
    for r, out in enumerate(world4.all_ranks("groups")):
        assert all(out.values()), (r, out)


def test_megatron_cpu_compat(world4):
    out = world4.get("compat")
    assert out.pop("proxy_device") == "cpu"
    assert all(out.values()), out


@pytest.mark.parametrize("name", ["tp4", "tp4_sp_actckpt", "tp2_dp2", "tp2_dp2_sp_acp", "tp2_dp2_sp_transformer_tied"])
def test_tp_matches_single_device_fp64(world4, name):
    m = world4.get(name)
    assert m["init"] == 0.0 and m["num_params"] == 0 and m["flops"] == 0
    for key in ("logits", "grads_replica", "grads_dp", "logits_docs", "grad_norm"):
        if key in m:
            assert m[key] < EXACT, (key, m)
    for key in ("loss_vs_fp64", "loss_vs_ref", "loss_grads"):
        assert m[key] < FP32, (key, m)


# ------------------------------------------------------------------ layout validation (no groups)
def _cfg(**kw) -> Config:
    cfg = Config()
    for sec_key, v in kw.items():
        sec, key = sec_key.split("__")
        setattr(getattr(cfg, sec), key, v)
    return cfg


@pytest.mark.parametrize("kw, world, match", [
    (dict(parallel__tp=2, parallel__cp=2), 6, r"world size 6 is not divisible by tp\*cp = 2\*2 = 4"),
    (dict(parallel__tp=3, model__d_model=384, model__n_heads=4), 3, r"n_heads=4 is not divisible by tp=3 \(4 % 3 = 1\)"),
    (dict(parallel__tp=4, model__n_heads=8, model__n_kv_heads=2), 4, r"n_kv_heads=2 is not divisible by tp=4"),
    (dict(parallel__tp=8, model__d_model=64, model__n_heads=8, model__mlp_multiple=2), 8,
     r"SwiGLU hidden size: 150 .* is not divisible by tp=8"),
    (dict(parallel__cp=2, data__seq_len=66), 2, r"seq_len=66 must be divisible by the zigzag layout's 4 chunks .* 66 % 4 = 2"),
    (dict(parallel__tp=2, parallel__sequence_parallel=True, data__seq_len=34, parallel__cp=1), 2, None),
    (dict(parallel__tp=4, parallel__sequence_parallel=True, parallel__cp=2, parallel__cp_layout="contiguous",
          data__seq_len=36), 8, r"sequence parallelism splits each rank's 18 tokens \(seq_len 36 / cp 2\) over tp=4: 18 % 4 = 2"),
    (dict(parallel__sequence_parallel=True), 2, r"needs tp > 1"),
    (dict(parallel__tp=2, parallel__cp=2, model__arch="transformer"), 4, r"without context parallelism"),
])
def test_layout_validation(kw, world, match):
    cfg = _cfg(**kw)
    if match is None:  # valid layout
        dims = ParallelDims.from_config(cfg, world)
        assert (dims.tp, dims.cp, dims.dp) == (cfg.parallel.tp, cfg.parallel.cp, world // (cfg.parallel.tp * cfg.parallel.cp))
        return
    with pytest.raises(ValueError, match=match):
        ParallelDims.from_config(cfg, world)


def test_dims_coordinates_and_degrees():
    d = ParallelDims(16, tp=2, cp=4)
    assert d.dp == 2
    assert [d.coords(r) for r in (0, 1, 2, 7, 8, 15)] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 3, 0), (0, 0, 1), (1, 3, 1)]
    with pytest.raises(ValueError, match="positive integer"):
        ParallelDims(4, tp=0)
    with pytest.raises(RuntimeError, match="init_groups"):
        _ = d.tp_group


def test_reference_config_pads_vocab_for_tp():
    from foxdist.config import model_dims
    from foxdist.parallel.tensor import reference_config

    m = ModelConfig(vocab_size=257)
    assert reference_config(m, 2) is m and reference_config(m, 4) is m
    r3 = reference_config(m, 3)
    assert model_dims(r3).padded_vocab == model_dims(m, 3).padded_vocab == 384


def test_shard_unshard_roundtrip():
    from foxdist.parallel.tensor import COLS, GATE_UP, REPLICATED, ROWS, shard_full, unshard

    full = torch.randn(8, 6)
    for split in (ROWS, COLS, GATE_UP, REPLICATED):
        parts = [shard_full(full, split, r, 2) for r in range(2)]
        assert torch.equal(unshard(parts, split), full)
    gu = shard_full(torch.arange(8.0)[:, None], GATE_UP, 1, 2).flatten().tolist()
    assert gu == [2.0, 3.0, 6.0, 7.0]  # rank 1 holds the second quarter of gate rows and of up rows


def test_compat_is_a_no_op_with_a_gpu(monkeypatch):
    from megatron.core.tensor_parallel import mappings

    from foxdist.parallel import megatron_compat

    monkeypatch.setattr(megatron_compat, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = mappings.torch
    assert megatron_compat.apply_cpu_compat() is False
    assert mappings.torch is before and not megatron_compat.is_applied()
