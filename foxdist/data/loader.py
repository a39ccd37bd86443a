"""Training data access: a concatenated token view and a deterministic, resumable batch loader.

:class:`TokenDataset` presents all shards of one split of a prepared
directory (see prepare.py) as one token stream.  :class:`WindowLoader` cuts
that stream into fixed windows, shuffles them per epoch, splits them across
data-parallel ranks, and yields ``torch.LongTensor [batch_size, seq_len + 1]``.

Windows ignore document boundaries (standard packing): documents are
separated by EOS in the stream, and a window may contain the end of one
document and the start of the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import torch

from .prepare import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION
from .shards import FrameError, ShardError, ShardReader

STATE_VERSION = 1


class TokenDataset:
    """All shards of ``split`` in ``shard_dir``, viewed as one token stream.

    Attributes:
        num_tokens: total tokens (int).
        vocab_size, eos_id: from the manifest, checked against every shard.
        manifest: the parsed manifest.json (dict).
        fingerprint: 16-hex-digit id of exactly these shards' contents (shard
            names, token counts and header+index checksums); used by
            WindowLoader to refuse resuming onto different data.
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train", cache_frames: int = 32):
        self.shard_dir = os.fspath(shard_dir)
        self.split = split
        mpath = os.path.join(self.shard_dir, MANIFEST_NAME)
        if not os.path.isfile(mpath):
            raise ValueError(f"{self.shard_dir} has no {MANIFEST_NAME}, so it is not a prepared "
                             "corpus (or its preparation did not finish); create it with "
                             f"`foxdist prepare 'INPUT_GLOB' --out {self.shard_dir}`")
        with open(mpath) as f:
            try:
                self.manifest = m = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{mpath} is not valid JSON ({e}); re-run `foxdist prepare` "
                                 "with --overwrite") from None
        if m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{mpath} is format {m.get('format')!r} version {m.get('version')!r}"
                             f", expected {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}; re-run "
                             "`foxdist prepare` with this foxdist version")
        entries = m["splits"].get(split, {}).get("shards", [])
        if not entries:
            have = {k: v["num_tokens"] for k, v in m["splits"].items() if v["shards"]}
            hint = (" (hold out a validation split with `foxdist prepare ... --val-fraction 0.01`)"
                    if split == "val" else "")
            raise ValueError(f"split {split!r} of {self.shard_dir} is empty; splits with data "
                             f"(tokens): {have}{hint}")
        self.vocab_size = int(m["tokenizer"]["vocab_size"])
        self.eos_id = int(m["tokenizer"]["eos_id"])
        self.shards: list[ShardReader] = []
        try:
            for e in entries:
                r = ShardReader(os.path.join(self.shard_dir, e["file"]), cache_frames)
                self.shards.append(r)
                got = (r.num_tokens, r.checksum, r.vocab_size, r.eos_id)
                want = (e["num_tokens"], e["checksum"], self.vocab_size, self.eos_id)
                if got != want:
                    raise ShardError(
                        f"shard {r.path} does not match {mpath} (tokens, checksum, vocab, eos: "
                        f"file has {got}, manifest says {want}); it was replaced by a file from "
                        "another run; re-run `foxdist prepare --overwrite` for this directory")
        except BaseException:
            self.close()
            raise
        # offsets[i] = first global token of shard i; offsets[-1] = num_tokens.
        self.offsets = np.cumsum([0] + [r.num_tokens for r in self.shards], dtype=np.int64)
        self.num_tokens = int(self.offsets[-1])
        ident = {"vocab": self.vocab_size, "eos": self.eos_id,
                 "shards": [[e["file"], e["num_tokens"], e["checksum"]] for e in entries]}
        self.fingerprint = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]

    @property
    def num_docs(self) -> int:
        return sum(r.num_docs for r in self.shards)

    @property
    def doc_starts(self) -> np.ndarray:
        """int64 [num_docs]: global token offset of every document start."""
        return np.concatenate([r.doc_starts + off for r, off in zip(self.shards, self.offsets)])

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated stream, crossing shards.

        Returns int64 [length], or fills and returns ``out`` (1-D, size ``length``).
        """
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise ValueError(f"read({start}, {length}) is out of range for split {self.split!r} "
                             f"of {self.shard_dir} with {self.num_tokens} tokens")
        if out is None:
            out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, end, filled = start, start + length, 0
        while pos < end:
            take = min(end, int(self.offsets[i + 1])) - pos
            self.shards[i].read(pos - int(self.offsets[i]), take, out=out[filled:filled + take])
            filled += take
            pos += take
            i += 1
        return out

    def close(self) -> None:
        for r in self.shards:
            r.close()

    def __repr__(self) -> str:
        return (f"TokenDataset({self.shard_dir!r}, split={self.split!r}, "
                f"num_tokens={self.num_tokens}, shards={len(self.shards)})")


class WindowLoader:
    """Deterministic, resumable, data-parallel batches of token windows.

    Yields ``torch.LongTensor [batch_size, seq_len + 1]`` forever (epochs roll
    over); use ``batch[:, :-1]`` as inputs and ``batch[:, 1:]`` as targets.

    Windows: window ``w`` covers tokens ``[w * seq_len, w * seq_len + seq_len + 1)``,
    i.e. stride ``seq_len`` with a one-token overlap, for
    ``num_windows = (num_tokens - 1) // seq_len``.  Stride ``seq_len`` (not
    ``seq_len + 1``) makes the *targets* of consecutive windows tile the
    stream exactly: every token after the first is predicted exactly once per
    epoch, and no next-token transition is lost at window seams.  Only the
    last ``< seq_len`` tokens of the stream are never a target.

    Order: epoch ``e`` visits windows in the order
    ``perm = Generator(PCG64(SeedSequence([seed, e]))).permutation(num_windows)``.
    Slot ``s`` of ``perm`` goes to dp rank ``s % dp_size``; rank ``r``'s batch
    ``k`` is ``perm[(k * batch_size + j) * dp_size + r]`` for ``j < batch_size``.
    So at global step ``k`` the ranks together consume the contiguous chunk
    ``perm[k*B*D : (k+1)*B*D]``: ranks are disjoint and jointly cover the epoch.
    The ``num_windows % (batch_size * dp_size)`` windows left over at the end of
    an epoch's permutation are skipped (different ones each epoch), so every
    rank runs the same number of steps.

    Tensor-/context-/pipeline-parallel peers pass the same ``dp_rank`` and
    therefore receive identical batches (with no communication); only the data
    parallel coordinates matter here.

    ``state_dict()`` counts batches *returned* so far: if a prefetcher pulls
    batches ahead of the training step, save the state that matches the last
    batch actually trained on.

    Damaged frames: by default a window that touches a damaged shard frame raises
    :class:`~foxdist.data.shards.FrameError` (naming the file and the frame). With
    ``skip_bad_frames=True`` the window is replaced by the next window in stream
    order that reads cleanly (a deterministic choice, so resumes stay exact; that
    window is then seen twice in the epoch), a warning naming the file and frame
    is printed to stderr, and ``skipped_windows`` counts the replacements (it is
    part of the saved state).
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, skip_bad_frames: bool = False):
        for name, v, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                            ("dp_size", dp_size, 1), ("seed", seed, 0)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.dataset = dataset
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.num_windows = (dataset.num_tokens - 1) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(f"dataset {dataset!r} has {dataset.num_tokens} tokens, fewer than one "
                             f"window of seq_len + 1 = {self.seq_len + 1}; use a shorter seq_len "
                             "or prepare more data")
        per_step = self.batch_size * self.dp_size
        self.batches_per_epoch = self.num_windows // per_step
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"dataset {dataset!r} holds {self.num_windows} windows of {self.seq_len + 1} "
                f"tokens, fewer than one global batch of batch_size * dp_size = {per_step}; "
                "reduce batch_size, seq_len or the number of data-parallel ranks, or add data")
        self.epoch = 0
        self.step = 0  # batches already returned in the current epoch
        self.skip_bad_frames = bool(skip_bad_frames)
        self.skipped_windows = 0  # windows replaced because they touch a damaged frame
        self.bad_frames: set[tuple[str, int]] = set()  # (shard path, frame) seen damaged by this loader
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens trained per epoch, summed over all dp ranks."""
        return self.batches_per_epoch * self.batch_size * self.dp_size * self.seq_len

    @property
    def tokens_seen(self) -> int:
        """Target tokens returned so far, summed over all dp ranks (for logging)."""
        steps = self.epoch * self.batches_per_epoch + self.step
        return steps * self.batch_size * self.dp_size * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_starts(self, epoch: int, step: int) -> np.ndarray:
        """int64 [batch_size]: start tokens of this rank's batch ``step`` in ``epoch``."""
        assert 0 <= step < self.batches_per_epoch
        slots = (step * self.batch_size + np.arange(self.batch_size)) * self.dp_size + self.dp_rank
        return self._permutation(epoch)[slots] * self.seq_len

    def __iter__(self) -> "WindowLoader":
        return self

    def __next__(self) -> torch.Tensor:
        starts = self.window_starts(self.epoch, self.step)
        # A fresh array per batch: the caller may still hold (or pin) the previous one.
        batch = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row, s in zip(batch, starts):
            self._read_window(int(s) // self.seq_len, row)
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return torch.from_numpy(batch)

    def _read_window(self, w: int, out: np.ndarray) -> None:
        n = self.seq_len + 1
        try:
            self.dataset.read(w * self.seq_len, n, out=out)
            return
        except FrameError as e:
            if not self.skip_bad_frames:
                raise
            first = e
        self.bad_frames.add((first.path, first.frame))
        for k in range(1, self.num_windows):
            cand = (w + k) % self.num_windows
            try:
                self.dataset.read(cand * self.seq_len, n, out=out)
                break
            except FrameError as e:
                self.bad_frames.add((e.path, e.frame))
        else:
            raise ShardError(f"every window of {self.dataset!r} touches a damaged frame (first: {first})")
        self.skipped_windows += 1
        print(f"foxdist: warning: skipped window {w} (tokens {w * self.seq_len}..{w * self.seq_len + n - 1}): "
              f"{str(first).split('; ')[0]}; read window {cand} instead (dp rank {self.dp_rank}: "
              f"{self.skipped_windows} windows skipped, {len(self.bad_frames)} damaged frames seen)",
              file=sys.stderr, flush=True)

    def state_dict(self) -> dict:
        """Small, JSON- and torch.save-friendly dict; all values are int or str."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len,
                "dataset": self.dataset.fingerprint, "num_windows": self.num_windows,
                "skipped_windows": self.skipped_windows}

    def load_state_dict(self, state: dict) -> None:
        """Resume so the next batch equals what an uninterrupted run would produce next.

        Refuses (ValueError) a state saved for different data, seed, seq_len,
        batch size or dp layout, since resuming it would silently change the
        data order.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; it was saved by an incompatible foxdist")
        mine = self.state_dict()
        fixes = {"dataset": "point the run at the shard directory (and split) it was started with",
                 "seed": "construct the loader with the seed of the run being resumed",
                 "seq_len": "keep seq_len unchanged when resuming",
                 "batch_size": "keep the per-rank batch size unchanged when resuming",
                 "dp_size": "resume with the same number of data-parallel ranks",
                 "dp_rank": "load each rank's own state (or set state['dp_rank'] to this rank: "
                            "epoch/step are the same on every rank)",
                 "num_windows": "point the run at the data it was started with"}
        for key, fix in fixes.items():
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume loader: saved {key}={state.get(key)!r} but this "
                                 f"loader has {key}={mine[key]!r}; {fix}")
        epoch, step = state["epoch"], state["step"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(step, int)
                and 0 <= step < self.batches_per_epoch):
            raise ValueError(f"loader state has invalid position epoch={epoch!r} step={step!r} "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self.epoch, self.step = epoch, step
        self.skipped_windows = int(state.get("skipped_windows", 0))

    def load_state_dict_relayout(self, state: dict) -> str:
        """Resume from a state saved with another dp degree or per-rank batch size.

        All ranks together consume the epoch's permutation in contiguous chunks of
        ``batch_size * dp_size`` windows, so the position is the number of windows already taken
        from the current epoch. It carries over when that number is a multiple of this loader's
        ``batch_size * dp_size``: the next optimizer steps then see the same windows as the saved
        run would have (assigned to ranks and micro-batches differently). Returns a note for the
        log; raises ValueError when the position cannot be carried over.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; it was saved by an incompatible foxdist")
        mine = self.state_dict()
        for key in ("dataset", "seed", "seq_len", "num_windows"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume loader: saved {key}={state.get(key)!r} but this loader has "
                                 f"{key}={mine[key]!r}; resume with the data, seed and seq_len of the saved run")
        old_chunk = state["batch_size"] * state["dp_size"]
        new_chunk = self.batch_size * self.dp_size
        done = state["step"] * old_chunk
        if done % new_chunk:
            raise ValueError(
                f"cannot carry the data position over: the saved run (micro_batch_size {state['batch_size']} x "
                f"dp {state['dp_size']}) has taken {done} windows of epoch {state['epoch']}, which is not a "
                f"multiple of this run's micro_batch_size {self.batch_size} x dp {self.dp_size} = {new_chunk}; "
                f"choose train.micro_batch_size and dp so that their product divides {done} (for example the "
                f"saved {state['batch_size']} x {state['dp_size']})")
        epoch, step = state["epoch"], done // new_chunk
        if step == self.batches_per_epoch:
            epoch, step = epoch + 1, 0
        self.epoch, self.step = epoch, step
        old_used = (self.num_windows // old_chunk) * old_chunk
        new_used = self.batches_per_epoch * new_chunk
        note = (f"data order kept: epoch {epoch}, {done} windows of its permutation already trained on; with an "
                f"unchanged global batch size each optimizer step sees the windows the saved run would have seen "
                f"(micro_batch_size x dp {state['batch_size']} x {state['dp_size']} -> {self.batch_size} x "
                f"{self.dp_size} only changes which rank and micro-batch reads them)")
        if old_used != new_used:
            note += (f"; from the end of this epoch on, each epoch uses {new_used} of its {self.num_windows} windows "
                     f"instead of {old_used}, so later epochs leave out different windows at their end")
        return note

    def __repr__(self) -> str:
        return (f"WindowLoader(batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"seed={self.seed}, dp={self.dp_rank}/{self.dp_size}, epoch={self.epoch}, "
                f"step={self.step}, batches_per_epoch={self.batches_per_epoch})")
