"""A sweep grid on the mini world: one leaderboard whose rows equal MLflow, and the accuracy-vs-value plot."""
import pytest

from bench_helpers import cli, write_grid


def test_sweep_grid_expands_and_rejects_bad_entries(tmp_path):
    from benchmark_suite.grid import GridError, expand_grid, sweep_points
    from fedml_pfedmoap.config import load_config

    sweep = {"key": "train_args.client_num_per_round", "values": [1, 5], "x": [0.2, 1.0]}
    cfg = load_config(write_grid(tmp_path, tmp_path / "cache", benchmark_args={"sweep": sweep}))
    cells = expand_grid(cfg)
    assert sorted({(c.override, c.cfg.train_args.client_num_per_round) for c in cells}) == \
        [("client_num_per_round=1", 1), ("client_num_per_round=5", 5)]
    assert sweep_points(sweep) == {"client_num_per_round=1": 0.2, "client_num_per_round=5": 1.0}
    for bad, msg in [({"key": "shots", "values": [1]}, "sweep.key"), ({"key": "data_args.shots", "values": []},
                     "sweep.values"), ({**sweep, "x": [1.0]}, "sweep.x")]:
        with pytest.raises(GridError, match=msg):
            expand_grid(load_config(write_grid(tmp_path, tmp_path / "cache", benchmark_args={"sweep": bad})))


def test_shots_sweep_leaderboard_equals_mlflow_and_plots(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    grid = write_grid(tmp_path, tmp_path / "cache", train_args={"comm_round": 2},
                      data_args={"val_fraction": 0.25},
                      benchmark_args={"algorithms": ["zeroshot", "promptfl"],
                                      "sweep": {"key": "data_args.shots", "values": [2, 4]}})
    rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 0, err
    rc, out, err = cli("leaderboard", "--config", str(grid), "--out", str(tmp_path / "board"))
    assert rc == 0, err
    board = tmp_path / "board"
    assert (board / "acc_vs_shots-digits_pathological.png").stat().st_size > 1000
    md = (board / "LEADERBOARD.md").read_text()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "attributes.status = 'FINISHED' and tags.cell_hash != ''")
    assert len(runs) == 4
    for run in runs:
        tags, m = run.data.tags, run.data.metrics
        assert tags["override"] in ("shots=2", "shots=4")
        section = md.split(f"## digits · pathological · {tags['override']}")[1].split("\n## ")[0]
        head = next(line for line in section.splitlines() if line.startswith("| algorithm"))
        cols = [c.strip() for c in head.strip("|").split("|")]
        row = next(line for line in section.splitlines() if line.startswith(f"| {tags['algorithm']} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        got = cells[cols.index("acc_val_selected (round of best validation accuracy)")].strip("*")
        assert got == f"{100 * m['acc_val_selected']:.2f} (n=1)"
        assert cells[cols.index("acc_last (final round)")].strip("*") == f"{100 * m['acc_last']:.2f} (n=1)"
        hist = {int(x.step): x.value for x in client.get_metric_history(run.info.run_id, "acc_val_mean")}
        accs = {int(x.step): x.value for x in client.get_metric_history(run.info.run_id, "acc_mean")}
        best = min(hist, key=lambda s: (-hist[s], s))  # highest validation accuracy, earliest round
        assert m["acc_val_selected"] == pytest.approx(accs[best], abs=1e-12)
