"""DomainNet (FedBN 10-class subset, 6 domains) and Office-Caltech10 (4 domains): feature-shift datasets.

Layouts (docs/data.md §Layouts): ``fedbn``: ``{site}_train.pkl`` / ``{site}_test.pkl`` per domain in ``DomainNet/`` or
``office_caltech_10/`` (or ``pickle_dir``), each a pickled ``(paths, text_labels)`` with paths relative to the data
root (or ``image_root``); ``imagefolder``: ``<root>/<domain>/<class>/*.jpg`` with a seeded stratified 80/20 split per
domain, saved like a partition when ``split_dir`` is given.

Fixes of the reference's defects (docs/data.md): labels are positions in the fixed, ordered class list (D10: never a
``set``), and paths and labels stay one list of pairs, so any subset indexes both (D9). Items are domain-major, domains
in the fixed order; ``train_domains``/``test_domains`` give each item's domain index.
"""
from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..base import DATASETS, FileSplit, ImageDataset
from ..splits import saved_holdout
from .common import Probe, check_files, folder_candidates, list_dirs, list_images, load_with_layouts
from .specs import DOMAINNET, OFFICE, DomainSpec

logger = logging.getLogger(__name__)


def load_pickle_pair(path: Path) -> Tuple[List[str], List[str]]:
    """A FedBN ``(paths, text_labels)`` pickle (``np.save`` object arrays or a plain pickle). Trusted files only."""
    try:
        obj = np.load(path, allow_pickle=True)
    except (OSError, ValueError, pickle.UnpicklingError):
        with open(path, "rb") as f:
            obj = pickle.load(f)
    paths, labels = obj[0], obj[1]
    return [str(p) for p in list(paths)], [str(t) for t in list(labels)]


def _image_root(probe: Probe, spec: DomainSpec, pickle_dir: Path, first: str) -> Path:
    given = probe.options.get("image_root")
    cands = [Path(str(given)).expanduser()] if given else [probe.root, pickle_dir, pickle_dir.parent]
    for c in dict.fromkeys(cands):
        if probe.look(c / first, "file"):
            return c
    raise probe.fail(f"image {first!r} (first item of the pickles) does not resolve under "
                     f"{', '.join(str(c) for c in dict.fromkeys(cands))}; set image_root", spec.expected("fedbn"))


def read_fedbn(spec: DomainSpec, probe: Probe) -> ImageDataset:
    given = probe.options.get("pickle_dir")
    cands = [Path(str(given)).expanduser()] if given else folder_candidates(probe.root, spec.folders)
    marker = f"{spec.domains[0]}_train.pkl"
    pdir = probe.require([c / marker for c in cands], "file").parent
    index = {c: j for j, c in enumerate(spec.classes)}
    per_split: Dict[str, Tuple[List[str], List[int], List[int]]] = {}
    for split in ("train", "test"):
        paths: List[str] = []
        labels: List[int] = []
        doms: List[int] = []
        for d, dom in enumerate(spec.domains):
            f = pdir / f"{dom}_{split}.pkl"
            if not probe.look(f, "file"):
                raise probe.fail(f"{f} is missing (every domain needs its train and test pickle)",
                                 spec.expected("fedbn"))
            p, t = load_pickle_pair(f)
            if len(p) != len(t):
                raise probe.fail(f"{f}: {len(p)} paths but {len(t)} labels", spec.expected("fedbn"))
            unknown = sorted(set(t) - set(index))
            if unknown:
                raise probe.fail(f"{f}: labels {unknown[:5]} are not in the class list {list(spec.classes)}",
                                 spec.expected("fedbn"))
            paths += p
            labels += [index[x] for x in t]
            doms += [d] * len(p)
        per_split[split] = (paths, labels, doms)
    if not per_split["train"][0]:
        raise probe.fail("the train pickles are empty", spec.expected("fedbn"))
    root = _image_root(probe, spec, pdir, per_split["train"][0][0])
    check_files(probe, root, per_split["train"][0] + per_split["test"][0], spec.expected("fedbn"))
    return _assemble(spec, root, per_split, "")


def read_imagefolder(spec: DomainSpec, probe: Probe) -> ImageDataset:
    cands = folder_candidates(probe.root, spec.folders)
    base = probe.require([c / spec.domains[0] for c in cands], "dir").parent
    keys: List[str] = []
    labels: List[int] = []
    doms: List[int] = []
    for d, dom in enumerate(spec.domains):
        ddir = base / dom
        if not probe.look(ddir, "dir"):
            raise probe.fail(f"domain folder {ddir} is missing", spec.expected("imagefolder"))
        missing = [c for c in spec.classes if c not in set(list_dirs(ddir))]
        if missing:
            raise probe.fail(f"{ddir} lacks class folders {missing}", spec.expected("imagefolder"))
        for j, c in enumerate(spec.classes):  # extra class folders (DomainNet has 345) are ignored
            files = list_images(ddir / c)
            keys += [f"{dom}/{c}/{f}" for f in files]
            labels += [j] * len(files)
            doms += [d] * len(files)
    y, dm = np.asarray(labels, np.int64), np.asarray(doms, np.int64)
    seed = int(probe.options.get("split_seed") or 0)
    # stratify by (domain, class) so every domain keeps 80/20 of each class
    tr, te, h = saved_holdout(spec.name, keys, y + len(spec.classes) * dm, 0.2, seed, probe.options.get("split_dir"))
    per_split = {s: ([keys[i] for i in idx], y[idx].tolist(), dm[idx].tolist()) for s, idx in (("train", tr),
                                                                                               ("test", te))}
    return _assemble(spec, base, per_split, f"stratified-{h}")


def _assemble(spec: DomainSpec, root: Path, per_split: Dict[str, Tuple[List[str], List[int], List[int]]],
              source: str) -> ImageDataset:
    names = list(spec.classes)
    tr, te = per_split["train"], per_split["test"]
    return ImageDataset(name=spec.name, classnames=names, train=FileSplit(root, tr[0], tr[1]),
                        test=FileSplit(root, te[0], te[1]), template="a photo of a {}.",
                        train_domains=np.asarray(tr[2], np.int64), test_domains=np.asarray(te[2], np.int64),
                        domain_names=list(spec.domains), split_source=source)


def scramble_classnames(names: Sequence[str], seed: int) -> List[str]:
    """``legacy_domain_label_bugs`` (D10 only): a seeded permutation of the class names, as a set's order would give."""
    out = list(names)
    random.Random(seed).shuffle(out)
    return out


def _builder(spec: DomainSpec):
    def build(root: Optional[str] = None, layout: str = "auto", pickle_dir: Optional[str] = None,
              image_root: Optional[str] = None, split_dir: Optional[str] = None, split_seed: int = 0,
              legacy_domain_label_bugs: bool = False, legacy_label_seed: int = 0) -> ImageDataset:
        opts = {"pickle_dir": pickle_dir, "image_root": image_root, "split_dir": split_dir, "split_seed": split_seed}
        readers = {"fedbn": lambda p: read_fedbn(spec, p), "imagefolder": lambda p: read_imagefolder(spec, p)}
        ds = load_with_layouts(spec.name, root, layout, readers, {k: spec.expected(k) for k in readers}, opts)
        if legacy_domain_label_bugs:
            logger.warning("%s: legacy_domain_label_bugs scrambles the class-name order (reference defect D10); "
                           "results are only comparable with the paper's invalid tables", spec.name)
            ds.classnames = scramble_classnames(ds.classnames, legacy_label_seed)
            ds.split_source = (ds.split_source + "+legacy-d10").lstrip("+")
        return ds

    build.__name__ = spec.name
    build.__doc__ = f"{spec.name}: FedBN pickles or an image-folder tree; never downloads."
    return build


DATASETS.register("domainnet")(_builder(DOMAINNET))
DATASETS.register("office_caltech10")(_builder(OFFICE))
