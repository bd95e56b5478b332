"""Private random streams named by their purpose, importable from every layer (data, algorithms, engines).

``derive_seed`` hashes its parts (a seed, a purpose, a client, a round), so each stream is independent of the order in
which others are drawn and of global RNG state. It is the same function as ``algorithms.base.derive_seed``, which can
re-export it from here.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (seed, purpose, client, round): private, order-independent streams."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def numpy_generator(*parts: Any) -> np.random.Generator:
    """``np.random.default_rng`` seeded by ``derive_seed(*parts)``; never touches NumPy's global state."""
    return np.random.default_rng(derive_seed(*parts))
