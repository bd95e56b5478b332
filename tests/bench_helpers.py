"""Helpers for the benchmark-harness tests: tiny grid YAMLs in a temp dir and in-process CLI calls."""
from __future__ import annotations

import contextlib
import copy
import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "common_args": {"random_seed": 0, "data_seed": 0},
    "data_args": {"dataset": "digits", "partition_method": "pathological", "shots": 8},
    "model_args": {"model": "tiny-clip", "pretrained": None, "n_ctx": 4},
    "train_args": {"client_num_in_total": 5, "client_num_per_round": 5, "comm_round": 3, "epochs": 1,
                   "batch_size": 16},
    "device_args": {"device": "cpu", "num_threads": 1},
    "tracking_args": {},
    "benchmark_args": {"name": "tiny", "algorithms": ["zeroshot", "local", "promptfl"], "seeds": [0],
                       "caution": "tiny random-init CLIP: machinery check only"},
}


def write_grid(tmp: Path, cache: Path, uri: Optional[str] = "sqlite", name: str = "grid.yaml",
               **sections: Dict[str, Any]) -> Path:
    """The tiny grid with section updates; outputs in ``tmp/out``; ``uri="sqlite"`` -> ``tmp/mlflow.db``."""
    raw = copy.deepcopy(TINY)
    raw["common_args"].update(cache_dir=str(cache), output_dir=str(tmp / "out"))
    raw["tracking_args"]["mlflow_tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}" if uri == "sqlite" else uri
    for sec, body in sections.items():
        raw.setdefault(sec, {}).update(body)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(*argv: str) -> Tuple[int, str, str]:
    """``pfedmoap-bench argv...`` in this process; returns (rc, stdout, stderr)."""
    from benchmark_suite.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def start_stalled_run(grid: Path, stall: str) -> "subprocess.Popen[str]":
    """``pfedmoap-bench run --config grid`` in its own process group, told to stall after ``stall``'s checkpoint
    (``algorithm@round``, the runner's ``PFEDMOAP_FAULT_STALL`` hook); returns once it prints ``FAULT-STALL``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PFEDMOAP_FAULT_STALL": stall}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "benchmark_suite.cli", "run", "--config", str(grid),
                             "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=sigint_default)
    try:
        wait_for_marker(proc, "FAULT-STALL", timeout=300)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise
    return proc


def wait_for_marker(proc: "subprocess.Popen[str]", marker: str, timeout: float) -> str:
    """The first stderr line of ``proc`` containing ``marker``; fails with the stderr tail after ``timeout`` s.

    Reads the pipe's file descriptor directly: ``select`` on a buffered text stream would miss a line that arrived in
    the same chunk as the one before it (it sits in the stream's buffer while the descriptor is drained)."""
    deadline, buf, seen = time.monotonic() + timeout, b"", []
    fd = proc.stderr.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk and proc.poll() is not None:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace") + "\n"
            seen.append(line)
            if marker in line:
                return line
    raise AssertionError(f"no {marker!r} within {timeout} s; stderr tail: {''.join(seen[-20:])}")


def sigint_default() -> None:
    """``preexec_fn`` of a child that must see Ctrl-C: a process started from a non-interactive shell's background job
    inherits SIGINT ignored (and Python then keeps it ignored), which would make the child deaf to the test's SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def child_runs(uri: str, experiment: str) -> Tuple[List[Any], List[Any]]:
    """(parent runs, nested runs) of an experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def history(client: Any, run_id: str, key: str) -> List[Tuple[int, float]]:
    return sorted((int(m.step), float(m.value)) for m in client.get_metric_history(run_id, key))
