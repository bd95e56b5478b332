"""The suite's one DP noise source: Gaussian noise from a secret that only the client's local state holds.

Each client draws a 256-bit secret from the operating system's entropy (``secrets``) the first time it releases
something privately and keeps it in its local state (``state[SECRET_KEY]``), which the engines persist with the client,
so a resumed run draws the same noise. The secret is never part of an upload, a log, the config or the train seed;
the server, the config and the tracking store therefore hold nothing that regenerates the noise.

A draw is keyed by (secret, context), e.g. ``("upload", round)``: numpy's ``SeedSequence`` mixes the secret and a
hash of the context into a Philox counter-based generator with a 128-bit key. (``torch.Generator`` only takes a 64-bit
seed, which would cap the secret's strength.)
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Any, Dict, Sequence

import numpy as np
import torch

SECRET_KEY = "dp_secret"  # the client-state entry holding the secret (hex); never uploaded or logged
SECRET_BITS = 256


def new_secret() -> str:
    """A fresh secret from the operating system's entropy, as hex (plain data: checkpoints keep it)."""
    return secrets.token_hex(SECRET_BITS // 8)


def client_secret(state: Dict[str, Any]) -> str:
    """The client's secret, created in its local state on first use."""
    if SECRET_KEY not in state:
        state[SECRET_KEY] = new_secret()
    return state[SECRET_KEY]


def _generator(secret: str, context: Sequence[Any]) -> np.random.Generator:
    tag = hashlib.sha256("/".join(map(str, context)).encode()).digest()
    seq = np.random.SeedSequence(int(secret, 16), spawn_key=(int.from_bytes(tag, "little"),))
    return np.random.Generator(np.random.Philox(seq))


def gaussian_noise(shape: Sequence[int], sigma: float, secret: str, *context: Any) -> torch.Tensor:
    """N(0, σ²) i.i.d. per coordinate (float32), a deterministic function of (secret, context)."""
    draws = _generator(secret, context).standard_normal(tuple(int(s) for s in shape))
    return torch.from_numpy(draws).float() * float(sigma)
