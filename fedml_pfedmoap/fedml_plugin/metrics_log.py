"""Server-side MLflow logging for the FedML paths: one writer per run (docs/fedml.md §Stack notes).

FedML has no MLflow support and its own tracking needs an account, so the FedML server (cross-silo aggregator) or the
simulation flow logs through the suite's ``fedml_pfedmoap.tracking.MlflowLogger`` — the same metric names and URI
rules as ``pfedmoap-bench run``: the flattened config as params, per-round metrics with ``step = round``, the
``acc_last``/``acc_last5``/``acc_best`` summary at the end, tags naming the algorithm, dataset and FedML mode.
``tracking_args.mlflow_tracking_uri: null`` turns logging off.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from ..config import Config
from ..federated.metrics import run_summary

logger = logging.getLogger(__name__)


class RoundLogger:
    """``log_round(metrics, step)`` / ``close()`` on one top-level MLflow run; a no-op when tracking is off."""

    def __init__(self, cfg: Config, run_name: str, tags: Optional[Dict[str, str]] = None) -> None:
        from ..tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.tracking_args.mlflow_tracking_uri)
        self.enabled = uri is not None
        self.run_id: Optional[str] = None
        self.acc: List[float] = []
        if not self.enabled:
            return
        from ..tracking import MlflowLogger

        self._mlflow = MlflowLogger(uri, cfg.tracking_args.mlflow_experiment or cfg.common_args.run_name)
        self.run_id = self._mlflow.start_cell(run_name, cfg.flat(), {k: str(v) for k, v in (tags or {}).items()})

    def log_round(self, metrics: Dict[str, Any], step: int) -> None:
        if "acc_mean" in metrics:
            self.acc.append(float(metrics["acc_mean"]))
        if self.enabled:
            self._mlflow.log_round(self.run_id, metrics, int(step))

    def close(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id is not None:
            if status == "FINISHED" and self.acc:
                self._mlflow.log_summary(self.run_id, run_summary(self.acc))
            self._mlflow.end_cell(self.run_id, status)
            self.run_id = None
