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
VALIDATION_METRICS = ("acc_val_selected",)  # selection_summary, once per run (data_args.val_fraction > 0)
EXTRA_ROUND_METRICS = ("acc_val_mean", "dropped")  # only when validation / client dropout is on


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


def dropout_metrics(dropped: Sequence[int]) -> Dict[str, object]:
    """A round with client dropout on: how many selected clients' uploads were lost (``dropped``, a metric) and which
    (``dropped_clients``, sorted ids: round log / JSONL only)."""
    ids = sorted(int(i) for i in dropped)
    return {"dropped": len(ids), "dropped_clients": ids}


def validation_summary(val_accs: Sequence[float]) -> Dict[str, float]:
    """``acc_val_mean``: unweighted mean over clients of each client's accuracy on its own validation split."""
    return {"acc_val_mean": float(np.mean(val_accs))} if len(val_accs) else {}


def selection_summary(rounds: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """``acc_val_selected``: ``acc_mean`` of the evaluated round with the highest ``acc_val_mean`` (ties: the earliest).

    The round is chosen from validation accuracies alone; the test accuracy is read only at that round."""
    scored = [r for r in rounds if "acc_val_mean" in r and "acc_mean" in r]
    if not scored:
        return {}
    best = scored[int(np.argmax([float(r["acc_val_mean"]) for r in scored]))]  # argmax: first of equal maxima
    return {"acc_val_selected": float(best["acc_mean"]), "round_val_selected": int(best["round"])}


B2N_METRICS = ("acc_local", "acc_base", "acc_novel", "acc_hm")  # base-to-novel rounds (docs/algorithms.md)
