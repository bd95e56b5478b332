"""Cross-silo server with DP (docs/privacy.md): ``report_eval: false`` asks no client for the evaluation of its private
model; the run-level accounting is logged with the last round."""
import types

import pytest
import torch

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import FeatureSet

pytestmark = pytest.mark.fedml  # FedML's ServerAggregator


class Log:
    def __init__(self):
        self.rows = []

    def log_round(self, metrics, step):
        self.rows.append(dict(metrics))

    def close(self, status="FINISHED"):
        pass


@pytest.mark.parametrize("report", [True, False])
def test_report_eval_switch(tiny_backbone, tmp_path, report):
    from fedml_pfedmoap.fedml_plugin.cross_silo import PersonalizedServerAggregator

    text = TextEncoder(tiny_backbone, ["zero", "one", "two"], n_ctx=4)
    rt = Runtime(backbone=tiny_backbone, text=text, num_clients=2, seed=0, local_epochs=1, batch_size=8, rounds=2)
    algo = get_algorithm("promptfl")(rt, {"dp": {"epsilon": 10, "clip_update": 0.05, "report_eval": report}})
    algo.init_server()
    log = Log()
    server = PersonalizedServerAggregator(None, types.SimpleNamespace(), algo, 2, 2, 2, 0, 1, log, tmp_path)
    downloads = server.get_model_params()
    gen = torch.Generator().manual_seed(0)
    data = FeatureSet(torch.randn(8, 32, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    states = {0: {}, 1: {}}
    for r in range(3):  # rounds 0, 1 and FedML's extra evaluation round
        ups = []
        for i, d in downloads.items():
            ev = {"round": d["eval_round"], "correct": 1, "total": 2, "loss": 0.5} if d["eval"] else None
            assert (d["eval"] is not None) == (report and r > 0)
            up = algo.local_train(d["train"], states[i], data) if d["train"] else None
            ups.append((8, {"client_index": i, "round": r, "rank": i + 1, "upload": up, "eval": ev}))
        downloads = server.aggregate(ups)
    assert [row["round"] for row in log.rows] == [0, 1]
    assert all(("acc_mean" in row) == report for row in log.rows)
    assert log.rows[-1]["dp_busiest_releases"] == 2 and log.rows[-1]["dp_epsilon_run_pld"] > 0
    assert "train_loss" not in log.rows[0] and "update_norm" not in log.rows[0]
