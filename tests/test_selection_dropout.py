"""Model selection on a validation split (never on test accuracy) and client dropout, in both engines."""
import itertools

import numpy as np
import pytest
import torch

from fedml_pfedmoap.algorithms.protocol import Algorithm, EvalResult
from fedml_pfedmoap.federated.features import FeatureSet
from fedml_pfedmoap.federated.metrics import selection_summary
from fedml_pfedmoap.federated.simulator import ClientData, Simulator
from fedml_pfedmoap.seeding import numpy_generator


# ---- validation selection -----------------------------------------------------------------------------------------
def _rounds(val, test):
    return [{"round": t, "acc_val_mean": v, "acc_mean": a} for t, (v, a) in enumerate(zip(val, test))]


def test_selection_is_the_hand_written_argmax_of_validation_with_earliest_tie():
    val = [0.2, 0.5, 0.4, 0.5, 0.1]
    test = [0.9, 0.3, 0.8, 0.7, 0.95]  # the test-best round (4) is not the validation-best one
    best = None
    for t in range(len(val)):  # hand-written: strictly greater only, so the earliest of equal maxima wins
        if best is None or val[t] > val[best]:
            best = t
    assert best == 1
    got = selection_summary(_rounds(val, test))
    assert got == {"acc_val_selected": test[best], "round_val_selected": best}
    assert got["acc_val_selected"] != max(test)


def test_selection_never_reads_test_accuracy():
    rng = np.random.default_rng(0)
    val = rng.random(6).round(2)
    test = rng.random(6)
    chosen = selection_summary(_rounds(val, test))["round_val_selected"]
    for perm in itertools.permutations(range(6)):  # permuted test accuracies: the same round is selected
        shuffled = test[list(perm)]
        got = selection_summary(_rounds(val, shuffled))
        assert got["round_val_selected"] == chosen
        assert got["acc_val_selected"] == shuffled[chosen]


def test_no_validation_no_selection():
    assert selection_summary([{"round": 0, "acc_mean": 0.5}]) == {}


def test_validation_split_in_the_simulator(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.data_args.val_fraction = 0.25
    exp = build_experiment(quick_cfg, "promptfl", progress=False)
    n = quick_cfg.train_args.client_num_in_total
    for i, c in enumerate(exp.simulator.clients):  # train + val = the client's partition items, disjoint
        assert len(c.train) + len(c.val) == len(exp.partition.train[i])
        assert len(c.val) > 0
    res = exp.simulator.run()
    for r in res.rounds:
        assert "acc_val_mean" in r and "acc_mean" in r
    val_by_round = [r["acc_val_mean"] for r in res.rounds]
    best = int(np.argmax(val_by_round))
    assert res.summary["acc_val_selected"] == res.rounds[best]["acc_mean"]
    assert n == len(exp.simulator.validated())


def test_validation_is_the_same_for_every_method(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.data_args.val_fraction = 0.25
    a = build_experiment(quick_cfg, "promptfl", progress=False).simulator.clients
    b = build_experiment(quick_cfg, "local", seed=5, progress=False).simulator.clients
    for x, y in zip(a, b):
        assert torch.equal(x.val.feats, y.val.feats) and torch.equal(x.train.feats, y.train.feats)


def test_validation_off_changes_nothing(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    exp = build_experiment(quick_cfg, "promptfl", progress=False)
    assert all(c.val is None for c in exp.simulator.clients)
    res = exp.simulator.run()
    assert "acc_val_selected" not in res.summary and all("acc_val_mean" not in r for r in res.rounds)
    assert all("dropped" not in r for r in res.rounds)


# ---- client dropout -----------------------------------------------------------------------------------------------
class Probe(Algorithm):
    """Records what reaches aggregate; its server state is the number of aggregated uploads so far."""

    name = "probe"

    def init_server(self):
        super().init_server()
        self.aggregated, self.total = [], 0

    def client_payload(self, cid):
        return {"client_index": cid, "round": self.round, "w": torch.tensor([float(self.total)])}

    def init_client_state(self, cid):
        return {}

    def local_train(self, payload, state, data):
        return {"client_index": payload["client_index"], "n": len(data), "prompt": torch.zeros(2),
                "metrics": {"train_loss": 1.0}}

    def aggregate(self, uploads):
        self.aggregated.append(sorted(u["client_index"] for u in uploads))
        self.total += len(uploads)

    def evaluate(self, payload, state, data):
        return EvalResult(1, 2, 0.0)


def _probe_run(p, seed, n=8, frac=0.5, rounds=6):
    algo = Probe.__new__(Probe)
    Algorithm.__init__(algo, runtime=None, params={})
    fs = FeatureSet(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    sim = Simulator(algo, [ClientData(fs, fs) for _ in range(n)], rounds=rounds, frac=frac, seed=seed,
                    progress=False, dropout=p)
    return sim, sim.run(), algo


def _hand_dropped(n, selected, p, seed, t):
    """The documented rule: u = numpy_generator(seed, 'client-dropout', t).random(n); client i drops if u[i] < p."""
    u = numpy_generator(seed, "client-dropout", t).random(n)
    return sorted(i for i in selected if u[i] < p)


def test_dropped_uploads_never_reach_aggregate():
    sim, res, algo = _probe_run(0.4, seed=3)
    seen_drop = 0
    rounds_aggregated = iter(algo.aggregated)
    for t, r in enumerate(res.rounds):
        selected = sim.schedule.sampled(t)
        assert r["dropped_clients"] == _hand_dropped(8, selected, 0.4, 3, t)
        assert r["dropped"] == len(r["dropped_clients"])
        delivered = sorted(set(selected) - set(r["dropped_clients"]))
        if delivered:
            assert next(rounds_aggregated) == delivered
        assert r["bytes_up"] == pytest.approx(8 * len(delivered) / len(selected))
        seen_drop += r["dropped"]
    assert seen_drop > 0  # the test exercises dropout


def test_all_dropped_leaves_the_server_state_unchanged():
    sim, res, algo = _probe_run(0.999, seed=0, rounds=3)
    assert algo.aggregated == [] and algo.total == 0
    assert all(r["dropped"] == r["participants"] for r in res.rounds)
    assert all(np.isnan(r["train_loss"]) for r in res.rounds)


def test_dropout_schedule_same_across_methods_and_seed_for_seed(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.train_args.client_dropout = 0.5
    quick_cfg.train_args.comm_round = 3

    n = quick_cfg.train_args.client_num_in_total

    def dropped(algorithm, seed):
        sim = build_experiment(quick_cfg, algorithm, seed=seed, progress=False).simulator
        res = sim.run()
        for t, r in enumerate(res.rounds):
            assert r["dropped_clients"] == _hand_dropped(n, sim.schedule.sampled(t), 0.5, seed, t)
        return [r["dropped_clients"] for r in res.rounds]

    a, b = dropped("promptfl", 0), dropped("local", 0)
    assert a == b and any(a)
    assert dropped("promptfl", 0) == a  # seed for seed
    assert dropped("promptfl", 1) != a  # another seed, another schedule


@pytest.mark.parametrize("train_args,data_args", [
    ({"client_dropout": 0.5}, {}),
    ({"client_dropout": 0.3, "client_num_per_round": 4}, {"val_fraction": 0.25}),
])
@pytest.mark.fedml
def test_cross_silo_adapters_equal_simulator_with_dropout(tmp_path, train_args, data_args):
    from cross_silo_compare import adapters_match_simulator

    train_args = dict(train_args)
    per_round = train_args.pop("client_num_per_round", 3)
    rows = adapters_match_simulator(tmp_path, "promptfl", {}, rounds=3, clients=4, per_round=per_round,
                                    train_args=train_args, data_args=data_args)
    assert any(r["dropped"] for r in rows)
    if data_args:
        assert all("acc_val_mean" in r for r in rows)
