"""torchvision's on-disk layouts of the five CoOp datasets (``download=False``; docs/data.md), read by our own code.

The splits are torchvision's (``split_source: torchvision``), not CoOp's, so the sizes differ from the paper's; prefer
the CoOp split JSON. Caltech101 has no official split: a seeded stratified 50/20/30 train/val/test split is generated
(val dropped) and saved like a partition when ``split_dir`` is given. Class names follow CoOp's conventions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from ...fileio import file_hexdigest
from ..base import FileSplit, ImageDataset
from ..splits import saved_holdout
from .common import Probe, check_files, classnames_from_pairs, folder_candidates, list_dirs, list_images
from .specs import SPECS

# CoOp renames four Caltech101 folders and ignores two (BACKGROUND_Google, Faces_easy): 100 classes
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def _dataset(name: str, names: List[str], root: Path, tr: Tuple[List[str], List[int]],
             te: Tuple[List[str], List[int]], source: str) -> ImageDataset:
    return ImageDataset(name=name, classnames=names, train=FileSplit(root, *tr), test=FileSplit(root, *te),
                        template=SPECS[name].template, split_source=source)


def read_caltech101(probe: Probe) -> ImageDataset:
    spec = SPECS["caltech101"]
    cat_dir = probe.require([f / "101_ObjectCategories" for f in
                             folder_candidates(probe.root, ("caltech101", "caltech-101"))], "dir")
    classes = [c for c in list_dirs(cat_dir) if c not in CALTECH_IGNORED]
    keys, labels = [], []
    for lab, c in enumerate(classes):
        files = list_images(cat_dir / c)
        keys += [f"{c}/{f}" for f in files]
        labels += [lab] * len(files)
    if not keys:
        raise probe.fail(f"no images under {cat_dir}/<class>/", spec.tv_expected)
    y = np.asarray(labels, np.int64)
    tr, te, h = saved_holdout("caltech101", keys, y, 0.3, int(probe.options.get("split_seed") or 0),
                              probe.options.get("split_dir"), val_fraction=0.2)
    names = [CALTECH_RENAMED.get(c, c) for c in classes]
    return _dataset("caltech101", names, cat_dir, ([keys[i] for i in tr], y[tr].tolist()),
                    ([keys[i] for i in te], y[te].tolist()), f"stratified-{h}")


def read_oxford_pets(probe: Probe) -> ImageDataset:
    spec = SPECS["oxford_pets"]
    folder = probe.require([f / "annotations" / "trainval.txt" for f in
                            folder_candidates(probe.root, ("oxford-iiit-pet", "oxford_pets"))], "file").parent.parent
    out, pairs = {}, []
    for split, fname in (("train", "trainval.txt"), ("test", "test.txt")):
        path = folder / "annotations" / fname
        if not probe.look(path, "file"):
            raise probe.fail(f"{path} is missing", spec.tv_expected)
        rels, labs = [], []
        for line in path.read_text().splitlines():
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 4:
                raise probe.fail(f"{path}: line {line!r} is not 'name class_id species breed_id'", spec.tv_expected)
            lab = int(parts[1]) - 1
            rels.append(f"{parts[0]}.jpg")
            labs.append(lab)
            pairs.append((lab, parts[0].rsplit("_", 1)[0].lower()))
        out[split] = (rels, labs)
    names = classnames_from_pairs(probe, pairs, spec.tv_expected)
    img = folder / "images"
    check_files(probe, img, out["train"][0] + out["test"][0], spec.tv_expected)
    return _dataset("oxford_pets", names, img, out["train"], out["test"], "torchvision")


def read_oxford_flowers(probe: Probe) -> ImageDataset:
    from scipy.io import loadmat

    spec = SPECS["oxford_flowers"]
    folder = probe.require([f / "setid.mat" for f in folder_candidates(probe.root, ("flowers-102", "oxford_flowers"))],
                           "file").parent
    labels_mat = folder / "imagelabels.mat"
    if not probe.look(labels_mat, "file"):
        raise probe.fail(f"{labels_mat} is missing", spec.tv_expected)
    if probe.options.get("verify_md5"):
        import torchvision.datasets as tvd

        for key, fname in (("label", "imagelabels.mat"), ("setid", "setid.mat")):
            if file_hexdigest(folder / fname, "md5") != tvd.Flowers102._file_dict[key][1]:
                raise probe.fail(f"{folder / fname}: md5 mismatch (corrupted or not the official file)",
                                 spec.tv_expected)
    try:
        labels = np.asarray(loadmat(str(labels_mat))["labels"]).reshape(-1).astype(np.int64) - 1
        setid = loadmat(str(folder / "setid.mat"))
        tr_ids = np.asarray(setid["trnid"]).reshape(-1).astype(np.int64)
        te_ids = np.asarray(setid["tstid"]).reshape(-1).astype(np.int64)
    except (KeyError, ValueError, OSError) as err:
        raise probe.fail(f"cannot read imagelabels.mat/setid.mat ({err})", spec.tv_expected) from None
    cat = folder / "cat_to_name.json"
    if probe.look(cat, "file"):  # CoOp's names, keyed "1".."102"
        mapping = json.loads(cat.read_text())
        names = [mapping[str(j + 1)] for j in range(len(mapping))]
    else:
        import torchvision.datasets as tvd

        names = list(tvd.Flowers102.classes)
    rel = lambda ids: [f"image_{int(i):05d}.jpg" for i in ids]  # noqa: E731
    tr = (rel(tr_ids), labels[tr_ids - 1].tolist())
    te = (rel(te_ids), labels[te_ids - 1].tolist())
    check_files(probe, folder / "jpg", tr[0] + te[0], spec.tv_expected)
    return _dataset("oxford_flowers", names, folder / "jpg", tr, te, "torchvision")


def read_food101(probe: Probe) -> ImageDataset:
    spec = SPECS["food101"]
    meta = probe.require([f / "meta" / "train.json" for f in folder_candidates(probe.root, ("food-101", "food101"))],
                         "file").parent
    out = {}
    for split in ("train", "test"):
        path = meta / f"{split}.json"
        if not probe.look(path, "file"):
            raise probe.fail(f"{path} is missing", spec.tv_expected)
        out[split] = json.loads(path.read_text())
    names = sorted(out["train"])
    index = {c: j for j, c in enumerate(names)}
    pairs = {s: ([f"{i}.jpg" for c in names for i in out[s].get(c, [])],
                 [index[c] for c in names for _ in out[s].get(c, [])]) for s in out}
    check_files(probe, meta.parent / "images", pairs["train"][0] + pairs["test"][0], spec.tv_expected)
    return _dataset("food101", names, meta.parent / "images", pairs["train"], pairs["test"], "torchvision")


def read_dtd(probe: Probe) -> ImageDataset:
    spec = SPECS["dtd"]
    fold = int(probe.options.get("dtd_fold") or 1)
    labels_dir = probe.require([f / "labels" for f in folder_candidates(probe.root, ("dtd/dtd", "dtd"))], "dir")
    img = labels_dir.parent / "images"
    if not probe.look(img, "dir"):
        raise probe.fail(f"{img} is missing", spec.tv_expected)
    names = list_dirs(img)
    index = {c: j for j, c in enumerate(names)}
    out = {}
    for split in ("train", "test"):
        path = labels_dir / f"{split}{fold}.txt"
        if not probe.look(path, "file"):
            raise probe.fail(f"{path} is missing", spec.tv_expected)
        rels = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        unknown = sorted({r.split("/", 1)[0] for r in rels} - set(index))
        if unknown:
            raise probe.fail(f"{path} names classes with no image folder: {unknown[:5]}", spec.tv_expected)
        out[split] = (rels, [index[r.split("/", 1)[0]] for r in rels])
    check_files(probe, img, out["train"][0] + out["test"][0], spec.tv_expected)
    return _dataset("dtd", names, img, out["train"], out["test"], f"torchvision-fold{fold}")


READERS: Dict[str, Callable[[Probe], ImageDataset]] = {
    "caltech101": read_caltech101, "oxford_pets": read_oxford_pets, "oxford_flowers": read_oxford_flowers,
    "food101": read_food101, "dtd": read_dtd,
}
