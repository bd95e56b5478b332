"""FedML plugin: config mapping, offline guard, state store, watchdog, the adapters' protocol (in process), the
FedML-simulation path against the in-process simulator (launch packages: test_launch_build.py)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml

from fedml_helpers import PY, ROOT, Procs, child_env, mlflow_metric, write_config
from tree_compare import deep_equal

from fedml_pfedmoap.config import ConfigError
from fedml_pfedmoap.fedml_plugin.config import (ALGORITHM_KEY, config_from_namespace, load_plugin_config,
                                                to_fedml_namespace)

pytestmark = pytest.mark.fedml


# ---- config ------------------------------------------------------------------------------------------------------
def test_cross_silo_translation_and_namespace_roundtrip(tmp_path):
    cfg = write_config(tmp_path, "cross_silo_mpi.yaml", {"train_args": {"comm_round": 4}})
    pc = load_plugin_config(cfg)
    assert pc.algorithm == "pfedmoap" and pc.cfg.algorithm_args["pfedmoap"]["num_experts"] == 10  # from pfedmoap_args
    ns = to_fedml_namespace(pc, rank=2)
    assert ns.federated_optimizer == "FedAvg" and getattr(ns, ALGORITHM_KEY) == "pFedMoAP"  # FedML's switch
    assert ns.comm_round == 5 and ns.worker_num == 3 and ns.role == "client"  # T + 1: the evaluation round
    assert not ns.enable_tracking and not ns.using_mlops and not ns.enable_wandb
    assert ns.frequency_of_the_test == 1 and ns.pfedmoap == {"lam": 0.5, "num_experts": 10}
    ns.yaml_config_file = ""  # rebuild from the flat namespace alone
    back = config_from_namespace(ns)
    assert back.cfg.to_dict() == pc.cfg.to_dict()


@pytest.mark.parametrize("patch, message", [
    ({"train_args": {"federated_optimizer": "nosuch"}}, "train_args.federated_optimizer"),
    ({"train_args": {"learning_rate": 0.1}}, "algorithm_args.<algorithm>.lr"),
    ({"device_args": {"worker_num": 2}}, "device_args.worker_num=2"),
    ({"comm_args": {"backend": "MQTT_S3"}}, "comm_args.backend"),
    ({"tracking_args": {"enable_tracking": True}}, "enable_tracking"),
    ({"comm_args": {"backend": "GRPC", "grpc_ipconfig_path": "nope.csv"}}, "grpc_ipconfig_path"),
    ({"pfedmoap_args": {"nosuch": 1}}, "nosuch"),
])
def test_bad_configs_fail_naming_the_key(tmp_path, patch, message):
    cfg = write_config(tmp_path, "cross_silo_mpi.yaml", patch)
    with pytest.raises((ConfigError, ValueError), match=message.replace(".", r"\.").replace("<", ".").replace(">", ".")):
        load_plugin_config(cfg)


def test_grpc_csv_needs_fedml_096_header_and_every_rank(tmp_path):
    csv = tmp_path / "ip.csv"
    csv.write_text("receiver_id,ip\n0,127.0.0.1\n")
    cfg = write_config(tmp_path, "cross_silo_grpc.yaml", {"comm_args": {"grpc_ipconfig_path": str(csv)}})
    with pytest.raises(ConfigError, match="eid,rank,grpc_server_ip,grpc_server_port"):
        load_plugin_config(cfg)
    csv.write_text("eid,rank,grpc_server_ip,grpc_server_port\n0,0,127.0.0.1,1\n1,1,127.0.0.1,2\n")
    with pytest.raises(ConfigError, match=r"rank\(s\) \[2, 3\]"):
        load_plugin_config(cfg)


# ---- guard, state store (the watchdog: test_peer_gone.py) -----------------------------------------------------
def test_is_loopback():
    from fedml_pfedmoap.fedml_plugin.guard import is_loopback

    for host in (None, "localhost", "127.0.0.1", "127.5.0.1", "::1", "0.0.0.0", b"localhost", ""):
        assert is_loopback(host), host
    for host in ("open.fedml.ai", "8.8.8.8", "10.0.0.1", "example.com", "2001:db8::1"):
        assert not is_loopback(host), host


def test_state_store_roundtrip_weights_only(tmp_path):
    from fedml_pfedmoap.checkpoint import CheckpointError
    from fedml_pfedmoap.fedml_plugin.state import ClientStateStore

    store = ClientStateStore(tmp_path, "run-1", lambda i: {"fresh": i})
    assert store.load(3) == {"fresh": 3}  # first participation
    state = {"ctx": torch.randn(4, 8), "gate": {"w": torch.randn(2, 2), "b": torch.zeros(2)}, "moe_trained": True,
             "ids": [1, 2], "n": 7}
    path = store.save(3, state)
    raw = torch.load(path, weights_only=True)  # plain tensors and data only
    assert raw["client_index"] == 3
    deep_equal(state, store.load(3))
    with pytest.raises(CheckpointError, match="client state 4"):
        store.save(4, {"bad": object()})
    path.rename(store.path(5))
    with pytest.raises(CheckpointError, match="not a state of client 5"):
        store.load(5)
    assert ClientStateStore(tmp_path, "run-2", lambda i: {}).load(3) == {}  # another run never reads it


# ---- the adapters' protocol, in process ----------------------------------------------------------------------------
def test_adapters_match_simulator_with_clients_moving_between_workers(tmp_path):
    """Server + 3 trainer objects driven like FedML would (worker k serves a rotating client): metrics and final states
    equal the in-process simulator's; the gate persisted by one worker is continued by another."""
    from cross_silo_compare import in_process_rig

    from fedml_pfedmoap.federated.schedule import sample_clients
    from fedml_pfedmoap.fedml_plugin.cross_silo import PersonalizedServerAggregator, ProtocolError
    from fedml_pfedmoap.fedml_plugin.metrics_log import RoundLogger
    from fedml_pfedmoap.fedml_plugin.state import ClientStateStore

    rig = in_process_rig(tmp_path, {"train_args": {"comm_round": 3, "client_num_in_total": 4, "client_num_per_round": 3}})
    pc, ns, ref, ref_result, srv_exp = rig.pc, rig.ns, rig.ref, rig.ref_result, rig.srv_exp
    server, workers = rig.server, rig.workers
    from fedml_pfedmoap.algorithms import get_algorithm

    for name, params in (("pfedmoap", {"pool_snapshot": "live"}), ("fedotp", {"round0_all_clients": True})):
        with pytest.raises(ValueError, match=list(params)[0]):  # simulator-only parity switches, named
            PersonalizedServerAggregator(None, ns, get_algorithm(name)(srv_exp.algorithm.rt, params), 4, 3, 3, 0, 1,
                                         RoundLogger(pc.cfg, "y"), tmp_path / "run2", run_tag="u")
    downloads, served = server.get_model_params(), {}
    assert set(downloads) == {0, 1, 2, 3}  # an entry for every client
    for r in range(4):  # 3 training rounds + the evaluation round
        sel = list(server.selection)
        assert sel == sample_clients(4, 0.75, 0, r)
        uploads = []
        for k, w in enumerate(workers):
            cid = sel[(k + r) % 3]  # rotate: a client moves between workers across rounds
            served.setdefault(cid, set()).add(k + 1)
            w.set_model_params(downloads[cid])
            w.train(None, None, ns)
            uploads.append((0, w.get_model_params()))
        downloads = server.aggregate(uploads)
    assert server.finished and all(d["done"] for d in downloads.values())
    assert any(len(ranks) > 1 for ranks in served.values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "cross_silo_rounds.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for t, row in enumerate(rows):
        evaluated = sorted(int(i) for i in row["eval_clients"])
        assert evaluated == sample_clients(4, 0.75, 0, t + 1)  # participants of the next round
        expected = sum(ref_result.client_acc[t][i] for i in evaluated) / len(evaluated)
        assert row["acc_mean"] == pytest.approx(expected, abs=1e-12)
        assert row["train_loss"] == pytest.approx(ref_result.rounds[t]["train_loss"], rel=1e-6)
    assert len({row["clients"][k]["digest"] for k in row["clients"]}) > 1  # personalized downloads in the last round
    store = ClientStateStore(tmp_path / "state", "t", lambda i: {})
    assert any("gate" in ref.simulator.states[i] for i in range(4))
    for i in range(4):
        deep_equal(ref.simulator.states[i], store.load(i), f"client {i}")
    # protocol violations are named
    bad = dict(downloads[0], selected=False, done=False)
    workers[0].set_model_params(bad)
    with pytest.raises(ProtocolError, match="did not select"):
        workers[0].train(None, None, ns)


# ---- offline guard with the real fedml.init -------------------------------------------------------------------------
AUDIT_SCRIPT = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
from fedml_pfedmoap.fedml_plugin import guard
guard.install_network_audit(sys.argv[1])
from fedml_pfedmoap.fedml_plugin.config import load_plugin_config, to_fedml_namespace
import fedml
pc = load_plugin_config(sys.argv[2])
def lines():
    return len(open(sys.argv[1]).read().splitlines())
fedml.init(to_fedml_namespace(pc), check_env=False, should_init_logs=False)   # FedML as shipped: phones home
unguarded = lines()
guard.neutralize_fedml()
fedml.init(to_fedml_namespace(pc), check_env=False, should_init_logs=False)
print(json.dumps({"unguarded": unguarded, "guarded": lines() - unguarded,
                  "home_files": sorted(os.listdir(os.path.expanduser("~/.fedml")))}))
"""


@pytest.mark.slow
def test_guard_stops_fedml_phoning_home(tmp_path):
    """The audit hook sees FedML's ops-server request when unguarded (so it can see one), and none once guarded."""
    cfg = write_config(tmp_path, "simulation.yaml", {})
    env = child_env(tmp_path, "unused")
    out = subprocess.run([PY, "-c", AUDIT_SCRIPT, str(tmp_path / "audit.jsonl"), str(cfg)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["unguarded"] > 0 and got["guarded"] == 0, got
    assert "global_services" in got["home_files"]  # FedML's files went to the temp HOME


# ---- simulation through FedMLRunner(algorithm_flow=...) -------------------------------------------------------------
@pytest.mark.slow
def test_fedml_simulation_equals_pfedmoap_bench_run(tmp_path):
    """`python -m fedml_pfedmoap` (FedMLRunner + algorithm_flow, network audited) vs `pfedmoap-bench run` on the same
    config: identical per-round acc_mean (and test_loss) in MLflow."""
    from benchmark_suite.cli import main as bench_main
    from fedml_pfedmoap.fedml_plugin.config import split_raw

    cfg = write_config(tmp_path, "simulation.yaml", {"train_args": {
        "comm_round": 2, "client_num_in_total": 3, "client_num_per_round": 3}})
    procs = Procs(tmp_path)
    try:
        procs.start("sim", [PY, "-m", "fedml_pfedmoap", "--cf", str(cfg)])
        rc = procs.wait_all(300)
    finally:
        procs.close()
    assert rc == {"sim": 0}, procs.log("sim")[-3000:]
    assert (tmp_path / "audit_sim.jsonl").read_text() == ""  # no outbound attempt while the network is "unreachable"
    assert not (tmp_path / "home" / ".fedml").exists()  # FedML's home is under the config's output dir
    assert (tmp_path / "out" / "fedml" / "home" / ".fedml").is_dir()
    suite, _ = split_raw(yaml.safe_load(cfg.read_text()))  # the same settings as a benchmark config
    suite["benchmark_args"] = {"name": "bench", "algorithms": ["pfedmoap"], "seeds": [0]}
    suite["tracking_args"]["mlflow_tracking_uri"] = f"sqlite:///{tmp_path / 'bench' / 'mlflow.db'}"
    bench_cfg = tmp_path / "bench.yaml"
    bench_cfg.write_text(yaml.safe_dump(suite))
    assert bench_main(["run", "--config", str(bench_cfg), "--no-progress"]) == 0
    for key in ("acc_mean", "test_loss"):
        fedml_hist = mlflow_metric(tmp_path, key)
        bench_hist = mlflow_metric(tmp_path / "bench", key)
        assert sorted(fedml_hist) == [0, 1]
        assert fedml_hist == bench_hist, key
