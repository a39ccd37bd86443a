"""Token shard files (``*.fxs``): zstd-compressed token streams with random access.

A shard holds one long stream of token ids made of documents, each followed by
the EOS token.  The stream is cut into fixed-size *frames* of ``frame_tokens``
tokens (the last one may be shorter); every frame is an independent zstd
frame, so reading ``[start, start + length)`` only decompresses the frames it
touches.

File layout (all integers little-endian)::

    offset 0      header, HEADER_SIZE (128) bytes
                    magic         8s   b"FOXSHARD"
                    version       u32  FORMAT_VERSION
                    itemsize      u32  2 (uint16 tokens) or 4 (uint32 tokens)
                    vocab_size    u64
                    eos_id        u64
                    frame_tokens  u64
                    num_tokens    u64
                    num_frames    u64  == ceil(num_tokens / frame_tokens)
                    num_docs      u64
                    index_offset  u64  == end of the last frame
                    index_nbytes  u64
                    zero padding up to byte 124
                    checksum      u32  crc32(header[:124] + index)
    offset 128    frame 0, frame 1, ... (compressed bytes, back to back)
    index_offset  index:
                    frame_offsets int64[num_frames]   absolute byte offsets
                    frame_nbytes  int64[num_frames]   compressed sizes
                    doc_starts    int64[num_docs]     token offset of each document
                    frame_crcs    uint32[num_frames]  crc32 of the *uncompressed* frame
    end of file   (== index_offset + index_nbytes)

The index sits at the end so the writer can stream frames to disk without
knowing the total size up front; the header is rewritten last.  A write goes
to ``path + ".tmp"`` and is published with ``os.replace`` so a crash never
leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict
from typing import Self

import numpy as np
import zstandard

MAGIC = b"FOXSHARD"
FORMAT_VERSION = 1
HEADER_SIZE = 128
_HEADER = struct.Struct("<8sII8Q")  # 80 bytes; the rest up to byte 124 is zero padding
_CRC_AT = HEADER_SIZE - 4

_REBUILD_HINT = "delete it and re-run `foxdist prepare` to rebuild the shard directory"


class ShardError(ValueError):
    """A shard file is damaged, truncated, of the wrong format, or holds invalid tokens."""


class FrameError(ShardError):
    """One frame of a shard is damaged (the rest of the file is readable): ``path`` and ``frame`` name it."""

    def __init__(self, message: str, path: str, frame: int):
        super().__init__(message)
        self.path, self.frame = path, frame

    def __reduce__(self):
        return FrameError, (str(self), self.path, self.frame)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest on-disk dtype for ``vocab_size``: uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _index_nbytes(num_frames: int, num_docs: int) -> int:
    return 8 * num_frames * 2 + 8 * num_docs + 4 * num_frames


class ShardWriter:
    """Streams documents into a new shard file.

    Args:
        path: destination file (conventionally ``*.fxs``). Written as
            ``path + ".tmp"`` and renamed on :meth:`close`.
        vocab_size: number of token ids; every token must be in ``[0, vocab_size)``.
        eos_id: id appended after every document.
        frame_tokens: tokens per zstd frame.  Smaller frames make random reads
            cheaper but compress worse; 2048 suits windows of ~2k tokens.
        level: zstd compression level.

    Use as a context manager: a clean exit publishes the file, an exception
    deletes the temporary file instead.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int, eos_id: int,
                 frame_tokens: int = 2048, level: int = 3):
        if not 1 <= vocab_size <= 1 << 32:
            raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id must be in [0, vocab_size={vocab_size}), got {eos_id}; "
                             "check the tokenizer's EOS token")
        if frame_tokens < 1:
            raise ValueError(f"frame_tokens must be >= 1, got {frame_tokens}")
        self.path = os.fspath(path)
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.frame_tokens = int(frame_tokens)
        self.dtype = token_dtype(self.vocab_size)
        self.num_tokens = 0
        self._tmp_path = self.path + ".tmp"
        self._cctx = zstandard.ZstdCompressor(level=level)
        # Tokens not yet forming a full frame; filled in place to avoid reallocations.
        self._buf = np.empty(self.frame_tokens, dtype=self.dtype)
        self._buf_len = 0
        self._offsets: list[int] = []
        self._nbytes: list[int] = []
        self._crcs: list[int] = []
        self._doc_starts: list[int] = []
        self._file = open(self._tmp_path, "wb")
        self._file.write(b"\0" * HEADER_SIZE)  # placeholder, rewritten by close()
        self._pos = HEADER_SIZE
        self._closed = False

    @property
    def num_docs(self) -> int:
        return len(self._doc_starts)

    def add_document(self, tokens) -> None:
        """Append one document (1-D integer array-like) followed by the EOS token."""
        if self._closed:
            raise ValueError(f"ShardWriter for {self.path} is already closed")
        arr = np.asarray(tokens)
        if arr.size == 0:
            arr = arr.astype(self.dtype).reshape(0)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"add_document expects a 1-D integer array, got shape {arr.shape} "
                             f"dtype {arr.dtype}; pass the token ids from tokenizer.encode()")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"document has token ids in [{lo}, {hi}] but vocab_size is {self.vocab_size}; "
                    "the tokenizer and the shard's vocab_size disagree")
        self._doc_starts.append(self.num_tokens)
        self._append(arr)
        self._append(np.array([self.eos_id], dtype=self.dtype))

    def _append(self, arr: np.ndarray) -> None:
        i, n = 0, arr.size
        while i < n:
            take = min(n - i, self.frame_tokens - self._buf_len)
            # Assigning casts to the on-disk dtype; values were range-checked above.
            self._buf[self._buf_len:self._buf_len + take] = arr[i:i + take]
            self._buf_len += take
            i += take
            if self._buf_len == self.frame_tokens:
                self._flush_frame()
        self.num_tokens += n

    def _flush_frame(self) -> None:
        if self._buf_len == 0:
            return
        raw = self._buf[:self._buf_len].astype("<" + self.dtype.str[1:], copy=False).tobytes()
        comp = self._cctx.compress(raw)
        self._file.write(comp)
        self._offsets.append(self._pos)
        self._nbytes.append(len(comp))
        self._crcs.append(zlib.crc32(raw))
        self._pos += len(comp)
        self._buf_len = 0

    def close(self) -> None:
        """Flush the last frame, write index and header, and publish the file atomically."""
        if self._closed:
            return
        try:
            self._finish()
        except BaseException:
            self.abort()  # e.g. disk full: leave neither a half file nor a stray .tmp
            raise
        self._closed = True

    def _finish(self) -> None:
        self._flush_frame()
        index = b"".join([
            np.asarray(self._offsets, dtype="<i8").tobytes(),
            np.asarray(self._nbytes, dtype="<i8").tobytes(),
            np.asarray(self._doc_starts, dtype="<i8").tobytes(),
            np.asarray(self._crcs, dtype="<u4").tobytes(),
        ])
        num_frames = len(self._offsets)
        assert len(index) == _index_nbytes(num_frames, self.num_docs)
        assert num_frames == -(-self.num_tokens // self.frame_tokens)
        fields = _HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.vocab_size,
                              self.eos_id, self.frame_tokens, self.num_tokens, num_frames,
                              self.num_docs, self._pos, len(index))
        head = fields.ljust(_CRC_AT, b"\0")
        self.checksum = zlib.crc32(index, zlib.crc32(head))  # == ShardReader.checksum
        head += struct.pack("<I", self.checksum)
        self._file.write(index)
        self._file.seek(0)
        self._file.write(head)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        """Discard everything written so far; the real path is never touched."""
        if self._closed:
            return
        self._file.close()
        try:
            os.unlink(self._tmp_path)
        except FileNotFoundError:
            pass
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardReader:
    """Random-access reader for one shard file.

    Everything cheap is validated on open (magic, version, sizes against the
    file length, the header+index checksum, index consistency); each frame's
    checksum and token range are validated when it is first decompressed.
    Any failure raises :class:`ShardError`.

    Attributes:
        path, vocab_size, eos_id, frame_tokens, num_tokens, num_frames, num_docs
        dtype: on-disk token dtype (uint16 or uint32).
        doc_starts: int64 array [num_docs], token offset of each document start.
        checksum: the header+index crc32; doubles as a cheap content fingerprint
            because the index holds every frame's crc.

    Thread-safe; picklable (re-opens the file by path), so it survives being
    sent to DataLoader worker processes.
    """

    def __init__(self, path: str | os.PathLike, cache_frames: int = 32):
        self.path = os.fspath(path)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bad: dict[int, FrameError] = {}
        self._cache_frames = max(1, int(cache_frames))
        self._lock = threading.Lock()
        # zstd decompression contexts must not be shared between threads.
        self._tls = threading.local()
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise ShardError(f"shard file {self.path} does not exist; re-run `foxdist prepare` "
                             "to (re)build the shard directory") from None
        try:
            self._open()
        except BaseException:
            self.close()  # also marks the fd closed so __del__ cannot close a reused fd
            raise

    def _fail(self, what: str) -> ShardError:
        return ShardError(f"shard {self.path}: {what}; {_REBUILD_HINT}")

    def _pread(self, nbytes: int, offset: int) -> bytes:
        data = os.pread(self._fd, nbytes, offset)
        if len(data) != nbytes:
            raise self._fail(f"short read of {nbytes} bytes at offset {offset} "
                             f"(got {len(data)}); the file was truncated")
        return data

    def _open(self) -> None:
        size = os.fstat(self._fd).st_size
        if size < HEADER_SIZE:
            raise self._fail(f"file is {size} bytes, too small for the {HEADER_SIZE}-byte header "
                             "(truncated or not a shard)")
        head = self._pread(HEADER_SIZE, 0)
        (magic, version, itemsize, vocab, eos, ftok, ntok, nframes, ndocs,
         idx_off, idx_len) = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise self._fail(f"bad magic {magic!r} (expected {MAGIC!r}); not a foxdist shard")
        if version != FORMAT_VERSION:
            raise self._fail(f"format version {version}, but this foxdist reads version "
                             f"{FORMAT_VERSION}")
        if idx_off + idx_len != size:
            raise self._fail(f"header says the file is {idx_off + idx_len} bytes but it is "
                             f"{size} bytes (truncated, or extra bytes appended)")
        if idx_len != _index_nbytes(nframes, ndocs):
            raise self._fail(f"index is {idx_len} bytes, expected "
                             f"{_index_nbytes(nframes, ndocs)} for {nframes} frames, {ndocs} docs")
        index = self._pread(idx_len, idx_off)
        (stored_crc,) = struct.unpack_from("<I", head, _CRC_AT)
        if zlib.crc32(index, zlib.crc32(head[:_CRC_AT])) != stored_crc:
            raise self._fail("header/index checksum mismatch (header or index is corrupted)")
        # The checksum passed, so remaining failures mean a writer bug or a
        # deliberately forged file; still refuse rather than read garbage.
        if itemsize not in (2, 4) or ftok < 1 or not 0 <= eos < vocab <= 1 << (8 * itemsize):
            raise self._fail(f"inconsistent header (itemsize={itemsize}, vocab_size={vocab}, "
                             f"eos_id={eos}, frame_tokens={ftok})")
        if nframes != -(-ntok // ftok):
            raise self._fail(f"{nframes} frames cannot hold {ntok} tokens of {ftok} per frame")
        n8 = 8 * nframes
        self._offsets = np.frombuffer(index, dtype="<i8", count=nframes, offset=0).astype(np.int64)
        self._nbytes = np.frombuffer(index, dtype="<i8", count=nframes, offset=n8).astype(np.int64)
        self.doc_starts = np.frombuffer(index, dtype="<i8", count=ndocs,
                                        offset=2 * n8).astype(np.int64)
        self._crcs = np.frombuffer(index, dtype="<u4", count=nframes,
                                   offset=2 * n8 + 8 * ndocs).astype(np.uint32)
        ends = self._offsets + self._nbytes
        if nframes and (self._offsets[0] != HEADER_SIZE or ends[-1] != idx_off
                        or np.any(self._offsets[1:] != ends[:-1]) or np.any(self._nbytes <= 0)):
            raise self._fail("frame table is not contiguous")
        if ntok and (ndocs == 0 or self.doc_starts[0] != 0 or self.doc_starts[-1] >= ntok
                     or np.any(np.diff(self.doc_starts) <= 0)):
            raise self._fail("document start table is inconsistent")
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32).newbyteorder("<")
        self.vocab_size, self.eos_id, self.frame_tokens = int(vocab), int(eos), int(ftok)
        self.num_tokens, self.num_frames, self.num_docs = int(ntok), int(nframes), int(ndocs)
        self.checksum = int(stored_crc)

    def _frame_range(self, i: int) -> tuple[int, int]:
        a = i * self.frame_tokens
        return a, min(a + self.frame_tokens, self.num_tokens)

    def _frame_error(self, i: int, what: str) -> FrameError:
        a, b = self._frame_range(i)
        return FrameError(f"shard {self.path}: frame {i} (tokens {a}..{b - 1}) {what}; {_REBUILD_HINT} (or set "
                          f"data.skip_bad_frames=true to train on without the windows that touch damaged frames)",
                          self.path, i)

    def _load_frame(self, i: int) -> np.ndarray:
        """Decompress and validate frame ``i``; returns a read-only token array."""
        a, b = self._frame_range(i)
        expected = (b - a) * self.dtype.itemsize
        comp = os.pread(self._fd, int(self._nbytes[i]), int(self._offsets[i]))
        if len(comp) != self._nbytes[i]:
            raise self._frame_error(i, "is cut short; the file was truncated after opening")
        dctx = getattr(self._tls, "dctx", None)
        if dctx is None:
            dctx = self._tls.dctx = zstandard.ZstdDecompressor()
        try:
            raw = dctx.decompress(comp, max_output_size=expected)
        except zstandard.ZstdError as e:
            raise self._frame_error(i, f"does not decompress ({e})") from None
        if len(raw) != expected or zlib.crc32(raw) != self._crcs[i]:
            raise self._frame_error(i, "failed its checksum (corrupted data)")
        arr = np.frombuffer(raw, dtype=self.dtype)
        hi = int(arr.max())
        if hi >= self.vocab_size:
            raise self._frame_error(i, f"holds token id {hi} >= vocab_size {self.vocab_size}")
        return arr

    def _frame(self, i: int) -> np.ndarray:
        with self._lock:
            arr = self._cache.get(i)
            if arr is not None:
                self._cache.move_to_end(i)
                return arr
            bad = self._bad.get(i)
        if bad is not None:  # known damaged: fail again without re-reading it
            raise FrameError(str(bad), bad.path, bad.frame)
        try:
            arr = self._load_frame(i)  # outside the lock: decompression can run concurrently
        except FrameError as e:
            with self._lock:
                self._bad[i] = e
            raise
        with self._lock:
            self._cache[i] = arr
            while len(self._cache) > self._cache_frames:
                self._cache.popitem(last=False)
        return arr

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` as a 1-D array.

        Returns a fresh array of the on-disk dtype, or fills ``out`` (any numeric
        1-D array of size ``length``, e.g. an int64 batch row, values are cast)
        and returns it.
        """
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise ValueError(f"read({start}, {length}) is out of range for {self.path} "
                             f"with {self.num_tokens} tokens")
        if out is None:
            out = np.empty(length, dtype=self.dtype.newbyteorder("="))
        elif out.shape != (length,):
            raise ValueError(f"out has shape {out.shape}, expected ({length},)")
        pos, end, filled = start, start + length, 0
        while pos < end:
            i = pos // self.frame_tokens
            frame = self._frame(i)
            lo = pos - i * self.frame_tokens
            take = min(end - pos, frame.size - lo)
            out[filled:filled + take] = frame[lo:lo + take]
            filled += take
            pos += take
        return out

    def verify(self) -> None:
        """Decompress and check every frame (slow: reads the whole file)."""
        for i in range(self.num_frames):
            self._load_frame(i)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __reduce__(self):
        return (ShardReader, (self.path, self._cache_frames))

    def __repr__(self) -> str:
        return (f"ShardReader({self.path!r}, num_tokens={self.num_tokens}, "
                f"num_docs={self.num_docs}, vocab_size={self.vocab_size})")
