"""Base-to-novel splits, HM, validation split and dropout schedule against hand-written reference loops."""
import hashlib
import random

import numpy as np
import pytest

from fedml_pfedmoap.data import base2novel as b2n
from fedml_pfedmoap.data.base import ArraySplit, ImageDataset
from fedml_pfedmoap.data.partition import PartitionError
from fedml_pfedmoap.data.validation import validation_split
from fedml_pfedmoap.dropout import dropped_clients


def seed_of(*parts):
    """Hand-written copy of the documented stream recipe: sha256 of '/'-joined parts, low 63 bits little-endian."""
    d = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(d[:8], "little") % (2 ** 63)


def make_ds(classnames, n_train=20, n_test=5, seed=0):
    """Every class has n_train/n_test items; items are in a shuffled (non-sorted) label order."""
    rng = np.random.default_rng(seed)
    n = len(classnames)
    tr = rng.permutation(np.repeat(np.arange(n), n_train))
    te = rng.permutation(np.repeat(np.arange(n), n_test))
    img = lambda k: np.zeros((k, 2, 2), np.uint8)  # noqa: E731
    return ImageDataset("synthetic", list(classnames), ArraySplit(img(len(tr)), tr), ArraySplit(img(len(te)), te))


def numbered(n):
    return [f"class{j:03d}" for j in range(n)]


# (N classes, K clients) -> expected slice sizes, computed by hand from cpc = round(m/K) (half to even)
SIZES = {
    (47, 10): [2] * 9 + [6],   # DTD: m = 24
    (37, 10): [2] * 9 + [1],   # Pets: m = 19
    (100, 10): [5] * 10,       # Caltech: m = 50
    (50, 10): [2] * 9 + [7],   # m = 25: round(2.5) = 2
    (10, 5): [1] * 5,          # digits: m = 5
    (9, 2): [2, 3],            # m = 5: round(2.5) = 2
}


@pytest.mark.parametrize("n,k", sorted(SIZES))
def test_label_id_halves_slices_and_shots(n, k):
    ds = make_ds(numbered(n), n_train=20)
    split = b2n.split_label_id(ds, k, data_seed=7, shots=3)
    m = (n + 1) // 2
    assert split.base.ids == tuple(range(m)) and split.novel.ids == tuple(range(m, n))
    perm = np.random.default_rng(seed_of(7, "base2novel", "classes")).permutation(m).tolist()
    cpc = round(m / k)
    want = [perm[i * cpc:(i + 1) * cpc] for i in range(k - 1)] + [perm[(k - 1) * cpc:]]
    assert [len(g) for g in want] == SIZES[(n, k)]
    assert split.client_classes == [sorted(g) for g in want]
    labels = ds.train.labels
    for g, got in zip(want, split.train):
        ref = []
        for c in g:
            items = np.flatnonzero(labels == c)
            ref += np.random.default_rng(seed_of(7, "base2novel", "shots", c)).choice(items, 3, replace=False).tolist()
        assert sorted(ref) == got.tolist()
    for g, got in zip(want, split.local_test):
        assert got.tolist() == [i for i, y in enumerate(ds.test.labels.tolist()) if y in g]
    assert split.base_test.tolist() == [i for i, y in enumerate(ds.test.labels.tolist()) if y < m]
    assert split.novel_test.tolist() == [i for i, y in enumerate(ds.test.labels.tolist()) if y >= m]


def test_label_id_rejects_empty_last_client_and_bad_shots():
    with pytest.raises(PartitionError, match="last client"):
        b2n.split_label_id(make_ds(numbered(70)), 10, 0)  # m = 35, round(3.5) = 4, 9·4 = 36 > 35
    with pytest.raises(PartitionError, match="client_num_in_total"):
        b2n.split_label_id(make_ds(numbered(10)), 6, 0)
    with pytest.raises(PartitionError, match="data_args.shots"):
        b2n.split_label_id(make_ds(numbered(10)), 2, 0, shots=0)


def test_legacy_replays_python_random_seed_2023():
    n, k, shots = 47, 10, 4
    ds = make_ds(numbered(n), n_train=6, seed=3)
    split = b2n.split_label_id(ds, k, data_seed=123, shots=shots, legacy=True)
    m = 24
    r = random.Random(2023)
    class_list = list(range(m))
    r.shuffle(class_list)
    cpc = round(m / k)
    base_items = [i for i, y in enumerate(ds.train.labels.tolist()) if y < m]
    tracker = {}
    for i in base_items:
        tracker.setdefault(int(ds.train.labels[i]), []).append(i)
    for idx in range(k):
        mine = class_list[idx * cpc:] if idx == k - 1 else class_list[idx * cpc:(idx + 1) * cpc]
        ref = []
        for label, items in tracker.items():
            if label in mine:
                ref += r.sample(items, shots) if len(items) >= shots else items
        assert split.train[idx].tolist() == ref
        assert split.client_classes[idx] == sorted(mine)
        assert split.local_test[idx].tolist() == [i for i, y in enumerate(ds.test.labels.tolist()) if y in mine]
    assert b2n.split_label_id(ds, k, data_seed=999, shots=shots, legacy=True).train[0].tolist() == \
        split.train[0].tolist()


NAMES = ["zebra", "ant", "Mouse", "bee", "cat"]  # label order differs from sorted-name order


def test_label_order_differs_from_name_order_both_conventions():
    ds = make_ds(NAMES, n_train=12, n_test=4)
    lid = b2n.split_label_id(ds, 3, 0, shots=2)
    assert lid.base.names == ("zebra", "ant", "Mouse") and lid.novel.names == ("bee", "cat")
    flip = b2n.split_flip(ds, 2, 0, shots=5, alpha=1.0)
    # Python sorts uppercase first: Mouse < ant < bee < cat < zebra
    assert flip.base.ids == (2, 1, 3) and flip.base.names == ("Mouse", "ant", "bee")
    assert flip.novel.ids == (4, 0) and flip.novel.names == ("cat", "zebra")
    assert flip.base.remap([3, 2, 1]).tolist() == [2, 0, 1] and flip.novel.remap([0, 4]).tolist() == [1, 0]
    rep = b2n.order_report(NAMES)
    assert not rep.same_order and rep.to_novel == ("zebra",) and rep.to_base == ("bee",)
    assert b2n.order_report(sorted(NAMES)).same_order
    # FLiP few-shot pool: first `shots` of one permutation stream per base class (ascending id), split by Dirichlet
    rng = np.random.default_rng(seed_of(0, "base2novel-flip", "shots"))
    pool = sorted(sum((rng.permutation(np.flatnonzero(ds.train.labels == c))[:5].tolist() for c in (1, 2, 3)), []))
    got = np.concatenate(flip.train)
    assert sorted(got.tolist()) == pool and len(set(got.tolist())) == len(got)
    assert sorted(np.concatenate(flip.local_test).tolist()) == flip.base_test.tolist()


def test_sort_names_override_and_mismatch():
    ds = make_ds(NAMES)
    flip = b2n.split_flip(ds, 1, 0, shots=2, sort_names=["e", "d", "c", "b", "a"])
    assert flip.base.ids == (4, 3, 2) and flip.base.names == ("cat", "bee", "Mouse")
    with pytest.raises(PartitionError, match="sort_names"):
        b2n.split_flip(ds, 1, 0, sort_names=["a"])


@pytest.mark.parametrize("convention", ["label_id", "legacy", "flip"])
def test_no_base_class_leaks_into_novel_evaluation(convention):
    ds = make_ds(NAMES + ["dog", "Eel", "fox"], n_train=10, n_test=3)
    if convention == "flip":
        s = b2n.split_flip(ds, 2, 1, shots=4, alpha=1.0)
    else:
        s = b2n.split_label_id(ds, 2, 1, shots=4, legacy=convention == "legacy")
    assert not set(s.base.names) & set(s.novel.names)
    assert sorted(s.base.ids + s.novel.ids) == list(range(8))
    novel_labels = ds.test.labels[s.novel_test]
    assert set(novel_labels.tolist()) == set(s.novel.ids)
    assert [s.novel.names[j] for j in s.novel.remap(novel_labels)] == [ds.classnames[y] for y in novel_labels]
    with pytest.raises(ValueError):
        s.base.remap(novel_labels[:1])
    assert set(ds.test.labels[s.base_test].tolist()) == set(s.base.ids)
    for classes, tr, te in zip(s.client_classes, s.train, s.local_test):
        assert set(ds.train.labels[tr].tolist()) <= set(classes) <= set(s.base.ids)
        assert set(ds.test.labels[te].tolist()) <= set(s.base.ids)


def test_harmonic_means_by_hand():
    assert b2n.hm_local_base_novel(0.5, 0.25, 1.0) == pytest.approx(3 / (2 + 4 + 1))
    assert b2n.hm_base_novel(0.6, 0.3) == pytest.approx(2 / (1 / 0.6 + 1 / 0.3))
    assert b2n.hm_base_novel(80.0, 80.0) == pytest.approx(80.0)
    assert b2n.hm_local_base_novel(90.0, 0.0, 50.0) == 0.0 and b2n.hm_base_novel(0.0, 0.0) == 0.0
    for bad in ((-0.1, 0.5), (float("nan"), 0.5)):
        with pytest.raises(ValueError):
            b2n.hm_base_novel(*bad)


def test_validation_split_disjoint_deterministic_and_identical_for_any_method():
    ds = make_ds(numbered(10), n_train=16)
    train = b2n.split_label_id(ds, 5, 0, shots=None).train
    kept, val = validation_split(train, ds.train.labels, data_seed=5, fraction=0.25)
    for tr, k, v in zip(train, kept, val):
        assert not set(k.tolist()) & set(v.tolist()) and sorted(k.tolist() + v.tolist()) == sorted(tr.tolist())
        for c in np.unique(ds.train.labels[tr]):
            assert (ds.train.labels[v] == c).sum() == 4  # round(0.25 · 16)
    np.random.seed(1)
    random.seed(1)
    np.random.random(5)  # global state must not matter: another method may have drawn anything before
    again = validation_split(train, ds.train.labels, data_seed=5, fraction=0.25)
    assert all(np.array_equal(a, b) for a, b in zip(val, again[1]))
    other = validation_split(train, ds.train.labels, data_seed=6, fraction=0.25)[1]
    assert any(not np.array_equal(a, b) for a, b in zip(val, other))
    kept, val = validation_split(train, ds.train.labels, data_seed=5, per_class=99)
    for tr, k in zip(train, kept):  # capped: one training item per class stays
        assert len(k) == len(np.unique(ds.train.labels[tr]))
    assert all(len(v) == 0 for v in validation_split(train, ds.train.labels, 5)[1])


@pytest.mark.parametrize("kwargs,key", [({"fraction": 1.0}, "data_args.val_fraction"),
                                        ({"fraction": -0.1}, "data_args.val_fraction"),
                                        ({"fraction": "0.2"}, "data_args.val_fraction"),
                                        ({"per_class": -1}, "data_args.val_per_class"),
                                        ({"per_class": 1.5}, "data_args.val_per_class"),
                                        ({"fraction": 0.1, "per_class": 1}, "not both")])
def test_validation_split_bad_values_name_the_key(kwargs, key):
    with pytest.raises(PartitionError, match=key.replace(".", r"\.")):
        validation_split([np.arange(4)], np.zeros(4, np.int64), 0, **kwargs)


def test_dropout_schedule_same_for_every_method_and_per_seed():
    n, p = 20, 0.3
    selected = [1, 4, 5, 9, 12, 18]
    for t in range(5):
        u = np.random.default_rng(seed_of(11, "client-dropout", t)).random(n)
        assert dropped_clients(n, selected, p, 11, t) == [i for i in selected if u[i] < p]
        # a client's fate does not depend on who else was selected
        assert dropped_clients(n, selected, p, 11, t) == [i for i in dropped_clients(n, range(n), p, 11, t)
                                                          if i in selected]
    np.random.seed(0)
    a = [dropped_clients(n, range(n), p, 11, t) for t in range(50)]
    np.random.seed(1)
    random.seed(3)
    assert a == [dropped_clients(n, range(n), p, 11, t) for t in range(50)]
    assert a != [dropped_clients(n, range(n), p, 12, t) for t in range(50)]
    rate = sum(map(len, a)) / (50 * n)
    assert abs(rate - p) < 0.06
    assert dropped_clients(n, selected, 0.0, 11, 0) == []
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="train_args.client_dropout"):
            dropped_clients(n, selected, bad, 11, 0)
    with pytest.raises(ValueError, match="outside"):
        dropped_clients(n, [n], 0.1, 11, 0)

