"""Legacy partitions that reproduce the reference code's fixed split seeds (docs/data.md), for parity runs only.

None of them touches global RNG state: each builds a private ``random.Random`` / ``numpy.random.RandomState``
seeded exactly as the reference seeded the global one, and replays the reference's call order.

* ``legacy_pathological``: Python ``random`` seeded 2023 whatever the run seed; the class list is shuffled and split
  with Python's ``round`` (half to even); shots by ``random.sample`` in (client, label-first-appearance) order; the
  test side reseeds 2023, repeats the shuffle and gives every client all test images of its classes.
* ``legacy_dirichlet``: NIID-Bench ``noniid-labeldir`` drawn from a RandomState seeded by ``data_seed`` (set it to
  the reference's ``--seed``), train and test cut with the same proportions, ``min_size`` fixed at 10 there.
* ``legacy_domain_dirichlet``: the DomainNet/Office split that reseeds NumPy to 0 inside the per-class loop; its retry
  can never succeed, so a failed first attempt raises instead of looping forever.
* ``legacy_pachinko``: CIFAR-100's pachinko allocation over 20 super-classes (reseeded 12345), pooled train+test.

Bit-exactness with the reference must be checked against per-client lists exported from it (golden files).
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import ImageDataset
from .splits import PARTITIONERS, PartitionError, class_groups

Lists = Tuple[List[np.ndarray], List[np.ndarray]]


def _by_label(labels: np.ndarray) -> Dict[int, List[int]]:
    """Item indices per label, labels in order of first appearance (the reference's ``defaultdict`` tracker)."""
    out: Dict[int, List[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        out.setdefault(int(lab), []).append(i)
    return out


def _legacy_pathological(ds: ImageDataset, rng: Any, num_clients: int, shots: Optional[int] = 16,
                         legacy_seed: int = 2023, **_: Any) -> Lists:
    num_classes = int(ds.train.labels.max()) + 1  # the reference counts classes as max train label + 1
    order = list(range(num_classes))
    r = random.Random(legacy_seed)
    r.shuffle(order)
    groups = [set(g) for g in class_groups(order, num_clients, "last", rounding="half_even")]
    train_track, test_track = _by_label(ds.train.labels), _by_label(ds.test.labels)
    train = []
    for classes in groups:
        picked: List[int] = []
        for lab, items in train_track.items():
            if lab in classes:
                picked += r.sample(items, shots) if shots is not None and len(items) >= shots else list(items)
        train.append(np.asarray(picked, np.int64))
    test = [np.asarray([i for lab, items in test_track.items() if lab in classes for i in items], np.int64)
            for classes in groups]
    return train, test


def legacy_dirichlet_split(tr_lab: np.ndarray, te_lab: np.ndarray, num_clients: int, alpha: float, min_size: int,
                           rs: np.random.RandomState, reseed_each_class: Optional[int] = None,
                           max_attempts: int = 1000, what: str = "legacy_dirichlet") -> Lists:
    """The reference's label-Dirichlet loop on a private RandomState (``reseed_each_class``: its per-class reseed)."""
    cap = len(tr_lab) / num_clients
    num_classes = int(max(tr_lab.max(initial=-1), te_lab.max(initial=-1))) + 1
    smallest = -1
    for _attempt in range(max_attempts):
        train: List[List[int]] = [[] for _ in range(num_clients)]
        test: List[List[int]] = [[] for _ in range(num_clients)]
        for k in range(num_classes):
            tr_k, te_k = np.where(tr_lab == k)[0], np.where(te_lab == k)[0]
            if reseed_each_class is not None:
                rs = np.random.RandomState(reseed_each_class)
            rs.shuffle(tr_k)
            rs.shuffle(te_k)
            p = rs.dirichlet(np.repeat(alpha, num_clients))
            p = np.array([pj * (len(idx) < cap) for pj, idx in zip(p, train)])
            p = p / p.sum()
            for lists, items in ((train, tr_k), (test, te_k)):
                cuts = (np.cumsum(p) * len(items)).astype(int)[:-1]
                for j, piece in enumerate(np.split(items, cuts)):
                    lists[j] += piece.tolist()
        smallest = min(min(len(x) for x in train), min(len(x) for x in test))
        if smallest >= min_size:
            for j in range(num_clients):
                rs.shuffle(train[j])
                rs.shuffle(test[j])
            return [np.asarray(x, np.int64) for x in train], [np.asarray(x, np.int64) for x in test]
        if reseed_each_class is not None:
            break  # every retry recomputes the identical split: the reference would loop forever
    raise PartitionError(f"{what}: smallest client has {smallest} items < min_size={min_size}"
                         + (" (the reference reseeds inside the class loop, so retrying cannot help; use "
                            "domain_dirichlet)" if reseed_each_class is not None else
                            f" after {max_attempts} attempts"))


def _legacy_dirichlet(ds: ImageDataset, rng: Any, num_clients: int, alpha: float = 0.5, min_size: int = 10,
                      data_seed: int = 0, max_attempts: int = 1000, **_: Any) -> Lists:
    rs = np.random.RandomState(int(data_seed))
    return legacy_dirichlet_split(ds.train.labels, ds.test.labels, num_clients, alpha, min_size, rs,
                                  max_attempts=max_attempts)


def _legacy_domain_dirichlet(ds: ImageDataset, rng: Any, num_clients: int, alpha: float = 0.3, min_size: int = 2,
                             clients_per_domain: int = 5, **_: Any) -> Lists:
    if ds.train_domains is None or ds.test_domains is None:
        raise PartitionError(f"legacy_domain_dirichlet needs a dataset with domains; {ds.name} has none")
    if num_clients != len(ds.domain_names) * clients_per_domain:
        raise PartitionError(f"legacy_domain_dirichlet: {len(ds.domain_names)} domains × {clients_per_domain} = "
                             f"{len(ds.domain_names) * clients_per_domain} clients, got {num_clients}")
    train, test = [], []
    for d, dom in enumerate(ds.domain_names):
        tr_pool, te_pool = np.flatnonzero(ds.train_domains == d), np.flatnonzero(ds.test_domains == d)
        tr, te = legacy_dirichlet_split(ds.train.labels[tr_pool], ds.test.labels[te_pool], clients_per_domain,
                                        alpha, min_size, np.random.RandomState(0), reseed_each_class=0,
                                        what=f"legacy_domain_dirichlet, domain {dom}")
        train += [tr_pool[x] for x in tr]
        test += [te_pool[x] for x in te]
    return train, test


def _renormalize_without(weights: np.ndarray, index: int) -> np.ndarray:
    w = np.delete(weights, index)
    return w / w.sum()


def pachinko(fine: np.ndarray, coarse_of_fine: Sequence[int], num_clients: int, alpha: float, fine_alpha: float,
             rs: np.random.RandomState, r: random.Random) -> List[List[int]]:
    """Pachinko allocation (Reddi et al. 2021): per client, coarse weights ~ Dir(α), fine-within-coarse ~ Dir(10);
    each of n/N draws picks a coarse then a fine label and takes one remaining item of it at random."""
    by_fine: Dict[int, List[int]] = {k: [] for k in range(len(coarse_of_fine))}
    n_coarse = int(max(coarse_of_fine)) + 1
    by_coarse: Dict[int, List[int]] = {k: [] for k in range(n_coarse)}
    for idx in r.sample(range(len(fine)), len(fine)):
        by_fine[int(fine[idx])].append(idx)
        by_coarse[int(coarse_of_fine[fine[idx]])].append(idx)
    fine_of_coarse: Dict[int, List[int]] = {k: [] for k in range(n_coarse)}
    for f, c in enumerate(coarse_of_fine):
        fine_of_coarse[int(c)].append(f)
    available = list(range(n_coarse))
    per_client = len(fine) // num_clients
    out: List[List[int]] = [[] for _ in range(num_clients)]
    for client in range(num_clients):
        coarse_w = rs.dirichlet(alpha * np.ones(len(fine_of_coarse)))
        fine_w = {c: rs.dirichlet(fine_alpha * np.ones(len(fs))) for c, fs in fine_of_coarse.items()}
        for _ in range(per_client):
            ci = int(np.argmax(rs.multinomial(1, coarse_w)))
            c = available[ci]
            fi = int(np.argmax(rs.multinomial(1, fine_w[c])))
            f = fine_of_coarse[c][fi]
            idx = int(r.choice(by_fine[f]))
            out[client].append(idx)
            by_fine[f].remove(idx)
            by_coarse[c].remove(idx)
            if not by_fine[f]:
                fine_of_coarse[c].remove(f)
                fine_w[c] = _renormalize_without(fine_w[c], fi)
                if not by_coarse[c]:
                    fine_of_coarse.pop(c)
                    available.remove(c)
                    coarse_w = _renormalize_without(coarse_w, ci)
    return out


def _legacy_pachinko(ds: ImageDataset, rng: Any, num_clients: int, alpha: float = 0.5, data_seed: int = 0,
                     legacy_seed: int = 12345, fine_alpha: float = 10.0, **_: Any) -> Lists:
    coarse_tr = getattr(ds.train, "coarse_labels", None)
    coarse_te = getattr(ds.test, "coarse_labels", None)
    if coarse_tr is None or coarse_te is None:
        raise PartitionError(f"legacy_pachinko needs CIFAR-100 super-class labels; {ds.name} has none")
    fine = np.concatenate([ds.train.labels, ds.test.labels])
    coarse = np.concatenate([coarse_tr, coarse_te])
    coarse_of_fine = np.zeros(ds.num_classes, np.int64)
    coarse_of_fine[fine] = coarse
    clients = pachinko(fine, coarse_of_fine.tolist(), num_clients, alpha, fine_alpha,
                       np.random.RandomState(legacy_seed), random.Random(legacy_seed))
    # the reference then shuffles the client order with the global `random` (state unknowable): we use data_seed
    random.Random(int(data_seed)).shuffle(clients)
    n_tr = len(ds.train)
    train = [np.asarray([i for i in c if i < n_tr], np.int64) for c in clients]
    test = [np.asarray([i - n_tr for i in c if i >= n_tr], np.int64) for c in clients]
    return train, test


PARTITIONERS.register("legacy_pathological")(_legacy_pathological)
PARTITIONERS.register("legacy_dirichlet")(_legacy_dirichlet)
PARTITIONERS.register("legacy_domain_dirichlet")(_legacy_domain_dirichlet)
PARTITIONERS.register("legacy_pachinko")(_legacy_pachinko)
