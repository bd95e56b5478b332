"""Server-side run logging for the multi-process engines: one writer per run (docs/fedml.md §Stack notes).

FedML has no MLflow support and its own tracking needs an account, and a Flower ServerApp is the one process that sees
every round, so the FedML server (cross-silo aggregator), the FedML simulation flow and the Flower ServerApp log through
the suite's ``fedml_pfedmoap.tracking`` logger protocol — the same metric names and URI rules as ``pfedmoap-bench run``:
the flattened config as params, per-round metrics with ``step = round``, the ``SUMMARY_METRICS`` of
``federated.metrics`` at the end, tags naming the algorithm, dataset and engine mode.
``tracking_args.mlflow_tracking_uri: null`` selects the no-op logger.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..config import Config
from ..tracking import Status, tracker_from_config
from .metrics import run_summary, selection_summary


class RoundLogger:
    """``log_round(metrics, step)`` / ``close()`` on one top-level run of the config's tracker."""

    def __init__(self, cfg: Config, run_name: str, tags: Optional[Dict[str, str]] = None) -> None:
        self._tracker = tracker_from_config(cfg, experiment=cfg.tracking_args.mlflow_experiment
                                            or cfg.common_args.run_name)
        self.acc: List[float] = []
        self.rows: List[Dict[str, Any]] = []  # evaluated rounds' acc_mean / acc_val_mean (validation selection)
        self.run_id = self._tracker.start_cell(run_name, cfg.flat(), {k: str(v) for k, v in (tags or {}).items()})
        self._open = True

    def log_round(self, metrics: Dict[str, Any], step: int) -> None:
        if "acc_mean" in metrics:
            self.acc.append(float(metrics["acc_mean"]))
            self.rows.append({k: metrics[k] for k in ("round", "acc_mean", "acc_val_mean") if k in metrics})
        self._tracker.log_round(self.run_id, metrics, int(step))

    def close(self, status: Status = "FINISHED") -> None:
        """Summary (on FINISHED) and the final status; later calls do nothing."""
        if not self._open:
            return
        self._open = False
        if status == "FINISHED" and self.acc:
            self._tracker.log_summary(self.run_id, {**run_summary(self.acc), **selection_summary(self.rows)})
        self._tracker.end_cell(self.run_id, status)
