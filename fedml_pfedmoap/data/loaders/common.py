"""Layout probing shared by the on-disk loaders (docs/data.md): find a dataset under ``root`` without downloading.

A loader declares, per layout, a reader ``fn(probe) -> ImageDataset``. A reader raises ``LayoutAbsent`` when the
layout's marker files are not there (``auto`` then tries the next layout), and ``DatasetError`` when the layout is
there but broken (missing images, inconsistent labels): that error is raised at once. When no layout is found, one
``DatasetError`` names the dataset, every path looked at and the expected layouts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..base import DatasetError, ImageDataset

LAYOUT_ORDER = ("coop", "torchvision", "fedbn", "imagefolder")
ROOT_ENV = "PFEDMOAP_DATA_ROOT"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class LayoutAbsent(Exception):
    """The layout's marker files are missing (not an error under ``layout: auto``)."""


@dataclass
class Probe:
    """What a reader needs: the dataset id, the root, the reader's options, and a log of every path looked at."""

    dataset: str
    root: Path
    layout: str = ""
    options: Dict[str, object] = field(default_factory=dict)
    looked: List[Tuple[str, str, str]] = field(default_factory=list)

    def look(self, path: Path, want: str = "any") -> bool:
        """Record ``path`` as looked at; True when it exists (``want``: any | file | dir)."""
        ok = path.is_file() if want == "file" else path.is_dir() if want == "dir" else path.exists()
        self.looked.append((self.layout, str(path), "found" if ok else "missing"))
        return ok

    def first(self, candidates: Iterable[Path], want: str = "any") -> Optional[Path]:
        """The first existing candidate (every one tried is recorded)."""
        for c in candidates:
            if self.look(c, want):
                return c
        return None

    def require(self, candidates: Sequence[Path], want: str = "any") -> Path:
        """The first existing candidate, or ``LayoutAbsent``."""
        hit = self.first(candidates, want)
        if hit is None:
            raise LayoutAbsent(", ".join(map(str, candidates)))
        return hit

    def fail(self, problem: str, expected: str) -> DatasetError:
        """A ``DatasetError`` for a layout that is present but broken."""
        return DatasetError(f"dataset {self.dataset!r}, layout {self.layout!r} under {self.root}: {problem}\n"
                            f"Expected layout: {expected}")


Reader = Callable[[Probe], ImageDataset]


def resolve_root(dataset: str, root: Optional[str]) -> Path:
    """``root`` from the config, else the ``PFEDMOAP_DATA_ROOT`` environment variable; never a download."""
    chosen = root if root not in (None, "") else os.environ.get(ROOT_ENV)
    if not chosen:
        raise DatasetError(f"dataset {dataset!r}: no data root given; set data_args.data_root (in a FedML config also "
                           f"data_cache_dir, or the {ROOT_ENV} environment variable) to the folder that holds the "
                           "dataset. Nothing is downloaded.")
    return Path(os.path.expanduser(str(chosen)))


def load_with_layouts(dataset: str, root: Optional[str], layout: str, readers: Dict[str, Reader],
                      expected: Dict[str, str], options: Dict[str, object]) -> ImageDataset:
    """Run the reader of ``layout``, or under ``auto`` the readers in ``LAYOUT_ORDER``; one clear error otherwise."""
    base = resolve_root(dataset, root)
    layout = (layout or "auto").lower()
    if layout != "auto" and layout not in readers:
        raise DatasetError(f"dataset {dataset!r}: layout {layout!r} is not supported; choose auto or one of "
                           f"{', '.join(k for k in LAYOUT_ORDER if k in readers)}")
    order = [k for k in LAYOUT_ORDER if k in readers] if layout == "auto" else [layout]
    probe = Probe(dataset, base, options=dict(options))
    if not probe.look(base, "dir"):
        order = []
    for name in order:
        probe.layout = name
        try:
            return readers[name](probe)
        except LayoutAbsent:
            continue
    looked = "\n".join(f"  [{lay or 'root'}] {path}: {status}" for lay, path, status in probe.looked)
    wanted = "\n".join(f"  {k}: {expected[k]}" for k in order or [k for k in LAYOUT_ORDER if k in readers])
    raise DatasetError(f"dataset {dataset!r} not found under data root {str(base)!r} (layout: {layout}).\n"
                       f"Paths looked at:\n{looked}\nExpected layout (<root> = data_args.data_root, or a FedML config's "
                       f"data_cache_dir):\n{wanted}\nNothing is downloaded: place the files there, or point "
                       "data_args.data_root (data_cache_dir) and data_args.layout at them.")


def check_files(probe: Probe, image_root: Path, relpaths: Sequence[str], expected: str, show: int = 5) -> None:
    """Every image must resolve; otherwise one error naming the first few missing files and the count."""
    missing = [p for p in relpaths if not (image_root / p).is_file()]
    if missing:
        listed = "\n".join(f"    {image_root / p}" for p in missing[:show])
        raise probe.fail(f"{len(missing)} of {len(relpaths)} listed images are missing under {image_root}, e.g.\n"
                         f"{listed}", expected)


def list_images(folder: Path) -> List[str]:
    """Image file names in ``folder``, sorted, hidden files skipped."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)


def list_dirs(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_candidates(root: Path, names: Sequence[str]) -> List[Path]:
    """``root/<name>`` for each spelling, then ``root`` itself (a root that already is the dataset folder)."""
    out: List[Path] = []
    for n in list(names) + [""]:
        p = root / n if n else root
        if p not in out:
            out.append(p)
    return out


def classnames_from_pairs(probe: Probe, pairs: Iterable[Tuple[int, str]], expected: str) -> List[str]:
    """Label-ordered class names from (label, name) pairs; every label 0..C-1 must have exactly one name."""
    names: Dict[int, str] = {}
    for lab, name in pairs:
        if names.setdefault(int(lab), str(name)) != str(name):
            raise probe.fail(f"label {lab} is named both {names[int(lab)]!r} and {name!r}", expected)
    if not names:
        raise probe.fail("no labelled items", expected)
    c = max(names) + 1
    gaps = [j for j in range(c) if j not in names]
    if gaps or min(names) < 0:
        raise probe.fail(f"labels must be 0..{c - 1}; missing {gaps[:10]}", expected)
    return [names[j] for j in range(c)]
