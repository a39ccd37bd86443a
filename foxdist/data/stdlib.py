"""The embedded default corpus: the running interpreter's standard-library sources.

Every Python installation carries ~30 MB of real, varied text (the ``*.py``
files of its standard library), so foxdist can train and be tested with no
download.  :func:`stdlib_corpus` turns those files into a byte-level shard
directory (same layout as ``foxdist prepare``) once and caches it.

Cache location: ``$FOXDIST_CACHE`` if set, else ``$XDG_CACHE_HOME/foxdist``,
else ``~/.cache/foxdist``; the corpus lives in a subdirectory
``stdlib-<python version>-<hash>`` where the hash covers the file list, file
sizes and the build recipe, so an interpreter upgrade or a recipe change
builds a new directory instead of reusing a stale one.

Concurrency: each process builds into its own temporary directory and
publishes it with one atomic ``os.rename``.  When several ranks race, exactly
one rename wins; the losers delete their copy and use the winner's, which is
identical because the build is deterministic.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time

from .prepare import MANIFEST_NAME, build_corpus
from .shards import FORMAT_VERSION
from .tokenizer import ByteTokenizer

# Bump when anything below changes what gets written, to invalidate old caches.
RECIPE_VERSION = 1
VAL_FRACTION = 0.01
FRAME_TOKENS = 2048
SHARD_TOKENS = 50_000_000
# Third-party code installed into the base interpreter is not stdlib and varies
# between machines; bytecode caches are not text.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_STALE_TMP_SECONDS = 3600


def default_cache_root() -> str:
    """``$FOXDIST_CACHE``, else ``$XDG_CACHE_HOME/foxdist``, else ``~/.cache/foxdist``."""
    env = os.environ.get("FOXDIST_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "foxdist")


def stdlib_files() -> tuple[str, list[tuple[str, int]]]:
    """Returns ``(stdlib_root, [(relative posix path, size in bytes), ...])`` sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                try:
                    size = os.stat(full).st_size
                except OSError:  # dangling symlink etc.; the builder would skip it anyway
                    continue
                files.append((os.path.relpath(full, root).replace(os.sep, "/"), size))
    files.sort()
    if not files:
        raise ValueError(f"no *.py files found under the standard library at {root}; this "
                         "interpreter ships without sources, so use `foxdist prepare` on your "
                         "own text instead")
    return root, files


def _corpus_key(files: list[tuple[str, int]]) -> str:
    h = hashlib.sha256(f"recipe={RECIPE_VERSION} format={FORMAT_VERSION} val={VAL_FRACTION} "
                       f"frame={FRAME_TOKENS} shard={SHARD_TOKENS}\n".encode())
    for rel, size in files:
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()[:12]


def _remove_stale_tmp(root: str) -> None:
    """Deletes temporary build dirs left by crashed processes (older than an hour)."""
    now = time.time()
    for name in os.listdir(root):
        if name.startswith(".stdlib-") and ".tmp-" in name:
            path = os.path.join(root, name)
            try:
                if now - os.stat(path).st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def stdlib_corpus(cache_dir: str | None = None, verbose: bool = True) -> str:
    """Returns a prepared shard directory built from the standard-library ``*.py`` files.

    Args:
        cache_dir: cache root to use instead of :func:`default_cache_root`.
        verbose: print one line to stderr when (and only when) the corpus is built.

    Returns:
        Path of the directory, loadable with ``TokenDataset(path, "train")`` and
        ``TokenDataset(path, "val")``.  Byte tokenizer (vocab 257, EOS 256);
        ~1% of files (chosen by a hash of their relative path) form the val split.
    """
    root, files = stdlib_files()
    cache_root = os.path.abspath(cache_dir) if cache_dir else default_cache_root()
    name = f"stdlib-{platform.python_version()}-{_corpus_key(files)}"
    final = os.path.join(cache_root, name)
    if os.path.exists(os.path.join(final, MANIFEST_NAME)):
        return final
    if os.path.exists(final):
        # Cannot come from our atomic publish; someone edited the cache by hand.
        raise ValueError(f"cached corpus {final} has no {MANIFEST_NAME}; delete that directory "
                         "and it will be rebuilt")
    os.makedirs(cache_root, exist_ok=True)
    _remove_stale_tmp(cache_root)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_root)
    try:
        source = {"kind": "python-stdlib", "python": platform.python_version(), "root": root,
                  "key": name.rsplit("-", 1)[1]}
        paths = [os.path.join(root, rel) for rel, _ in files]
        # Split by relative path (not content) so it is the same on every machine
        # with the same Python version.
        build_corpus(tmp, paths, ByteTokenizer(), source=source,
                     split_key=lambda p, raw: os.path.relpath(p, root).replace(os.sep, "/").encode(),
                     val_fraction=VAL_FRACTION, shard_tokens=SHARD_TOKENS,
                     frame_tokens=FRAME_TOKENS)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost the race to another process (final now exists and is non-empty).
            if not os.path.exists(os.path.join(final, MANIFEST_NAME)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"foxdist: built stdlib corpus ({len(files)} files) in "
              f"{time.perf_counter() - t0:.1f}s -> {final}", file=sys.stderr)
    return final
