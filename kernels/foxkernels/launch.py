"""Host side of the kernels: tile configurations, environment switches for A/Bs, the per-call plan
(document tables, decay inputs, ACP tables) and the launches of the forward and backward kernels."""

from __future__ import annotations

import functools
import os

import torch
import triton

from .acp import _acp_bound_kernel
from .backward import _bwd_pre_kernel, _dkdv_kernel, _dq_kernel
from .common import LOG2E
from .forward import _fwd_kernel


def _dmode() -> int:
    return int(os.environ.get("FOXKERNELS_DECAY_MODE", "1"))


def _use_tma(kernel: str, *xs) -> bool:
    """Whole tiles of the streamed operand (K, V in fwd and dq; Q, dO in dkdv) through TMA descriptors.

    ``FOXKERNELS_TMA`` lists the kernels (default ``fwd``; ``none``; ``fwd,dq,dkdv``): see the module
    docstring for the measurements. Descriptors need Hopper or newer (or the interpreter), rows of
    ``H * D`` contiguous elements on 16-byte boundaries and 32-bit row offsets.
    """
    if kernel not in os.environ.get("FOXKERNELS_TMA", "fwd").split(","):
        return False
    if xs[0].is_cuda and _capability(xs[0].device.index)[0] < 9:
        return False
    return all(x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.data_ptr() % 16 == 0
               and (x.stride(0) * x.element_size()) % 16 == 0 and 0 < x.shape[0] < 2 ** 31 for x in xs)


@functools.lru_cache(maxsize=16)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _tma_operands(kernel: str, rows: int, *xs):
    """``(use TMA, operands)``: TMA descriptors over each ``x [N, Hx, D]`` seen as ``[N, Hx * D]`` with
    blocks of ``[rows, D]`` when :func:`_use_tma` allows it, else the tensors themselves (the kernel
    then ignores them and uses its pointer loads)."""
    if not _use_tma(kernel, *xs):
        return False, xs
    from triton.tools.tensor_descriptor import TensorDescriptor
    return True, tuple(TensorDescriptor(x, [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1], [rows, x.shape[2]])
                       for x in xs)


def _force_table(kernel: str, d: int) -> bool:
    """Run a dense call through the ACP-table code path (a table of zeros) for this kernel.

    Measured on the H200 (bf16, T=32k, D=128): the forward with its key loop starting at a loaded
    bound ran 11.3 ms against 13.7 ms with the constant start; at D=64 (T=16k) 3.56 against 3.41 ms.
    The dq kernel through the table path, H100 fwd+bwd: 10.86 against 11.10 ms (T16k D64), 45.61
    against 45.65 ms (T32k D128). The dkdv kernel through the table path (trips counted from 0, a table that
    prunes nothing), same-run A/B on the H200 (``bench/results/attention-h200-2026-12-04-ab-force-table.json``):
    fwd+bwd -8.2% at T16k H32 D32, -1.1% at T16k H24 D64, -4.2% at T16k H8 D256, -0.3 / +0.4% at T32k / T64k
    D128 (noise, so D128 keeps the range loop); the forward through it +1.7% at D32 and +1.8% at D256.
    ``FOXKERNELS_FORCE_TABLE=fwd,dq,dkdv`` (a list, or ``none``) overrides.
    """
    env = os.environ.get("FOXKERNELS_FORCE_TABLE")
    if env is not None:
        return kernel in env.split(",")
    return kernel == "dq" or (kernel == "fwd" and d == 128) or (kernel == "dkdv" and d != 128)


def _config(d: int, tile: int):
    """Tile shapes and warps per head dim. Every block size divides ``tile`` (the ACP unit)."""
    return _config_cached(d, tile, os.environ.get("FOXKERNELS_CONFIG"))


@functools.lru_cache(maxsize=64)
def _config_cached(d: int, tile: int, env: str | None):
    # (BLOCK_M, BLOCK_N, warps, stages) from the H100 sweep in bench/results (T = 16k, bf16)
    # dkdv: 64-key tiles on 4 warps fit two CTAs per SM (module docstring, "Two dkdv CTAs per SM")
    if d <= 64:
        cfg = dict(fwd=(128, 128, 8, 3), dq=(64, 64, 4, 3), dkdv=(32, 64, 4, 3))
    elif d <= 128:
        cfg = dict(fwd=(128, 64, 8, 4), dq=(128, 64, 8, 3), dkdv=(32, 64, 4, 3))
    else:
        # D256: the D128 tiles need 329 KB of shared memory in the forward and dq kernels (227 KB on the
        # H100/H200). These fit (offline sm_90a compile: fwd 164 KB, dq 197 KB, dkdv 131 KB); the dkdv tile was
        # the best of three on the H200 (fwd+bwd T16k H8: 18.0 ms against 23.6 for (16, 64, 8, 3) and 27.3 for
        # (16, 32, 4, 3); bench/results/attention-h200-2026-12-04-ab-d256-configs.json)
        cfg = dict(fwd=(128, 32, 8, 3), dq=(128, 32, 8, 2), dkdv=(32, 64, 8, 2))
    if env:  # "fwd=128,64,4,3;dq=...;dkdv=..." (benchmark sweeps)
        for part in env.split(";"):
            key, val = part.split("=")
            cfg[key.strip()] = tuple(int(x) for x in val.split(","))
    out = {}
    for key, (bm, bn, warps, stages) in cfg.items():
        bm, bn = min(bm, tile), min(bn, tile)
        assert tile % bm == 0 and tile % bn == 0, (key, bm, bn, tile)
        out[key] = (bm, bn, warps, stages)
    if out["dkdv"][1] % out["dkdv"][0]:
        bm, bn, w, s = out["dkdv"]
        out["dkdv"] = (min(bm, bn), bn, w, s)
    return out


class _Plan:
    """Everything the kernels need besides q, k, v: document table, decay inputs, ACP table."""

    def __init__(self, cu_q, cu_k, lens_q, lens_k, cq, ck, bq, bk, delta, causal, tile, h, tabs=None):
        self.tabs = tabs  # _DocTables of the single-device entry point (cached per layout), or None
        self.cu_q, self.cu_k = cu_q, cu_k
        self.lens_q, self.lens_k = lens_q, lens_k
        self.cq, self.ck, self.bq, self.bk = cq, ck, bq, bk
        self.causal, self.tile, self.h = causal, tile, h
        self.n_docs = len(lens_q)
        self.max_q = max(lens_q) if lens_q else 0
        self.max_k = max(lens_k) if lens_k else 0
        self.max_units = max(1, -(-self.max_q // tile))
        self.bound = None
        if delta is not None and self.max_q > 0:
            d = delta  # [n_docs, H] fp64 on the device
            self.bound = _empty((self.n_docs, self.max_units, h), torch.int32, cq.device)
            _acp_bound_kernel[(self.max_units, self.n_docs, h)](
                cq, ck, bq, bk, d, self.bound, cu_q, cu_k,
                cq.stride(0), cq.stride(1), ck.stride(0), ck.stride(1), bq.stride(0), bq.stride(1),
                bk.stride(0), bk.stride(1), self.max_units, h, TILE=tile, CAUSAL=causal, NV=256)

    def dkdv_ends(self):
        """``[n_docs, H, key units]`` int32: the first query unit whose pruned prefix covers each key unit.

        The table ``bound[z, u, h]`` is non-decreasing in u (c is non-increasing), so the query units
        that keep key unit ku are exactly those before the first u with ``bound > ku``: a sorted search.
        The dkdv kernel then loops over query rows ``[.., min(Lq, ends * TILE))``, skipping the same
        (query unit, key unit) pairs as the forward and the dq kernel.
        """
        if getattr(self, "_ends", None) is None:
            valid = self.valid_units()
            seq = self.bound if valid is None else torch.where(valid, self.bound, torch.iinfo(torch.int32).max)
            seq = seq.permute(0, 2, 1).contiguous()  # [n_docs, H, units]
            nk = max(1, -(-self.max_k // self.tile))
            # the single-device entry point's cached key-unit indices: no index tensor built per call
            ku = self.tabs.key_units(self.h, nk) if self.tabs is not None else \
                torch.arange(nk, dtype=torch.int32, device=seq.device).expand(self.n_docs, self.h, nk).contiguous()
            self._ends = torch.searchsorted(seq, ku, right=True, out_int32=True)
        return self._ends

    def valid_units(self):
        """``[n_docs, max_units, 1]`` bool: query units inside their document (the rows of ``bound`` past
        a shorter document's end are never written), or None when every document has ``max_units``."""
        if self.tabs is not None:
            return self.tabs.valid3  # cached per layout
        return (torch.arange(self.max_units, device=self.bound.device)[None, :] < self.units_q()[:, None])[..., None]

    def units_q(self):
        """Query units per document, on the device, from ``cu_q`` (no host-to-device copy: a
        ``torch.tensor(list, device=cuda)`` would synchronise the stream)."""
        t = self.tile
        return torch.div(self.cu_q[1:] - self.cu_q[:-1] + (t - 1), t, rounding_mode="floor")

    def zero_table(self):
        """An all-zero ACP table (nothing pruned), for dense calls that take the table code path."""
        if getattr(self, "_zeros", None) is None:
            self._zeros = torch.zeros((self.n_docs, self.max_units, self.h), dtype=torch.int32,
                                      device=self.cq.device)
        return self._zeros

    def full_ends(self):
        """dkdv ends that prune nothing (every query unit keeps every key unit), for dense calls that take the
        dkdv kernel's table code path."""
        nk = max(1, -(-self.max_k // self.tile))
        return torch.full((self.n_docs, self.h, nk), self.max_units, dtype=torch.int32, device=self.cq.device)

    def count(self, stats):
        """Add this call's unit counts to an AcpStats (tiles_total, tiles_pruned)."""
        if stats is None:
            return
        if self.tabs is not None and self.causal:
            stats.tiles_total += self.tabs.tiles_total * self.h
        else:
            t = self.tile
            total = 0
            for lq, lk in zip(self.lens_q, self.lens_k):
                nq, nk = -(-lq // t), -(-lk // t)
                total += sum(min(i, nk - 1) + 1 for i in range(nq)) if self.causal else nq * nk
            stats.tiles_total += total * self.h
        if self.bound is not None:
            valid = self.valid_units()
            stats.add_pruned(self.bound if valid is None else torch.where(valid, self.bound, 0))  # summed on read


# Outputs are allocated with torch.empty; tests set FOXKERNELS_POISON=1 to NaN-fill them (-1 for ints)
# so that an element no kernel writes fails the comparison.
def _empty(shape, dtype, device):
    x = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FOXKERNELS_POISON") == "1":
        x.fill_(float("nan") if dtype.is_floating_point else -1)
    return x


def _empty_tn(n, h, dtype, device):
    """A logical ``[N, H]`` per-token, per-head array stored head-major (``[H, N]`` in memory): the
    kernels read these along tokens, so a [BLOCK] load is contiguous instead of strided by H."""
    return _empty((h, n), dtype, device).t()


def _tn(x):
    """``[N, H]`` tensor -> the same values stored head-major (see :func:`_empty_tn`)."""
    return x.t().contiguous().t()


def _check_inputs(q, k, v):
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"foxkernels supports head dims 16, 32, 64, 128, 256; got {d}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"foxkernels supports fp16, bf16 and fp32 inputs; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _run_fwd(q, k, v, plan: _Plan, scale, out_dtype):
    """q [Nq, H, D], k, v [Nk, Hkv, D] (token-major, last dim contiguous) -> o [Nq, H, D], lse [Nq, H]."""
    _check_offsets(plan, q, k, v)
    nq_tok, h, d = q.shape
    hkv = k.shape[1]
    cfg = _config(d, plan.tile)
    bm, bn, warps, stages = cfg["fwd"]
    o = _empty((nq_tok, h, d), out_dtype, q.device)
    lse = _empty((nq_tok, h), torch.float32, q.device)
    if plan.max_q == 0:
        return o, lse
    bound, use_acp = plan.bound, plan.bound is not None
    if bound is None and _force_table("fwd", d):
        bound, use_acp = plan.zero_table(), True
    if bound is None:
        bound = lse  # dummy pointer when ACP is off
    if _gluon_wanted("fwd", q, k, plan):
        from .gluon_fwd import gluon_fwd
        gluon_fwd(q, k, v, plan, scale, o, lse, bound, use_acp)
        return o, lse
    grid = (triton.cdiv(plan.max_q, bm), plan.n_docs, h)
    tma, (kd, vd) = _tma_operands("fwd", bn, k, v)
    _fwd_kernel[grid](
        q, k, v, plan.cq, plan.ck, plan.bq, plan.bk, o, lse, bound, plan.cu_q, plan.cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        plan.cq.stride(0), plan.cq.stride(1), plan.ck.stride(0), plan.ck.stride(1),
        plan.bq.stride(0), plan.bq.stride(1), plan.bk.stride(0), plan.bk.stride(1), lse.stride(0), lse.stride(1),
        scale * LOG2E, plan.max_units, h, h // hkv,
        D=d, BM=bm, BN=bn, TILE=plan.tile, CAUSAL=plan.causal, USE_ACP=use_acp, DMODE=_dmode(),
        TMA=tma, KD=kd, VD=vd, num_warps=warps, num_stages=stages)
    return o, lse


def _check_offsets(plan: _Plan, *tensors):
    """Kernels add 32-bit in-document offsets to 64-bit document base pointers (fewer registers)."""
    longest = max(plan.max_q, plan.max_k)
    for x in tensors:
        if longest * max(x.stride()) >= 2 ** 31:
            raise ValueError(f"a document of {longest} tokens with row stride {max(x.stride())} exceeds 32-bit "
                             "in-document offsets; split it (e.g. context parallel blocks)")


def _run_bwd(do, q, k, v, plan: _Plan, scale, lse2, delta, grad_dtype):
    """Returns dq [Nq, H, D], dk, dv [Nk, Hkv, D] (grad_dtype) and dc [Nk, H] fp32."""
    _check_offsets(plan, q, k, v, do)
    nq_tok, h, d = q.shape
    nk_tok, hkv = k.shape[0], k.shape[1]
    cfg = _config(d, plan.tile)
    dq = _empty((nq_tok, h, d), grad_dtype, q.device)
    dk = _empty((nk_tok, hkv, d), grad_dtype, q.device)
    dv = _empty((nk_tok, hkv, d), grad_dtype, q.device)
    dc = _empty_tn(nk_tok, h, torch.float32, q.device)
    if plan.max_q == 0 or plan.max_k == 0:
        dq.zero_(), dk.zero_(), dv.zero_(), dc.zero_()
        return dq, dk, dv, dc
    # the row term of the decay joins the row statistic once, instead of a cq load in every dkdv trip
    lse2 = _tn(lse2 - plan.cq * LOG2E)
    bound = plan.bound if plan.bound is not None else lse2
    use_acp = plan.bound is not None
    dq_bound, dq_acp = bound, use_acp
    if not use_acp and _force_table("dq", d):
        dq_bound, dq_acp = plan.zero_table(), True
    strides = (plan.ck.stride(0), plan.ck.stride(1),
               plan.bq.stride(0), plan.bq.stride(1), plan.bk.stride(0), plan.bk.stride(1),
               lse2.stride(0), lse2.stride(1), scale, scale * LOG2E)
    common = (*strides, plan.max_units, h, h // hkv)
    gluon = _gluon_bwd(q, k, plan)
    if "dq" in gluon:
        gluon["dq"](q, k, v, do, plan, scale, lse2, delta, dq, dq_bound, dq_acp)
    else:
        bm, bn, warps, stages = cfg["dq"]
        tma, (kd, vd) = _tma_operands("dq", bn, k, v)
        _dq_kernel[(triton.cdiv(plan.max_q, bm), plan.n_docs, h)](
            q, k, v, do, plan.ck, plan.bq, plan.bk, lse2, delta, dq, dq_bound, plan.cu_q, plan.cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1), *common,
            D=d, BM=bm, BN=bn, TILE=plan.tile, CAUSAL=plan.causal, USE_ACP=dq_acp, DMODE=_dmode(),
            TMA=tma, KD=kd, VD=vd, num_warps=warps, num_stages=stages)
    ends, dkdv_acp = (plan.dkdv_ends(), True) if use_acp else (lse2, False)
    if not use_acp and _force_table("dkdv", d):
        ends, dkdv_acp = plan.full_ends(), True
    if "dkdv" in gluon:
        gluon["dkdv"](q, k, v, do, plan, scale, lse2, delta, dk, dv, dc, ends, dkdv_acp)
        return dq, dk, dv, dc
    bm, bn, warps, stages = cfg["dkdv"]
    tma, (qd, dod) = _tma_operands("dkdv", bm, q, do)
    _dkdv_kernel[(triton.cdiv(plan.max_k, bn), plan.n_docs, hkv)](
        q, k, v, do, plan.ck, plan.bq, plan.bk, lse2, delta, dk, dv, dc, ends, plan.cu_q, plan.cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dc.stride(0), dc.stride(1), *strides,
        ends.shape[-1] if dkdv_acp else 1, h, h // hkv,
        D=d, BM=bm, BN=bn, TILE=plan.tile, CAUSAL=plan.causal, USE_ACP=dkdv_acp,
        TMA=tma, QD=qd, DOD=dod, num_warps=warps, num_stages=stages)
    # every key of every document is written by the dkdv kernel (its grid covers the longest document)
    return dq, dk, dv, dc


def _gluon_bwd(q, k, plan: _Plan) -> dict:
    """The Gluon backward launchers that this call takes (see :func:`_gluon_wanted`), by kernel name."""
    want = [kern for kern in ("dq", "dkdv") if _gluon_wanted(kern, q, k, plan)]
    if not want:
        return {}
    from . import gluon_bwd
    return {kern: getattr(gluon_bwd, "gluon_" + kern) for kern in want}


def _gluon_wanted(kernel: str, q, k, plan: _Plan) -> bool:
    """Whether ``kernel`` (fwd, dq, dkdv) runs in its Gluon form (:mod:`foxkernels.gluon_fwd`,
    :mod:`foxkernels.gluon_bwd`) for these inputs.

    ``FOXKERNELS_FWD`` / ``FOXKERNELS_DQ`` / ``FOXKERNELS_DKDV`` = ``gluon`` or ``triton`` choose; by default Gluon
    at both head dims it runs at, D64 and D128, for all three kernels (same-run A/Bs on the H200,
    ``bench/results/attention-h200-2026-12-04-ab-gluon-*.json``; the kernel header has the numbers). Either
    way only where the Gluon kernels apply: a Hopper (or newer) GPU, Triton 3.6 (Gluon is an experimental API that
    changes between releases), causal attention, bf16, head dim 64 or 128, rows of ``H * D`` contiguous elements
    (TMA descriptors) and tiles dividing the ACP unit.
    """
    d = q.shape[-1]
    env = os.environ.get("FOXKERNELS_" + kernel.upper())
    if env not in (None, "gluon", "triton"):
        raise ValueError(f"FOXKERNELS_{kernel.upper()}={env!r}: use 'gluon' or 'triton'")
    if env == "triton":
        return False
    return (q.is_cuda and _gluon_triton() and _capability(q.device.index)[0] >= 9 and plan.causal
            and q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16 and d in (64, 128) and plan.tile % 128 == 0
            and all(x.stride(2) == 1 and x.stride(1) == x.shape[2] for x in (q, k)))


@functools.lru_cache(maxsize=1)
def _gluon_triton() -> bool:
    """Triton 3.6 with its Gluon dialect importable (the API the Gluon kernels were written and measured on)."""
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) != (3, 6):
        return False
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError:
        return False
    return True


def _bwd_pre(o, do, lse):
    """``delta = do . o`` and ``lse2 = lse log2(e)`` per row, head-major ``[N, H]`` fp32 each."""
    n, h, d = o.shape
    delta = _empty_tn(n, h, torch.float32, o.device)
    lse2 = _empty_tn(n, h, torch.float32, o.device)
    if n:
        blk = 64
        _bwd_pre_kernel[(triton.cdiv(n, blk), h)](o, do, lse, delta, lse2, n, o.stride(0), o.stride(1),
                                                   do.stride(0), do.stride(1), lse.stride(0), lse.stride(1),
                                                   delta.stride(0), delta.stride(1), D=d, BLK=blk)
    return delta, lse2
