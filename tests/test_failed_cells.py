"""A cell that raises, with the sequential executor: its run ends FAILED, the other cells still run, the command lists
the failed cell with its error line and exits 1; the same command then runs only that cell. And a cell run again within
one invocation (a retried Ray task, here in-process) keeps its one MLflow run."""
from bench_helpers import child_runs, cli, write_grid


def test_failing_cell_is_listed_and_the_grid_goes_on(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PFEDMOAP_FAULT_RAISE", "local@1")  # local raises after its round-1 checkpoint
    grid = write_grid(tmp_path, tmp_path / "cache", train_args={"comm_round": 2})
    rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 1, err
    assert out.splitlines()[-2:] == ["1 cell(s) failed (rerun the same command to retry them):",
                                     "  digits/pathological/local/seed0: RuntimeError: injected fault in "
                                     "digits/pathological/local/seed0 after round 1"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents, children = child_runs(uri, "tiny")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert {r.data.tags["algorithm"]: r.info.status for r in children} == {
        "zeroshot": "FINISHED", "local": "FAILED", "promptfl": "FINISHED"}  # promptfl ran after the failure
    summary = (tmp_path / "out" / "tiny" / "summary.csv").read_text()
    assert ",promptfl,0," in summary and ",local,0," not in summary

    monkeypatch.delenv("PFEDMOAP_FAULT_RAISE")
    rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 0 and "ran 1 cell(s), 2 already finished" in out, err
    _, children = child_runs(uri, "tiny")
    local = [r for r in children if r.data.tags["algorithm"] == "local"]
    assert len(local) == 1 and local[0].info.status == "FINISHED"  # the failed run resumed from its checkpoint


def test_a_cell_run_again_in_one_invocation_keeps_its_one_run(tmp_path, monkeypatch):
    """What a Ray task run again after its worker died finds: without a checkpoint it adopts the RUNNING run it had
    opened under this parent; after a finished checkpoint and FINISHED run it returns that result, opening nothing."""
    from tqdm import tqdm

    from benchmark_suite.executors import BarProgress
    from benchmark_suite.grid import expand_grid
    from benchmark_suite.runner import GridRunner
    from fedml_pfedmoap.config import load_config
    from fedml_pfedmoap.tracking import tracker_from_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    grid = write_grid(tmp_path, tmp_path / "cache", train_args={"comm_round": 2})
    base = load_config(grid)
    (cell,) = expand_grid(base, ["algo=local"])
    tracker = tracker_from_config(base)
    runner = GridRunner(tmp_path / "out", tracker, progress=False)
    tracker.start_parent("grid")
    orphan = tracker.start_cell(cell.run_name, {}, cell.tags())  # opened, then the worker died
    bar = tqdm(disable=True)
    first = runner.run_cell(cell, BarProgress(bar), "1/1")
    again = runner.run_cell(cell, BarProgress(bar), "1/1")  # died after finishing, before returning
    _, children = child_runs(tracker.uri, "tiny")
    assert [r.info.run_id for r in children] == [orphan] and children[0].info.status == "FINISHED"
    assert first.run_id == again.run_id == orphan
    assert [r["acc_mean"] for r in again.rounds] == [r["acc_mean"] for r in first.rounds] and len(first.rounds) == 2
