"""Low-level file helpers shared by every layer (docs/architecture.md): atomic writes and file digests.

An atomic write goes to a temporary file in the target's folder and is renamed over the target with ``os.replace``,
so a reader sees the old file or the new one, never half of one, and a failed write leaves no temporary file behind.
This module imports nothing from the package, so data, model, engine and harness code may all use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np


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


def file_hexdigest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (read in 1 MiB blocks), e.g. ``sha256`` or ``md5``."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
