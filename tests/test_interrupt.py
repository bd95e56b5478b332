"""Ctrl-C during a grid: the real command under SIGINT ends its MLflow runs as KILLED, prints one line saying how to
resume (no traceback) and exits non-zero; the same command then resumes the interrupted cell in its own run."""
import os
import signal

import pytest

from bench_helpers import child_runs, cli, history, start_stalled_run, write_grid


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


def test_ctrl_c_kills_runs_prints_one_line_and_resumes(tmp_path, cache, monkeypatch):
    from mlflow.tracking import MlflowClient

    from benchmark_suite.runner import Interrupted

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    grid = write_grid(tmp_path, cache, train_args={"comm_round": 3})
    proc = start_stalled_run(grid, "promptfl@0")  # promptfl: round 0 checkpointed, the process stalls after it
    try:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest = proc.communicate(timeout=120)[1]  # bounded: a child that ignored the signal fails the test
        rc = proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert rc != 0
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    lines = [line for line in rest.splitlines() if line.strip()]
    assert lines[-1].endswith(str(Interrupted())), rest
    assert "run the same command again to resume" in lines[-1]
    assert sum("interrupted" in line for line in lines) == 1

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents, children = child_runs(uri, "tiny")
    before = {r.data.tags["algorithm"]: r for r in children}
    assert {a: r.info.status for a, r in before.items()} == {"zeroshot": "FINISHED", "local": "FINISHED",
                                                             "promptfl": "KILLED"}
    assert [p.info.status for p in parents] == ["KILLED"]

    rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 0, err
    assert "ran 1 cell(s), 2 already finished" in out
    parents2, children2 = child_runs(uri, "tiny")
    pf = next(r for r in children2 if r.data.tags["algorithm"] == "promptfl")
    assert len(children2) == 3 and pf.info.run_id == before["promptfl"].info.run_id
    assert pf.info.status == "FINISHED" and pf.data.tags["resumed"] == "true"
    assert [s for s, _ in history(MlflowClient(tracking_uri=uri), pf.info.run_id, "acc_mean")] == [0, 1, 2]
