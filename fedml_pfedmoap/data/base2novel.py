"""Base-to-novel splits: classes halved into base and novel label spaces, base classes dealt to clients (docs/data.md
§Base-to-novel).

Two conventions are in use, and their numbers are not comparable:

* ``label_id`` (FedPGP, pFedMMA, FedMGP): base = the first ceil(N/2) label ids, novel = the rest. The base classes are
  shuffled and dealt to clients in disjoint slices of round(m/K) classes (Python's round, half to even); the last client
  takes the remainder. Each client trains on ``shots`` images of each of its classes and is tested locally on all test
  images of its classes, with logits over all m base classes (Local); every client's model is also scored on the full
  base test set (Base) and, with the novel class names only, on the full novel test set (Novel); HM is the 3-way
  harmonic mean. ``legacy=True`` replays the released code's draws (Python ``random`` seeded 2023).
* ``flip`` (FLiP): classes halved in sorted class-name order; ``shots`` images per base class; the base pool split over
  clients by Dirichlet label skew; only the global model is scored, on base and novel; HM is the 2-way mean.

Every draw comes from a private generator seeded by the data seed; nothing here reads or changes global RNG state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..seeding import numpy_generator
from .base import ImageDataset, SplitData
from .splits import PARTITIONERS, PartitionError, class_groups, dirichlet_split

CONVENTIONS = ("label_id", "flip")


@dataclass(frozen=True)
class LabelSpace:
    """One half's label space: ``ids[j]`` is the global label id of local label j, ``names[j]`` its class name."""

    ids: Tuple[int, ...]
    names: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def remap(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Global label ids -> local indices (0..len-1); a label outside this half is an error, never a silent -1."""
        lookup = {g: j for j, g in enumerate(self.ids)}
        arr = np.asarray(labels, dtype=np.int64).reshape(-1)
        outside = sorted({int(x) for x in arr.tolist() if int(x) not in lookup})
        if outside:
            raise ValueError(f"labels {outside[:5]} are not in this label space (ids {list(self.ids)[:5]}...)")
        return np.asarray([lookup[int(x)] for x in arr.tolist()], dtype=np.int64)


@dataclass
class Base2NovelSplit:
    """Indices into ``dataset.train`` / ``dataset.test`` for one base-to-novel setting.

    ``client_classes[k]``: client k's base classes (global ids). ``train[k]``: its training items (own base classes
    only). ``local_test[k]``: its local test items (``label_id``: all test images of its classes; ``flip``: the base
    test cut with the client's Dirichlet proportions, unused by FLiP's own evaluation). ``base_test`` / ``novel_test``:
    every test item of a base / novel class, scored over ``base`` / ``novel`` (use ``LabelSpace.remap`` on labels).
    """

    convention: str
    base: LabelSpace
    novel: LabelSpace
    client_classes: List[List[int]]
    train: List[np.ndarray]
    local_test: List[np.ndarray]
    base_test: np.ndarray
    novel_test: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.train)


@dataclass(frozen=True)
class OrderReport:
    """Whether label-id order equals sorted-name order, and which classes change half between the two conventions."""

    same_order: bool
    to_novel: Tuple[str, ...]  # base by label id, novel by name
    to_base: Tuple[str, ...]   # novel by label id, base by name


def base_size(num_classes: int) -> int:
    """m = ceil(N/2): the number of base classes."""
    if num_classes < 2:
        raise PartitionError(f"base-to-novel needs at least 2 classes, got {num_classes}")
    return math.ceil(num_classes / 2)


def halve_by_label(num_classes: int) -> Tuple[List[int], List[int]]:
    """``label_id`` halves: base = ids 0..m-1, novel = ids m..N-1."""
    m = base_size(num_classes)
    return list(range(m)), list(range(m, num_classes))


def name_order(classnames: Sequence[str]) -> List[int]:
    """Label ids in sorted class-name order (Python string order: case-sensitive, uppercase first; ties by id)."""
    return sorted(range(len(classnames)), key=lambda j: (str(classnames[j]), j))


def halve_by_name(classnames: Sequence[str]) -> Tuple[List[int], List[int]]:
    """``flip`` halves: base = the first ceil(N/2) names in sorted order, novel = the rest, each in sorted order."""
    order = name_order(classnames)
    m = base_size(len(order))
    return order[:m], order[m:]


def label_space(ids: Sequence[int], classnames: Sequence[str]) -> LabelSpace:
    return LabelSpace(tuple(int(i) for i in ids), tuple(str(classnames[i]) for i in ids))


def order_report(classnames: Sequence[str]) -> OrderReport:
    """Compare the two conventions' halves for one class list (the docs/data.md table is computed with this rule)."""
    lb, _ = halve_by_label(len(classnames))
    nb, _ = halve_by_name(classnames)
    same = name_order(classnames) == list(range(len(classnames)))
    to_novel = tuple(str(classnames[j]) for j in lb if j not in set(nb))
    to_base = tuple(str(classnames[j]) for j in sorted(nb) if j not in set(lb))
    return OrderReport(same, to_novel, to_base)


def _indices_of(labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(labels, np.asarray(list(ids), dtype=np.int64))).astype(np.int64)


def _check_clients(num_clients: int, m: int) -> None:
    if int(num_clients) < 1 or int(num_clients) > m:
        raise PartitionError(f"base-to-novel: {m} base classes cannot be dealt to {num_clients} clients "
                             "(need 1 <= data_args.client_num_in_total <= base classes)")


class _LabelsOnly(SplitData):
    """A labels-only view of a subset of a split, so the legacy partitioner can run on the base half alone."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)

    def item_keys(self) -> Sequence[str]:
        return [str(i) for i in range(len(self))]


def split_label_id(ds: ImageDataset, num_clients: int, data_seed: int, shots: Optional[int] = 16,
                   legacy: bool = False, legacy_seed: int = 2023) -> Base2NovelSplit:
    """The ``label_id`` convention (FedPGP / pFedMMA / FedMGP; docs/data.md §Base-to-novel).

    Default: the base ids are permuted by ``numpy_generator(data_seed, "base2novel", "classes")`` and cut by
    ``class_groups(..., remainder="last", rounding="half_even")``; class c's shots are drawn without replacement by
    ``numpy_generator(data_seed, "base2novel", "shots", c)`` (all images if it has fewer). ``legacy=True``: the released
    code's draws on the base half (``random.Random(legacy_seed)`` shuffles ``list(range(m))``, then ``random.sample``
    per client and label in first-appearance order over the full base training split); ``data_seed`` is not used.
    """
    tr_lab, te_lab = ds.train.labels, ds.test.labels
    base_ids, novel_ids = halve_by_label(ds.num_classes)
    _check_clients(num_clients, len(base_ids))
    base_train = _indices_of(tr_lab, base_ids)
    _check_shots(shots)
    if legacy:
        view = ImageDataset(ds.name, [ds.classnames[i] for i in base_ids], _LabelsOnly(tr_lab[base_train]),
                            _LabelsOnly(te_lab[_indices_of(te_lab, base_ids)]))
        tr, te = PARTITIONERS.get("legacy_pathological")(view, None, int(num_clients), shots=shots,
                                                         legacy_seed=legacy_seed)
        base_test_pool = _indices_of(te_lab, base_ids)
        train = [base_train[np.asarray(t, np.int64)] for t in tr]
        local_test = [np.sort(base_test_pool[np.asarray(t, np.int64)]) for t in te]
        groups = [sorted({int(x) for x in tr_lab[t].tolist()} | {int(x) for x in te_lab[s].tolist()})
                  for t, s in zip(train, local_test)]
    else:
        order = numpy_generator(int(data_seed), "base2novel", "classes").permutation(len(base_ids))
        groups = [sorted(g) for g in class_groups(order.tolist(), int(num_clients), "last", rounding="half_even")]
        picked = {c: _draw_shots(np.flatnonzero(tr_lab == c), shots, numpy_generator(int(data_seed), "base2novel",
                                                                                     "shots", c))
                  for c in base_ids}
        train = [np.sort(np.concatenate([picked[c] for c in g])).astype(np.int64) for g in groups]
        local_test = [_indices_of(te_lab, g) for g in groups]
    return Base2NovelSplit("label_id", label_space(base_ids, ds.classnames), label_space(novel_ids, ds.classnames),
                           groups, train, local_test, _indices_of(te_lab, base_ids), _indices_of(te_lab, novel_ids))


def _check_shots(shots: Optional[int]) -> None:
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1):
        raise PartitionError(f"base-to-novel: data_args.shots must be an integer >= 1 (or null for all images), "
                             f"got {shots!r}")


def _draw_shots(items: np.ndarray, shots: Optional[int], rng: np.random.Generator) -> np.ndarray:
    if shots is None or len(items) <= int(shots):
        return np.asarray(items, np.int64)
    return rng.choice(items, size=int(shots), replace=False).astype(np.int64)


def split_flip(ds: ImageDataset, num_clients: int, data_seed: int, shots: Optional[int] = 16, alpha: float = 0.5,
               min_size: int = 1, sort_names: Optional[Sequence[str]] = None, max_attempts: int = 1000
               ) -> Base2NovelSplit:
    """The ``flip`` convention (FLiP; docs/data.md §Base-to-novel).

    Halves by sorted ``sort_names`` (default: the dataset's class names; pass the folder names to sort exactly as FLiP
    does on disk). Local label order inside each half is sorted-name order. For each base class (ascending id) the
    first ``shots`` items of a ``numpy_generator(data_seed, "base2novel-flip", "shots")`` permutation are kept; that
    pool and the base test set are split by ``partition.dirichlet_split`` (Dirichlet(alpha), same proportions for
    test) from ``numpy_generator(data_seed, "base2novel-flip", "dirichlet")``.
    """
    names = list(ds.classnames if sort_names is None else sort_names)
    if len(names) != ds.num_classes:
        raise PartitionError(f"base-to-novel flip: sort_names has {len(names)} names for {ds.num_classes} classes")
    tr_lab, te_lab = ds.train.labels, ds.test.labels
    base_ids, novel_ids = halve_by_name(names)
    _check_clients(num_clients, len(base_ids))
    rng = numpy_generator(int(data_seed), "base2novel-flip", "shots")
    _check_shots(shots)
    pool = np.concatenate([rng.permutation(np.flatnonzero(tr_lab == c))[:shots] for c in sorted(base_ids)])
    base_test = _indices_of(te_lab, base_ids)
    train, local_test = dirichlet_split(tr_lab, te_lab, np.sort(pool).astype(np.int64), base_test, int(num_clients),
                                        float(alpha), int(min_size),
                                        numpy_generator(int(data_seed), "base2novel-flip", "dirichlet"),
                                        int(max_attempts), what="base-to-novel flip")
    groups = [sorted({int(x) for x in tr_lab[t].tolist()}) for t in train]
    return Base2NovelSplit("flip", label_space(base_ids, ds.classnames), label_space(novel_ids, ds.classnames),
                           groups, [np.sort(t) for t in train], [np.sort(t) for t in local_test], base_test,
                           _indices_of(te_lab, novel_ids))


def harmonic_mean(*values: float) -> float:
    """n / Σ 1/v; 0 when any value is 0 (accuracies are >= 0; negative or non-finite values are an error)."""
    if not values:
        raise ValueError("harmonic_mean needs at least one value")
    vals = [float(v) for v in values]
    if any(not math.isfinite(v) or v < 0 for v in vals):
        raise ValueError(f"harmonic_mean: accuracies must be finite and >= 0, got {vals}")
    if any(v == 0.0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def hm_local_base_novel(local: float, base: float, novel: float) -> float:
    """The ``label_id`` convention's 3-way HM = 3 / (1/Local + 1/Base + 1/Novel)."""
    return harmonic_mean(local, base, novel)


def hm_base_novel(base: float, novel: float) -> float:
    """The ``flip`` convention's 2-way HM = 2 / (1/Base + 1/Novel)."""
    return harmonic_mean(base, novel)
