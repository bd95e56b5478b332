"""Federated partitions with private generators, saved as hash-named JSON files (docs/data.md §Partitions).

Schemes (``PARTITIONERS``): ``pathological`` (few-shot, class-disjoint; the last client takes the remainder),
``dirichlet`` (Hsu et al. 2019 label skew, train and test cut with the same proportions) and ``domain_dirichlet``
(feature shift + label skew: clients per domain, Dirichlet inside each domain, domain-major client ids).
Every partitioner draws from ``np.random.default_rng(data_seed)`` only; the training seed never enters.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError
from ..registry import Registry
from .base import DatasetError, ImageDataset

logger = logging.getLogger(__name__)
PARTITIONER_VERSION = 1
PARTITIONERS: Registry[Callable[..., "tuple[list, list]"]] = Registry("partition method")


class PartitionError(UserError, ValueError):
    """A partition cannot be built with the requested parameters."""


@dataclass
class Partition:
    """Per-client train/test index arrays into the dataset's canonical item order."""

    hash: str
    args: Dict[str, Any]
    train: List[np.ndarray]
    test: List[np.ndarray]
    path: Optional[Path] = None

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def histograms(self, dataset: ImageDataset) -> Dict[str, np.ndarray]:
        """Per-client class counts (N, C) of the train and test splits."""
        c = dataset.num_classes
        hist = lambda labels, parts: np.stack([np.bincount(labels[p], minlength=c) for p in parts])  # noqa: E731
        return {"train": hist(dataset.train.labels, self.train), "test": hist(dataset.test.labels, self.test)}


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


def _pathological(ds: ImageDataset, rng: np.random.Generator, num_clients: int, shots: Optional[int] = 16,
                  remainder: str = "last", **_: Any):
    """Class shuffle; round(C/N) classes per client, the last client takes the rest; k shots per class."""
    groups = class_groups(rng.permutation(ds.num_classes), num_clients, remainder)
    tr_lab, te_lab = ds.train.labels, ds.test.labels
    train, test, short = [], [], []
    for classes in groups:
        tr = []
        for cls in sorted(classes):
            idx = np.flatnonzero(tr_lab == cls)
            if shots is not None and len(idx) < shots:
                short.append((cls, len(idx)))
            take = idx if shots is None or len(idx) <= shots else rng.choice(idx, size=shots, replace=False)
            tr.append(np.sort(take))
        train.append(np.concatenate(tr) if tr else np.zeros(0, np.int64))
        test.append(np.flatnonzero(np.isin(te_lab, classes)))
    if short:
        logger.warning("%s: %d classes have fewer than %s training images; all of them are used: %s", ds.name,
                       len(short), shots, ", ".join(f"{ds.classnames[c]}={n}" for c, n in short[:10]))
    return train, test


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


def _dirichlet(ds: ImageDataset, rng, num_clients: int, alpha: float = 0.5, min_size: int = 10,
               max_attempts: int = 1000, **_: Any):
    tr, te = ds.train.labels, ds.test.labels
    return dirichlet_split(tr, te, np.arange(len(tr)), np.arange(len(te)), num_clients, alpha, min_size, rng,
                           max_attempts)


def _domain_dirichlet(ds: ImageDataset, rng, num_clients: int, alpha: float = 0.3, min_size: int = 2,
                      clients_per_domain: int = 5, max_attempts: int = 1000, **_: Any):
    if ds.train_domains is None or ds.test_domains is None:
        raise PartitionError(f"domain_dirichlet needs a dataset with domains; {ds.name} has none")
    n_dom = len(ds.domain_names)
    if num_clients != n_dom * clients_per_domain:
        raise PartitionError(f"domain_dirichlet: {n_dom} domains × {clients_per_domain} clients per domain = "
                             f"{n_dom * clients_per_domain}, but client_num_in_total = {num_clients}")
    train, test = [], []
    for d in range(n_dom):  # domain-major client ids
        tr, te = dirichlet_split(ds.train.labels, ds.test.labels, np.flatnonzero(ds.train_domains == d),
                                 np.flatnonzero(ds.test_domains == d), clients_per_domain, alpha, min_size, rng,
                                 max_attempts, what=f"domain {ds.domain_names[d]}")
        train += tr
        test += te
    return train, test


PARTITIONERS.register("pathological")(_pathological)
PARTITIONERS.register("dirichlet")(_dirichlet)
PARTITIONERS.register("domain_dirichlet")(_domain_dirichlet)


def partition_args(ds: ImageDataset, method: str, num_clients: int, data_seed: int, **params: Any) -> Dict[str, Any]:
    args = {"dataset": ds.name, "fingerprint": ds.fingerprint(), "method": method, "num_clients": int(num_clients),
            "data_seed": int(data_seed), "version": PARTITIONER_VERSION,
            **{k: v for k, v in sorted(params.items()) if v is not None}}
    if getattr(ds, "split_source", ""):
        args["split_source"] = ds.split_source
    return args


def partition_hash(args: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_partition(ds: ImageDataset, method: str, num_clients: int, data_seed: int,
                   out_dir: str | Path | None = None, **params: Any) -> Partition:
    """Build (or reuse the saved file of) a partition; ``out_dir/<dataset>/<method>-<hash12>.json``."""
    fn = PARTITIONERS.get(method)
    args = partition_args(ds, method, num_clients, data_seed, **params)
    h = partition_hash(args)
    path = Path(out_dir) / ds.name / f"{method}-{h}.json" if out_dir else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("args", {}).get("fingerprint") != ds.fingerprint():
            raise DatasetError(f"partition file {path}: dataset fingerprint mismatch (the data on disk changed)")
        return Partition(h, saved["args"], [np.asarray(x, np.int64) for x in saved["train"]],
                         [np.asarray(x, np.int64) for x in saved["test"]], path)
    rng = np.random.default_rng(int(data_seed))
    train, test = fn(ds, rng, num_clients, data_seed=int(data_seed), **params)
    part = Partition(h, args, [np.asarray(x, np.int64) for x in train], [np.asarray(x, np.int64) for x in test], path)
    if path is not None:
        hist = part.histograms(ds)
        blob = {"hash": h, "args": args, "train": [x.tolist() for x in part.train],
                "test": [x.tolist() for x in part.test],
                "histogram_train": hist["train"].tolist(), "histogram_test": hist["test"].tolist()}
        write_json_atomic(blob, path)
    return part


def write_json_atomic(blob: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(blob, f)
    os.replace(tmp, path)


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
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        return np.asarray(saved["train"], np.int64), np.asarray(saved["test"], np.int64), hh
    train, test = stratified_holdout(labels, test_fraction, seed, val_fraction)
    if path is not None:
        write_json_atomic({"hash": hh, "args": args, "train": train.tolist(), "test": test.tolist()}, path)
    return train, test, hh


from . import partition_legacy  # noqa: E402,F401  (registers the legacy_* schemes)
