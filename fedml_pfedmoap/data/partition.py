"""Federated partitions with private generators, saved as hash-named JSON files (docs/data.md §Partitions).

Schemes (``PARTITIONERS``): ``pathological`` (few-shot, class-disjoint; the last client takes the remainder),
``dirichlet`` (Hsu et al. 2019 label skew, train and test cut with the same proportions) and ``domain_dirichlet``
(feature shift + label skew: clients per domain, Dirichlet inside each domain, domain-major client ids).
Every partitioner draws from ``np.random.default_rng(data_seed)`` only; the training seed never enters.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..fileio import atomic_write_json, build_once
from .base import DatasetError, ImageDataset
from .splits import PARTITIONER_VERSION, PARTITIONERS, PartitionError, class_groups, dirichlet_split, partition_hash

logger = logging.getLogger(__name__)


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
    if ds.split_source:
        args["split_source"] = ds.split_source
    return args


def make_partition(ds: ImageDataset, method: str, num_clients: int, data_seed: int,
                   out_dir: str | Path | None = None, **params: Any) -> Partition:
    """Build (or reuse the saved file of) a partition; ``out_dir/<dataset>/<method>-<hash12>.json``."""
    fn = PARTITIONERS.get(method)
    args = partition_args(ds, method, num_clients, data_seed, **params)
    h = partition_hash(args)
    path = Path(out_dir) / ds.name / f"{method}-{h}.json" if out_dir else None

    def load() -> Partition:
        saved = json.loads(path.read_text())
        if saved.get("args", {}).get("fingerprint") != ds.fingerprint():
            raise DatasetError(f"partition file {path}: dataset fingerprint mismatch (the data on disk changed)")
        return Partition(h, saved["args"], [np.asarray(x, np.int64) for x in saved["train"]],
                         [np.asarray(x, np.int64) for x in saved["test"]], path)

    def build() -> Partition:
        rng = np.random.default_rng(int(data_seed))
        train, test = fn(ds, rng, num_clients, data_seed=int(data_seed), **params)
        part = Partition(h, args, [np.asarray(x, np.int64) for x in train], [np.asarray(x, np.int64) for x in test],
                         path)
        if path is not None:
            hist = part.histograms(ds)
            blob = {"hash": h, "args": args, "train": [x.tolist() for x in part.train],
                    "test": [x.tolist() for x in part.test],
                    "histogram_train": hist["train"].tolist(), "histogram_test": hist["test"].tolist()}
            atomic_write_json(path, blob)
        return part

    return build() if path is None else build_once(path, load, build)  # one writer per file across processes
