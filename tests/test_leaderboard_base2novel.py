"""Leaderboard of base-to-novel cells: Local / Base / Novel / HM columns equal the final-round values MLflow holds
(mean ± population std over seeds), and summary.csv carries the per-round histories."""
import csv
import math

from bench_helpers import ROOT, child_runs, cli, history

B2N = (("Local", "acc_local"), ("Base", "acc_base"), ("Novel", "acc_novel"), ("HM", "acc_hm"))


def test_base2novel_columns_equal_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--config", str(ROOT / "configs" / "quickstart_base2novel.yaml"), "--only", "algo=zeroshot,promptfl"]
    for s in (f"common_args.cache_dir={tmp_path / 'cache'}", f"common_args.output_dir={tmp_path / 'out'}",
              f"tracking_args.mlflow_tracking_uri={uri}", "model_args.model=tiny-clip", "model_args.pretrained=null",
              "train_args.comm_round=2", "train_args.epochs=1", "data_args.shots=4", "device_args.num_threads=1",
              "benchmark_args.seeds=[0,1]"):
        argv += ["--set", s]
    rc, out, err = cli("run", *argv, "--no-progress")
    assert rc == 0, err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, out, err = cli("leaderboard", *argv, "--out", str(tmp_path / "board"))
    assert rc == 0, err
    md = (tmp_path / "board" / "LEADERBOARD.md").read_text()
    body = md.split("## digits · base2novel")[1].split("\n## ")[0]
    head = next(line for line in body.splitlines() if line.startswith("| algorithm"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[1:5] == ["Local", "Base", "Novel", "HM"]
    rows = {r.strip("|").split("|")[0].strip(): [c.strip().strip("*") for c in r.strip("|").split("|")]
            for r in body.splitlines() if r.startswith("| ") and not r.startswith("| algorithm")}
    client = MlflowClient(tracking_uri=uri)
    runs = child_runs(uri, "quickstart_base2novel")[1]
    assert len(runs) == 4
    table = list(csv.DictReader(open(tmp_path / "board" / "summary.csv")))
    for algo in ("zeroshot", "promptfl"):
        mine = [r for r in runs if r.data.tags["algorithm"] == algo]
        for title, key in B2N:
            vals = [history(client, r.info.run_id, key)[-1][1] for r in mine]
            mean = sum(vals) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
            assert rows[algo][cols.index(title)] == f"{100 * mean:.2f} ± {100 * std:.2f}", (algo, key)
        for run in mine:
            got = [(int(r["round"]), float(r["acc_hm"])) for r in table if r["run_id"] == run.info.run_id]
            assert got == history(client, run.info.run_id, "acc_hm")
            for rnd, hm in got:  # the HM logged is the 3-way harmonic mean of the three accuracies logged
                parts = [dict(history(client, run.info.run_id, k))[rnd] for k in ("acc_local", "acc_base", "acc_novel")]
                assert math.isclose(hm, 3 / sum(1 / p for p in parts), rel_tol=1e-12)
