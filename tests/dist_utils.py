"""Spawn gloo process groups on CPU for tests: one spawn, many checks.

Starting N Python processes that import torch costs ~10-25 s on a 2-core machine, so a test module
should spawn each world size once and run all its checks inside that spawn::

    # tests/test_something.py
    from dist_utils import DistSuite

    def _check_a(rank, world):            # module-level: picklable for the spawned workers
        ...collectives...
        return {"err": max_err}           # any picklable value; rank 0's is reported

    SUITE = DistSuite(world_size=2, checks=[_check_a, ...])

    @pytest.fixture(scope="module")
    def cp2():
        return SUITE.run()                # spawns once, runs every check, caches the results

    def test_a(cp2):
        assert cp2.get("_check_a")["err"] < 1e-10   # re-raises a worker's traceback if it failed

Workers run checks in order and agree on success (a tiny all-reduce) after each one. A check that raises on any rank is
recorded with its traceback and, because the ranks may no longer agree on which collective comes
next, the remaining checks of that spawn are marked as not run. Deadlocks are bounded twice: by the
process-group timeout inside the workers and by a wall-clock timeout in the parent, which kills the
workers it started and raises.

Test modules that spawn must be importable by the children (pytest puts ``tests/`` on ``sys.path``,
which ``spawn`` passes on); scripts that call :func:`run_distributed` directly need an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass, field

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedTestError(RuntimeError):
    """A worker failed (its traceback is in the message) or the run timed out."""


def _worker(rank, world, port, fn, args, out_q, pg_timeout_s, threads):
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        try:
            result = fn(rank, world, *args)
            out_q.put((rank, "ok", result))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        out_q.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0, pg_timeout_s: float = 60.0,
                    threads: int = 1, start_method: str = "spawn"):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results.

    ``fn`` and ``args`` must be picklable (module-level function). Raises
    :class:`DistributedTestError` with the workers' tracebacks if any rank fails, or when the whole
    run exceeds ``timeout_s`` (the workers are then terminated).
    """
    ctx = mp.get_context(start_method)
    out_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_q, pg_timeout_s, threads),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout_s
    clean = False
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedTestError(
                    f"distributed run of {getattr(fn, '__name__', fn)} on {world_size} ranks timed out after "
                    f"{timeout_s:.0f} s; finished ranks: {sorted(results)}, failed: {sorted(errors)}"
                    + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
            try:
                rank, status, payload = out_q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and i not in results and i not in errors]
                if dead:  # crashed without reporting (segfault, os._exit, OOM kill)
                    for i in dead:
                        errors[i] = f"process exited with code {procs[i].exitcode} without reporting"
                continue
            (results if status == "ok" else errors)[rank] = payload
            if errors and len(results) + len(errors) < world_size:
                # give the others a moment to report their own tracebacks, then stop waiting
                deadline = min(deadline, time.monotonic() + max(pg_timeout_s, 5.0) + 10.0)
        clean = not errors
    finally:
        # every rank reported: let them exit (destroy_process_group); otherwise stop them right away
        for p in procs:
            p.join(timeout=10 if clean else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise DistributedTestError(
            f"{len(errors)} of {world_size} ranks failed in {getattr(fn, '__name__', fn)}:"
            + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world_size)]


# --------------------------------------------------------------------------------------- suites

NOT_RUN = "not run: an earlier check of this spawn failed"


@dataclass
class Check:
    """A named, picklable check: ``fn(rank, world, **kwargs)`` (``fn`` defined at module level)."""

    name: str
    fn: object
    kwargs: dict = field(default_factory=dict)

    @property
    def __name__(self):  # noqa: A003 - lets a Check stand wherever a function is expected
        return self.name

    def __call__(self, rank, world):
        return self.fn(rank, world, **self.kwargs)


def _run_checks(rank, world, checks):
    import torch
    import torch.distributed as dist

    out = {}
    failed = False
    for fn in checks:
        name = fn.__name__
        if failed:
            out[name] = ("skipped", NOT_RUN)
            continue
        t0 = time.perf_counter()
        try:
            value = fn(rank, world)
            out[name] = ("ok", value, time.perf_counter() - t0)
        except BaseException:  # noqa: BLE001
            out[name] = ("error", traceback.format_exc())
        # agree on success before the next check (a rank stuck inside a collective that a failed
        # rank never entered is released by the process-group timeout instead)
        flag = torch.tensor([0 if out[name][0] == "ok" else 1])
        dist.all_reduce(flag)
        failed = bool(int(flag))
    return out


@dataclass
class SuiteResults:
    world_size: int
    per_rank: list
    wall_s: float

    def get(self, name: str, rank: int = 0):
        """Rank ``rank``'s return value of check ``name``; raises with tracebacks if any rank failed."""
        bad = []
        for r, res in enumerate(self.per_rank):
            entry = res.get(name)
            if entry is None:
                bad.append(f"rank {r}: check {name!r} is not part of this suite")
            elif entry[0] != "ok":
                bad.append(f"--- rank {r} ({entry[0]}) ---\n{entry[1]}")
        if bad:
            raise DistributedTestError(f"check {name} on {self.world_size} ranks failed:\n" + "\n".join(bad))
        return self.per_rank[rank][name][1]

    def all_ranks(self, name: str) -> list:
        self.get(name)
        return [res[name][1] for res in self.per_rank]

    def seconds(self, name: str) -> float:
        return max(res[name][2] for res in self.per_rank if res[name][0] == "ok")


@dataclass
class DistSuite:
    """A list of checks ``fn(rank, world) -> value`` run in ONE spawn of ``world_size`` gloo ranks."""

    world_size: int
    checks: list
    timeout_s: float = 300.0
    pg_timeout_s: float = 60.0
    _results: SuiteResults | None = field(default=None, repr=False)

    def run(self) -> SuiteResults:
        if self._results is None:
            t0 = time.perf_counter()
            per_rank = run_distributed(_run_checks, self.world_size, list(self.checks), timeout_s=self.timeout_s,
                                       pg_timeout_s=self.pg_timeout_s)
            self._results = SuiteResults(self.world_size, per_rank, time.perf_counter() - t0)
        return self._results
