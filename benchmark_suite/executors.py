"""How ``pfedmoap-bench run`` executes the pending cells of a grid (docs/benchmark.md §Multi-GPU machines and
clusters).

* ``sequential`` (default): one cell after the other in this process, sharing one ``Resources``;
* ``ray``: every cell is a Ray task in a worker process of its own (``ray_executor.py``, Ray imported only then).

Both keep going when a cell raises: the cell's run is ended FAILED, the failure (label and error line) is collected and
the rest of the grid runs; ``runner.main`` lists the failed cells and exits 1. Ctrl-C stops everything.

:func:`grid_session` opens what a grid invocation needs for its whole life: the tracker (with the Ray executor a file
store such as sqlite is served by an MLflow tracking server, since many processes must not write one sqlite file) and
the executor (a Ray instance started here is shut down at the end).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from fedml_pfedmoap.errors import UserError

logger = logging.getLogger(__name__)
EXECUTORS = ("sequential", "ray")
HTTP = ("http://", "https://")


@dataclass(frozen=True)
class CellFailure:
    """A cell that raised: its label and the one-line error."""

    label: str
    error: str


def error_line(err: BaseException) -> str:
    """``TypeName: first line of the message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor``, ``--address``, ``--cell-gpus``, ``--cell-cpus``, ``--max-retries``."""
    parser.add_argument("--executor", choices=EXECUTORS, default="sequential",
                        help="sequential: cells one after the other here; ray: every cell a Ray task")
    parser.add_argument("--address", default=None, metavar="HOST:PORT",
                        help="(ray) an existing Ray cluster, left running; default: start a local instance")
    parser.add_argument("--cell-gpus", type=float, default=None, metavar="G",
                        help="(ray) GPUs per cell, fractional allowed (0.5: two cells per GPU); default 1 when "
                             "device_args.device is cuda, else 0")
    parser.add_argument("--cell-cpus", type=float, default=1.0, metavar="N", help="(ray) CPUs per cell (default 1)")
    parser.add_argument("--max-retries", type=int, default=2, metavar="R",
                        help="(ray) retries of a cell whose worker process died (default 2); an exception raised by "
                             "the cell is never retried")


def check_executor_arguments(args: argparse.Namespace) -> None:
    """One-line errors for flags that do not fit together."""
    if args.executor != "ray":
        given = [f for f, v in (("--address", args.address), ("--cell-gpus", args.cell_gpus)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only with --executor ray")
        return
    if args.cell_gpus is not None and args.cell_gpus < 0:
        raise UserError(f"--cell-gpus: expected a number >= 0, got {args.cell_gpus:g}")
    if args.cell_cpus <= 0:
        raise UserError(f"--cell-cpus: expected a number > 0, got {args.cell_cpus:g}")
    if args.max_retries < 0:
        raise UserError(f"--max-retries: expected an integer >= 0, got {args.max_retries}")


class SequentialExecutor:
    """The cells one after the other in this process; a cell that raises is reported and the next one runs."""

    def run(self, runner: Any, pending: Sequence[Any], bar: Any) -> Tuple[Dict[str, Any], List[CellFailure]]:
        from .runner import BarProgress

        records: Dict[str, Any] = {}
        failures: List[CellFailure] = []
        progress = BarProgress(bar)
        for i, cell in enumerate(pending):
            progress.done = 0
            before = bar.n
            try:
                records[cell.hash] = runner.run_cell(cell, progress, f"{i + 1}/{len(pending)}")
            except Exception as err:  # noqa: BLE001 - the cell's run is FAILED; the grid goes on
                logger.exception("cell %s failed", cell.label)
                failures.append(CellFailure(cell.label, error_line(err)))
                bar.update(before + cell.cfg.train_args.comm_round - bar.n)  # its rounds leave the bar's ETA
        return records, failures


def _uri_needs_server(uri: str) -> bool:
    return not uri.startswith(HTTP)


@contextlib.contextmanager
def grid_session(base: Any, args: argparse.Namespace) -> Iterator[Tuple[Any, Any]]:
    """(tracker, executor) for one ``run`` invocation. With ``--executor ray`` and a store that is not an http(s)
    server, runs go through ``--mlflow-server`` (default ``auto`` for a local Ray instance: a server on 127.0.0.1 over
    the configured store, stopped at the end); with ``--address`` an explicit server is required, since a loopback
    server is out of reach of the other nodes."""
    from fedml_pfedmoap.tracking import MlflowLogger, _uri_is_explicit, resolve_tracking_uri, tracker_from_config

    check_executor_arguments(args)
    uri = resolve_tracking_uri(base.tracking_args.mlflow_tracking_uri, _uri_is_explicit(args.set))
    server = getattr(args, "mlflow_server", None)
    if args.executor == "ray" and uri and _uri_needs_server(uri) and server is None:
        if args.address:  # checked before the tracker exists: a refused command creates no store
            raise UserError(f"--executor ray --address: tracking URI {uri} is a file store that the "
                            f"cluster's processes must not write at once; pass --mlflow-server http://HOST:PORT "
                            f"(a server every node reaches), or turn tracking off with "
                            f"--set tracking_args.mlflow_tracking_uri=null")
        server = "auto"
    tracker = tracker_from_config(base, args.set)
    with contextlib.ExitStack() as stack:
        if server is not None and tracker.enabled and _uri_needs_server(tracker.uri):
            try:
                from .mlflow_server import tracking_server
            except ImportError as err:  # pragma: no cover - the module ships with the package
                raise UserError(f"--mlflow-server: the tracking server helper is missing ({err})") from None
            tracker = MlflowLogger(stack.enter_context(tracking_server(server, tracker.uri)), tracker.experiment)
        if args.executor == "ray":
            from .ray_executor import ray_executor

            executor = stack.enter_context(ray_executor(base, args))
        else:
            executor = SequentialExecutor()
        yield tracker, executor
