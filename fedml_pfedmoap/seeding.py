"""Private random streams named by their purpose, importable from every layer (data, algorithms, engines).

``derive_seed`` hashes its parts (a seed, a purpose, a client, a round), so each stream is independent of the order in
which others are drawn and of global RNG state (docs/architecture.md §Layers; docs/algorithms.md §Shared setting).
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (seed, purpose, client, round): private, order-independent streams."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def numpy_generator(*parts: Any) -> np.random.Generator:
    """``np.random.default_rng`` seeded by ``derive_seed(*parts)``; never touches NumPy's global state."""
    return np.random.default_rng(derive_seed(*parts))


def make_generator(*parts: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by ``derive_seed(*parts)``; never touches torch's global state."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def normal_prompt(shape: Sequence[int], *parts: Any, std: float = 0.02) -> torch.Tensor:
    """CoOp init: i.i.d. N(0, std²) from a private generator (docs/algorithms.md §Shared setting)."""
    return torch.randn(*shape, generator=make_generator(*parts)) * std
