"""The Flower engine against the in-process simulator, in Flower's simulation and in a loopback deployment of real
SuperLink / SuperNode processes; a SuperNode killed mid-run; no outbound connection (docs/flower.md).

Every process started here runs in its own process group and is killed at the end; every wait has a timeout.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.flower

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def write_cfg(tmp: Path, **train) -> Path:
    raw = {"common_args": {"random_seed": 0, "data_seed": 0, "run_name": "fl", "output_dir": str(tmp / "out"),
                           "cache_dir": str(tmp / "cache")},
           "data_args": {"dataset": "digits", "partition_method": "pathological", "shots": 8},
           "model_args": {"model": "tiny-clip", "n_ctx": 4},
           "train_args": {"federated_optimizer": "pFedMoAP", "client_num_in_total": 3, "client_num_per_round": 3,
                          "comm_round": 2, "epochs": 1, "batch_size": 16, **train},
           "device_args": {"device": "cpu", "num_threads": 1},
           "comm_args": {"round_timeout_s": 120, "startup_timeout_s": 120},
           "tracking_args": {"mlflow_tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
           "algorithm_args": {"pfedmoap": {"num_experts": 3}}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def child_env(tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", FEDML_PFEDMOAP_NETWORK_AUDIT=str(tmp / "audit.jsonl"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_launcher(tmp: Path, mode: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cfg = write_cfg(tmp)
    proc = subprocess.Popen([PY, "-m", "fedml_pfedmoap.flower", mode, "--config", str(cfg), "--timeout", "360"],
                            cwd=ROOT, env=child_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def mlflow_history(tmp: Path, key: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    runs = [r for r in runs if key in r.data.metrics]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert runs[0].info.status == "FINISHED"
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}


def assert_matches_simulator(tmp: Path) -> float:
    """Per-round acc_mean / test_loss / train_loss of the Flower run (JSONL and MLflow) == the simulator's."""
    from fedml_pfedmoap.config import load_config
    from fedml_pfedmoap.experiment import build_experiment

    cfg = load_config(tmp / "cfg.yaml", ["tracking_args.mlflow_tracking_uri=null"])
    ref = build_experiment(cfg, progress=False).simulator.run()
    rows = [json.loads(x) for x in (tmp / "out" / "fl" / "flower_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    acc, loss = mlflow_history(tmp, "acc_mean"), mlflow_history(tmp, "test_loss")
    worst = 0.0
    for r, row in enumerate(rows):
        assert sorted(int(i) for i in row["eval_clients"]) == [0, 1, 2]
        for key in ("acc_mean", "test_loss", "train_loss", "acc_weighted", "bytes_up", "bytes_down"):
            worst = max(worst, abs(row[key] - ref.rounds[r][key]))
            assert row[key] == ref.rounds[r][key], (r, key, row[key], ref.rounds[r][key])
        assert acc[r] == ref.rounds[r]["acc_mean"] and loss[r] == ref.rounds[r]["test_loss"]
    assert len({c["digest"] for c in rows[-1]["clients"].values()}) == 3  # personalized downloads
    assert (tmp / "audit.jsonl").read_text() == ""  # no app process tried to leave loopback
    return worst


@pytest.mark.slow
def test_flower_simulation_equals_simulator(tmp_path):
    """`flwr run` on a simulation SuperLink (Ray backend, 3 simulated SuperNodes): identical per-round metrics."""
    out = run_launcher(tmp_path, "simulation")
    assert out.returncode == 0, out.stdout[-4000:]
    assert assert_matches_simulator(tmp_path) == 0.0


@pytest.mark.slow
def test_flower_deployment_equals_simulator(tmp_path):
    """flower-superlink + 3 flower-supernode processes (partition-id k) on 127.0.0.1: identical per-round metrics;
    client i is served by the SuperNode of partition i."""
    out = run_launcher(tmp_path, "deployment")
    assert out.returncode == 0, out.stdout[-4000:]
    assert assert_matches_simulator(tmp_path) == 0.0
    rows = [json.loads(x) for x in (tmp_path / "out" / "fl" / "flower_rounds.jsonl").read_text().splitlines()]
    assert {int(i): c["rank"] for i, c in rows[-1]["clients"].items()} == {0: 0, 1: 1, 2: 2}


@pytest.mark.slow
def test_killed_supernode_ends_the_run_naming_it(tmp_path):
    """SIGKILL the SuperNode of partition 1 after it has served client 1 once: the run ends (no hang) with the one
    line naming partition-id 1 and its client, status FAILED in flower_status.json and in MLflow."""
    from fedml_pfedmoap.flower.launch import Cluster, read_status

    cfg = write_cfg(tmp_path, federated_optimizer="promptfl", client_num_in_total=2, client_num_per_round=2,
                    comm_round=500)
    raw = yaml.safe_load(cfg.read_text())
    raw["comm_args"]["round_timeout_s"] = 60  # covers a ClientApp process building its experiment on a busy machine
    cfg.write_text(yaml.safe_dump(raw))
    cluster = Cluster(tmp_path / "procs", child_env(tmp_path))
    try:
        cluster.superlink(simulation=False)
        for k in range(2):
            cluster.supernode(k, 2)
        run = cluster.flwr_run(ROOT / "configs" / "flower", cfg)
        deadline = time.monotonic() + 300
        while not list((tmp_path / "out" / "fl" / "client_state").glob("*/client_00001.pt")):
            assert time.monotonic() < deadline and run.poll() is None, cluster.log("flwr_run")[-3000:]
            time.sleep(0.2)
        os.killpg(cluster.procs["supernode1"].pid, signal.SIGKILL)
        run.wait(timeout=240)  # the contract: the run ends; bounded by round_timeout_s plus Flower's own shutdown
    finally:
        cluster.close()
    status = read_status(tmp_path / "out" / "fl")
    assert status["status"] == "FAILED", status
    assert "SuperNode(s) gone: partition-id [1]" in status["error"] and "clients [1]" in status["error"], status
    assert status["error"] in cluster.log("flwr_run")  # the same line reaches `flwr run --stream`
    from mlflow.tracking import MlflowClient

    runs = [r for e in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
            for r in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["FAILED"]


AUDIT_SCRIPT = r"""
import sys
from fedml_pfedmoap.netaudit import install_network_audit
install_network_audit(sys.argv[1])
from flwr.supercore.telemetry import EventType, event
try:
    event(EventType.RUN_SUPERLINK_ENTER).result(timeout=30)
except Exception:
    pass
from flwr.supercore.update_check import warn_if_flwr_update_available
try:
    warn_if_flwr_update_available(process_name="flower-superlink")
except Exception:
    pass
"""


def test_flower_telemetry_off_under_the_launcher_environment(tmp_path):
    """The audit hook sees Flower's telemetry / update check phoning home under Flower's defaults (so it can see
    them), and no attempt under the environment the launcher gives every Flower process."""
    from fedml_pfedmoap.flower.launch import flower_env

    base = {k: v for k, v in child_env(tmp_path).items() if not k.startswith(("FLWR_", "MLFLOW_"))}
    base["FLWR_HOME"] = str(tmp_path / "default_home")  # the update check caches its answer there
    for name, env in (("default", base), ("launcher", flower_env(tmp_path / "home", base))):
        out = subprocess.run([PY, "-c", AUDIT_SCRIPT, str(tmp_path / f"{name}.jsonl")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "default.jsonl").read_text() != ""
    assert (tmp_path / "launcher.jsonl").read_text() == ""
