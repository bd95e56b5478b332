"""How ``pfedmoap-bench run`` executes the pending cells of a grid (docs/benchmark.md §Multi-GPU machines and
clusters).

* ``sequential`` (default): one cell after the other in this process, sharing one ``Resources``;
* ``ray``: every cell is a Ray task in a worker process of its own (``ray_executor.py``, Ray imported only then).

Both keep going when a cell raises: the cell's run is ended FAILED, the failure (label and error line) is collected and
the rest of the grid runs; ``runner.main`` lists the failed cells and exits 1. Ctrl-C stops everything.

``session.grid_session`` opens the tracker and the executor of one invocation.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Protocol, Sequence, Tuple

from fedml_pfedmoap.errors import UserError

logger = logging.getLogger(__name__)
EXECUTORS = ("sequential", "ray")


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


class CellProgress(Protocol):
    """How a running cell reports to the grid's one progress bar (in this process, or from a Ray task)."""

    def rounds(self, done: int, post: Dict[str, str]) -> None:
        """``done`` rounds of the cell are finished (a count, not an increment: a resumed cell reports it again)."""


class BarProgress(CellProgress):
    """One cell's reports turned into increments of a tqdm bar."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.done = bar, 0

    def rounds(self, done: int, post: Dict[str, str]) -> None:
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done
        if post:
            self.bar.set_postfix(post, refresh=False)


class SequentialExecutor:
    """The cells one after the other in this process; a cell that raises is reported and the next one runs."""

    def run(self, runner: Any, pending: Sequence[Any], bar: Any) -> Tuple[Dict[str, Any], List[CellFailure]]:
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
