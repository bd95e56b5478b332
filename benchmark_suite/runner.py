"""``pfedmoap-bench run --config FILE [--set key=value ...] [--only algo=...]``: run a benchmark grid.

The grid (``benchmark_args``, see ``grid.py``) is expanded and validated before anything runs. An executor
(``executors.py``) runs the pending cells: ``sequential`` (default) one after the other in this process, sharing one
``Resources`` (backbone, dataset, cached features); ``ray`` each cell as a Ray task in a worker process of its own
(``ray_executor.py``, docs/benchmark.md §Multi-GPU machines and clusters). Cells of one (dataset, split, data seed)
share one partition through the partition files. Each cell logs to MLflow (a nested run under this invocation's
parent run) and checkpoints at every round boundary; a rerun skips finished cells and continues an interrupted cell
from its last checkpoint with the same final numbers. At the end the leaderboard table is printed and
``<output_dir>/<benchmark>/summary.csv``, ``LEADERBOARD.md`` and plots are written (from MLflow when tracking is on).
Every pre-run check (data present, partition possible, model resolvable) runs in this process before any MLflow
experiment or run is created, so a failed check leaves nothing behind. A cell that raises is ended FAILED, the others
still run, and the command lists the failed cells and exits 1; Ctrl-C ends the open runs as KILLED and raises
:class:`Interrupted`.
Logging goes through ``fedml_pfedmoap.tracking.TrackingLogger`` (a no-op logger when tracking is off); see
docs/benchmark.md §Running a grid and §Where the results go.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fedml_pfedmoap.tracking import NullLogger, TrackingLogger

from . import shards
from .executors import CellProgress
from .grid import Cell, CellRecord, expand_grid, unique_cells

logger = logging.getLogger(__name__)
# test hooks "<cell label substring>@<round>": stall (printing the process id) or raise after that round's checkpoint
FAULT_ENV = "PFEDMOAP_FAULT_STALL"
FAULT_RAISE_ENV = "PFEDMOAP_FAULT_RAISE"


class Interrupted(Exception):
    """Ctrl-C during a grid: the MLflow runs are ended as KILLED and the checkpoints kept; ``str()`` is the one line
    the command line prints."""

    def __init__(self, msg: str = "interrupted; run the same command again to resume: finished cells are skipped and "
                                  "the interrupted cell continues from its last checkpoint") -> None:
        super().__init__(msg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="benchmark YAML (FedML-style sections + benchmark_args)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. train_args.comm_round=3 (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V1[,V2]",
                        help="run a subset: algo=, dataset=, split=, seed=, override= (repeatable, ANDed)")
    parser.add_argument("--rerun", action="store_true", help="ignore finished runs and checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="R", help="checkpoint every R rounds")
    parser.add_argument("--headline", default="acc_last5", choices=("acc_last5", "acc_last"))
    shards.add_argument(parser)
    from .executors import add_executor_arguments
    from .mlflow_server import add_argument as add_server_argument

    add_server_argument(parser)
    add_executor_arguments(parser)


def cell_params(cell: Cell, partition_hash: str) -> Dict[str, Any]:
    """The flattened resolved config (other algorithms' hyperparameters left out) plus the partition hash."""
    flat = {k: v for k, v in cell.cfg.flat().items()
            if not k.startswith("algorithm_args.") or k.startswith(f"algorithm_args.{cell.algorithm}.")}
    flat["partition_hash"] = partition_hash
    return flat


def _fault_injection(label: str, round_idx: int) -> None:
    for env in (FAULT_ENV, FAULT_RAISE_ENV):
        spec = os.environ.get(env)
        if not spec or "@" not in spec:
            continue
        where, rnd = spec.rsplit("@", 1)
        if where in label and int(rnd) == round_idx:
            if env == FAULT_RAISE_ENV:
                raise RuntimeError(f"injected fault in {label} after round {round_idx}")
            print(f"FAULT-STALL {label} round {round_idx} pid {os.getpid()}", file=sys.stderr, flush=True)
            time.sleep(3600)


class GridRunner:
    """Runs cells with shared resources, MLflow logging, checkpoints and one progress bar with an ETA."""

    def __init__(self, out_dir: Path, tracker: Optional[TrackingLogger] = None, progress: bool = True,
                 rerun: bool = False, checkpoint_every: int = 1, executor: Optional[Any] = None,
                 resources: Optional[Any] = None) -> None:
        from fedml_pfedmoap.experiment import Resources

        from .executors import SequentialExecutor

        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.tracker: TrackingLogger = tracker if tracker is not None else NullLogger()
        self.progress = progress
        self.rerun = rerun
        self.every = max(1, int(checkpoint_every))
        self.resources = resources if resources is not None else Resources()
        self.executor = executor if executor is not None else SequentialExecutor()
        self.ran: List[str] = []  # labels of the cells run (or continued) by this invocation
        self.failed: List[Any] = []  # executors.CellFailure of the cells that raised
        self._tmp = tempfile.TemporaryDirectory(prefix="pfedmoap-bench-")
        self._partition_png: Dict[tuple, Path] = {}

    def store(self, cell: Cell) -> Any:
        from fedml_pfedmoap.checkpoint import CheckpointStore

        return CheckpointStore(self.ckpt_dir, cell.slug)

    def finished(self, cells: Sequence[Cell]) -> Dict[str, Any]:
        """cell hash -> evidence that the cell finished: its FINISHED run when the tracker stores runs, else a record
        from the cell's finished checkpoint."""
        from fedml_pfedmoap.checkpoint import result_from

        if self.rerun:
            return {}
        if self.tracker.enabled:
            return dict(self.tracker.finished_runs([c.hash for c in cells]))
        out = {}
        for c in cells:
            ck = self.store(c).load(c.hash)
            if ck is not None and ck.get("finished"):
                out[c.hash] = CellRecord.from_result(c, result_from(ck), ck.get("mlflow_run_id"))
        return out

    def run(self, cells: Sequence[Cell], run_name: str, parent_tags: Dict[str, str]) -> Dict[str, CellRecord]:
        """Run every unfinished cell; returns cell hash -> CellRecord for the cells run here."""
        from tqdm.auto import tqdm

        todo = unique_cells(cells)
        done = self.finished(todo)
        pending = [c for c in todo if c.hash not in done]
        for c in todo:
            if c.hash in done:
                logger.debug("skip finished cell %s", c.label)
        logger.info("%d cells in the grid: %d finished, %d to run", len(todo), len(done), len(pending))
        records: Dict[str, CellRecord] = {}
        if not pending:
            return records
        self.preflight(pending)  # every pre-run check, before anything is written to MLflow
        self.tracker.start_parent(run_name, tags=parent_tags)
        total = sum(c.cfg.train_args.comm_round for c in pending)
        bar = tqdm(total=total, unit="round", desc="grid", disable=not self.progress, dynamic_ncols=True)
        status = "FAILED"
        try:
            records, self.failed = self.executor.run(self, pending, bar)
            self.ran += [c.label for c in pending if c.hash in records]
            status = "FAILED" if self.failed else "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise Interrupted() from None
        finally:
            bar.close()
            self.tracker.end_parent(status)
        return records

    def preflight(self, cells: Sequence[Cell]) -> None:
        """Load every distinct model, dataset and partition once before any run (memoized in ``Resources``), so a
        missing checkpoint, data folder or impossible split fails before anything is trained or logged. Methods that
        split the image tower (pFedMMA: ViT only) are built on their own, so a ResNet model fails here too."""
        from fedml_pfedmoap.algorithms import get_algorithm
        from fedml_pfedmoap.experiment import build_experiment

        seen = set()
        for c in cells:
            m = c.cfg.model_args
            splits_tower = hasattr(get_algorithm(c.algorithm), "stream_block_for")
            key = (c.partition_key, c.cfg.data_args.partition_method, m.model, m.pretrained,
                   c.algorithm if splits_tower else None)
            if key not in seen:
                seen.add(key)
                build_experiment(c.cfg, c.algorithm, c.seed, self.resources, progress=False)

    def run_cell(self, cell: Cell, progress: CellProgress, position: str) -> CellRecord:
        """Run (or continue) one cell with its checkpoints and its tracked run; returns its record. For a Ray task run
        again after its worker died, a cell never gets two runs in one invocation: without a checkpoint it adopts its
        RUNNING run under this parent, and a finished checkpoint whose run is FINISHED (or with tracking off) is the
        result."""
        from fedml_pfedmoap.checkpoint import restore, result_from, snapshot
        from fedml_pfedmoap.experiment import build_experiment
        from fedml_pfedmoap.tracking import git_commit

        exp = build_experiment(cell.cfg, cell.algorithm, cell.seed, self.resources, progress=False)
        sim, store, tr = exp.simulator, self.store(cell), self.tracker
        ckpt = None if self.rerun else store.load(cell.hash)
        if ckpt is not None and ckpt.get("finished"):
            if self._finished_run(ckpt.get("mlflow_run_id")):
                return CellRecord.from_result(cell, result_from(ckpt), ckpt.get("mlflow_run_id"), exp.partition.hash,
                                              git_commit())
            ckpt = None  # finished by a run whose MLflow record is gone: run it again
        run_id = None if ckpt is not None else self._orphan_run(cell)
        if ckpt is not None:
            restore(sim, ckpt)
            run_id = ckpt.get("mlflow_run_id")
            logger.info("resume %s from round %d", cell.label, sim.next_round)
            progress.rounds(sim.next_round, {})

        def on_round(m: Dict[str, Any], s: Any) -> None:
            t = int(m["round"])
            if s.next_round % self.every == 0 or s.next_round >= s.rounds:
                store.save(snapshot(s, cell.hash, run_id))
            _fault_injection(cell.label, t)
            tr.log_round(run_id, m, t)
            post = {"cell": f"{position} {cell.label}", "clients": f"{m.get('participants', '?')}/{s.num_clients}"}
            if "acc_mean" in m:
                post["acc"] = f"{m['acc_mean']:.3f}"
            progress.rounds(s.next_round, post)

        sim.on_round = on_round
        t0 = time.perf_counter()
        opened = False
        try:
            run_id = self._open_run(cell, exp, ckpt, run_id)
            opened = True
            result = sim.run()
            self._close_run(run_id, result)
        except BaseException as err:
            if opened:  # Ctrl-C: KILLED (the checkpoint stays, a rerun resumes this run)
                tr.end_cell(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        store.save(snapshot(sim, cell.hash, run_id, finished=True))
        store.prev.unlink(missing_ok=True)
        logger.info("finished %s in %.1f s: %s", cell.label, time.perf_counter() - t0, result)
        return CellRecord.from_result(cell, result, run_id, exp.partition.hash, git_commit())

    def _finished_run(self, run_id: Optional[str]) -> bool:
        """Whether a finished checkpoint stands for a finished cell: tracking off, or its run is FINISHED."""
        if not self.tracker.enabled:
            return True
        client = getattr(self.tracker, "client", None)
        try:
            run = client.get_run(run_id) if run_id and client is not None else None
            return run is not None and run.info.status == "FINISHED" and \
                run.info.experiment_id == self.tracker.experiment_id
        except Exception:  # noqa: BLE001 - deleted run, other store: not finished here
            return False

    def _orphan_run(self, cell: Cell) -> Optional[str]:
        """The id of a RUNNING run of ``cell`` under this invocation's parent run, if any."""
        client, parent = getattr(self.tracker, "client", None), getattr(self.tracker, "parent_id", None)
        if client is None or not parent:
            return None
        runs = client.search_runs([self.tracker.experiment_id],
                                  f"tags.cell_hash = '{cell.hash}' and tags.`mlflow.parentRunId` = '{parent}' "
                                  "and attributes.status = 'RUNNING'", max_results=1)
        return runs[0].info.run_id if runs else None

    def _open_run(self, cell: Cell, exp: Any, ckpt: Optional[Dict[str, Any]],
                  run_id: Optional[str]) -> Optional[str]:
        """The cell's tracked run: the checkpoint's run resumed (logging the rounds checkpointed but not yet logged),
        or a new one with the history so far, the config and the partition plot."""
        tr, sim = self.tracker, exp.simulator
        resumed = run_id
        run_id = tr.start_cell(cell.run_name, cell_params(cell, exp.partition.hash),
                               {**cell.tags(), "partition_hash": exp.partition.hash}, resume_run_id=run_id)
        logged = tr.logged_steps(run_id) if ckpt is not None and resumed == run_id else set()
        for m in sim.result.rounds:
            if int(m["round"]) not in logged:
                tr.log_round(run_id, m, int(m["round"]))
        if not (ckpt is not None and resumed == run_id):
            self._log_start_artifacts(cell, exp, run_id)
        return run_id

    def _close_run(self, run_id: Optional[str], result: Any) -> None:
        """Summary metrics, the per-client accuracies and FINISHED."""
        from fedml_pfedmoap.tracking import write_client_acc_csv

        self.tracker.log_summary(run_id, result.summary)
        self.tracker.log_artifact(run_id, lambda: write_client_acc_csv(
            result.client_acc, result.rounds, Path(self._tmp.name) / "client_acc.csv"))
        self.tracker.end_cell(run_id, "FINISHED")

    def _log_start_artifacts(self, cell: Cell, exp: Any, run_id: Optional[str]) -> None:
        """The resolved config and the partition heat map (written only when the tracker stores them)."""
        self.tracker.log_artifact(run_id, lambda: self._config_yaml(cell))
        self.tracker.log_artifact(run_id, lambda: self._partition_heatmap(cell, exp))

    def _config_yaml(self, cell: Cell) -> Path:
        import yaml

        d = Path(self._tmp.name) / cell.hash
        d.mkdir(parents=True, exist_ok=True)
        cfg_path = d / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cell.cfg.to_dict(), sort_keys=False))
        return cfg_path

    def _partition_heatmap(self, cell: Cell, exp: Any) -> Path:
        """The training split's client × class heat map, drawn once per partition."""
        from .plots import partition_heatmap

        key = (cell.partition_key, exp.partition.hash)
        if key not in self._partition_png:
            png = Path(self._tmp.name) / f"partition-{exp.partition.hash}.png"
            hist = exp.partition.histograms(exp.dataset)["train"]
            title = f"{cell.dataset} / {cell.split} / data seed {cell.data_seed} ({exp.partition.hash})"
            self._partition_png[key] = partition_heatmap({"train": hist}, list(exp.dataset.classnames), title, png)
        return self._partition_png[key]


def main(args: argparse.Namespace) -> int:
    from fedml_pfedmoap.config import load_config

    from .session import grid_session

    logging.getLogger("benchmark_suite").setLevel(logging.INFO)  # skip/resume/finish notes (the root logger is quiet)
    base = load_config(args.config, args.set)
    cells = shards.select(base, expand_grid(base, args.only), args.shard)  # every grid error surfaces here
    if args.dry_run or not cells:
        for c in cells:
            print(f"{c.label}  [{c.hash}]")
        return 0
    with grid_session(base, args) as (tracker, executor):  # the tracking server and Ray instance live this long
        return _run_grid(args, base, cells, tracker, executor)


def _run_grid(args: argparse.Namespace, base: Any, cells: List[Cell], tracker: TrackingLogger, executor: Any) -> int:
    """Run the pending cells, write the outputs, print the table; 1 when a cell failed, else 0."""
    from fedml_pfedmoap.tracking import git_commit

    from . import leaderboard as lb

    uri = tracker.uri
    bench = base.benchmark_args.name
    out_dir = Path(base.common_args.output_dir) / bench
    runner = GridRunner(out_dir, tracker, progress=not args.no_progress, rerun=args.rerun,
                        checkpoint_every=args.checkpoint_every, executor=executor)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    tags = {"benchmark": bench, "config_file": str(args.config), "git_commit": git_commit(),
            "sets": " ".join(args.set), "only": " ".join(args.only), "cells": str(len(cells)),
            "shard": args.shard or "", "executor": args.executor}
    ran = runner.run(cells, f"{bench} {stamp}", tags)
    if tracker.enabled:  # the table and files come from MLflow, the single source of truth
        records, missing = lb.collect_from_mlflow(tracker, cells)
        source = f"MLflow `{uri}`, experiment `{tracker.experiment}`"
    else:
        by_hash = {**runner.finished(cells), **ran}
        records = [by_hash[c.hash].relabel(c) for c in cells if c.hash in by_hash]
        missing = [c for c in cells if c.hash not in by_hash]
        source = "this run (tracking off)"
    out_dir = shards.outputs_dir(out_dir, args.shard)  # checkpoints stay shared, each shard's outputs its own
    paths = lb.write_outputs(records, out_dir, bench, base.benchmark_args.caution, args.headline,
                             f"{source}, {stamp}", [c.label for c in missing])
    print(lb.console_table(records, base.benchmark_args.caution))
    print(f"ran {len(runner.ran)} cell(s), {len(cells) - len(runner.ran) - len(runner.failed)} already finished; "
          f"wrote {out_dir / 'summary.csv'}, {out_dir / 'LEADERBOARD.md'} and {len(paths) - 2} plot(s)"
          + (f"; MLflow: {uri} (mlflow ui --backend-store-uri {uri})" if uri and uri.startswith("sqlite") else
             f"; MLflow: {uri}" if uri else ""))
    if runner.failed:
        print(f"{len(runner.failed)} cell(s) failed (rerun the same command to retry them):")
        for f in runner.failed:
            print(f"  {f.label}: {f.error}")
        return 1
    return 0
