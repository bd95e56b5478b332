"""Per-round metrics over clients and run summaries (docs/algorithms.md §Evaluation)."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np


def client_summary(accs: Sequence[float], n_test: Sequence[int]) -> Dict[str, float]:
    """Unweighted mean over clients (primary), sample-weighted mean, std across clients, mean of the worst 10%."""
    a = np.asarray(accs, dtype=np.float64)
    n = np.asarray(n_test, dtype=np.float64)
    if a.size == 0:
        return {}
    k = max(1, int(math.ceil(0.1 * a.size)))
    return {
        "acc_mean": float(a.mean()),
        "acc_weighted": float((a * n).sum() / max(n.sum(), 1.0)),
        "acc_std": float(a.std()),
        "acc_bottom10": float(np.sort(a)[:k].mean()),
    }


def run_summary(acc_by_round: List[float]) -> Dict[str, float]:
    """``acc_last`` (last evaluated round), ``acc_last5`` (mean of the last 5), ``acc_best`` (test-selected, optimistic)."""
    if not acc_by_round:
        return {}
    a = np.asarray(acc_by_round, dtype=np.float64)
    return {"acc_last": float(a[-1]), "acc_last5": float(a[-5:].mean()), "acc_best": float(a.max())}
