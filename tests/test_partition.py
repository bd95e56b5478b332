"""Partitions (docs/data.md): the three schemes against hand-written loops, legacy modes, files and hashes."""
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from fedml_pfedmoap.data.base import DATASETS, ArraySplit, ImageDataset
from fedml_pfedmoap.data.partition import make_partition
from fedml_pfedmoap.data.splits import PartitionError, class_groups, saved_holdout, stratified_holdout


def synthetic(num_classes, n_train, n_test, seed=0, domains=None, name="synthetic"):
    """A tiny in-memory dataset: per-class counts ``n_train``/``n_test`` (int or list), shuffled item order."""
    rng = np.random.default_rng(seed)
    per = lambda n: n if isinstance(n, (list, tuple, np.ndarray)) else [n] * num_classes  # noqa: E731
    tr = rng.permutation(np.repeat(np.arange(num_classes), per(n_train)))
    te = rng.permutation(np.repeat(np.arange(num_classes), per(n_test)))
    img = lambda y: (np.arange(len(y))[:, None, None] % 251).astype(np.uint8) + np.zeros((1, 2, 2), np.uint8)  # noqa
    ds = ImageDataset(name, [f"c{k}" for k in range(num_classes)], ArraySplit(img(tr), tr, name),
                      ArraySplit(img(te), te, name))
    if domains:
        ds.domain_names = [f"d{d}" for d in range(domains)]
        ds.train_domains = rng.integers(0, domains, len(tr))
        ds.test_domains = rng.integers(0, domains, len(te))
    return ds


@DATASETS.register("test_partition_synthetic")
def _registered_synthetic(root=None, **_):
    """A registered in-memory dataset, so the config-driven tests avoid loading a real one."""
    return synthetic(10, 30, 10, seed=4, name="test_partition_synthetic")


# ------------------------------------------------------------------------------------------------- pathological
@pytest.mark.parametrize("c,n,sizes", [(37, 10, [4] * 9 + [1]), (47, 10, [5] * 9 + [2]), (102, 10, [10] * 9 + [12]),
                                       (101, 10, [10] * 9 + [11]), (100, 10, [10] * 10)])
def test_pathological_remainder_rule(c, n, sizes):
    ds = synthetic(c, 20, 5)
    part = make_partition(ds, "pathological", n, data_seed=3, shots=16)
    classes = [sorted(set(ds.train.labels[idx].tolist())) for idx in part.train]
    assert [len(x) for x in classes] == sizes
    flat = [k for x in classes for k in x]
    assert sorted(flat) == list(range(c))  # disjoint and covering
    for k, idx in enumerate(part.train):
        assert np.bincount(ds.train.labels[idx], minlength=c)[classes[k]].tolist() == [16] * len(classes[k])
        # test = all test images of the client's classes
        assert sorted(part.test[k].tolist()) == [i for i in range(len(ds.test)) if ds.test.labels[i] in classes[k]]


def test_pathological_matches_hand_written_loop():
    ds = synthetic(23, [30 - k for k in range(23)], 4, seed=5)
    part = make_partition(ds, "pathological", 5, data_seed=11, shots=8)
    rng = np.random.default_rng(11)
    order = rng.permutation(23)
    cpu = int(23 / 5 + 0.5)  # 4.6 -> 5
    want_train = []
    for k in range(5):
        cls = order[k * cpu:(k + 1) * cpu] if k < 4 else order[4 * cpu:]
        picked = []
        for c in sorted(cls.tolist()):
            idx = [i for i in range(len(ds.train)) if ds.train.labels[i] == c]
            take = idx if len(idx) <= 8 else rng.choice(np.array(idx), size=8, replace=False).tolist()
            picked += sorted(take)  # a class with <= k images is taken whole, without a draw
        want_train.append(picked)
    assert [x.tolist() for x in part.train] == want_train


def test_pathological_rejects_empty_last_client_and_spread_option():
    with pytest.raises(PartitionError, match="non-empty last client"):
        class_groups(list(range(15)), 10)  # round(1.5) = 2 -> 9·2 = 18 >= 15
    spread = class_groups(list(range(37)), 10, remainder="spread")
    assert [len(g) for g in spread] == [4] * 7 + [3] * 3 and sum(spread, []) == list(range(37))
    assert [len(g) for g in class_groups(list(range(25)), 10, rounding="half_even")] == [2] * 9 + [7]
    with pytest.raises(PartitionError):
        class_groups(list(range(25)), 10, rounding="half_up")  # round half up: 3 -> 27 >= 25


def test_pathological_few_images_takes_all_and_warns(caplog):
    ds = synthetic(4, [20, 3, 20, 20], 2)
    part = make_partition(ds, "pathological", 2, data_seed=0, shots=16)
    counts = np.bincount(np.concatenate([ds.train.labels[x] for x in part.train]), minlength=4)
    assert counts.tolist() == [16, 3, 16, 16] and "fewer than 16" in caplog.text


# ------------------------------------------------------------------------------------------------------ dirichlet
def reference_dirichlet(tr, te, n, beta, min_size, seed):
    """docs/data.md written as explicit loops, drawing from default_rng(seed) in the documented order."""
    rng = np.random.default_rng(seed)
    while True:
        train, test = [[] for _ in range(n)], [[] for _ in range(n)]
        for k in sorted(set(tr.tolist()) | set(te.tolist())):
            tk = rng.permutation(np.array([i for i in range(len(tr)) if tr[i] == k]))
            sk = rng.permutation(np.array([i for i in range(len(te)) if te[i] == k]))
            p = rng.dirichlet([beta] * n)
            p = np.array([p[j] if len(train[j]) < len(tr) / n else 0.0 for j in range(n)])
            p = p / p.sum()
            for lists, items in ((train, tk), (test, sk)):
                acc, start = 0.0, 0
                for j in range(n):
                    acc += p[j]
                    stop = len(items) if j == n - 1 else int(acc * len(items))
                    lists[j] += items[start:stop].tolist()
                    start = stop
        if min(min(map(len, train)), min(map(len, test))) >= min_size:
            return [rng.permutation(x).tolist() for x in train], [rng.permutation(x).tolist() for x in test]


def test_dirichlet_matches_reference_and_proportions():
    ds = synthetic(10, [60 + 7 * k for k in range(10)], [20 + k for k in range(10)], seed=2)
    part = make_partition(ds, "dirichlet", 8, data_seed=4, alpha=0.5, min_size=10)
    want_tr, want_te = reference_dirichlet(ds.train.labels, ds.test.labels, 8, 0.5, 10, 4)
    assert [x.tolist() for x in part.train] == want_tr and [x.tolist() for x in part.test] == want_te
    h = part.histograms(ds)
    n_tr, n_te = np.bincount(ds.train.labels), np.bincount(ds.test.labels)
    # same proportions: each client's share of class k in train and test differs only by the floor cuts
    diff = np.abs(h["train"] / n_tr - h["test"] / n_te)
    assert (diff <= 1.0 / n_te + 1.0 / n_tr + 1e-12).all()
    assert min(h["train"].sum(1).min(), h["test"].sum(1).min()) >= 10
    assert sorted(np.concatenate(part.train).tolist()) == list(range(len(ds.train)))  # disjoint and covering


def test_dirichlet_retry_bound_raises_clear_error():
    ds = synthetic(3, 40, 40)  # 120 items per split: enough for 4 clients × 25, but a skewed draw rarely gives it
    with pytest.raises(PartitionError, match=r"min_size=25 .* after 7 attempts \(largest minimum seen: \d+\)"):
        make_partition(ds, "dirichlet", 4, data_seed=0, alpha=0.05, min_size=25, max_attempts=7)


@pytest.mark.parametrize("clients,min_size", [(1000, 10), (700, 1), (130, 10)])
def test_dirichlet_with_too_few_samples_says_so(clients, min_size):
    ds = synthetic(10, 120, 60)  # 1,200 training and 600 test images
    with pytest.raises(PartitionError, match=rf"too few samples for {clients} clients: 1200 training and 600 test "
                                             rf"images, .*\({clients * min_size} per split\); use fewer clients"):
        make_partition(ds, "dirichlet", clients, data_seed=0, alpha=0.5, min_size=min_size)


def test_domain_dirichlet_domain_major_ids():
    ds = synthetic(5, 40, 10, seed=1, domains=3)
    part = make_partition(ds, "domain_dirichlet", 6, data_seed=2, alpha=0.3, min_size=2, clients_per_domain=2)
    for cid in range(6):
        assert set(ds.train_domains[part.train[cid]].tolist()) == {cid // 2}
        assert set(ds.test_domains[part.test[cid]].tolist()) == {cid // 2}
    for d in range(3):  # each domain fully split among its own clients
        got = sorted(np.concatenate([part.train[2 * d], part.train[2 * d + 1]]).tolist())
        assert got == np.flatnonzero(ds.train_domains == d).tolist()


# -------------------------------------------------------------------------------------------------- files, seeds
def test_same_data_seed_identical_file_and_hash(tmp_path):
    ds = synthetic(10, 30, 10)
    a = make_partition(ds, "dirichlet", 5, 7, out_dir=tmp_path / "a", alpha=0.5, min_size=5)
    b = make_partition(ds, "dirichlet", 5, 7, out_dir=tmp_path / "b", alpha=0.5, min_size=5)
    assert a.hash == b.hash and a.path.name == b.path.name == f"dirichlet-{a.hash}.json"
    assert a.path.read_bytes() == b.path.read_bytes()
    c = make_partition(ds, "dirichlet", 5, 8, out_dir=tmp_path / "a", alpha=0.5, min_size=5)
    assert c.hash != a.hash and any(not np.array_equal(x, y) for x, y in zip(a.train, c.train))
    blob = json.loads(a.path.read_text())
    assert blob["hash"] == a.hash and blob["args"]["data_seed"] == 7
    assert np.array_equal(np.asarray(blob["histogram_train"]), a.histograms(ds)["train"])


def test_existing_file_is_reused_not_regenerated(tmp_path):
    ds = synthetic(10, 30, 10)
    a = make_partition(ds, "pathological", 5, 0, out_dir=tmp_path, shots=4)
    blob = json.loads(a.path.read_text())
    blob["train"][0] = blob["train"][0][:1]  # a visible edit: a regenerated partition would not have it
    a.path.write_text(json.dumps(blob))
    b = make_partition(ds, "pathological", 5, 0, out_dir=tmp_path, shots=4)
    assert len(b.train[0]) == 1


def _cfg(tmp_path, seed, data_seed=0):
    from fedml_pfedmoap.config import from_dict

    return from_dict({"common_args": {"random_seed": seed, "data_seed": data_seed, "cache_dir": str(tmp_path)},
                      "data_args": {"dataset": "test_partition_synthetic", "partition_method": "dirichlet",
                                    "partition_alpha": 0.5,
                                    "min_size": 5},
                      "train_args": {"client_num_in_total": 10}})


def test_training_seed_does_not_change_partition(tmp_path):
    from benchmark_suite.partition_cmd import build_partition

    _, a = build_partition(_cfg(tmp_path, seed=0))
    _, b = build_partition(_cfg(tmp_path, seed=123))
    _, c = build_partition(_cfg(tmp_path, seed=0, data_seed=1))
    assert a.hash == b.hash and all(np.array_equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test))
    assert c.hash != a.hash


def test_partition_options_and_split_source_enter_the_hash():
    ds = synthetic(37, 20, 5)
    a = make_partition(ds, "pathological", 10, 0, shots=16)
    b = make_partition(ds, "pathological", 10, 0, shots=16, remainder="spread")
    assert a.hash != b.hash and [len(set(ds.train.labels[x])) for x in b.train] == [4] * 7 + [3] * 3
    ds.split_source = "torchvision"
    assert make_partition(ds, "pathological", 10, 0, shots=16).hash != a.hash


def test_stratified_holdout_saved_and_reused(tmp_path):
    labels = np.repeat(np.arange(4), [10, 10, 5, 3])
    tr, te = stratified_holdout(labels, 0.2, seed=1)
    assert np.bincount(labels[te]).tolist() == [2, 2, 1, 1] and sorted(tr.tolist() + te.tolist()) == list(range(28))
    keys = [f"k{i}" for i in range(28)]
    a = saved_holdout("x", keys, labels, 0.2, 1, tmp_path)
    b = saved_holdout("x", keys, labels, 0.2, 1, tmp_path)
    assert a[2] == b[2] and np.array_equal(a[0], tr) and (tmp_path / "x" / f"holdout-{a[2]}.json").is_file()


# ------------------------------------------------------------------------------------------------------- legacy
def test_legacy_pathological_replays_the_reference_call_order():
    ds = synthetic(11, [20, 4, 20, 20, 20, 20, 20, 20, 20, 20, 20], 3, seed=9)
    state = random.getstate()
    part = make_partition(ds, "legacy_pathological", 4, data_seed=99, shots=5)
    assert random.getstate() == state  # the global `random` is untouched
    # the reference, as explicit global-`random` code: seed 2023, shuffle, round(), tracker order, random.sample
    random.seed(2023)
    cls = list(range(11))
    random.shuffle(cls)
    cpu = int(round(11 / 4))
    tracker = {}
    for i, y in enumerate(ds.train.labels.tolist()):
        tracker.setdefault(y, []).append(i)
    want = []
    for k in range(4):
        mine = cls[k * cpu:(k + 1) * cpu] if k < 3 else cls[k * cpu:]
        out = []
        for lab, items in tracker.items():
            if lab in mine:
                out += random.sample(items, 5) if len(items) >= 5 else items
        want.append(out)
    random.setstate(state)
    assert [x.tolist() for x in part.train] == want
    other = make_partition(ds, "legacy_pathological", 4, data_seed=1, shots=5)  # the reference ignores --seed
    assert [x.tolist() for x in other.train] == want and other.hash != part.hash


def test_legacy_dirichlet_equals_global_numpy_and_leaves_it_alone():
    ds = synthetic(6, 40, 12, seed=3)
    before = np.random.get_state()[1].copy()
    part = make_partition(ds, "legacy_dirichlet", 5, data_seed=21, alpha=0.5, min_size=10)
    assert np.array_equal(np.random.get_state()[1], before)
    saved = np.random.get_state()
    np.random.seed(21)  # the reference: global NumPy seeded by the run seed, NIID-Bench loop
    tr_l, te_l = ds.train.labels, ds.test.labels
    min_size = 0
    while min_size < 10:
        btr, bte = [[] for _ in range(5)], [[] for _ in range(5)]
        for k in range(6):
            tk, sk = np.where(tr_l == k)[0], np.where(te_l == k)[0]
            np.random.shuffle(tk)
            np.random.shuffle(sk)
            p = np.random.dirichlet(np.repeat(0.5, 5))
            p = np.array([q * (len(b) < len(tr_l) / 5) for q, b in zip(p, btr)])
            p = p / p.sum()
            btr = [b + x.tolist() for b, x in zip(btr, np.split(tk, (np.cumsum(p) * len(tk)).astype(int)[:-1]))]
            bte = [b + x.tolist() for b, x in zip(bte, np.split(sk, (np.cumsum(p) * len(sk)).astype(int)[:-1]))]
            min_size = min(min(map(len, btr)), min(map(len, bte)))
    for j in range(5):
        np.random.shuffle(btr[j])
        np.random.shuffle(bte[j])
    np.random.set_state(saved)
    assert [x.tolist() for x in part.train] == btr and [x.tolist() for x in part.test] == bte


def test_legacy_domain_dirichlet_cannot_retry():
    ds = synthetic(4, 3, 1, seed=0, domains=2)
    with pytest.raises(PartitionError, match="retrying cannot help"):
        make_partition(ds, "legacy_domain_dirichlet", 10, 0, alpha=0.3, min_size=50, clients_per_domain=5)


def test_legacy_pachinko_sizes_and_split_back(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import fixtures_data as F
    from fedml_pfedmoap.data.base import build_dataset

    root = tmp_path
    F.make_cifar(root, "cifar100", per_class_train=5, per_class_test=1)
    ds = build_dataset("cifar100", str(root))
    part = make_partition(ds, "legacy_pachinko", 10, data_seed=0, alpha=0.5)
    sizes = [len(a) + len(b) for a, b in zip(part.train, part.test)]
    assert sizes == [600 // 10] * 10  # n // N draws per client from the pooled 600 items
    pooled = np.concatenate([np.concatenate(part.train), np.concatenate(part.test) + len(ds.train)])
    assert len(set(pooled.tolist())) == 600  # every item drawn once
    again = make_partition(ds, "legacy_pachinko", 10, data_seed=0, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(part.train, again.train))


# ---------------------------------------------------------------------------------------------------------- CLI
def test_partition_command_writes_png(tmp_path, capsys):
    from PIL import Image

    from benchmark_suite.cli import main

    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"common_args: {{cache_dir: {tmp_path / 'cache'}, data_seed: 0}}\n"
                   "data_args: {dataset: test_partition_synthetic, partition_method: pathological, shots: 8}\n"
                   "train_args: {client_num_in_total: 5}\n")
    png = tmp_path / "hist.png"
    assert main(["partition", "--config", str(cfg), "--png", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    out = capsys.readouterr().out
    assert "client 4 |" in out and "partition " in out
    files = list((tmp_path / "cache" / "partitions" / "test_partition_synthetic").glob("pathological-*.json"))
    assert len(files) == 1 and files[0].stem.split("-")[1] in out


# -------------------------------------------------------------------------------------------------------- configs
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# docs/algorithms.md §Paper settings (paper Table 5): clients, clients per round, rounds, shots, partition, backbone
FEW_SHOT = (10, 10, 10, 16, "pathological", "RN50")
PAPER = {"caltech101": FEW_SHOT, "oxford_flowers": FEW_SHOT, "oxford_pets": FEW_SHOT, "food101": FEW_SHOT,
         "dtd": FEW_SHOT, "cifar10": (100, 10, 120, None, "dirichlet", "RN50"),
         "cifar100": (100, 10, 120, None, "dirichlet", "RN50"),
         "domainnet": (30, 7, 25, None, "domain_dirichlet", "ViT-B-16"),
         "office_caltech10": (20, 10, 25, None, "domain_dirichlet", "ViT-B-16")}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dataset_configs_hold_the_paper_setting(name):
    from fedml_pfedmoap.config import load_config
    from fedml_pfedmoap.data.base import DATASETS
    from fedml_pfedmoap.data.partition import PARTITIONERS
    import fedml_pfedmoap.data.loaders  # noqa: F401

    cfg = load_config(CONFIGS / "datasets" / f"{name}.yaml")
    d, t = cfg.data_args, cfg.train_args
    got = (t.client_num_in_total, t.client_num_per_round, t.comm_round, d.shots, d.partition_method,
           cfg.model_args.model.replace("-quickgelu", ""))
    assert got == PAPER[name] and d.dataset == name and name in DATASETS and d.partition_method in PARTITIONERS
    alpha = {"dirichlet": 0.5, "domain_dirichlet": 0.3}.get(d.partition_method)
    assert alpha is None or d.partition_alpha == alpha


def test_benchmark_grids_expand_with_paper_split_labels():
    import yaml

    from benchmark_suite.grid import expand_grid
    from fedml_pfedmoap.config import load_config

    paper = yaml.safe_load((CONFIGS.parent / "benchmark_suite" / "paper_results.yaml").read_text())
    want = {1: ["oxford_flowers", "oxford_pets", "food101", "caltech101", "dtd"], 2: ["cifar10", "cifar100"],
            3: ["domainnet"], 4: ["office_caltech10"]}
    for k, datasets in want.items():
        cells = expand_grid(load_config(CONFIGS / "benchmarks" / f"paper_table{k}.yaml"))
        assert sorted({c.dataset for c in cells}) == sorted(datasets)
        assert {c.seed for c in cells} == {0, 1, 2}
        for c in cells:
            assert c.split in paper[c.dataset], (k, c.dataset, c.split)
            fed = PAPER[c.dataset]
            assert (c.cfg.train_args.client_num_in_total, c.cfg.train_args.comm_round) == (fed[0], fed[2])


def test_partition_command_on_a_dataset_config_with_fake_data(tmp_path, capsys):
    """configs/datasets/domainnet.yaml + a fake FedBN tree -> 30 domain-major clients, file and PNG."""
    from benchmark_suite.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    import fixtures_data as F

    F.make_fedbn(tmp_path / "data", "domainnet")
    png = tmp_path / "dn.png"
    rc = main(["partition", "--config", str(CONFIGS / "datasets" / "domainnet.yaml"), "--png", str(png),
               "--set", f"data_args.data_root={tmp_path / 'data'}", "--set", f"common_args.cache_dir={tmp_path / 'c'}"])
    assert rc == 0 and png.is_file()
    out = capsys.readouterr().out
    assert "client 29 |" in out and "domainnet, domain_dirichlet, 30 clients" in out
    assert len(list((tmp_path / "c" / "partitions" / "domainnet").glob("domain_dirichlet-*.json"))) == 1
