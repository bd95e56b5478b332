"""Lockstep training (Runtime.train_clients_per_call > 1) equals training the clients one after another.

Several clients' prompts go through ONE text-tower call per step; each client keeps its own optimizer, batch stream and
DP clipping. Reference: the one-client-at-a-time path (itself checked against hand computations in test_baselines /
test_pfedmoap). Tolerance 1e-5: only the blocking of the batched matmuls differs.
"""
import copy

import pytest

from benchmark_suite import perf_naive as nv
from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.simulator import ClientData, Simulator
from tree_compare import deep_equal

ALGOS = ["promptfl", "fedprox", "local", "fedotp", "fedpgp", "promptfolio", "pfedmoap", "fedtpg", "fedpha"]
PARAMS = {"fedtpg": {"n_ctx": 16}}  # FedTPG's own 4-token encoder would bypass the counted run encoder
TRAIN_SIZES = [6, 4, 6, 3]  # batch 2 (drop_last), 2 epochs: 6/4/6/2 steps: clients leave a group at different steps


@pytest.fixture(scope="module")
def clients(tiny_backbone):
    data = nv.synthetic_data(tiny_backbone, num_classes=4, num_clients=4, shots=6, test_per_client=5, patches=True)
    out = []
    for tr, te, n in zip(data.train, data.test, TRAIN_SIZES):
        out.append(ClientData(nv.encode_all(tiny_backbone, tr, True).subset(list(range(n))),
                              nv.encode_all(tiny_backbone, te, True)))
    return data.classnames, out


def _run(tiny_backbone, clients, name, per_call, params=None):
    classnames, cl = clients
    text = TextEncoder(tiny_backbone, classnames)
    calls = []
    orig = text.features
    text.features = lambda ctx, _o=orig: (calls.append(tuple(ctx.shape)), _o(ctx))[1]
    rt = Runtime(backbone=tiny_backbone, text=text, num_clients=4, local_epochs=2, batch_size=2, rounds=2,
                 train_clients_per_call=per_call)
    algo = get_algorithm(name)(rt, params if params is not None else nv.algorithm_params(name, 2))
    sim = Simulator(algo, cl, rounds=2, progress=False)
    for t in range(2):
        sim.run_round(t)
    return sim, calls


@pytest.mark.parametrize("name", ALGOS)
def test_lockstep_equals_one_client_at_a_time(tiny_backbone, clients, name):
    seq, seq_calls = _run(tiny_backbone, clients, name, 1, PARAMS.get(name))
    lock, lock_calls = _run(tiny_backbone, clients, name, 3, PARAMS.get(name))  # groups {0,1,2} and {3}
    for a, b in zip(seq.result.rounds, lock.result.rounds):
        assert a["acc_mean"] == b["acc_mean"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)
    deep_equal(seq.states, lock.states, "client states", atol=1e-5)
    deep_equal(seq.algo.server_state(), lock.algo.server_state(), "server state", atol=1e-5)
    # fewer, larger text calls: a step of the group {0,1,2} encodes 3·P prompts at once
    assert len(lock_calls) < len(seq_calls)
    p = seq.algo.build_model(seq.algo.client_payload(0), seq.state(0), train=True).train_prompts().shape[0]
    assert (3 * p, 16, tiny_backbone.text_width) in lock_calls


def test_lockstep_call_count_and_dropout_by_hand(tiny_backbone, clients):
    """PromptFL, 2 rounds: one-at-a-time = Σ steps_i calls; groups {0,1,2},{3} = max(steps 0..2) + steps_3 calls
    (the group shrinks from 3 to 2 prompts when client 1's 4 steps end)."""
    steps = [2 * (n // 2) for n in TRAIN_SIZES]  # 2 epochs of floor(n / 2) full batches: [6, 4, 6, 2]
    _, seq_calls = _run(tiny_backbone, clients, "promptfl", 1)
    _, lock_calls = _run(tiny_backbone, clients, "promptfl", 3)
    w = tiny_backbone.text_width
    eval_calls = 4  # one per client per round (evaluation is not batched here)
    assert seq_calls.count((1, 16, w)) == 2 * (sum(steps) + eval_calls)
    assert lock_calls.count((3, 16, w)) == 2 * min(steps[:3])
    assert lock_calls.count((2, 16, w)) == 2 * (max(steps[:3]) - min(steps[:3]))
    assert lock_calls.count((1, 16, w)) == 2 * (steps[3] + eval_calls)


def test_lockstep_with_dp_equals_sequential(tiny_backbone, clients, monkeypatch):
    """Per-client clipping and noise stay per client when clients share a text call (each client's secret fixed by
    its creation order, the same in both runs, so the noise is too)."""
    from fedml_pfedmoap.privacy import noise

    params = {"dp": {"epsilon": 5.0, "clip_grad": 0.5}}
    monkeypatch.setattr(noise, "new_secret", iter(f"{i:064x}" for i in range(1, 100)).__next__)
    seq, _ = _run(tiny_backbone, clients, "promptfl", 1, copy.deepcopy(params))
    monkeypatch.setattr(noise, "new_secret", iter(f"{i:064x}" for i in range(1, 100)).__next__)
    lock, _ = _run(tiny_backbone, clients, "promptfl", 4, copy.deepcopy(params))
    deep_equal(seq.algo.server_state(), lock.algo.server_state(), "server state", atol=1e-5)
    assert [r["dp_sigma"] for r in seq.result.rounds] == [r["dp_sigma"] for r in lock.result.rounds]


def test_train_clients_per_call_is_validated(quick_cfg):
    from fedml_pfedmoap.config import ConfigError
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.train_args.train_clients_per_call = 0
    with pytest.raises(ConfigError, match="train_args.train_clients_per_call"):
        build_experiment(quick_cfg, "promptfl", progress=False)
