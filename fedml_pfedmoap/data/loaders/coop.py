"""The five few-shot CLIP datasets (CoOp, Zhou et al. 2022) from the CoOp layout or the torchvision layout.

CoOp layout (docs/data.md): ``<root>/<folder>/split_zhou_<Name>.json`` holds ``{"train"|"val"|"test": [[relpath,
label, classname], ...]}`` with paths relative to the image folder; labels and class names come from that file. The
image folder may also be a torchvision tree (same archive file names), or ``image_root``. Folder spellings vary between
codebases (``caltech-101`` in CoOp's docs, ``caltech101`` in pFedMoAP/FedOTP), so every spelling is tried.
torchvision layouts are read by ``tv_layouts`` (their own splits, recorded as ``split_source``); the folder
spellings and templates live in ``specs``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..base import DATASETS, FileSplit, ImageDataset
from .common import Probe, check_files, classnames_from_pairs, folder_candidates, load_with_layouts
from .specs import SPECS, CoopSpec
from .tv_layouts import READERS


def _entries(probe: Probe, blob: Any, key: str, path: Path, expected: str) -> List[Tuple[str, int, str]]:
    rows = blob.get(key) if isinstance(blob, dict) else None
    if not isinstance(rows, list):
        raise probe.fail(f"{path} has no {key!r} list", expected)
    out = []
    for n, row in enumerate(rows):
        if not (isinstance(row, (list, tuple)) and len(row) == 3):
            raise probe.fail(f"{path}: {key}[{n}] = {row!r} is not [relpath, label, classname]", expected)
        out.append((str(row[0]), int(row[1]), str(row[2])))
    return out


def _pick_image_root(probe: Probe, spec: CoopSpec, split_path: Path, first_item: Optional[str]) -> Path:
    """``image_root`` if given; else the first candidate image folder in which the first listed image resolves."""
    given = probe.options.get("image_root")
    if given:
        p = Path(str(given)).expanduser()
        if not probe.look(p, "dir"):
            raise probe.fail(f"image_root {p} does not exist", spec.expected_coop())
        return p
    cands = [split_path.parent / spec.image_dir]
    cands += [f / spec.image_dir for f in folder_candidates(probe.root, spec.folders + spec.tv_folders)]
    existing = [c for c in dict.fromkeys(cands) if probe.look(c, "dir")]
    if not existing:
        raise probe.fail(f"found {split_path} but no image folder; looked at "
                         f"{', '.join(str(c) for c in dict.fromkeys(cands))}", spec.expected_coop())
    for c in existing:
        if first_item is None or (c / first_item).is_file():
            return c
    return existing[0]


def read_coop(spec: CoopSpec, probe: Probe) -> ImageDataset:
    """The CoOp split-JSON reader: class names and labels as stored in the split file, val unused."""
    given = probe.options.get("split_file")
    if given:
        split_path = Path(str(given)).expanduser()
        if not probe.look(split_path, "file"):
            raise probe.fail(f"split_file {split_path} does not exist", spec.expected_coop())
    else:
        split_path = probe.require([f / spec.split_file for f in
                                    folder_candidates(probe.root, spec.folders + spec.tv_folders)], "file")
    expected = spec.expected_coop()
    try:
        blob = json.loads(split_path.read_text())
    except (OSError, ValueError) as err:
        raise probe.fail(f"{split_path} is not readable JSON ({err})", expected) from None
    train = _entries(probe, blob, "train", split_path, expected)
    test = _entries(probe, blob, "test", split_path, expected)
    val = _entries(probe, blob, "val", split_path, expected) if "val" in blob else []
    names = classnames_from_pairs(probe, [(lab, name) for _, lab, name in train + val + test], expected)
    image_root = _pick_image_root(probe, spec, split_path, train[0][0] if train else None)
    check_files(probe, image_root, [p for p, _, _ in train + test], expected)
    return ImageDataset(name=spec.name, classnames=names,
                        train=FileSplit(image_root, [p for p, _, _ in train], [lab for _, lab, _ in train]),
                        test=FileSplit(image_root, [p for p, _, _ in test], [lab for _, lab, _ in test]),
                        template=spec.template)


def _builder(spec: CoopSpec):
    def build(root: Optional[str] = None, layout: str = "auto", image_root: Optional[str] = None,
              split_file: Optional[str] = None, split_dir: Optional[str] = None, split_seed: int = 0,
              dtd_fold: int = 1, verify_md5: bool = False) -> ImageDataset:
        opts = {"image_root": image_root, "split_file": split_file, "split_dir": split_dir,
                "split_seed": int(split_seed), "dtd_fold": int(dtd_fold), "verify_md5": bool(verify_md5)}
        readers = {"coop": lambda p: read_coop(spec, p), "torchvision": lambda p: READERS[spec.name](p)}
        expected = {"coop": spec.expected_coop(), "torchvision": spec.tv_expected}
        return load_with_layouts(spec.name, root, layout, readers, expected, opts)

    build.__name__ = spec.name
    build.__doc__ = (f"{spec.name}: CoOp split-JSON layout ({spec.folders[0]}/{spec.split_file}) or torchvision "
                     "layout; never downloads.")
    return build


for _spec in SPECS.values():
    DATASETS.register(_spec.name)(_builder(_spec))

__all__ = ["read_coop"]
