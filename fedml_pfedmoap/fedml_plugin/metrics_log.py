"""Server-side MLflow logging for the FedML paths: one writer per run (FEDML_AND_STACK.md §7 "Tracking").

FedML has no MLflow support and its own tracking needs an account, so the FedML server (cross-silo aggregator) or the
simulation flow logs here: the flattened config as params, per-round metrics with ``step = round``, tags naming the
algorithm, dataset and FedML mode. ``tracking_args.mlflow_tracking_uri: null`` turns logging off. mlflow is imported
lazily (it costs seconds).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

from ..config import Config

logger = logging.getLogger(__name__)


class RoundLogger:
    """``log_round(metrics, step)`` / ``close()``; a no-op when the config has no MLflow tracking URI."""

    def __init__(self, cfg: Config, run_name: str, tags: Optional[Dict[str, str]] = None) -> None:
        self.enabled = bool(cfg.tracking_args.mlflow_tracking_uri)
        self.run_id: Optional[str] = None
        if not self.enabled:
            return
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(cfg.tracking_args.mlflow_tracking_uri)
        mlflow.set_experiment(cfg.tracking_args.mlflow_experiment or cfg.common_args.run_name)
        run = mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
        self.run_id = run.info.run_id
        params = [(k, str(v)[:500]) for k, v in cfg.flat().items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            mlflow.log_params(dict(params[i:i + 100]))

    def log_round(self, metrics: Dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and k != "round"}
        self._mlflow.log_metrics(clean, step=int(step))

    def close(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)
