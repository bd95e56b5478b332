"""MLflow tracking: nested runs per cell under a parent, params, tags, per-round metrics and artifacts, with a sqlite
store and with a real ``mlflow server`` over HTTP; URI precedence and an active parent run."""
import json
import re
from pathlib import Path

import pytest

from bench_helpers import child_runs, cli, history, write_grid

ROUND_KEYS = ("acc_mean", "acc_weighted", "acc_std", "acc_bottom10", "test_loss", "bytes_up", "bytes_down",
              "round_time_s", "peak_rss_mb")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


def _check_grid_runs(uri, rounds, algorithms, partition_dir=None):
    """The nested-run layout, params, tags and metric histories every tracked grid must have."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parents, children = child_runs(uri, "tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["algorithm"] for r in children) == sorted(algorithms)
    hashes = set()
    for run in children:
        tags, params, rid = run.data.tags, run.data.params, run.info.run_id
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id and run.info.status == "FINISHED"
        assert tags["dataset"] == "digits" and tags["split"] == "pathological" and tags["seed"] == "0"
        assert len(tags["git_commit"]) >= 7 and tags["fedml_pfedmoap_version"]
        hashes.add(tags["partition_hash"])
        assert params["train_args.comm_round"] == str(rounds) and params["data_args.shots"] == "8"
        assert params["common_args.random_seed"] == "0" and params["partition_hash"] == tags["partition_hash"]
        assert params["train_args.federated_optimizer"] == tags["algorithm"]
        accs = history(client, rid, "acc_mean")
        assert [s for s, _ in accs] == list(range(rounds))  # one point per round, no duplicates
        for key in ROUND_KEYS:
            assert [s for s, _ in history(client, rid, key)] == list(range(rounds)), key
        vals = [v for _, v in accs]
        last5 = vals[-5:]
        m = run.data.metrics
        assert m["acc_last"] == vals[-1] and m["acc_best"] == max(vals)
        assert m["acc_last5"] == pytest.approx(sum(last5) / len(last5), abs=1e-12)
        arts = {a.path for a in client.list_artifacts(rid)}
        assert {"config.yaml", "client_acc.csv"} <= arts and any(a.startswith("partition-") for a in arts)
    assert len(hashes) == 1  # one partition shared by every algorithm
    if partition_dir is not None:
        files = list(Path(partition_dir).rglob("*.json"))
        assert len(files) == 1 and hashes.pop() in files[0].name
    return client, children


def test_sqlite_store_nested_runs_params_metrics_artifacts(tmp_path, cache):
    grid = write_grid(tmp_path, cache)
    rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 0, err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, children = _check_grid_runs(uri, 3, ["zeroshot", "local", "promptfl"], cache / "partitions")
    by_algo = {r.data.tags["algorithm"]: r for r in children}
    # communication: PromptFL sends and receives the n_ctx × width prompt (fp32); local CoOp sends nothing
    width = json.loads((Path(__file__).parent.parent / "fedml_pfedmoap" / "model_configs" / "tiny-clip.json")
                       .read_text())["text_cfg"]["width"]
    assert history(client, by_algo["promptfl"].info.run_id, "bytes_up")[0][1] == 4 * width * 4
    assert history(client, by_algo["local"].info.run_id, "bytes_up")[0][1] == 0.0
    assert "train_loss" not in by_algo["zeroshot"].data.metrics  # NaN (no training) is not logged
    assert len(history(client, by_algo["local"].info.run_id, "train_loss")) == 3
    # the resolved YAML artifact round-trips to the cell's config
    import yaml

    from mlflow.artifacts import download_artifacts

    p = download_artifacts(run_id=by_algo["local"].info.run_id, artifact_path="config.yaml",
                           dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    resolved = yaml.safe_load(open(p))
    assert resolved["train_args"]["federated_optimizer"] == "local" and resolved["data_args"]["shots"] == 8
    assert resolved["benchmark_args"]["algorithms"] == ["local"] and resolved["benchmark_args"]["seeds"] == [0]


def test_tracking_uri_precedence_and_active_parent(tmp_path, monkeypatch):
    from fedml_pfedmoap.tracking import MlflowLogger, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///a.db") == "sqlite:///a.db"
    assert resolve_tracking_uri(None) is None and resolve_tracking_uri("null") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("sqlite:///a.db") == "http://127.0.0.1:5999"  # env beats the YAML value
    assert resolve_tracking_uri("sqlite:///b.db", explicit=True) == "sqlite:///b.db"  # --set beats env
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    logger = MlflowLogger(uri, "exp")
    with _use_tracking_uri(uri), mlflow.start_run(experiment_id=logger.experiment_id) as outer:  # a sweep's parent
        assert logger.start_parent("ignored") == outer.info.run_id
        rid = logger.start_cell("c", {"a": 1}, {"cell_hash": "h"})
        logger.log_round(rid, {"round": 0, "acc_mean": 0.5, "train_loss": float("nan")}, 0)
        logger.end_cell(rid)
        logger.end_parent()  # not ours: left running
        assert mlflow.active_run().info.run_id == outer.info.run_id
    run = logger.client.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert run.data.metrics == {"acc_mean": 0.5} and run.data.params == {"a": "1"}
    assert logger.client.get_run(outer.info.run_id).info.status == "FINISHED"


def test_real_mlflow_server_over_http(tmp_path, cache, monkeypatch):
    """``--mlflow-server auto``: the grid logs over HTTP to a server the command starts over its sqlite store (and
    stops: the port no longer answers); the runs and artifacts land in that store and the mlruns folder beside it."""
    from benchmark_suite.mlflow_server import _answers

    grid = write_grid(tmp_path, cache, uri=f"sqlite:///{tmp_path / 'srv.db'}", train_args={"comm_round": 2})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, out, err = cli("run", "--config", str(grid), "--no-progress", "--only", "algo=zeroshot,promptfl",
                       "--mlflow-server", "auto")
    assert rc == 0, err
    served = re.search(r"MLflow: (http://127\.0\.0\.1:\d+)", out)
    assert served is not None, out  # the runs went through the server
    assert _answers(served.group(1), timeout=2) is not None  # and the server is gone
    _check_grid_runs(f"sqlite:///{tmp_path / 'srv.db'}", 2, ["zeroshot", "promptfl"])
    assert not (tmp_path / "mlflow.db").exists()
    assert any((tmp_path / "mlruns").rglob("client_acc.csv"))  # beside the store, as without a server


def test_mlflow_server_errors_name_the_uri_or_store(tmp_path):
    """Bad ``--mlflow-server`` values, a URI where nothing answers and a server that dies at start are one line
    each; a server is stopped when the body raises (Ctrl-C)."""
    from benchmark_suite.mlflow_server import TrackingServerError, _answers, tracking_server
    from fedml_pfedmoap.netaudit import free_loopback_port

    db = f"sqlite:///{tmp_path / 'm.db'}"
    with tracking_server(None, db) as uri:
        assert uri == db
    with pytest.raises(TrackingServerError, match=r"^--mlflow-server: expected 'auto' or an http\(s\):// URI, "
                                                  r"got 'x'$"):
        tracking_server("x", db).__enter__()
    nowhere = f"http://127.0.0.1:{free_loopback_port()}"
    with pytest.raises(TrackingServerError, match=rf"^--mlflow-server {nowhere}: no MLflow server answers there"):
        tracking_server(nowhere, db).__enter__()
    with pytest.raises(TrackingServerError, match=r"auto: serves the grid's sqlite store, but the tracking URI"):
        tracking_server("auto", "http://elsewhere:5000").__enter__()
    (tmp_path / "bad.db").write_bytes(b"not a database" * 100)
    with pytest.raises(TrackingServerError) as info:
        tracking_server("auto", f"sqlite:///{tmp_path / 'bad.db'}").__enter__()
    msg = str(info.value)
    assert "\n" not in msg and f"server over {tmp_path / 'bad.db'} exited with" in msg and "database" in msg
    with pytest.raises(KeyboardInterrupt):
        with tracking_server("auto", db) as uri:
            assert _answers(uri) is None
            raise KeyboardInterrupt
    assert _answers(uri, timeout=2) is not None


def test_tracker_from_config_and_the_null_logger(tmp_path, monkeypatch):
    """Tracking off gives a logger that stores nothing and never writes an artifact; on, the URI and experiment follow
    the documented precedence (--set > env > YAML; config > MLFLOW_EXPERIMENT_NAME > benchmark name)."""
    from fedml_pfedmoap.config import load_config
    from fedml_pfedmoap.tracking import MlflowLogger, NullLogger, tracker_from_config

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    off = tracker_from_config(load_config(quickstart, ["tracking_args.mlflow_tracking_uri=null"]))
    assert isinstance(off, NullLogger) and not off.enabled and off.uri is None and off.experiment == "quickstart"
    assert off.start_parent("p") is None and off.start_cell("c", {"a": 1}, {}) is None
    assert off.start_cell("c", {}, {}, resume_run_id="r1") == "r1"  # a checkpoint's run id is kept
    off.log_artifact("r1", lambda: pytest.fail("a no-op logger must not write artifacts"))
    off.log_round("r1", {"acc_mean": 0.5}, 0)
    assert off.logged_steps("r1") == set() and off.finished_runs(["h"]) == {}

    db = f"sqlite:///{tmp_path / 'a.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    sets = [f"tracking_args.mlflow_tracking_uri={db}"]
    on = tracker_from_config(load_config(quickstart, sets), sets)
    assert isinstance(on, MlflowLogger) and on.enabled and on.uri == db and on.experiment == "from-env"
    assert tracker_from_config(load_config(quickstart, sets)).uri == f"sqlite:///{tmp_path / 'env.db'}"
    named = tracker_from_config(load_config(quickstart, ["tracking_args.mlflow_experiment=mine"]), experiment="x")
    assert named.experiment == "x"


def test_metric_names_have_one_source():
    """The summary CSV's metric columns and the client/run summaries use the documented names."""
    from benchmark_suite.leaderboard import CSV_COLUMNS
    from fedml_pfedmoap.federated.metrics import client_summary, run_summary

    assert CSV_COLUMNS[7:20] == ["acc_mean", "acc_weighted", "acc_std", "acc_bottom10", "train_loss", "test_loss",
                                 "bytes_up", "bytes_down", "round_time_s", "peak_rss_mb", "acc_last", "acc_last5",
                                 "acc_best"]
    assert list(client_summary([0.5, 1.0], [1, 1])) == ["acc_mean", "acc_weighted", "acc_std", "acc_bottom10"]
    assert list(run_summary([0.5, 1.0])) == ["acc_last", "acc_last5", "acc_best"]


def test_two_loggers_creating_one_experiment_share_it(tmp_path):
    """Two processes (concurrent shards) that both found no experiment: the second creation finds the first's."""
    from fedml_pfedmoap.tracking import MlflowLogger

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first, second = MlflowLogger(uri, "shared"), MlflowLogger(uri, "shared")  # both looked before either created
    assert first.experiment_id == second.experiment_id
    assert second._found.artifact_location == (tmp_path / "mlruns" / "shared").as_uri()


TELEMETRY_PROBE = r"""
import sys
from fedml_pfedmoap.netaudit import install_network_audit
install_network_audit(sys.argv[1])
from fedml_pfedmoap.tracking import MlflowLogger
tracker = MlflowLogger(f"sqlite:///{sys.argv[2]}/mlflow.db", "probe")
tracker.start_parent("parent", tags={})
run = tracker.start_cell("cell", {"a": 1}, {})
tracker.log_round(run, {"acc_mean": 0.5}, 0)
tracker.end_cell(run, "FINISHED")
tracker.end_parent("FINISHED")
"""


def test_tracking_makes_no_outbound_connection(tmp_path):
    """A tracked run under the network audit hook, with the caller's environment free of MLflow settings: no
    attempt to leave loopback (MLflow 3's telemetry is switched off by the tracker; on MLflow 2 there is none)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    audit = tmp_path / "audit.jsonl"
    out = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, str(audit), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not audit.exists() or audit.read_text() == "", audit.read_text()
