"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle layout (``download=False``; docs/data.md §Layouts).

``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and ``<root>/cifar-100-python/{train, test,
meta}``. Labels and class names are torchvision's (the pickles' own). CIFAR-100 items also carry their super-class
(``coarse_labels``) for the ``legacy_pachinko`` partition. ``verify_md5`` checks the files against torchvision's
published checksums.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ...fileio import file_hexdigest
from ..base import DATASETS, ArraySplit, ImageDataset
from .common import Probe, load_with_layouts
from .specs import CIFAR_EXPECTED

class CifarSplit(ArraySplit):
    """In-memory CIFAR images (N,32,32,3); item keys are ``<file>#<row>`` plus a content digest of the whole split."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, keys: List[str], name: str,
                 coarse_labels: Optional[np.ndarray] = None) -> None:
        super().__init__(images, labels, name)
        self.keys = keys
        self.coarse_labels = coarse_labels
        self._digest = hashlib.sha256(self.images.tobytes()).hexdigest()[:16]

    def item_keys(self) -> Sequence[str]:
        return [f"{k}@{self._digest}" for k in self.keys]


def _unpickle(probe: Probe, path: Path, expected: str) -> dict:
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f, encoding="latin1")  # trusted local files only
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise probe.fail(f"{path} is not a readable CIFAR pickle ({err})", expected) from None
    if not isinstance(blob, dict):
        raise probe.fail(f"{path} does not hold a dict", expected)
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in blob.items()}


def _verify(probe: Probe, folder: Path, files: Sequence[Tuple[str, str]], expected: str) -> None:
    for fname, md5 in files:
        h = file_hexdigest(folder / fname, "md5")
        if h != md5:
            raise probe.fail(f"{folder / fname}: md5 {h} != {md5} (corrupted or not the official file)", expected)


def _batches(probe: Probe, folder: Path, files: Sequence[str], label_key: str, expected: str):
    images, labels, coarse, keys = [], [], [], []
    for fname in files:
        blob = _unpickle(probe, folder / fname, expected)
        if "data" not in blob or label_key not in blob:
            raise probe.fail(f"{folder / fname} lacks 'data' or {label_key!r}", expected)
        data = np.asarray(blob["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(blob[label_key], np.int64))
        if "coarse_labels" in blob:
            coarse.append(np.asarray(blob["coarse_labels"], np.int64))
        keys += [f"{fname}#{i}" for i in range(len(data))]
    co = np.concatenate(coarse) if len(coarse) == len(files) else None
    return np.concatenate(images), np.concatenate(labels), keys, co


def _read(name: str, probe: Probe) -> ImageDataset:
    import torchvision.datasets as tvd

    tv = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    expected = CIFAR_EXPECTED[name]
    meta = probe.require([probe.root / tv.base_folder / tv.meta["filename"], probe.root / tv.meta["filename"]],
                         "file")
    folder = meta.parent
    files = [f for f, _ in tv.train_list + tv.test_list]
    missing = [str(folder / f) for f in files if not probe.look(folder / f, "file")]
    if missing:
        raise probe.fail(f"missing files: {', '.join(missing)}", expected)
    if probe.options.get("verify_md5"):
        _verify(probe, folder, tv.train_list + tv.test_list + [[tv.meta["filename"], tv.meta["md5"]]], expected)
    names = [str(x) for x in _unpickle(probe, meta, expected)[tv.meta["key"]]]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    splits = []
    for lst in (tv.train_list, tv.test_list):
        x, y, keys, coarse = _batches(probe, folder, [f for f, _ in lst], label_key, expected)
        if y.min() < 0 or y.max() >= len(names):
            raise probe.fail(f"labels outside 0..{len(names) - 1}", expected)
        splits.append(CifarSplit(x, y, keys, name, coarse))
    return ImageDataset(name=name, classnames=names, train=splits[0], test=splits[1], template="a photo of a {}.")


def _builder(name: str):
    def build(root: Optional[str] = None, layout: str = "auto", verify_md5: bool = False) -> ImageDataset:
        return load_with_layouts(name, root, layout, {"torchvision": lambda p: _read(name, p)},
                                 {"torchvision": CIFAR_EXPECTED[name]}, {"verify_md5": bool(verify_md5)})

    build.__name__ = name
    build.__doc__ = f"{name} from torchvision's python-pickle layout; never downloads."
    return build


DATASETS.register("cifar10")(_builder("cifar10"))
DATASETS.register("cifar100")(_builder("cifar100"))
