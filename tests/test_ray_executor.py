"""``pfedmoap-bench run --executor ray`` on a real two-node Ray cluster on loopback (one CPU per node) with a real
MLflow server over http: the same per-round numbers as the sequential executor, a worker process SIGKILLed mid-cell
retried from its checkpoint into the same run, a failing cell reported while the others finish, Ctrl-C with a local
Ray instance leaving no process behind, and the flag errors."""
import os
import re
import signal
import subprocess
import sys

import pytest

from bench_helpers import ROOT, child_runs, cli, history, sigint_default, wait_for_marker, write_grid
from ray_cluster import child_env, loopback_cluster, session_pids, stop_session

from benchmark_suite.mlflow_server import tracking_server

pytestmark = pytest.mark.ray

ROUNDS = 3
TINY_GRID = {"train_args": {"comm_round": ROUNDS, "client_num_in_total": 2, "client_num_per_round": 2},
             "benchmark_args": {"name": "tiny", "algorithms": ["local", "promptfl"], "seeds": [0, 1]}}
def _varies(metric):
    """Wall-clock times and memory: not part of the numbers."""
    return metric.startswith("time_") or metric in ("round_time_s", "peak_rss_mb")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-cache")


@pytest.fixture(scope="module")
def cluster():
    with loopback_cluster() as address:
        yield address


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("mlflow-server") / "server.db"
    with tracking_server("auto", f"sqlite:///{store}") as uri:
        yield uri


def _driver(grid, *flags, **env):
    """``pfedmoap-bench run --executor ray`` as its own process (a session of its own), stderr piped."""
    return subprocess.Popen([sys.executable, "-m", "benchmark_suite.cli", "run", "--config", str(grid),
                             "--no-progress", "--executor", "ray", *flags], cwd=ROOT, env=child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_default)


def _stalled_pid(proc):
    line = wait_for_marker(proc, "FAULT-STALL", timeout=240)
    return int(re.search(r"FAULT-STALL .* pid (\d+)", line).group(1))


def _numbers(uri, experiment="tiny"):
    """cell hash -> {metric: [(step, value), ...]} over the nested runs, without the wall-clock metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    _, children = child_runs(uri, experiment)
    return {r.data.tags["cell_hash"]: {k: history(client, r.info.run_id, k) for k in r.data.metrics
                                       if not _varies(k)} for r in children}


def test_ray_grid_equals_sequential_and_survives_a_killed_worker(tmp_path, cache, cluster, server, monkeypatch):
    """Four cells: the Ray run's per-round metrics equal the sequential run's; the worker running promptfl/seed1 is
    SIGKILLed after its round-1 checkpoint, Ray reruns the task, the cell resumes in the same MLflow run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seq_dir, ray_dir = tmp_path / "seq", tmp_path / "ray"
    seq_dir.mkdir(), ray_dir.mkdir()
    rc, out, err = cli("run", "--config", str(write_grid(seq_dir, cache, **TINY_GRID)), "--no-progress")
    assert rc == 0, err
    proc = _driver(write_grid(ray_dir, cache, uri=server, **TINY_GRID), "--address", cluster, "--max-retries", "2",
                   PFEDMOAP_FAULT_STALL="promptfl/seed1@1")
    try:
        os.kill(_stalled_pid(proc), signal.SIGKILL)  # a worker process of the cluster, mid-cell
        out, err = proc.communicate(timeout=300)
    finally:
        stop_session(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "ran 4 cell(s)" in out

    parents, children = child_runs(server, "tiny")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(r.data.tags["cell"] for r in children) == sorted(
        f"digits/pathological/{a}/seed{s}" for a in ("local", "promptfl") for s in (0, 1))  # one run per cell
    assert {r.info.status for r in children} == {"FINISHED"}
    resumed = [r.data.tags["cell"] for r in children if r.data.tags.get("resumed") == "true"]
    assert resumed == ["digits/pathological/promptfl/seed1"]
    seq, par = _numbers(f"sqlite:///{seq_dir / 'mlflow.db'}"), _numbers(server)
    assert set(seq) == set(par) and len(seq) == 4
    for h in seq:
        assert par[h] == seq[h], h  # every metric, round by round, exactly
        assert [s for s, _ in par[h]["acc_mean"]] == list(range(ROUNDS))


def test_failing_cell_is_reported_once_and_the_others_finish(tmp_path, cache, cluster, monkeypatch):
    """Tracking off. local/seed0 raises after its round-0 checkpoint: a retry would resume at round 1 and succeed,
    so its failure shows that the exception was not retried; the three other cells finish."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PFEDMOAP_FAULT_RAISE", "local/seed0@0")
    grid = write_grid(tmp_path, cache, uri=None, **TINY_GRID)
    rc, out, err = cli("run", "--config", str(grid), "--executor", "ray", "--address", cluster, "--no-progress")
    assert rc == 1, err[-3000:]
    assert "1 cell(s) failed" in out
    assert "  digits/pathological/local/seed0: RuntimeError: injected fault in digits/pathological/local/seed0 " \
           "after round 0" in out
    summary = (tmp_path / "out" / "tiny" / "summary.csv").read_text()
    for a, s in (("local", 1), ("promptfl", 0), ("promptfl", 1)):
        assert f",{a},{s}," in summary
    assert ",local,0," not in summary
    monkeypatch.delenv("PFEDMOAP_FAULT_RAISE")
    rc, out, err = cli("run", "--config", str(grid), "--executor", "ray", "--address", cluster, "--no-progress")
    assert rc == 0 and "ran 1 cell(s), 3 already finished" in out, err[-3000:]  # the rerun resumes it


def test_ctrl_c_with_a_local_instance_leaves_nothing_behind(tmp_path, cache, server):
    """Without --address the command starts its own Ray instance; Ctrl-C (SIGINT to the whole process group, as a
    terminal sends it) ends the runs as KILLED, writes no outputs and leaves no process of the session alive."""
    grid = write_grid(tmp_path, cache, uri=server, **{**TINY_GRID, "benchmark_args": {
        "name": "tiny-int", "algorithms": ["promptfl"], "seeds": [0]}})
    proc = _driver(grid, "--cell-cpus", "1", PFEDMOAP_FAULT_STALL="promptfl/seed0@0")
    try:
        _stalled_pid(proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        left = session_pids(proc.pid)
    finally:
        stop_session(proc)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].endswith("run the same command again to resume: finished cells are skipped "
                                                 "and the interrupted cell continues from its last checkpoint")
    assert left == []  # raylet, GCS, workers: all gone with the driver
    parents, children = child_runs(server, "tiny-int")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert [r.info.status for r in children] == ["KILLED"]
    assert not (tmp_path / "out" / "tiny-int" / "summary.csv").exists()


def test_a_cell_larger_than_the_cluster_is_refused(tmp_path, cache, cluster):
    rc, out, err = cli("run", "--config", str(write_grid(tmp_path, cache, uri=None)), "--no-progress",
                       "--executor", "ray", "--address", cluster, "--cell-cpus", "3")
    assert rc == 2, err
    assert err.strip().splitlines()[-1] == \
        "pfedmoap-bench run: error: --cell-cpus 3: the Ray cluster has 2 CPU(s) in all"


@pytest.mark.parametrize("flags, message", [
    (["--address", "127.0.0.1:1"], "--address: only with --executor ray"),
    (["--executor", "ray", "--cell-cpus", "0"], "--cell-cpus: expected a number > 0, got 0"),
    (["--executor", "ray", "--address", "127.0.0.1:1"], "--mlflow-server http://HOST:PORT"),
])
def test_executor_flag_errors_are_one_line(tmp_path, cache, monkeypatch, flags, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, out, err = cli("run", "--config", str(write_grid(tmp_path, cache)), "--no-progress", *flags)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "mlflow.db").exists()
