"""``pfedmoap-bench partition --config FILE``: write a config's partition file and show its client × class histogram.

The partition comes from the same code path as a run (dataset builder, ``make_partition`` with the experiment's
partition parameters, ``common_args.data_seed``), so the file it writes is the one every algorithm of a grid reuses.
It prints the hash, the file path and the client × class table (train counts by default), and plots train and test
histograms as a PNG (``plots.partition_heatmap``); docs/data.md describes the partition methods.
"""
from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from fedml_pfedmoap.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment or benchmark YAML (data_args, train_args, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--png", default=None, help="histogram PNG path (default: next to the partition file)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="which split's table to print")


def build_partition(cfg: Config) -> Tuple[Any, Any]:
    """(dataset, partition) exactly as ``build_experiment`` makes them (training seed never enters)."""
    from fedml_pfedmoap.data.base import DATASETS, build_dataset
    from fedml_pfedmoap.data.partition import make_partition
    from fedml_pfedmoap.experiment import _partition_params

    d, cache = cfg.data_args, Path(cfg.common_args.cache_dir)
    opts = dict(d.dataset_options)
    if d.layout != "auto":
        opts["layout"] = d.layout
    import fedml_pfedmoap.data.embedded  # noqa: F401  (registration)
    import fedml_pfedmoap.data.loaders  # noqa: F401
    if "split_dir" in inspect.signature(DATASETS.get(d.dataset)).parameters:
        opts.setdefault("split_dir", str(cache / "partitions"))  # save a generated holdout split like a partition
    ds = build_dataset(d.dataset, d.data_root, **opts)
    part = make_partition(ds, d.partition_method, cfg.train_args.client_num_in_total, cfg.common_args.data_seed,
                          out_dir=cache / "partitions", **_partition_params(cfg))
    return ds, part


def format_table(hist: np.ndarray, row_names: Optional[Sequence[str]] = None) -> str:
    """Client × class counts with per-client totals and class counts, right-aligned."""
    n, c = hist.shape
    rows = list(row_names or [f"client {i}" for i in range(n)])
    width = max(3, len(str(int(hist.max(initial=0)))), len(str(c - 1)))
    left = max(len(r) for r in rows)
    head = f"{'':>{left}} | " + " ".join(f"{j:>{width}}" for j in range(c)) + " | total #cls"
    lines = [head, "-" * len(head)]
    for r, counts in zip(rows, hist):
        cells = " ".join(f"{int(x) if x else '.':>{width}}" for x in counts)
        lines.append(f"{r:>{left}} | {cells} | {int(counts.sum()):>5} {int((counts > 0).sum()):>4}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from fedml_pfedmoap.config import load_config

    from .plots import partition_heatmap

    cfg = load_config(args.config, args.overrides)
    ds, part = build_partition(cfg)
    hists = part.histograms(ds)
    png = Path(args.png) if args.png else (part.path.with_suffix(".png") if part.path else Path(f"{part.hash}.png"))
    title = f"{ds.name} · {cfg.data_args.partition_method} · {part.num_clients} clients · data_seed " \
            f"{cfg.common_args.data_seed} · {part.hash}"
    partition_heatmap(hists, ds.classnames, title, png)
    print(f"partition {part.hash}: {ds.name}, {cfg.data_args.partition_method}, {part.num_clients} clients")
    print(f"file: {part.path}")
    print(f"histogram: {png}")
    print(f"{args.split} items per client × class (columns are label indices; '.' = 0):")
    print(format_table(hists[args.split]))
    return 0

