"""Every plot of the suite (matplotlib, Agg): the leaderboard's accuracy vs round per algorithm and per-client accuracy
distribution (docs/benchmark.md §Reading the leaderboard), and the partition's client × class heat map (the
``partition`` command's PNG and each run's ``partition-<hash>.png`` artifact).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_algorithm(records: Sequence[Any]) -> Dict[str, List[Any]]:
    out: Dict[str, List[Any]] = {}
    for r in records:
        out.setdefault(r.algorithm, []).append(r)
    return out


def accuracy_vs_round(records: Sequence[Any], title: str, path: Path) -> Path:
    """Mean client accuracy (``acc_mean``) per evaluated round, one line per algorithm: mean over seeds ± std."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for algo, recs in _by_algorithm(records).items():
        per_round: Dict[int, List[float]] = {}
        for r in recs:
            for x in r.rounds:
                if "acc_mean" in x:
                    per_round.setdefault(int(x["round"]), []).append(100 * x["acc_mean"])
        if not per_round:
            continue
        t = np.array(sorted(per_round))
        m = np.array([np.mean(per_round[k]) for k in t])
        s = np.array([np.std(per_round[k]) for k in t])
        ax.plot(t + 1, m, marker="o", ms=3, label=algo)
        ax.fill_between(t + 1, m - s, m + s, alpha=0.15)
    return _save_lines(plt, fig, ax, "round", "acc_mean (%)", f"accuracy vs round: {title}", path)


def accuracy_vs_value(records: Sequence[Any], points: Mapping[str, float], metric: str, key: str, title: str,
                      path: Path) -> Path:
    """A sweep: ``metric`` (a run summary, mean over seeds ± std) against the swept value, one line per algorithm;
    ``points`` maps a cell's override label to its x value."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for algo, recs in _by_algorithm(records).items():
        per_x: Dict[float, List[float]] = {}
        for r in recs:
            if r.override in points and metric in r.summary:
                per_x.setdefault(float(points[r.override]), []).append(100 * r.summary[metric])
        if not per_x:
            continue
        x = np.array(sorted(per_x))
        m = np.array([np.mean(per_x[v]) for v in x])
        s = np.array([np.std(per_x[v]) for v in x])
        ax.errorbar(x, m, yerr=s, marker="o", ms=4, capsize=3, label=algo)
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(float(v) for v in points.values())))
    ax.set_xticklabels([f"{v:g}" for v in sorted(set(float(v) for v in points.values()))])
    return _save_lines(plt, fig, ax, key, f"{metric} (%)", f"accuracy vs {key}: {title}", path)


def _save_lines(plt: Any, fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Labels, grid and legend of a one-line-per-algorithm plot; written to ``path`` and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def client_distribution(records: Sequence[Any], title: str, path: Path) -> Path:
    """Final-round accuracy of every client (pooled over seeds): a box per algorithm with the points on top."""
    plt = _plt()
    groups = [(a, [100 * v for r in recs for v in r.client_acc]) for a, recs in _by_algorithm(records).items()]
    groups = [(a, v) for a, v in groups if v]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(groups) + 2), 4.0))
    if groups:
        ax.boxplot([v for _, v in groups], showmeans=True, showfliers=False)  # every point is drawn below
        ax.set_xticks(range(1, len(groups) + 1), [a for a, _ in groups], rotation=30, fontsize=8)
        rng = np.random.default_rng(0)  # fixed jitter, for reproducible images
        for i, (_, v) in enumerate(groups, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=8, alpha=0.5, color="k")
    ax.set_ylabel("client accuracy, final round (%)")
    ax.set_title(f"per-client accuracy: {title}", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def partition_heatmap(hists: Mapping[str, np.ndarray], classnames: Sequence[str], title: str, path: Path) -> Path:
    """Client × class item counts, one heat map per split (e.g. ``{"train": ..., "test": ...}``), side by side."""
    plt = _plt()
    n, c = next(iter(hists.values())).shape
    fig, axes = plt.subplots(1, len(hists), figsize=(min(24, 4 + 0.18 * c) * len(hists), max(3, 1 + 0.25 * n)),
                             squeeze=False)
    for ax, (split, hist) in zip(axes[0], hists.items()):
        im = ax.imshow(hist, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(f"{split}: {int(hist.sum())} items")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        if c <= 40:
            ax.set_xticks(range(c))
            ax.set_xticklabels(classnames, rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
