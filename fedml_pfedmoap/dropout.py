"""Client dropout: which selected clients fail to deliver their update in a round (docs/data.md §Base-to-novel,
"Client dropout").

Each client's failure in round t is decided by u_i < p with u = ``numpy_generator(seed, "client-dropout", t)`` drawn
for all clients, independent of the algorithm and of which other clients were selected, so every method sees the same
failures for the same seed.
"""
from __future__ import annotations

from typing import List, Sequence

from .seeding import numpy_generator


def dropped_clients(num_clients: int, selected: Sequence[int], p: float, seed: int, round_idx: int) -> List[int]:
    """The sorted subset of ``selected`` that drops out in round ``round_idx`` (may be all of them; the caller then
    aggregates nothing). ``p`` in [0, 1); p = 0 never drops."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"train_args.client_dropout must be a probability in [0, 1), got {p!r}")
    bad = [i for i in selected if not 0 <= int(i) < int(num_clients)]
    if bad:
        raise ValueError(f"client dropout: selected clients {bad[:5]} are outside 0..{int(num_clients) - 1}")
    if float(p) == 0.0:
        return []
    u = numpy_generator(int(seed), "client-dropout", int(round_idx)).random(int(num_clients))
    return sorted({int(i) for i in selected if u[int(i)] < float(p)})
