"""``pfedmoap-bench run --executor ray``: every pending cell is a Ray task (docs/benchmark.md §Multi-GPU machines and
clusters). Imported only for that executor, so Ray stays an optional extra (``pip install fedml_pfedmoap[ray]``).

* Each task asks for ``--cell-gpus`` GPUs (fractional: several cells share one) and ``--cell-cpus`` CPUs, builds the
  ``Resources`` of its worker process (kept for the next cell the process runs) and runs the cell through
  ``GridRunner.run_cell``: its checkpoints under the shared output folder and its nested MLflow run under the
  driver's parent run, over an http tracking URI.
* A worker process that dies (killed, out of memory, node lost) makes Ray run the task again, up to
  ``--max-retries`` times: the retry resumes the cell from its last round checkpoint and reopens the run the
  checkpoint names, so the cell keeps one run and the same numbers. An exception raised by the cell is not retried
  (``retry_exceptions=False``): the cell fails once with its error and the grid goes on.
* Round progress comes back through a small actor that the driver polls for its one progress bar.
* Ctrl-C cancels the tasks (their worker processes are killed), ends the still running cell runs as KILLED and, like
  every exit, shuts down the Ray instance if this command started it (an ``--address`` cluster is left running).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from fedml_pfedmoap.errors import UserError

from .executors import CellFailure, CellProgress, error_line

try:
    import ray
except ImportError:  # pragma: no cover - depends on the install
    ray = None

logger = logging.getLogger(__name__)
POLL_S = 0.5
FAULT_PREFIX = "PFEDMOAP_FAULT_"
_WORKER_RESOURCES: Dict[str, Any] = {}  # per worker process, keyed by its visible GPUs


@dataclass(frozen=True)
class CellJob:
    """What a task needs to run one cell in a fresh process (plain, picklable data)."""

    cell: Any
    position: str
    out_dir: str
    uri: Optional[str]
    experiment: str
    parent_id: Optional[str]
    checkpoint_every: int
    runner_cls: type  # runner.GridRunner (passed in: this module does not import the runner)


class _Reporter:
    """Actor body: rounds finished per cell and the latest progress-bar postfix, read by the driver."""

    def __init__(self) -> None:
        self.done: Dict[str, int] = {}
        self.post: Dict[str, str] = {}

    def rounds(self, cell_hash: str, done: int, post: Dict[str, str]) -> None:
        self.done[cell_hash] = max(done, self.done.get(cell_hash, 0))
        if post:
            self.post = post

    def poll(self) -> Tuple[int, Dict[str, str]]:
        return sum(self.done.values()), dict(self.post)


class ActorProgress(CellProgress):
    """A task's progress reports, sent to the reporter actor without waiting."""

    def __init__(self, reporter: Any, cell_hash: str) -> None:
        self.reporter, self.cell_hash = reporter, cell_hash

    def rounds(self, done: int, post: Dict[str, str]) -> None:
        self.reporter.rounds.remote(self.cell_hash, done, post)


def run_job(job: CellJob, reporter: Any) -> Any:
    """The task body: one cell in this worker process; returns its ``CellRecord``."""
    from fedml_pfedmoap.experiment import Resources
    from fedml_pfedmoap.tracking import MlflowLogger, NullLogger

    tracker: Any = NullLogger(job.experiment) if job.uri is None else MlflowLogger(job.uri, job.experiment)
    tracker.parent_id = job.parent_id
    resources = _WORKER_RESOURCES.setdefault(os.environ.get("CUDA_VISIBLE_DEVICES", ""), Resources())
    runner = job.runner_cls(Path(job.out_dir), tracker, progress=False, checkpoint_every=job.checkpoint_every,
                        resources=resources)
    return runner.run_cell(job.cell, ActorProgress(reporter, job.cell.hash), job.position)


class RayExecutor:
    """Runs the pending cells as Ray tasks on the connected Ray instance and collects records and failures;
    ``submitted_at`` / ``ready_at`` hold each cell's ``time.time()`` of submission and of its result's arrival."""

    body: Callable[..., Any] = staticmethod(run_job)  # the task body (the perf command times a wrapper of it)

    def __init__(self, cell_gpus: float, cell_cpus: float, max_retries: int) -> None:
        self.cell_gpus, self.cell_cpus, self.max_retries = cell_gpus, cell_cpus, max_retries
        self.submitted_at: Dict[str, float] = {}
        self.ready_at: Dict[str, float] = {}

    def _task(self) -> Any:
        env = {k: v for k, v in os.environ.items() if k.startswith(FAULT_PREFIX) and v}  # the runner's test hooks
        opts: Dict[str, Any] = {"num_cpus": self.cell_cpus, "num_gpus": self.cell_gpus,
                                "max_retries": self.max_retries, "retry_exceptions": False}
        if env:
            opts["runtime_env"] = {"env_vars": env}
        return ray.remote(self.body).options(**opts)

    def run(self, runner: Any, pending: Sequence[Any], bar: Any) -> Tuple[Dict[str, Any], List[CellFailure]]:
        from fedml_pfedmoap.experiment import Resources

        runner.resources = Resources()  # the pre-run checks' models and features: the tasks build their own
        if runner.rerun:  # a retried task must resume this invocation's checkpoints, so drop the old ones now
            for c in pending:
                runner.store(c).clear()
        tr = runner.tracker
        reporter = ray.remote(num_cpus=0)(_Reporter).remote()
        task = self._task()
        self.submitted_at = {c.hash: time.time() for c in pending}
        refs = {task.remote(CellJob(c, f"{i + 1}/{len(pending)}", str(runner.out_dir), tr.uri if tr.enabled else None,
                                    tr.experiment, getattr(tr, "parent_id", None), runner.every, type(runner)),
                          reporter): c
                for i, c in enumerate(pending)}
        records: Dict[str, Any] = {}
        failures: List[CellFailure] = []
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    cell = refs.pop(ref)
                    self.ready_at[cell.hash] = time.time()
                    try:
                        records[cell.hash] = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        failures.append(CellFailure(cell.label, self._failure_line(err)))
                        logger.error("cell %s failed: %s", cell.label, err)
                self._show(reporter, bar)
        except KeyboardInterrupt:
            self._cancel(list(refs), tr)
            raise
        return records, failures

    def _failure_line(self, err: BaseException) -> str:
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            return error_line(cause)
        return f"{error_line(err)} (the worker process died; Ray ran the cell {self.max_retries + 1} time(s))"

    @staticmethod
    def _show(reporter: Any, bar: Any) -> None:
        done, post = ray.get(reporter.poll.remote())
        if done > bar.n:
            bar.update(done - bar.n)
        if post:
            bar.set_postfix(post, refresh=False)

    @staticmethod
    def _cancel(refs: List[Any], tracker: Any) -> None:
        """Kill the running tasks, then end their cells' runs (still RUNNING under our parent) as KILLED."""
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=10)
        client, parent = getattr(tracker, "client", None), getattr(tracker, "parent_id", None)
        if client is None or not parent:
            return
        for run in client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                      "attributes.status = 'RUNNING'", max_results=1000):
            client.set_terminated(run.info.run_id, "KILLED")


def default_cell_gpus(base: Any) -> float:
    """1 when the config asks for CUDA, else 0."""
    return 1.0 if str(base.device_args.device).startswith("cuda") else 0.0


@contextlib.contextmanager
def ray_executor(base: Any, args: argparse.Namespace, num_cpus: Optional[int] = None,
                 kind: type = RayExecutor) -> Iterator[RayExecutor]:
    """Connect to ``--address`` (left running) or start a local Ray instance with ``num_cpus`` CPUs (default: the
    machine's), shut down on exit, Ctrl-C included; yields a ``kind`` executor."""
    if ray is None:
        raise UserError("--executor ray needs Ray: pip install 'fedml_pfedmoap[ray]'")
    gpus = default_cell_gpus(base) if args.cell_gpus is None else float(args.cell_gpus)
    t0 = time.perf_counter()
    # the default (a task without GPUs sees none) is what we want; silence Ray's notice that it may change
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
    try:
        ray.init(address=args.address or "local", num_cpus=None if args.address else num_cpus,
                 include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    except ConnectionError as err:
        raise UserError(f"--address {args.address}: no Ray cluster reachable there ({error_line(err)})") from None
    try:
        have = ray.cluster_resources()
        logger.info("Ray %s (%s) in %.1f s: %s", "cluster " + args.address if args.address else "local instance",
                    ray.__version__, time.perf_counter() - t0, have)
        for flag, key, want in (("--cell-cpus", "CPU", float(args.cell_cpus)), ("--cell-gpus", "GPU", gpus)):
            if want > have.get(key, 0.0):  # such a task would wait for ever
                raise UserError(f"{flag} {want:g}: the Ray cluster has {have.get(key, 0.0):g} {key}(s) in all")
        yield kind(gpus, float(args.cell_cpus), int(args.max_retries))
    finally:
        ray.shutdown()
