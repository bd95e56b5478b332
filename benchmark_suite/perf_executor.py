"""``pfedmoap-bench perf-executor``: the Ray executor's overhead per cell and a small grid's wall time with W Ray
workers against the sequential executor, measured side by side in one invocation (docs/performance.md §Executors).

The same cells run twice with tracking off, outputs in a temporary folder: first sequentially in this process, then as
Ray tasks on a local Ray instance of W CPUs (one CPU per cell, so W cells at a time). Timestamps taken inside each
task (``time.time()``, one machine) split the Ray side into: starting the instance; a worker's first task from
submission to the start of its body (worker process start, imports, function and argument transfer); a warm worker's
gap between two tasks; the return of a result to the driver; and the cell inside the task, which builds the worker's
own resources (model, dataset, cached features) on its first cell where the sequential run reuses the ones of its
pre-run checks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from .runner import GridRunner

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
DEFAULT_SETS = ("train_args.comm_round=5", "device_args.num_threads=1", "tracking_args.mlflow_tracking_uri=null")
DEFAULT_ONLY = ("split=pathological", "algo=local,promptfl,fedprox,fedotp,fedpgp,pfedmoap")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="benchmark YAML (default: the quickstart)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"config override, after the defaults {' '.join(DEFAULT_SETS)}")
    p.add_argument("--only", action="append", default=None, metavar="KEY=V1[,V2]",
                   help=f"cells to time (default: {' '.join(DEFAULT_ONLY)})")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local Ray instance)")
    p.add_argument("--out", default=None, help="also write the measurements as JSON here")


def timed_job(job: Any, reporter: Any) -> Tuple[Any, Dict[str, float]]:
    """``run_job`` with the wall-clock start and end of the task body and the worker's process id."""
    from .ray_executor import run_job

    start = time.time()
    record = run_job(job, reporter)
    return record, {"start": start, "end": time.time(), "pid": os.getpid()}


class _TimedRunner(GridRunner):
    """Records the time of every ``run_cell``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cell_s: Dict[str, float] = {}

    def run_cell(self, cell: Any, progress: Any, position: str) -> Any:
        t0 = time.perf_counter()
        record = super().run_cell(cell, progress, position)
        self.cell_s[cell.hash] = time.perf_counter() - t0
        return record


def _timed_grid(cells: Sequence[Any], out: Path, executor: Any = None) -> Tuple[float, _TimedRunner]:
    runner = _TimedRunner(out, progress=False, executor=executor)
    t0 = time.perf_counter()
    runner.run(cells, "perf-executor", {})
    wall = time.perf_counter() - t0
    if runner.failed:
        raise RuntimeError(f"perf-executor: cell {runner.failed[0].label} failed: {runner.failed[0].error}")
    return wall, runner


def _ray_side(base: Any, cells: Sequence[Any], out: Path, workers: int) -> Dict[str, Any]:
    from .ray_executor import RayExecutor, ray_executor

    class Timed(RayExecutor):
        body = staticmethod(timed_job)

        def run(self, runner: Any, pending: Sequence[Any], bar: Any) -> Any:
            records, failures = super().run(runner, pending, bar)
            self.body_times = {h: t for h, (_, t) in records.items()}
            return {h: r for h, (r, _) in records.items()}, failures

    ns = argparse.Namespace(address=None, cell_gpus=0.0, cell_cpus=1.0, max_retries=0)
    t0 = time.perf_counter()
    with ray_executor(base, ns, num_cpus=workers, kind=Timed) as ex:
        start_s = time.perf_counter() - t0
        wall, _ = _timed_grid(cells, out, ex)
    first: Dict[int, float] = {}
    gaps: List[float] = []
    by_pid: Dict[int, List[Dict[str, Any]]] = {}
    for h, t in ex.body_times.items():
        by_pid.setdefault(int(t["pid"]), []).append({**t, "submitted": ex.submitted_at[h], "hash": h})
    for pid, ts in by_pid.items():
        ts.sort(key=lambda t: t["start"])
        first[pid] = ts[0]["start"] - ts[0]["submitted"]
        gaps += [b["start"] - a["end"] for a, b in zip(ts, ts[1:])]
    return {"ray_start_s": start_s, "wall_s": wall, "workers_used": len(by_pid),
            "first_cells": [ts[0]["hash"] for ts in by_pid.values()],
            "first_task_start_s": list(first.values()), "warm_gap_s": gaps,
            "return_s": [ex.ready_at[h] - t["end"] for h, t in ex.body_times.items()],
            "cell_s": {h: t["end"] - t["start"] for h, t in ex.body_times.items()}}


def _med(xs: Sequence[float]) -> str:
    return f"{statistics.median(xs):.2f}" if xs else "–"


def table(seq_wall: float, seq_cells: Dict[str, float], ray_m: Dict[str, Any], workers: int) -> str:
    """The side-by-side Markdown table."""
    n = len(seq_cells)
    rows = [("grid wall time, s (pre-run checks included)", f"{seq_wall:.1f}",
             f"{ray_m['wall_s']:.1f} (+ {ray_m['ray_start_s']:.1f} Ray start)"),
            ("cell time, median s (min–max)", f"{_med(list(seq_cells.values()))} "
             f"({min(seq_cells.values()):.2f}–{max(seq_cells.values()):.2f})",
             f"{_med(list(ray_m['cell_s'].values()))} ({min(ray_m['cell_s'].values()):.2f}–"
             f"{max(ray_m['cell_s'].values()):.2f}), inside the task"),
            ("extra time of a worker's first cell, median s (imports, its own model, data and features)", "–",
             _med([ray_m["cell_s"][h] - seq_cells[h] for h in ray_m["first_cells"]])),
            ("extra time of a later cell on the same worker, median s", "–",
             _med([ray_m["cell_s"][h] - seq_cells[h] for h in seq_cells if h not in ray_m["first_cells"]])),
            ("worker's first task: submission to body start, median s", "–", _med(ray_m["first_task_start_s"])),
            ("warm worker: gap between two tasks, median s", "–", _med(ray_m["warm_gap_s"])),
            ("result back at the driver, median s", "–", _med(ray_m["return_s"]))]
    head = [f"| {n} cells | sequential | Ray, {workers} workers ({ray_m['workers_used']} used) |", "|---|---|---|"]
    return "\n".join(head + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main(args: argparse.Namespace) -> int:
    from fedml_pfedmoap.config import load_config

    from .grid import expand_grid, unique_cells

    if args.workers < 1:
        raise ValueError(f"--workers: expected an integer >= 1, got {args.workers}")
    base = load_config(args.config, list(DEFAULT_SETS) + list(args.set))
    cells = unique_cells(expand_grid(base, DEFAULT_ONLY if args.only is None else args.only))
    with tempfile.TemporaryDirectory(prefix="perf-executor-") as tmp:
        seq_wall, seq = _timed_grid(cells, Path(tmp) / "seq")
        ray_m = _ray_side(base, cells, Path(tmp) / "ray", args.workers)
    print(table(seq_wall, seq.cell_s, ray_m, args.workers))
    if args.out:
        from fedml_pfedmoap.fileio import atomic_write_json

        atomic_write_json(args.out, {"cells": [c.label for c in cells], "sequential": {
            "wall_s": seq_wall, "cell_s": seq.cell_s}, "ray": ray_m}, indent=1)
    return 0
