"""The dataset interface every loader returns: a labelled image dataset with train/test splits in canonical order.

Loaders (``fedml_pfedmoap.data.loaders``) and embedded datasets (``fedml_pfedmoap.data.embedded``) register a builder
``fn(root: str | None, **options) -> ImageDataset`` in ``DATASETS``; the package's ``__init__`` imports them, so
the registry is full once anything under ``fedml_pfedmoap.data`` is imported. Partitions (``partition.py``) index into
the canonical item order of ``train`` and ``test``. This module holds only the types and the registry.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import UserError
from ..registry import Registry

DATASETS: Registry[Callable[..., "ImageDataset"]] = Registry("dataset")


class DatasetError(UserError, RuntimeError):
    """A dataset is missing or malformed: the message names the dataset, the paths looked at and the layout expected."""


class SplitData:
    """One split: ``len``, integer ``labels`` aligned with items, ``image(i)`` -> RGB PIL image, ``fingerprint``."""

    labels: np.ndarray

    def __len__(self) -> int:
        return int(len(self.labels))

    def image(self, i: int) -> Image.Image:  # pragma: no cover - interface
        raise NotImplementedError

    def item_keys(self) -> Sequence[str]:
        """Stable per-item identifiers (file paths, or array indices) used for the fingerprint."""
        raise NotImplementedError  # pragma: no cover

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(len(self)).encode())
        for key, lab in zip(self.item_keys(), self.labels.tolist()):
            h.update(f"{key}\t{lab}\n".encode())
        return h.hexdigest()[:16]


class ArraySplit(SplitData):
    """Images held in memory as uint8 arrays (N,H,W) gray or (N,H,W,3) RGB; gray is replicated to 3 channels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "array") -> None:
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name = name

    def image(self, i: int) -> Image.Image:
        arr = self.images[i]
        img = Image.fromarray(arr)
        return img.convert("RGB")

    def item_keys(self) -> Sequence[str]:
        # content hash per item keeps the fingerprint honest for in-memory data
        return [hashlib.md5(self.images[i].tobytes()).hexdigest()[:12] for i in range(len(self))]


class FileSplit(SplitData):
    """Images on disk: ``paths[i]`` relative to ``image_root`` (or absolute), aligned with ``labels[i]``."""

    def __init__(self, image_root: str | Path, paths: Sequence[str], labels: Sequence[int]) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels under {image_root}")
        self.image_root = Path(image_root)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, i: int) -> Image.Image:
        path = self.image_root / self.paths[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # truncated, corrupt, foreign
            raise DatasetError(f"image {path}: cannot be decoded ({err}); replace the file or remove it from the "
                               "dataset's list") from None

    def item_keys(self) -> Sequence[str]:
        return self.paths


@dataclass
class ImageDataset:
    """A labelled image dataset. ``classnames[j]`` names label j (label order, never a set's order)."""

    name: str
    classnames: List[str]
    train: SplitData
    test: SplitData
    template: str = "a photo of a {}."
    # optional per-item domain index (feature-shift datasets), aligned with train/test items
    train_domains: Optional[np.ndarray] = None
    test_domains: Optional[np.ndarray] = None
    domain_names: List[str] = field(default_factory=list)
    # where the train/test split comes from when it is not the dataset's own canonical one (e.g. "torchvision",
    # "stratified-<hash>"); part of the partition hash (docs/data.md §Layouts, §Partitions). Empty: the canonical split.
    split_source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def fingerprint(self) -> str:
        """Hash of the ordered item lists and class names: part of partition and feature-cache keys."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update("|".join(self.classnames).encode())
        h.update(self.train.fingerprint().encode())
        h.update(self.test.fingerprint().encode())
        return h.hexdigest()[:16]


def build_dataset(name: str, root: Optional[str] = None, **options) -> ImageDataset:
    """Build a registered dataset by name (``DATASETS.names()`` lists them; importing ``fedml_pfedmoap.data``, which
    any import of this module does first, registers them all)."""
    return DATASETS.get(name)(root, **options)
