"""Run tracking behind one small logger protocol (docs/benchmark.md §Where the results go).

:class:`TrackingLogger` is what the benchmark runner and the FedML plugin call: a parent run per grid invocation, one
nested run per cell, params, per-round metrics (``step`` = round index), summaries, tags, artifacts and a final
status (FINISHED, FAILED or KILLED). :func:`tracker_from_config` returns an :class:`MlflowLogger` (one experiment
per benchmark; the pattern of torchtune's ``MLFlowLogger``, plus proper handling of an already active parent run), or
a :class:`NullLogger` that does nothing when tracking is off, so callers never branch on it.

* ``mlflow`` is imported on first use only (tracking off never loads it).
* The tracking URI: an explicit ``--set tracking_args.mlflow_tracking_uri=...`` wins, then ``MLFLOW_TRACKING_URI``,
  then the YAML value (default ``sqlite:///results/mlflow.db``, relative to the working directory); ``null`` turns
  tracking off. ``MLFLOW_EXPERIMENT_NAME`` names the experiment when the config does not; ``MLFLOW_RUN_ID`` or an
  active run (``mlflow.start_run()`` around the grid) becomes the parent.
* Metrics are logged once per round in one batch (the names of ``federated.metrics.ROUND_METRICS`` and any other
  numeric round metric), summaries (``SUMMARY_METRICS``) at the end.
* Only the server side logs (a single writer), as FedML has no MLflow support of its own.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import (Any, Callable, Dict, Iterable, List, Literal, Mapping, Optional, Protocol, Sequence, Set, Tuple,
                    Union)

from .config import Config

logger = logging.getLogger(__name__)

OFF = {"", "none", "null", "off", "false"}
STEP_KEY = "round_time_s"  # logged every round: its history tells which rounds reached MLflow
MAX_PARAM_LEN = 6000


# MLflow 3 sends usage telemetry unless told not to; the suite makes no outbound connection (docs/privacy.md
# §Network). Set before mlflow is imported, inherited by the servers and workers this process starts; a user who
# sets the variable to something else keeps their choice.
QUIET_MLFLOW_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def _mlflow() -> Any:
    """``mlflow`` (a dependency, imported on first use: tracking off never loads it), with its noise turned down."""
    for key, value in QUIET_MLFLOW_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow

    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


@contextlib.contextmanager
def _quiet_store_init():
    """Creating a sqlite store runs MLflow's alembic migrations, whose ``env.py`` calls ``logging.config.fileConfig``:
    it would print ~40 migration lines, replace the root logger's handlers and *close* every existing handler (a
    handler that owns its stream, such as absl's, then closes the process's stderr). Make that call a no-op for the
    duration and keep the alembic logger at WARNING."""
    import logging.config

    original = logging.config.fileConfig
    logging.config.fileConfig = lambda *args, **kwargs: None
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        yield
    finally:
        logging.config.fileConfig = original


def resolve_tracking_uri(configured: Optional[str], explicit: bool = False) -> Optional[str]:
    """Explicit setting > ``MLFLOW_TRACKING_URI`` > YAML value; None when tracking is off."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = configured if explicit or not env else env
    return None if uri is None or str(uri).strip().lower() in OFF else str(uri).strip()


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The git commit of the checkout the package runs from, else ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, timeout=5,
                             capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version() -> str:
    from . import __version__

    return __version__


def _finite(items: Mapping[str, Any]) -> Dict[str, float]:
    out = {}
    for k, v in items.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and k != "round":
            out[k] = float(v)
    return out


Status = Literal["FINISHED", "FAILED", "KILLED"]
Artifact = Union[str, Path, Callable[[], Path]]  # a file, or a function writing it (called only when stored)


class TrackingLogger(Protocol):
    """What the runner and the FedML plugin call. Run ids are ``None`` when nothing is stored (:class:`NullLogger`)."""

    enabled: bool  # True when runs are stored: then they, not the checkpoints, say which cells finished
    uri: Optional[str]
    experiment: str

    def start_parent(self, run_name: str, tags: Optional[Mapping[str, str]] = None,
                     params: Optional[Mapping[str, Any]] = None) -> Optional[str]:
        """Open (or adopt) the parent run of a grid invocation."""

    def end_parent(self, status: Status = "FINISHED") -> None:
        """End the parent run opened by :meth:`start_parent`."""

    def start_cell(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                   resume_run_id: Optional[str] = None) -> Optional[str]:
        """Open a nested run (or resume ``resume_run_id``); returns its id."""

    def end_cell(self, run_id: Optional[str], status: Status = "FINISHED") -> None:
        """End a run opened by :meth:`start_cell`."""

    def log_round(self, run_id: Optional[str], metrics: Mapping[str, Any], step: int) -> None:
        """The finite numeric metrics of one round at ``step``."""

    def log_summary(self, run_id: Optional[str], summary: Mapping[str, float]) -> None:
        """The run's summary metrics."""

    def logged_steps(self, run_id: Optional[str]) -> Set[int]:
        """The rounds already logged to the run."""

    def log_artifact(self, run_id: Optional[str], path: Artifact) -> None:
        """Attach a file to the run."""

    def finished_runs(self, cell_hashes: Iterable[str]) -> Dict[str, Any]:
        """cell hash -> the newest FINISHED run carrying it."""


class NullLogger(TrackingLogger):
    """Tracking off: every call does nothing (an artifact function is never called); a resumed id is kept."""

    enabled = False
    uri = None

    def __init__(self, experiment: str = "") -> None:
        self.experiment = experiment

    def start_parent(self, run_name: str, tags: Optional[Mapping[str, str]] = None,
                     params: Optional[Mapping[str, Any]] = None) -> Optional[str]:
        return None

    def end_parent(self, status: Status = "FINISHED") -> None:
        return None

    def start_cell(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                   resume_run_id: Optional[str] = None) -> Optional[str]:
        return resume_run_id

    def end_cell(self, run_id: Optional[str], status: Status = "FINISHED") -> None:
        return None

    def log_round(self, run_id: Optional[str], metrics: Mapping[str, Any], step: int) -> None:
        return None

    def log_summary(self, run_id: Optional[str], summary: Mapping[str, float]) -> None:
        return None

    def logged_steps(self, run_id: Optional[str]) -> Set[int]:
        return set()

    def log_artifact(self, run_id: Optional[str], path: Artifact) -> None:
        return None

    def finished_runs(self, cell_hashes: Iterable[str]) -> Dict[str, Any]:
        return {}


def _uri_is_explicit(sets: Sequence[str]) -> bool:
    return any(s.split("=", 1)[0].strip() == "tracking_args.mlflow_tracking_uri" for s in sets)


def tracker_from_config(cfg: Config, sets: Sequence[str] = (), experiment: Optional[str] = None) -> TrackingLogger:
    """The logger for a config and its ``--set`` overrides: :class:`MlflowLogger` on the resolved URI, else
    :class:`NullLogger`. The experiment is ``experiment`` when given (the FedML plugin names its own), else
    ``tracking_args.mlflow_experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else the benchmark name."""
    uri = resolve_tracking_uri(cfg.tracking_args.mlflow_tracking_uri, _uri_is_explicit(sets))
    name = experiment or (cfg.tracking_args.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                          or cfg.benchmark_args.name)
    return MlflowLogger(uri, name) if uri else NullLogger(name)


def sqlite_artifact_root(uri: str) -> Optional[Path]:
    """``<folder of the database>/mlruns`` (created) for a ``sqlite:///`` URI, else None. Without a location MLflow
    would drop artifacts into ./mlruns; they stay beside the database instead (a folder version control ignores)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return db.parent.resolve() / "mlruns"


class MlflowLogger(TrackingLogger):
    """Parent/child MLflow runs over ``MlflowClient`` (explicit run ids, no global active-run stack)."""

    enabled = True

    def __init__(self, tracking_uri: str, experiment: str, store_uri: Optional[str] = None) -> None:
        """``store_uri``: the sqlite store a local server (``tracking_uri``) serves, so that an experiment created
        through the server keeps its artifacts where a direct sqlite client puts them."""
        mlflow = _mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        root = sqlite_artifact_root(store_uri or tracking_uri)
        artifact_location = (root / experiment).as_uri() if root is not None else None
        stray = Path("mlruns")  # a sqlite store mkdirs its default artifact root ./mlruns even when unused
        stray_existed = stray.exists()
        with _quiet_store_init():
            self.client = MlflowClient(tracking_uri=tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
        if not stray_existed:
            with contextlib.suppress(OSError):
                stray.rmdir()  # only if empty
        # the experiment is created (or restored) on the first write only, so a run that fails its pre-run checks,
        # or a leaderboard query, leaves no empty experiment behind
        self._found = exp
        self._artifact_location = artifact_location
        self.experiment = experiment
        self.parent_id: Optional[str] = None
        self._own_parent = False
        self._mlflow = mlflow

    @property
    def experiment_id(self) -> str:
        """The experiment's id, creating (or restoring a deleted) experiment on first use: call it only to write."""
        exp = self._found
        if exp is None:
            try:
                eid = self.client.create_experiment(self.experiment, artifact_location=self._artifact_location)
            except Exception:  # noqa: BLE001 - another process (a concurrent shard) created it first
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                eid = found.experiment_id
            self._found = exp = self.client.get_experiment(eid)
        elif exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
            self._found = exp = self.client.get_experiment(exp.experiment_id)
        return exp.experiment_id

    # ---- parent run ---------------------------------------------------------------------------------------------
    def start_parent(self, run_name: str, tags: Optional[Mapping[str, str]] = None,
                     params: Optional[Mapping[str, Any]] = None) -> str:
        """Use ``MLFLOW_RUN_ID`` or the caller's active run as the parent; else open a new parent run."""
        active = self._mlflow.active_run()
        given = os.environ.get("MLFLOW_RUN_ID") or (active.info.run_id if active is not None else None)
        if given:
            self.parent_id, self._own_parent = given, False
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
            self.parent_id, self._own_parent = run.info.run_id, True
            self.log_params(self.parent_id, params or {})
        return self.parent_id

    def end_parent(self, status: Status = "FINISHED") -> None:
        if self.parent_id and self._own_parent:
            self.client.set_terminated(self.parent_id, status)

    # ---- cell runs ----------------------------------------------------------------------------------------------
    def start_cell(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                   resume_run_id: Optional[str] = None) -> str:
        """A nested run under the parent; an interrupted cell's run is resumed (and moved under this parent)."""
        if resume_run_id:
            try:
                run = self.client.get_run(resume_run_id)
            except Exception:  # deleted, other store: start a fresh run
                run = None
            if run is not None and run.info.experiment_id == self.experiment_id:
                old_parent = run.data.tags.get("mlflow.parentRunId")
                if old_parent and old_parent != self.parent_id:
                    self._close_stale_parent(old_parent)
                    self.client.set_tag(resume_run_id, "mlflow.parentRunId", self.parent_id)
                self.client.update_run(resume_run_id, status="RUNNING")
                self.client.set_tag(resume_run_id, "resumed", "true")
                return resume_run_id
            logger.warning("MLflow run %s of the checkpoint is not in experiment %r; starting a new run",
                           resume_run_id, self.experiment)
        all_tags = {**tags, "git_commit": git_commit(), "fedml_pfedmoap_version": package_version()}
        if self.parent_id:
            all_tags["mlflow.parentRunId"] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def _close_stale_parent(self, run_id: str) -> None:
        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")
        except Exception:  # noqa: BLE001 - best effort bookkeeping
            pass

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_round(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """One batched call per round; non-finite values (e.g. zero-shot's train loss) are skipped."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, int(step)) for k, v in _finite(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def metric_history(self, run_id: str, key: str) -> List[Tuple[int, float]]:
        """(step, value) of every logged value of ``key``."""
        return [(int(m.step), float(m.value)) for m in self.client.get_metric_history(run_id, key)]

    def logged_steps(self, run_id: str) -> Set[int]:
        return {step for step, _ in self.metric_history(run_id, STEP_KEY)}

    def log_summary(self, run_id: str, summary: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in _finite(summary).items()])

    @contextlib.contextmanager
    def _artifact_uri(self):
        """``mlflow-artifacts:/`` (a server's proxied store) resolves against the *global* tracking URI even for a
        client with its own URI, so point the global one at ours for the duration of an artifact call."""
        # a private helper, present from MLflow 2.22 to 3.x (the tracking tests run on both: docs/install.md)
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(self.uri):
            yield

    def log_artifact(self, run_id: str, path: Artifact, artifact_path: Optional[str] = None) -> None:
        """Upload a file; a function is called first to write it."""
        with self._artifact_uri():
            self.client.log_artifact(run_id, str(path() if callable(path) else path), artifact_path)

    def download_artifact(self, run_id: str, path: str, dst: str | Path) -> Path:
        with self._artifact_uri():
            return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def end_cell(self, run_id: str, status: Status = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    # ---- queries --------------------------------------------------------------------------------------------------
    def finished_runs(self, cell_hashes: Iterable[str]) -> Dict[str, Any]:
        """cell hash -> the newest FINISHED nested run carrying it (searched in one paged query)."""
        wanted = set(cell_hashes)
        out: Dict[str, Any] = {}
        if self._found is None:  # no experiment yet: nothing finished (and nothing created by asking)
            return out
        token = None
        while True:
            page = self.client.search_runs([self._found.experiment_id], "attributes.status = 'FINISHED'",
                                           max_results=1000, order_by=["attributes.start_time DESC"],
                                           page_token=token)
            for run in page:
                h = run.data.tags.get("cell_hash")
                if h in wanted and h not in out:
                    out[h] = run
            token = page.token
            if not token:
                return out


# ---- artifacts written by the runner ------------------------------------------------------------------------------
def write_client_acc_csv(client_acc: Sequence[Sequence[float]], rounds: Sequence[Mapping[str, Any]],
                         path: str | Path) -> Path:
    """Long form ``round, client, acc`` for every evaluated round."""
    eval_rounds = [int(r["round"]) for r in rounds if "acc_mean" in r]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "client", "acc"])
        for t, accs in zip(eval_rounds, client_acc):
            for cid, a in enumerate(accs):
                w.writerow([t, cid, f"{float(a):.6f}"])
    return Path(path)


def read_client_acc_csv(path: str | Path) -> Dict[int, List[float]]:
    """round -> per-client accuracies (inverse of ``write_client_acc_csv``)."""
    out: Dict[int, List[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(int(row["round"]), []).append(float(row["acc"]))
    return out
