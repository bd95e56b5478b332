"""Drive the FedML cross-silo adapters in process (server aggregator + worker trainers serving rotating clients, as
FedML would) and compare per-round metrics and final client states with the in-process simulator."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from fedml_helpers import write_config
from tree_compare import deep_equal


@dataclass
class Rig:
    """The FedML cross-silo adapters in one process: the plugin config, FedML's namespace, the simulator's reference
    run, one experiment for the server half and one for the workers, the aggregator and one trainer per worker."""

    pc: Any
    ns: Any
    ref: Any
    ref_result: Any
    srv_exp: Any
    cli_exp: Any
    server: Any
    workers: List[Any]


def in_process_rig(tmp_path: Path, overrides: Dict[str, Dict[str, Any]]) -> Rig:
    """``cross_silo_mpi.yaml`` with ``overrides``, tracking off; the reference simulator run is done here."""
    from fedml_pfedmoap.experiment import Resources, build_experiment
    from fedml_pfedmoap.fedml_plugin.config import load_plugin_config, to_fedml_namespace
    from fedml_pfedmoap.fedml_plugin.cross_silo import PersonalizedClientTrainer, PersonalizedServerAggregator
    from fedml_pfedmoap.fedml_plugin.metrics_log import RoundLogger

    pc = load_plugin_config(write_config(tmp_path, "cross_silo_mpi.yaml", overrides))
    pc.cfg.tracking_args.mlflow_tracking_uri = None
    t = pc.cfg.train_args
    res = Resources()
    ref = build_experiment(pc.cfg, progress=False, resources=res)
    ref_result = ref.simulator.run()
    ns = to_fedml_namespace(pc)
    srv_exp = build_experiment(pc.cfg, progress=False, resources=res)
    cli_exp = build_experiment(pc.cfg, progress=False, resources=res)
    server = PersonalizedServerAggregator(None, ns, srv_exp.algorithm, t.client_num_in_total, t.client_num_per_round,
                                          t.comm_round, 0, 1, RoundLogger(pc.cfg, "x"), tmp_path / "run", run_tag="t",
                                          dropout=t.client_dropout)
    workers = [PersonalizedClientTrainer(None, ns, cli_exp.algorithm, cli_exp.simulator.clients, tmp_path / "state",
                                         k + 1) for k in range(t.client_num_per_round)]
    return Rig(pc, ns, ref, ref_result, srv_exp, cli_exp, server, workers)


def adapters_match_simulator(tmp_path: Path, algorithm: str, params: Dict[str, Any], rounds: int = 2,
                             clients: int = 4, per_round: int = 3, train_args: Optional[Dict[str, Any]] = None,
                             data_args: Optional[Dict[str, Any]] = None) -> list:
    from fedml_pfedmoap.federated.schedule import sample_clients
    from fedml_pfedmoap.fedml_plugin.state import ClientStateStore

    rig = in_process_rig(tmp_path, {
        "train_args": {"federated_optimizer": algorithm, "comm_round": rounds, "client_num_in_total": clients,
                       "client_num_per_round": per_round, "epochs": 1, **(train_args or {})},
        "model_args": {"n_ctx": 4}, "algorithm_args": {algorithm: params}, "data_args": data_args or {},
        "device_args": {"worker_num": per_round}})
    ns, ref, ref_result, server, workers = rig.ns, rig.ref, rig.ref_result, rig.server, rig.workers
    frac = per_round / clients
    downloads = server.get_model_params()
    for r in range(rounds + 1):  # the training rounds + the evaluation round
        sel = list(server.selection)
        assert sel == sample_clients(clients, frac, 0, r)
        uploads = []
        for k, w in enumerate(workers):
            w.set_model_params(downloads[sel[(k + r) % per_round]])  # clients move between workers
            w.train(None, None, ns)
            uploads.append((0, w.get_model_params()))
        downloads = server.aggregate(uploads)
    assert server.finished
    rows = [json.loads(x) for x in (tmp_path / "run" / "cross_silo_rounds.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(rounds))
    for t, row in enumerate(rows):
        evaluated = sorted(int(i) for i in row["eval_clients"])
        expected = sum(ref_result.client_acc[t][i] for i in evaluated) / len(evaluated)
        assert row["acc_mean"] == pytest.approx(expected, abs=1e-12)
        keys = ["train_loss", "bytes_up", "bytes_down", "dropped", "dropped_clients"]
        keys += ["acc_val_mean"] if len(evaluated) == clients else []  # a mean over every client, as the simulator's
        for key in keys:
            if key in ref_result.rounds[t] or key in row:
                got = row.get(key, float("nan"))  # a round whose uploads were all lost reports no train_loss
                assert got == pytest.approx(ref_result.rounds[t][key], rel=1e-6, nan_ok=True), key
    store = ClientStateStore(tmp_path / "state", "t", lambda i: {})
    for i in range(clients):
        if store.path(i).exists():
            deep_equal(ref.simulator.states[i], store.load(i), f"client {i}")
    return rows
