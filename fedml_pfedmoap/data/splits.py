"""Split helpers shared by the partitions and the loaders (docs/data.md §Partitions, §Layouts), and the registry of
partition schemes (``PARTITIONERS``; the schemes register in ``partition.py`` and ``partition_legacy.py``).

* ``class_groups``: deal a shuffled class list to clients (pathological split);
* ``dirichlet_split``: Hsu et al. label skew over a pool of items, train and test cut with the same proportions;
* ``stratified_holdout`` / ``saved_holdout``: a seeded stratified train/test split of an unsplit item list, saved like
  a partition; ``stratified_split``: the fixed split of the embedded datasets;
* ``partition_hash``: the 12-hex name of a saved partition or holdout file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_json, build_once
from ..registry import Registry

PARTITIONER_VERSION = 1
PARTITIONERS: Registry[Callable[..., "tuple[list, list]"]] = Registry("partition method")


class PartitionError(UserError, ValueError):
    """A partition cannot be built with the requested parameters."""


def class_groups(order: Sequence[int], num_clients: int, remainder: str = "last", rounding: str = "half_up"
                 ) -> List[List[int]]:
    """Split a shuffled class list into client groups (docs/data.md §Partition rules).

    ``remainder: last`` (the paper's rule): cpu = round(C/N) classes per client and the last client takes positions
    [(N-1)·cpu, C); a configuration whose last client would get nothing is rejected. ``remainder: spread``: every
    client gets floor(C/N) and the first C mod N clients one more. ``rounding``: ``half_up`` or ``half_even`` (Python's
    ``round``, the reference's legacy rule).
    """
    c, n = len(order), int(num_clients)
    if n < 1 or c < n:
        raise PartitionError(f"pathological split: {c} classes cannot be shared by {n} clients (need C >= N >= 1)")
    order = [int(x) for x in order]
    if remainder == "spread":
        base, extra = divmod(c, n)
        sizes = [base + (k < extra) for k in range(n)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        return [order[starts[k]:starts[k + 1]] for k in range(n)]
    if remainder != "last":
        raise PartitionError(f"pathological split: remainder must be 'last' or 'spread', got {remainder!r}")
    cpu = int(round(c / n)) if rounding == "half_even" else int(np.floor(c / n + 0.5))
    if cpu < 1 or (n - 1) * cpu >= c:
        raise PartitionError(f"pathological split: {c} classes cannot give {n} clients round(C/N)={cpu} classes "
                             "each with a non-empty last client; use remainder: spread or fewer clients")
    return [order[k * cpu:(k + 1) * cpu] for k in range(n - 1)] + [order[(n - 1) * cpu:]]


def dirichlet_split(tr_lab: np.ndarray, te_lab: np.ndarray, tr_pool: np.ndarray, te_pool: np.ndarray,
                    num_clients: int, alpha: float, min_size: int, rng: np.random.Generator,
                    max_attempts: int = 1000, what: str = "dirichlet"):
    """Hsu et al. label skew over the items in ``tr_pool``/``te_pool``; same per-class proportions for test."""
    need = num_clients * max(1, int(min_size))
    if len(tr_pool) < need or len(te_pool) < need:
        raise PartitionError(f"{what}: too few samples for {num_clients} clients: {len(tr_pool)} training and "
                             f"{len(te_pool)} test images, but every client needs at least max(1, min_size={min_size}) "
                             f"of each ({need} per split); use fewer clients (train_args.client_num_in_total)")
    cap = len(tr_pool) / num_clients
    classes = np.unique(np.concatenate([tr_lab[tr_pool], te_lab[te_pool]]))
    best = -1
    for _ in range(max_attempts):
        train: List[List[int]] = [[] for _ in range(num_clients)]
        test: List[List[int]] = [[] for _ in range(num_clients)]
        for k in classes:
            tr_k = rng.permutation(tr_pool[tr_lab[tr_pool] == k])
            te_k = rng.permutation(te_pool[te_lab[te_pool] == k])
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = np.array([pj * (len(train[j]) < cap) for j, pj in enumerate(p)])
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            for lst, items in ((train, tr_k), (test, te_k)):
                cuts = (np.cumsum(p) * len(items)).astype(int)[:-1]
                for j, piece in enumerate(np.split(items, cuts)):
                    lst[j].extend(piece.tolist())
        smallest = min(min(len(x) for x in train), min(len(x) for x in test))
        best = max(best, smallest)
        if smallest >= min_size:
            return ([rng.permutation(np.asarray(x, np.int64)) for x in train],
                    [rng.permutation(np.asarray(x, np.int64)) for x in test])
    raise PartitionError(f"{what}: no split with min_size={min_size} per client after {max_attempts} attempts "
                         f"(largest minimum seen: {best}); lower data_args.min_size or raise partition_alpha")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle; the first ``round(test_fraction·n_c)`` items go to test. Sorted index arrays."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def partition_hash(args: Dict[str, Any]) -> str:
    """The 12-hex SHA-256 of ``args`` (sorted-key JSON) that names a saved partition or holdout file."""
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stratified_holdout(labels: np.ndarray, test_fraction: float, seed: int, val_fraction: float = 0.0
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Per class (ascending), a private-generator shuffle; round(f_test·n) items go to test, the next round(f_val·n)
    are dropped (validation), the rest train; at least one train item per class. Sorted index arrays."""
    if not 0.0 < test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0 - test_fraction:
        raise PartitionError(f"stratified split: need 0 < test_fraction < 1 and 0 <= val_fraction < 1 - "
                             f"test_fraction, got {test_fraction}, {val_fraction}")
    rng = np.random.default_rng(int(seed))
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(int(np.floor(test_fraction * len(idx) + 0.5)), max(0, len(idx) - 1))
        n_val = min(int(np.floor(val_fraction * len(idx) + 0.5)), max(0, len(idx) - 1 - n_test))
        test.append(idx[:n_test])
        train.append(idx[n_test + n_val:])
    cat = lambda xs: np.sort(np.concatenate(xs)).astype(np.int64) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(train), cat(test)


def saved_holdout(dataset: str, keys: Sequence[str], labels: np.ndarray, test_fraction: float, seed: int,
                  out_dir: str | Path | None = None, val_fraction: float = 0.0) -> Tuple[np.ndarray, np.ndarray, str]:
    """A seeded stratified train/test split of an unsplit item list (docs/data.md §Layouts), saved like a partition.

    The file ``out_dir/<dataset>/holdout-<hash12>.json`` is named by a hash of the item list, fractions and seed; an
    existing file is reused. Returns (train indices, test indices, hash12).
    """
    h = hashlib.sha256()
    for key, lab in zip(keys, np.asarray(labels).tolist()):
        h.update(f"{key}\t{lab}\n".encode())
    args = {"dataset": dataset, "items": len(keys), "items_sha256": h.hexdigest()[:16], "scheme": "holdout",
            "test_fraction": float(test_fraction), "val_fraction": float(val_fraction), "seed": int(seed),
            "version": PARTITIONER_VERSION}
    hh = partition_hash(args)
    path = Path(out_dir) / dataset / f"holdout-{hh}.json" if out_dir else None

    def load() -> Tuple[np.ndarray, np.ndarray, str]:
        saved = json.loads(path.read_text())
        return np.asarray(saved["train"], np.int64), np.asarray(saved["test"], np.int64), hh

    def build() -> Tuple[np.ndarray, np.ndarray, str]:
        train, test = stratified_holdout(labels, test_fraction, seed, val_fraction)
        if path is not None:
            atomic_write_json(path, {"hash": hh, "args": args, "train": train.tolist(), "test": test.tolist()})
        return train, test, hh

    return build() if path is None else build_once(path, load, build)  # one writer per file across processes
