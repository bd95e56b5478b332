"""Per-round metrics over clients, run summaries, and the one list of metric names (docs/algorithms.md §Evaluation).

The MLflow logger, the FedML plugin's logger and the leaderboard name metrics through the tuples below; docs/benchmark.md
§Where the results go says what each one means.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

CLIENT_METRICS = ("acc_mean", "acc_weighted", "acc_std", "acc_bottom10")  # client_summary, every evaluated round
ROUND_METRICS = (*CLIENT_METRICS, "train_loss", "test_loss", "bytes_up", "bytes_down", "round_time_s",
                 "peak_rss_mb")  # logged with step = round index
SUMMARY_METRICS = ("acc_last", "acc_last5", "acc_best")  # run_summary, once per run
PRIVACY_METRICS = ("dp_epsilon_run_pld", "dp_epsilon_run_zcdp", "dp_busiest_releases")  # DP runs (docs/privacy.md)


def client_summary(accs: Sequence[float], n_test: Sequence[int]) -> Dict[str, float]:
    """Unweighted mean over clients (primary), sample-weighted mean, std across clients, mean of the worst 10%."""
    a = np.asarray(accs, dtype=np.float64)
    n = np.asarray(n_test, dtype=np.float64)
    if a.size == 0:
        return {}
    k = max(1, int(math.ceil(0.1 * a.size)))
    values = (a.mean(), (a * n).sum() / max(n.sum(), 1.0), a.std(), np.sort(a)[:k].mean())
    return {name: float(v) for name, v in zip(CLIENT_METRICS, values)}


def run_summary(acc_by_round: List[float]) -> Dict[str, float]:
    """``acc_last`` (last evaluated round), ``acc_last5`` (mean of the last 5), ``acc_best`` (test-selected, optimistic)."""
    if not acc_by_round:
        return {}
    a = np.asarray(acc_by_round, dtype=np.float64)
    return {name: float(v) for name, v in zip(SUMMARY_METRICS, (a[-1], a[-5:].mean(), a.max()))}


B2N_METRICS = ("acc_local", "acc_base", "acc_novel", "acc_hm")  # base-to-novel rounds (docs/algorithms.md)
