"""``foxdist bench scaling``: the real training step swept over the context-parallel degree, the
tensor-parallel degree or the sequence length, on whatever devices are present.

Launch::

    # CPU (gloo), about a minute on 2 cores: the debug model at two lengths, then cp 1 -> 2
    foxdist bench scaling --recipe recipes/debug.py:tiny --seq-lens 128,256 --steps 3 --out runs/scaling-T
    foxdist bench scaling --recipe recipes/debug.py:tiny --cp 1,2 --steps 3 --out runs/scaling-cp
    # GPUs (nccl): FoX Pro 760M at 32k on 1, 2, 4 and 8 GPUs with the zigzag ring
    foxdist bench scaling --model fox-pro-760m --seq-lens 32768 --cp 1,2,4,8 --cp-mode ring --layout zigzag \\
        --steps 10 --warmup 3 --out bench/results/scaling-cp-760m
    foxdist bench scaling --model fox-pro-125m --seq-lens 4096,8192,16384,32768 --out runs/scaling-T   # one GPU
    foxdist bench scaling --model fox-pro-760m --seq-lens 8192 --tp 1,2,4 --out runs/scaling-tp

Every point is a fresh process group: one process for degree 1, else ``torchrun --standalone
--nproc-per-node tp*cp -m foxdist.bench_scaling --point SPEC`` (dp = 1). It builds
``foxdist.train.Trainer`` from the point's config and times ``--steps`` optimizer steps after
``--warmup`` ones (synchronizing on CUDA); rank 0 writes one JSON line. Points that need more devices
than are available (GPUs, or ``--max-procs`` processes on CPU) are skipped with the reason printed.
Per point: tokens/s (median step), per-device TFLOP/s (``flops_per_token`` of the model), MFU on
known GPUs, efficiency (per-device TFLOP/s over that of the smallest point of the same series), peak
memory (``max_memory_allocated`` on GPU, peak RSS of the process on CPU; max over ranks) and
communication bytes per step (max over ranks): the payload handed to ``torch.distributed``
collectives and P2P sends from Python, plus the DDP gradient all-reduce (the local gradients' size,
one bucket pass per step). Writes into ``--out``: ``scaling.json`` (command, device, versions, date,
git revision, every point), tensorboard scalars under ``tb/`` (``scaling/<metric>``, or
``scaling/T<len>/<metric>`` when lengths and degrees are both swept, with the swept value as the
step) and ``scaling.png``; each point's log is in ``points/``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, apply_overrides, derive, load_recipe

METRICS = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "efficiency", "mfu", "peak_mem_gib",
           "comm_bytes_per_step", "step_time_s")
AXIS_LABEL = {"cp": "context-parallel degree (GPUs = tp x cp)", "tp": "tensor-parallel degree (GPUs = tp x cp)",
              "seq_len": "sequence length (tokens)"}
# torch.distributed function -> (position, keyword) of the argument whose size is the payload it sends
PAYLOAD_ARG = {"all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "send": (0, "tensor"), "all_gather": (1, "tensor"),
               "all_gather_into_tensor": (1, "input_tensor"), "_all_gather_base": (1, "input_tensor"),
               "all_gather_single": (1, "input_tensor"), "reduce_scatter": (1, "input_list"),
               "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
               "all_to_all": (1, "input_tensor_list"), "all_to_all_single": (1, "input"),
               "batch_isend_irecv": (0, "p2p_op_list")}


@dataclass
class Point:
    axis: str
    series: str  # "" for one curve; "T<len>" when a degree is swept at several lengths
    cfg: Config

    @property
    def x(self) -> int:
        return self.cfg.data.seq_len if self.axis == "seq_len" else getattr(self.cfg.parallel, self.axis)

    world = property(lambda self: self.cfg.parallel.tp * self.cfg.parallel.cp)  # processes (dp = 1)
    label = property(lambda self: f"T{self.cfg.data.seq_len}-tp{self.cfg.parallel.tp}-cp{self.cfg.parallel.cp}")


# ---------------------------------------------------------------------------------------- planning
def _ints(text: str | None, flag: str) -> list[int]:
    if not text:
        return []
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} expects comma-separated positive integers such as 1,2,4; got {text!r}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{flag} lists a value twice: {text!r}")
    return sorted(vals)


def base_config(args: argparse.Namespace) -> Config:
    """The recipe (or model preset) with ``--set`` overrides: what every point starts from."""
    if bool(args.recipe) == bool(args.model):
        raise ValueError("give exactly one of --recipe FILE:FUNCTION or --model PRESET")
    if args.recipe:
        cfg = load_recipe(args.recipe)
    else:
        from .model import preset

        cfg = Config()
        cfg.model = preset(args.model, vocab_size=257)  # byte-level stdlib corpus: the numbers measure the body
        cfg.data.seq_len = 2048
        cfg.train.global_batch_size = cfg.train.micro_batch_size = 1
        cfg.recipe = f"preset:{args.model}"
    apply_overrides(cfg, args.overrides)
    if args.steps < 1 or args.warmup < 0 or args.max_procs < 1:
        raise ValueError(f"--steps and --max-procs must be >= 1 and --warmup >= 0, got {args.steps}, "
                         f"{args.max_procs} and {args.warmup}")
    cfg.train.max_steps = args.warmup + args.steps
    cfg.train.eval_every = 0
    cfg.logging.tensorboard = False
    if args.cp_mode:
        cfg.parallel.cp_mode = args.cp_mode
    if args.layout:
        cfg.parallel.cp_layout = args.layout
    return cfg


def plan(args: argparse.Namespace) -> tuple[str, list[Point], Config]:
    """``(axis, points, base config)``; every point validated by ``derive``, nothing launched."""
    base = base_config(args)
    seq_lens = _ints(args.seq_lens, "--seq-lens") or [base.data.seq_len]
    cps = _ints(args.cp, "--cp") or [base.parallel.cp]
    tps = _ints(args.tp, "--tp") or [base.parallel.tp]
    if len(cps) > 1 and len(tps) > 1:
        raise ValueError(f"sweep one degree at a time: --cp {args.cp} and --tp {args.tp} both list several values")
    axis = "cp" if len(cps) > 1 else "tp" if len(tps) > 1 else "seq_len"
    if axis == "seq_len" and len(seq_lens) < 2:
        raise ValueError("nothing to sweep: give two or more values to --seq-lens, --cp or --tp")
    points = []
    for t in seq_lens:
        for tp in tps:
            for cp in cps:
                cfg = copy.deepcopy(base)
                cfg.data.seq_len, cfg.parallel.tp, cfg.parallel.cp = t, tp, cp
                point = Point(axis, f"T{t}" if axis != "seq_len" and len(seq_lens) > 1 else "", cfg)
                try:
                    derive(cfg, point.world)
                except ValueError as e:
                    raise ValueError(f"point seq_len={t} tp={tp} cp={cp}: {e}") from None
                points.append(point)
    return axis, points, base


def device_budget(cfg: Config, max_procs: int) -> tuple[str, int]:
    """``("cuda", visible GPUs)`` or ``("cpu", max_procs)``: how many processes a point may use."""
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use --set train.device=cpu")
        return "cuda", torch.cuda.device_count()
    return "cpu", max_procs


# ----------------------------------------------------------------------------------- the worker
class CommCounter:
    """Counts the payload bytes this rank hands to ``torch.distributed`` collectives and P2P sends.

    Installed before foxdist or megatron-core are imported, so modules that bind a function at import
    time get the counting one. Only the outermost call counts (a collective built on another is one).
    """

    def __init__(self):
        self.bytes = 0
        self._local = threading.local()

    def install(self) -> CommCounter:
        import torch.distributed as dist

        for name, where in PAYLOAD_ARG.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), name, where))
        return self

    @staticmethod
    def _size(x, name: str) -> int:
        if name == "batch_isend_irecv":
            return sum(op.tensor.nbytes for op in x if getattr(op.op, "__name__", "") == "isend")
        if isinstance(x, (list, tuple)):
            return sum(t.nbytes for t in x)
        return x.nbytes

    def _wrap(self, fn, name: str, where: tuple[int, str]):
        pos, key = where

        def counted(*args, **kwargs):
            if getattr(self._local, "inside", False):
                return fn(*args, **kwargs)
            payload = kwargs[key] if key in kwargs else args[pos] if len(args) > pos else None
            if payload is not None:
                self.bytes += self._size(payload, name)
            self._local.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.inside = False

        counted.__name__ = counted.__qualname__ = name
        counted.__wrapped__ = fn
        return counted


def measure(trainer, warmup: int, steps: int, counter: CommCounter) -> dict:
    """Time ``steps`` optimizer steps after ``warmup`` of them; statistics are the max over ranks."""
    import torch.distributed as dist

    rt = trainer.rt

    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        if rt.distributed:
            dist.barrier()

    for _ in range(warmup):
        trainer.train_step()
    sync()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    counter.bytes = 0
    times, rows = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        rows.append(trainer.train_step())
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        times.append(time.perf_counter() - t0)
    counted = counter.bytes / steps
    sync()
    ddp = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad) \
        if trainer.ddp is not None else 0
    if rt.device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(rt.device))
    else:  # peak resident set of the whole process (KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    stats = torch.tensor([*times, peak, counted + ddp, ddp], dtype=torch.float64)
    if rt.distributed:
        stats = stats.to(rt.device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    stats = stats.cpu().tolist()
    times, (peak, comm, ddp) = stats[:steps], stats[steps:]
    d = trainer.derived
    step_s = statistics.median(times)
    tps = d.tokens_per_step / step_s
    out = {"world": d.world_size, "tp": d.tp, "cp": d.cp, "dp": d.dp, "seq_len": trainer.cfg.data.seq_len,
           "tokens_per_step": d.tokens_per_step, "grad_accum": d.grad_accum, "flops_per_token": trainer.flops_per_token,
           "step_time_s": step_s, "step_times_s": times, "tokens_per_s": tps, "tokens_per_s_per_device": tps / d.world_size,
           "tflops_per_device": trainer.flops_per_token * tps / d.world_size / 1e12, "peak_mem_gib": peak / 2**30,
           "peak_mem_kind": "max_memory_allocated" if rt.device.type == "cuda" else "max_rss",
           "comm_bytes_per_step": comm, "comm_ddp_bytes_per_step": ddp, "loss_last": rows[-1]["loss"],
           "device": rt.device.type, "threads_per_proc": torch.get_num_threads()}
    if trainer.peak:
        out["mfu"] = trainer.flops_per_token * tps / d.world_size / trainer.peak
    if trainer.cfg.kernels.acp_eps is not None:
        out["acp_pruned_fraction"] = statistics.median(r["acp_pruned_fraction"] for r in rows)
    return out


def run_point(spec_file: Path) -> None:
    """One point, on every rank of a torchrun job (or a single process): build, measure, report."""
    spec = json.loads(Path(spec_file).read_text())
    counter = CommCounter().install()  # before foxdist.parallel / megatron-core bind any collective
    import torch.distributed as dist

    from .runtime import init_runtime
    from .train import Trainer, shutdown

    cfg = Config.from_dict(spec["config"])
    rt = init_runtime(cfg.train.device, cfg.parallel.backend, cfg.parallel.timeout_s)
    trainer = None
    try:
        trainer = Trainer(cfg, Path(spec["run_dir"]), rt)
        result = measure(trainer, spec["warmup"], spec["steps"], counter)
        if rt.is_main:
            Path(spec["result"]).write_text(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
        if rt.distributed:
            dist.barrier()
    finally:
        shutdown(trainer)


# ----------------------------------------------------------------------------------- the parent
def launch(point: Point, args: argparse.Namespace, kind: str, out: Path) -> dict:
    """Run one point in its own process(es); its JSON result, or the reason it failed."""
    pdir = out / "points"
    pdir.mkdir(parents=True, exist_ok=True)
    spec = pdir / f"{point.label}.spec.json"
    result = pdir / f"{point.label}.json"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"config": point.cfg.to_dict(), "warmup": args.warmup, "steps": args.steps,
                                "result": str(result.resolve()), "run_dir": str((pdir / point.label).resolve())}))
    cmd = [sys.executable, "-m", "foxdist.bench_scaling", "--point", str(spec.resolve())]
    if point.world > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(point.world),
                    "-m", "foxdist.bench_scaling"]
    env = dict(os.environ)
    if kind == "cpu":  # share the cores between the point's processes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // point.world))
    log = pdir / f"{point.label}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {args.timeout} s"
        finally:  # timed out or interrupted: stop torchrun and its workers (the session started above)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    base = {"label": point.label, "series": point.series, "x": point.x, "command": shlex.join(cmd), "log": str(log)}
    if rc != 0 or not result.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        return {**base, "status": "failed", "returncode": rc, "error": "\n".join(tail)}
    return {**base, "status": "ok", **json.loads(result.read_text())}


def add_efficiency(points: list[dict]) -> None:
    """Per-device TFLOP/s relative to the smallest successful point of the same series."""
    for series in {p["series"] for p in points}:
        ok = sorted((p for p in points if p["series"] == series and p["status"] == "ok"), key=lambda p: p["x"])
        for p in ok:
            p["efficiency"] = p["tflops_per_device"] / ok[0]["tflops_per_device"]


def write_tensorboard(points: list[dict], tb_dir: Path, command: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    tb_dir.mkdir(parents=True, exist_ok=True)
    for old in tb_dir.glob("events.out.tfevents.*"):  # a rerun replaces the curves instead of doubling them
        old.unlink()
    w = SummaryWriter(str(tb_dir))
    for p in sorted((p for p in points if p["status"] == "ok"), key=lambda p: p["x"]):
        prefix = f"scaling/{p['series']}/" if p["series"] else "scaling/"
        for k in METRICS:
            if k in p:
                w.add_scalar(prefix + k, p[k], p["x"])
    w.add_text("scaling/command", command)
    w.close()


def plot(report: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = report["device_kind"] == "cpu"
    panels = [("tokens_per_s", "tokens/s (all devices)"), ("tflops_per_device", "TFLOP/s per device"),
              ("efficiency", "efficiency vs smallest point"),
              ("peak_mem_gib", "peak RSS per process, GiB" if cpu else "peak memory per GPU, GiB"),
              ("comm_mib", "comm MiB/step per rank"), ("step_time_s", "step time, s")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    ok = [p for p in report["points"] if p["status"] == "ok"]
    xs_all = sorted({p["x"] for p in ok})
    for ax, (key, title) in zip(axes.flat, panels):
        for series in sorted({p["series"] for p in ok}, key=lambda s: (len(s), s)):  # T64 before T128
            pts = sorted((p for p in ok if p["series"] == series), key=lambda p: p["x"])
            ys = [p["comm_bytes_per_step"] / 2**20 if key == "comm_mib" else p[key] for p in pts]
            line, = ax.plot([p["x"] for p in pts], ys, "o-", label=series or None)
            if key == "tokens_per_s" and report["axis"] != "seq_len":
                x0 = pts[0]["x"]
                ax.plot([p["x"] for p in pts], [ys[0] * p["x"] / x0 for p in pts], "--", color=line.get_color(),
                        alpha=0.4, label=f"{series} linear".strip())
        if key == "efficiency":
            ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(AXIS_LABEL[report["axis"]], fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    how = f", cp {report['cp_mode']} {report['cp_layout']}" if report["axis"] == "cp" else ""
    fig.suptitle(f"{report['model']}{how} on {report['device']} ({report['date'][:10]})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def environment(kind: str, budget: int) -> dict:
    """Device, versions, date and git revision (``-dirty`` with uncommitted changes to tracked files)."""
    from .runtime import code_revision

    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if ln.startswith("model name")]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": torch.cuda.get_device_name(0) if kind == "cuda" else (names or [platform.processor() or "cpu"])[0],
            "device_kind": kind, "device_count": budget if kind == "cuda" else os.cpu_count(),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_revision": code_revision()}


def sweep(args: argparse.Namespace, argv: list[str]) -> dict:
    """Plan (validating every point), run the points that fit, and write JSON, tensorboard and PNG."""
    axis, points, base = plan(args)
    kind, budget = device_budget(base, args.max_procs)
    out = Path(args.out)
    runnable, skipped = [], []
    for p in points:
        if p.world > budget:
            why = (f"needs {p.world} GPUs, {budget} visible" if kind == "cuda" else
                   f"needs {p.world} processes, --max-procs is {budget}")
            print(f"skip {p.label}: {why}", flush=True)
            skipped.append({"label": p.label, "series": p.series, "x": p.x, "status": "skipped", "reason": why})
        else:
            runnable.append(p)
    if not runnable:
        raise ValueError(f"no point of the sweep fits on this machine ({kind}, {budget} available)")
    command = "foxdist bench scaling " + shlex.join(argv)
    results = []
    for p in runnable:
        print(f"point {p.label} ({p.world} process{'es' if p.world > 1 else ''}) ...", flush=True)
        r = launch(p, args, kind, out)
        results.append(r)
        print(f"  {r['label']}: " + (f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_device']:.3g} TFLOP/s per "
                                     f"device, peak {r['peak_mem_gib']:.2f} GiB" if r["status"] == "ok" else
                                     f"FAILED ({r['returncode']}); see {r['log']}\n{r['error']}"), flush=True)
    add_efficiency(results)
    m = base.model
    report = {
        "command": command, "cwd": os.getcwd(), "axis": axis, **environment(kind, budget),
        "model": f"{base.recipe} ({m.arch}, {m.n_layers} x {m.d_model}, {m.n_heads} heads)",
        "cp_mode": base.parallel.cp_mode, "cp_layout": base.parallel.cp_layout, "warmup": args.warmup,
        "steps": args.steps, "config": base.to_dict(), "points": results, "skipped": skipped,
        "note": "tokens/s over the median step; efficiency = per-device TFLOP/s / that of the smallest point of the "
                "series; peak memory and comm bytes are the max over ranks; comm = payload handed to torch.distributed "
                "collectives and P2P sends from Python plus the DDP gradient all-reduce size (not wire bytes)",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    write_tensorboard(results, out / "tb", command)
    png = plot(report, out / "scaling.png") if any(r["status"] == "ok" for r in results) else "no plot (no point ran)"
    print(f"wrote {out / 'scaling.json'}, {png} and tensorboard scalars in {out / 'tb'}")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foxdist bench scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="FILE:FUNCTION returning a foxdist Config (as for foxdist train)")
    p.add_argument("--model", help="model preset, e.g. fox-pro-760m (byte-level vocab, batch 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--seq-lens", help="comma-separated sequence lengths, e.g. 4096,8192,16384")
    p.add_argument("--cp", help="comma-separated context-parallel degrees, e.g. 1,2,4,8")
    p.add_argument("--tp", help="comma-separated tensor-parallel degrees, e.g. 1,2,4")
    p.add_argument("--cp-mode", choices=["ring", "ulysses", "hybrid"], help="default: the recipe's")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], help="context-parallel layout; default: the recipe's")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--max-procs", type=int, default=4, help="on CPU: most processes a point may use (gloo)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per point before it is killed")
    p.add_argument("--out", default="runs/scaling", help="output directory")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point (what the launcher starts)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    if args.point:
        run_point(Path(args.point))
        return 0
    try:
        report = sweep(args, argv)
    except ValueError as e:
        p.exit(2, f"foxdist bench scaling: error: {e}\n")
    failed = [r["label"] for r in report["points"] if r["status"] == "failed"]
    if failed:
        print(f"foxdist bench scaling: {len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
