"""pFedMoAP (docs/algorithms.md): model vs hand-written loops, gradients, server KNN/snapshot, client state, variants."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.coop import CoOpModel
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import Batch, FeatureSet
from fedml_pfedmoap.federated.schedule import payload_bytes
from fedml_pfedmoap.federated.simulator import ClientData, Simulator
from test_gating import reference_attention

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def text(tiny_backbone):
    return TextEncoder(tiny_backbone, NAMES, n_ctx=4)


@pytest.fixture
def rt(tiny_backbone, text):
    return Runtime(backbone=tiny_backbone, text=text, num_clients=5, seed=0, local_epochs=2, batch_size=8)


def make_algo(rt, **params):
    algo = get_algorithm("pfedmoap")(rt, params)
    algo.init_server()
    return algo


def data(cid, n=20):
    g = torch.Generator().manual_seed(100 + cid)
    return FeatureSet(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def prompts(k, seed=1):
    return 0.05 * torch.randn(k, 4, 64, generator=torch.Generator().manual_seed(seed))


def train_payload(algo, k=3, ids=None):
    ids = list(range(1, k + 1)) if ids is None else ids
    p = {"client_index": 0, "round": 1, "global_prompt": algo.global_prompt.clone(), "experts": prompts(k),
         "expert_ids": ids, "expert_rounds": [0] * k}
    return p


def fake_round(algo, t, uploads):
    algo.begin_round(t, [u["client_index"] for u in uploads])
    algo.aggregate(uploads)


# ---------------------------------------------------------------------------------------------------------- model
def test_logits_match_reference_loop(rt, text):
    algo = make_algo(rt)
    payload = train_payload(algo)
    model = algo.build_model(payload, {}, train=True)
    batch = Batch(*data(0, 6)._astuple(torch.arange(6)))
    logits = model(batch)
    s = float(rt.logit_scale)
    with torch.no_grad():
        local = F.normalize(text.features(payload["global_prompt"]), dim=-1)
        experts = [F.normalize(text.features(payload["experts"][j]), dim=-1) for j in range(3)]
        img = F.normalize(batch.feats, dim=-1)
        q = img[:, ::1]  # D = 32 = d_gating -> stride 1
        kv = torch.stack([torch.stack([local[c]] + [e[c] for e in experts]) for c in range(10)])
        t_moe, _ = reference_attention(model.gate, q, kv)
    for b in range(6):
        for c in range(10):
            ref = 0.5 * float(torch.dot(img[b], local[c])) + float(torch.dot(q[b], t_moe[c, b]))
            assert abs(float(logits[b, c]) / s - ref) <= 1e-5


def test_expert_order_does_not_change_logits(rt):
    algo = make_algo(rt)
    p = train_payload(algo, k=4)
    perm = [2, 0, 3, 1]
    q = {**p, "experts": p["experts"][perm], "expert_ids": [p["expert_ids"][i] for i in perm]}
    batch = Batch(*data(1, 8)._astuple(torch.arange(8)))
    with torch.no_grad():
        a, b = algo.build_model(p, {}, True)(batch), algo.build_model(q, {}, True)(batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lam, k", [(0.5, 3), (0.0, 3), (0.5, 0)])
def test_gradients_reach_ctx_and_gate_never_experts_or_clip(rt, lam, k):
    algo = make_algo(rt, lam=lam)
    model = algo.build_model(train_payload(algo, k=k), {}, train=True)
    batch = Batch(*data(2, 8)._astuple(torch.arange(8)))
    model.loss(batch).backward()
    assert model.ctx.grad is not None and float(model.ctx.grad.abs().sum()) > 0  # λ=0: through key/value only
    if k:
        assert all(float(p.grad.abs().sum()) > 0 for p in model.gate.parameters())
        assert not model.experts.requires_grad and model.experts.grad is None
    else:
        assert model.gate is None
    assert all(p.grad is None for p in rt.backbone.parameters())


def test_expert_features_encoded_once_and_shared(rt, monkeypatch):
    algo = make_algo(rt)
    calls = []
    orig = rt.text.features
    monkeypatch.setattr(rt.text, "features", lambda ctx: calls.append(tuple(ctx.shape)) or orig(ctx))
    p = train_payload(algo, k=3)
    d = data(0)
    steps = 2 * d.num_batches(8)
    algo.local_train(p, {}, d)
    assert calls.count((3, 4, 64)) == 1 and calls.count((1, 4, 64)) == steps  # experts once, batched
    calls.clear()
    algo.local_train({**p, "client_index": 4}, {}, data(4))  # another client, same expert versions: cached
    assert (3, 4, 64) not in calls and len(calls) == steps


# ---------------------------------------------------------------------------------------------------------- server
def _up(cid, value, n=10):
    return {"client_index": cid, "n": n, "prompt": torch.full((4, 64), float(value))}


def test_knn_ids_self_excluded_ties_snapshot_and_first_timers(rt):
    algo = make_algo(rt, num_experts=3)  # K = 2
    fake_round(algo, 0, [_up(0, 0), _up(2, 2), _up(3, 3), _up(4, 4)])  # exact distances
    algo.begin_round(1, [0, 1, 2, 3])
    assert algo.client_payload(1)["expert_ids"] == []  # first-time participant
    assert algo.client_payload(0)["expert_ids"] == [2, 3]  # ids, not pool positions
    assert algo.client_payload(2)["expert_ids"] == [3, 0]  # 0 and 4 tie at distance 2: lower id wins
    assert algo.client_payload(3)["expert_ids"] == [2, 4]  # 2 and 4 tie at distance 1
    before = algo.client_payload(2)
    algo.aggregate([_up(3, 50), _up(1, 2.1)])  # the live pool changes mid-round ...
    after = algo.client_payload(2)  # ... the payload still comes from the round-start snapshot
    assert after["expert_ids"] == [3, 0] and torch.equal(after["experts"], before["experts"])
    assert torch.equal(after["experts"][0], torch.full((4, 64), 3.0))
    assert not torch.equal(algo.client_payload(0)["experts"], algo.client_payload(2)["experts"])
    assert payload_bytes(algo.client_payload(0)) == 3 * 4 * 64 * 4  # (K+1) prompts down
    assert payload_bytes(algo.client_payload(1)) == 4 * 64 * 4


def test_all_candidates_when_at_most_k_and_eval_payloads(rt):
    algo = make_algo(rt)  # K = 9
    fake_round(algo, 0, [_up(0, 0), _up(2, 2), _up(3, 3)])
    algo.begin_round(1, [0, 4])
    assert algo.client_payload(0)["expert_ids"] == [2, 3]
    algo.aggregate([_up(0, 2.5, n=30), _up(4, 1, n=10)])
    # FedAvg over participants only, weighted by n
    assert torch.allclose(algo.global_prompt, torch.full((4, 64), 0.75 * 2.5 + 0.25 * 1))
    assert set(algo.pool) == {0, 2, 3, 4} and float(algo.pool[2]["prompt"][0, 0]) == 2.0
    assert algo.eval_payload(0)["expert_ids"] == [2, 3]  # a participant: the experts it trained with
    assert algo.eval_payload(4)["expert_ids"] == []  # a first-timer trained without experts
    assert algo.eval_payload(2)["expert_ids"] == [0, 3, 4]  # non-participant: KNN over the end-of-round pool
    assert algo.eval_payload(1)["expert_ids"] == []  # never trained


def test_random_selection_follows_fixed_permutation(rt):
    algo = make_algo(rt, num_experts=3, expert_selection="legacy_fixed_permutation")
    fake_round(algo, 0, [_up(c, c) for c in range(5)])
    algo.begin_round(1, [0])
    want = [j for j in algo.permutation if j != 0][:2]
    assert algo.client_payload(0)["expert_ids"] == want
    assert algo.permutation == make_algo(rt, expert_selection="random").permutation  # fixed by the seed


# ---------------------------------------------------------------------------------------------------------- client
def run_rounds(algo, states, schedule):
    for t, selected in enumerate(schedule):
        algo.begin_round(t, selected)
        ups = [algo.local_train(algo.client_payload(c), states.setdefault(c, {}), data(c)) for c in selected]
        algo.aggregate(ups)
    return ups


def test_gate_state_fresh_private_init_persistence_and_no_leakage(rt):
    algo = make_algo(rt, gate_lr=0.0, weight_decay=0.0)
    states = {}
    run_rounds(algo, states, [[0, 1, 2], [0, 1]])
    init = algo.new_gate(1).state_dict()  # with gate_lr 0 the kept gate is its private init (train seed, client)
    assert all(torch.equal(states[1]["gate"][k], init[k]) for k in init)
    assert not torch.equal(states[0]["gate"]["q_proj.weight"], states[1]["gate"]["q_proj.weight"])
    assert "gate" not in states[2] and not states[2].get("moe_trained", False)

    a, b = make_algo(rt), make_algo(rt)
    sa, sb = {}, {}
    run_rounds(a, sa, [[0, 1, 2], [0, 1]])  # A then B ...
    ups_b = run_rounds(b, sb, [[0, 1, 2], [1]])  # ... gives the same B as B alone (fresh optimizers, own gate)
    assert torch.equal(sa[1]["ctx"], sb[1]["ctx"]) and torch.equal(ups_b[0]["prompt"], sb[1]["ctx"])
    assert all(torch.equal(sa[1]["gate"][k], sb[1]["gate"][k]) for k in sb[1]["gate"])
    kept = copy.deepcopy(sa[1])
    run_rounds_from(a, sa, 2, [0, 2])  # client 1 sits out: its gate and prompt stay
    assert all(torch.equal(kept["gate"][k], sa[1]["gate"][k]) for k in kept["gate"])
    assert all(isinstance(v, torch.Tensor) for v in sa[1]["gate"].values())


def run_rounds_from(algo, states, t, selected):
    algo.begin_round(t, selected)
    algo.aggregate([algo.local_train(algo.client_payload(c), states.setdefault(c, {}), data(c)) for c in selected])


def test_upload_is_prompt_and_n_only(rt):
    algo = make_algo(rt)
    ups = run_rounds(algo, {}, [[0, 1], [0, 1]])
    assert all(set(u) == {"client_index", "n", "prompt", "metrics"} for u in ups)
    assert payload_bytes({k: v for k, v in ups[0].items() if k != "metrics"}) == 4 * 64 * 4


def test_evaluation_paths(rt):
    algo = make_algo(rt)
    states = {}
    run_rounds(algo, states, [[0, 1, 2], [0, 1]])
    test = data(9, 30)

    def plain(ctx):
        m = CoOpModel(rt, ctx)
        with torch.no_grad():
            return float(F.cross_entropy(m.scorer()(Batch(test.feats, test.labels)), test.labels))

    assert algo.evaluate(algo.eval_payload(4), {}, test).loss == pytest.approx(plain(algo.global_prompt), abs=1e-5)
    r2 = algo.evaluate(algo.eval_payload(2), states[2], test)  # trained once, never with experts
    assert algo.eval_payload(2)["expert_ids"] and r2.loss == pytest.approx(plain(states[2]["ctx"]), abs=1e-5)
    r0 = algo.evaluate(algo.eval_payload(0), states[0], test)  # ctx_0 + gate + experts
    assert abs(r0.loss - plain(states[0]["ctx"])) > 1e-4


def test_live_pool_parity_sees_same_round_uploads(rt):
    """pool_snapshot: live (D2 parity): in round 1 client 1's download holds client 0's round-1 upload (the default
    round-start snapshot holds its round-0 prompt); each participant is evaluated with exactly the experts it got."""
    from fedml_pfedmoap.federated.simulator import ClientData, Simulator

    clients = [ClientData(data(c, 8), data(10 + c, 6)) for c in range(3)]
    sims = {}
    for mode in ("round_start", "live"):
        algo = get_algorithm("pfedmoap")(rt, {"num_experts": 3, "pool_snapshot": mode})
        sims[mode] = Simulator(algo, clients, rounds=2, progress=False)
        sims[mode].run_round(0)
        before = {c: sims[mode].algo.pool[c]["prompt"].clone() for c in range(3)}  # round-0 uploads
        algo.begin_round(1, [0, 1, 2])
        p0 = algo.client_payload(0)
        up0 = algo.local_train(p0, sims[mode].state(0), clients[0].train)
        algo.observe_upload(up0)
        p1 = algo.client_payload(1)
        got = p1["experts"][p1["expert_ids"].index(0)]
        if mode == "live":
            assert p1["expert_rounds"][p1["expert_ids"].index(0)] == 1 and torch.equal(got, up0["prompt"])
            assert algo.sequential
        else:
            assert p1["expert_rounds"] == [0, 0] and torch.equal(got, before[0])
            assert not algo.sequential
        ev = algo.eval_payload(1)
        assert ev["expert_ids"] == p1["expert_ids"] and torch.equal(ev["experts"], p1["experts"])
        ev0 = algo.eval_payload(0)
        assert torch.equal(ev0["experts"], p0["experts"])  # client 0 keeps what it downloaded
    # through the simulator: a sequential loop, and results differ from the round-start default
    for mode in ("round_start", "live"):
        sims[mode] = Simulator(get_algorithm("pfedmoap")(rt, {"num_experts": 3, "pool_snapshot": mode}), clients,
                               rounds=2, progress=False)
        sims[mode].run_round(0)
        sims[mode].run_round(1)
    assert torch.equal(sims["live"].states[0]["ctx"], sims["round_start"].states[0]["ctx"])  # client 0: same pool
    assert not torch.equal(sims["live"].states[2]["ctx"], sims["round_start"].states[2]["ctx"])
    with pytest.raises(ValueError, match="pool_snapshot"):
        get_algorithm("pfedmoap")(rt, {"pool_snapshot": "stale"})


def test_checkpoint_resume_reproduces_next_round(rt):
    clients = [ClientData(data(c), data(c + 50, 12)) for c in range(5)]

    def sim():
        return Simulator(make_algo(rt), clients, rounds=4, frac=0.6, seed=0, progress=False)

    full = sim()
    full.run()
    part = sim()
    for t in range(3):
        part.run_round(t)
    resumed = sim()
    resumed.algo.load_server_state(copy.deepcopy(part.algo.server_state()))
    resumed.states = copy.deepcopy(part.states)
    m = resumed.run_round(3)
    assert torch.equal(resumed.algo.global_prompt, full.algo.global_prompt)
    assert m["acc_mean"] == full.result.rounds[3]["acc_mean"] and m["test_loss"] == full.result.rounds[3]["test_loss"]


# ---------------------------------------------------------------------------------------------------------- variants
def test_gate_fedavg_variant(rt):
    algo = make_algo(rt, gate_aggregation="fedavg")
    before = {k: v.clone() for k, v in algo.global_gate.items()}
    ups = run_rounds(algo, {}, [[0, 1, 2], [0, 2]])
    assert all("gate" in u for u in ups)
    w = [u["n"] for u in ups]
    ref = (w[0] * ups[0]["gate"]["q_proj.weight"] + w[1] * ups[1]["gate"]["q_proj.weight"]) / sum(w)
    torch.testing.assert_close(algo.global_gate["q_proj.weight"], ref)
    assert not torch.equal(before["q_proj.weight"], algo.global_gate["q_proj.weight"])
    assert "global_gate" in algo.client_payload(0)


def test_linear_and_uniform_variants_run(rt):
    for params in ({"gating": "linear", "num_experts": 3}, {"uniform_gate": True}):
        algo = make_algo(rt, **params)
        states = {}
        run_rounds(algo, states, [[0, 1, 2], [0, 1]])
        assert states[0]["moe_trained"]
    assert sum(v.numel() for v in states[0]["gate"].values()) == 4 * (32 * 32 + 32)


def test_params_validation_and_lambda_alias(rt):
    cls = get_algorithm("pfedmoap")
    assert cls.parse_params({"lambda": 0.0}).lam == 0.0
    assert get_algorithm("pfedmoap_lambda0").parse_params({}).lam == 0.0
    for bad, msg in [({"lambda": 1, "lam": 1}, "either"), ({"gating": "mlp"}, "gating"), ({"foo": 1}, "unknown"),
                     ({"uniform_gate": "False"}, "uniform_gate"), ({"expert_selection": "nearest"}, "expert_selection"),
                     ({"gate_aggregation": "mean"}, "gate_aggregation"), ({"num_experts": 0}, "num_experts")]:
        with pytest.raises(ValueError, match=msg):
            cls.parse_params(bad)
    with pytest.raises(ValueError, match="d_gating"):
        make_algo(rt, d_gating=128)  # the tiny model has D = 32


def test_quickstart_experiment_runs_pfedmoap(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    exp = build_experiment(quick_cfg, "pfedmoap", progress=False)
    res = exp.simulator.run()
    prompt_bytes = 16 * exp.simulator.algo.rt.ctx_shape[1] * 4
    r0, r1 = res.rounds
    k = min(9, exp.simulator.num_clients - 1)
    assert r0["bytes_down"] == prompt_bytes and r1["bytes_down"] == (k + 1) * prompt_bytes
    assert r0["bytes_up"] == r1["bytes_up"] == prompt_bytes
    assert 0.0 <= res.summary["acc_last"] <= 1.0 and r1["train_loss"] == r1["train_loss"]
