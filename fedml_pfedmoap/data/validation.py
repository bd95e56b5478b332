"""A validation split held out of each client's training items, for model selection without the test set
(docs/data.md §Base-to-novel, "Validation split").

The split depends only on the data seed, the client index and the client's training items, so every method sees the
same validation items. Per client, for each of its classes in ascending order, the class's items are permuted by
``numpy_generator(data_seed, "validation", client)`` and the first n_val go to validation, where n_val is
``per_class`` or round-half-up(fraction·n), capped at n-1 so every class keeps at least one training item.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..seeding import numpy_generator
from .splits import PartitionError


def _check(fraction: Optional[float], per_class: Optional[int]) -> None:
    if fraction is not None and per_class is not None:
        raise PartitionError("validation split: set data_args.val_fraction or data_args.val_per_class, not both")
    if fraction is not None:
        ok = isinstance(fraction, (int, float, np.floating)) and not isinstance(fraction, bool)
        if not ok or not 0.0 <= float(fraction) < 1.0:
            raise PartitionError(f"data_args.val_fraction must be a number in [0, 1), got {fraction!r}")
    if per_class is not None:
        ok = isinstance(per_class, (int, np.integer)) and not isinstance(per_class, bool)
        if not ok or int(per_class) < 0:
            raise PartitionError(f"data_args.val_per_class must be an integer >= 0, got {per_class!r}")


def validation_split(train: Sequence[np.ndarray], labels: np.ndarray, data_seed: int,
                     fraction: Optional[float] = None, per_class: Optional[int] = None
                     ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Split each client's training indices into (kept train, validation), both sorted.

    ``train[k]``: client k's indices into the training split whose labels are ``labels``. Neither option set: no
    validation items.
    """
    _check(fraction, per_class)
    labels = np.asarray(labels)
    kept, val = [], []
    for k, items in enumerate(train):
        items = np.sort(np.asarray(items, dtype=np.int64))
        rng = numpy_generator(int(data_seed), "validation", k)
        tr_k, va_k = [], []
        for c in np.unique(labels[items]):
            perm = rng.permutation(items[labels[items] == c])
            n = len(perm)
            want = int(per_class) if per_class is not None else int(np.floor(float(fraction or 0.0) * n + 0.5))
            n_val = min(want, n - 1)
            va_k.append(perm[:n_val])
            tr_k.append(perm[n_val:])
        cat = lambda xs: np.sort(np.concatenate(xs)).astype(np.int64) if xs else np.zeros(0, np.int64)  # noqa: E731
        kept.append(cat(tr_k))
        val.append(cat(va_k))
    return kept, val
