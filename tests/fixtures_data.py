"""Tiny fake dataset trees in the users' real on-disk layouts (docs/data.md), for the loader and partition tests.

Every image is a small solid-colour JPEG whose colour encodes its label (``label_color``/``decode_label``), so a test
can check path–label alignment through the pixels. Each ``make_*`` returns a ``Manifest``: the expected class names in
label order and, per split, a map from the image path (relative to the loader's image root) to its label.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

STEP = 60  # 5 levels per channel -> 125 distinguishable colours, far apart compared with JPEG error


def label_color(label: int) -> Tuple[int, int, int]:
    return (STEP * (label // 25 % 5), STEP * (label // 5 % 5), STEP * (label % 5))


def decode_label(img: Image.Image) -> int:
    r, g, b = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    q = [int(round(v / STEP)) for v in (r, g, b)]
    return q[0] * 25 + q[1] * 5 + q[2]


def write_jpeg(path: Path, label: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), label_color(label)).save(path, "JPEG", quality=95)


@dataclass
class Manifest:
    classnames: List[str]
    train: Dict[str, int] = field(default_factory=dict)
    test: Dict[str, int] = field(default_factory=dict)
    extra: Dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------- CoOp
# (relpath pattern, class names in LABEL order, folder names on disk) - labels deliberately not alphabetical
COOP = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   ["face", "accordion", "airplane", "leopard"], ["Faces", "accordion", "airplanes", "Leopards"]),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    ["saint_bernard", "abyssinian", "american_bulldog"],
                    ["saint_bernard", "Abyssinian", "american_bulldog"]),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"], None),
    "food101": ("food-101", "images", "split_zhou_Food101.json", ["waffles", "apple_pie", "baby_back_ribs"],
                ["waffles", "apple_pie", "baby_back_ribs"]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", ["zigzagged", "banded", "blotchy"],
            ["zigzagged", "banded", "blotchy"]),
}


def _coop_relpath(name: str, folder_class: str, k: int, flat_id: int) -> str:
    if name == "caltech101":
        return f"{folder_class}/image_{k + 1:04d}.jpg"
    if name == "oxford_pets":
        return f"{folder_class}_{k + 1}.jpg"
    if name == "oxford_flowers":
        return f"image_{flat_id:05d}.jpg"
    if name == "food101":
        return f"{folder_class}/{100000 + 37 * flat_id}.jpg"
    return f"{folder_class}/{folder_class}_{k + 1:04d}.jpg"


def make_coop(root: Path, name: str, folder: str | None = None, per_class: Sequence[int] = (3, 1, 2),
              write_images: bool = True, image_root: Path | None = None) -> Manifest:
    """CoOp layout: ``<root>/<folder>/<image_dir>/...`` plus a hand-written ``split_zhou_*.json`` (shuffled rows)."""
    default_folder, image_dir, split_file, names, folders = COOP[name]
    ds_dir = root / (folder or default_folder)
    img_root = image_root or ds_dir / image_dir
    man = Manifest(list(names))
    rows: Dict[str, list] = {"train": [], "val": [], "test": []}
    flat = 1
    for lab in reversed(range(len(names))):  # write classes in reverse label order: first appearance != label order
        fc = folders[lab] if folders else ""
        for split, count in zip(("train", "val", "test"), per_class):
            for _ in range(count):
                k = flat
                rel = _coop_relpath(name, fc, k, flat)
                flat += 1
                rows[split].append([rel, lab, names[lab]])
                if write_images:
                    write_jpeg(img_root / rel, lab)
                if split != "val":
                    getattr(man, split)[rel] = lab
    ds_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in rows:
        rows[split] = [rows[split][i] for i in rng.permutation(len(rows[split]))]
    (ds_dir / split_file).write_text(json.dumps(rows))
    man.extra["split_file"] = ds_dir / split_file
    man.extra["image_root"] = img_root
    return man


# ---------------------------------------------------------------------------------------------------- torchvision
def make_tv_caltech(root: Path, per_class: int = 6) -> Manifest:
    cat = root / "caltech101" / "101_ObjectCategories"
    folders = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "accordion", "airplanes"]
    kept = ["Faces", "Leopards", "accordion", "airplanes"]  # sorted, BACKGROUND_Google and Faces_easy dropped
    man = Manifest(["face", "leopard", "accordion", "airplane"])
    for f in folders:
        lab = kept.index(f) if f in kept else 99
        for k in range(per_class):
            write_jpeg(cat / f / f"image_{k + 1:04d}.jpg", lab)
            if f in kept:
                man.extra.setdefault("all", {})[f"{f}/image_{k + 1:04d}.jpg"] = lab
    return man


def make_tv_pets(root: Path) -> Manifest:
    base = root / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 3, 1)]
    man = Manifest([b.lower() for b, _, _ in breeds])
    lines = {"trainval.txt": [], "test.txt": []}
    for b, cid, species in reversed(breeds):
        for n in range(1, 5):
            fname = "trainval.txt" if n <= 3 else "test.txt"
            lines[fname].append(f"{b}_{n} {cid} {species} {n}")
            write_jpeg(base / "images" / f"{b}_{n}.jpg", cid - 1)
            (man.train if n <= 3 else man.test)[f"{b}_{n}.jpg"] = cid - 1
    (base / "annotations").mkdir(parents=True)
    for fname, ls in lines.items():
        (base / "annotations" / fname).write_text("\n".join(ls) + "\n")
    return man


def make_tv_flowers(root: Path) -> Manifest:
    from scipy.io import savemat
    import torchvision.datasets as tvd

    base = root / "flowers-102"
    labels1 = np.array([3, 1, 2, 1, 3, 2, 2, 1, 3])  # 1-based, image_00001 .. image_00009
    for i, lab in enumerate(labels1):
        write_jpeg(base / "jpg" / f"image_{i + 1:05d}.jpg", int(lab) - 1)
    savemat(str(base / "imagelabels.mat"), {"labels": labels1.reshape(1, -1)})
    trn, val, tst = np.array([[2, 5, 7]]), np.array([[1]]), np.array([[3, 4, 6, 8, 9]])
    savemat(str(base / "setid.mat"), {"trnid": trn, "valid": val, "tstid": tst})
    man = Manifest(list(tvd.Flowers102.classes))
    man.train = {f"image_{i:05d}.jpg": int(labels1[i - 1]) - 1 for i in trn.ravel()}
    man.test = {f"image_{i:05d}.jpg": int(labels1[i - 1]) - 1 for i in tst.ravel()}
    return man


def make_tv_food(root: Path) -> Manifest:
    base = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "waffles"]  # torchvision: sorted keys of meta json
    man = Manifest(list(classes))
    meta = {"train": {}, "test": {}}
    for lab, c in enumerate(classes):
        for n in range(5):
            split = "train" if n < 3 else "test"
            img_id = f"{c}/{(lab + 1) * 1000 + n * 7}"
            meta[split].setdefault(c, []).append(img_id)
            write_jpeg(base / "images" / f"{img_id}.jpg", lab)
            getattr(man, split)[f"{img_id}.jpg"] = lab
    (base / "meta").mkdir(parents=True)
    for split in meta:
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    (base / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    return man


def make_tv_dtd(root: Path) -> Manifest:
    base = root / "dtd" / "dtd"  # the doubled dtd/dtd of torchvision's archive
    classes = ["banded", "blotchy", "zigzagged"]
    man = Manifest(list(classes))
    lines = {"train1.txt": [], "val1.txt": [], "test1.txt": []}
    for lab, c in enumerate(classes):
        for n, fname in enumerate(["train1.txt", "train1.txt", "val1.txt", "test1.txt", "test1.txt"]):
            rel = f"{c}/{c}_{n + 1:04d}.jpg"
            write_jpeg(base / "images" / rel, lab)
            lines[fname].append(rel)
            if fname != "val1.txt":
                (man.train if fname.startswith("train") else man.test)[rel] = lab
    (base / "labels").mkdir(parents=True)
    for fname, ls in lines.items():
        (base / "labels" / fname).write_text("\n".join(ls) + "\n")
    return man


# ------------------------------------------------------------------------------------------------------------ CIFAR
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_rows(labels: Sequence[int]) -> np.ndarray:
    rows = np.zeros((len(labels), 3072), np.uint8)
    for i, lab in enumerate(labels):
        img = np.zeros((32, 32, 3), np.uint8) + np.array(label_color(lab), np.uint8)
        rows[i] = img.transpose(2, 0, 1).reshape(-1)
    return rows


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar(root: Path, name: str, per_class_train: int = 2, per_class_test: int = 1) -> Manifest:
    rng = np.random.default_rng(1)
    if name == "cifar10":
        base, names = root / "cifar-10-batches-py", CIFAR10_NAMES
        tr = rng.permutation(np.repeat(np.arange(10), per_class_train)).tolist()
        te = rng.permutation(np.repeat(np.arange(10), per_class_test)).tolist()
        chunks = np.array_split(np.arange(len(tr)), 5)
        for b, ch in enumerate(chunks):
            labs = [tr[i] for i in ch]
            _dump(base / f"data_batch_{b + 1}", {"data": _cifar_rows(labs), "labels": labs,
                                                 "batch_label": f"training batch {b + 1} of 5"})
        _dump(base / "test_batch", {"data": _cifar_rows(te), "labels": te})
        _dump(base / "batches.meta", {"label_names": names, "num_cases_per_batch": 10000})
        return Manifest(list(names), extra={"train_labels": tr, "test_labels": te})
    base, names = root / "cifar-100-python", [f"fine_{k:02d}" for k in range(100)]
    coarse_of = (np.arange(100) * 7) % 20  # a fixed fine -> coarse map (every coarse has 5 fine classes)
    tr = rng.permutation(np.repeat(np.arange(100), per_class_train)).tolist()
    te = rng.permutation(np.repeat(np.arange(100), per_class_test)).tolist()
    for fname, labs in (("train", tr), ("test", te)):
        _dump(base / fname, {"data": _cifar_rows(labs), "fine_labels": labs,
                             "coarse_labels": coarse_of[labs].tolist()})
    _dump(base / "meta", {"fine_label_names": names, "coarse_label_names": [f"coarse_{k}" for k in range(20)]})
    return Manifest(list(names), extra={"train_labels": tr, "test_labels": te, "coarse_of": coarse_of})


# -------------------------------------------------------------------------------------------------- DomainNet/Office
DOMAIN_SPECS = {
    "domainnet": ("DomainNet", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
                  ["bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill", "wine_glass",
                   "zebra"]),
    "office_caltech10": ("office_caltech_10", ["amazon", "caltech", "dslr", "webcam"],
                         ["back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor",
                          "mouse", "mug", "projector"]),
}


def _domain_file(name: str, dom: str, cls: str, n: int) -> str:
    return f"{dom}_{n:03d}_{n * 13 % 997:06d}.jpg" if name == "domainnet" else f"frame_{n:04d}.jpg"


def make_fedbn(root: Path, name: str, train_per_class: int = 4, test_per_class: int = 2) -> Manifest:
    """FedBN pickles ``<folder>/{site}_{train,test}.pkl`` with deliberately non-sorted (paths, text labels)."""
    folder, domains, classes = DOMAIN_SPECS[name]
    man = Manifest(list(classes), extra={"pickles": {}})
    rng = np.random.default_rng(7)
    n = 0
    for dom in domains:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            rows = []
            for lab, cls in enumerate(classes):
                for _ in range(count):
                    n += 1
                    rel = f"{folder}/{dom}/{cls}/{_domain_file(name, dom, cls, n)}"
                    write_jpeg(root / rel, lab)
                    rows.append((rel, cls))
                    getattr(man, split)[rel] = lab
            rows = [rows[i] for i in rng.permutation(len(rows))]  # non-sorted, so D9 indexing would misalign
            paths, labels = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
            _dump(root / folder / f"{dom}_{split}.pkl", (paths, labels))
            man.extra["pickles"][(dom, split)] = (paths.tolist(), labels.tolist())
    return man


def make_imagefolder(root: Path, name: str, per_class: int = 5) -> Manifest:
    """``<root>/<folder>/<domain>/<class>/*.jpg`` (plus an extra class folder that must be ignored)."""
    folder, domains, classes = DOMAIN_SPECS[name]
    man = Manifest(list(classes), extra={"all": {}})
    for dom in domains:
        for lab, cls in enumerate(classes):
            for k in range(per_class):
                rel = f"{dom}/{cls}/{_domain_file(name, dom, cls, k + 1)}"
                write_jpeg(root / folder / rel, lab)
                man.extra["all"][rel] = lab
        write_jpeg(root / folder / dom / "aircraft_carrier" / "x_0001.jpg", 124)
    return man
