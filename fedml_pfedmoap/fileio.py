"""Low-level file helpers shared by every layer (docs/architecture.md): atomic writes, build-once locks, digests.

An atomic write goes to a temporary file in the target's folder and is renamed over the target with ``os.replace``,
so a reader sees the old file or the new one, never half of one, and a failed write leaves no temporary file behind.
:func:`build_once` adds one writer per cache file across processes: an exclusive ``fcntl.flock`` on ``<file>.lock``
(docs/benchmark.md §Shared caches on a shared filesystem).
This module imports nothing from the package, so data, model, engine and harness code may all use it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import numpy as np

logger = logging.getLogger(__name__)
T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", fsync: bool = False,
                keep_previous: Optional[str | Path] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the body has written it, it replaces ``path``.

    ``suffix`` ends the temporary name (writers such as ``np.savez`` append their own extension otherwise);
    ``fsync`` flushes the written bytes to disk before the rename; ``keep_previous`` receives the old ``path``
    (if any) just before the rename. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, **dump_options: Any) -> Path:
    """Write ``json.dumps(obj, **dump_options)`` to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, **dump_options))


def atomic_write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write an uncompressed ``.npz`` (``np.savez``) to ``path`` atomically."""
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``<path>.lock`` (created if missing, never removed: removing a lock file
    another process is waiting on would let a third one in) for the body; yields the lock file's path. The kernel
    drops the lock when its holder exits, so a killed holder never blocks the others."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for %s (another process is writing %s)", lock, Path(path).name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def build_once(path: str | Path, load: Callable[[], Optional[T]], build: Callable[[], T]) -> T:
    """``load()`` when ``path`` exists and loads (``load`` returns None for an unusable file); else, holding
    :func:`file_lock` on ``path``, ``load()`` again (another process may have written it while this one waited) and
    only then ``build()``, which must write ``path`` atomically. Processes sharing the file system thus compute a
    key once: the first builds, the others wait and reuse its file."""
    path = Path(path)
    got = load() if path.exists() else None
    if got is not None:
        return got
    with file_lock(path):
        got = load() if path.exists() else None
        return got if got is not None else build()


def file_hexdigest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (read in 1 MiB blocks), e.g. ``sha256`` or ``md5``."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
