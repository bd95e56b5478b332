"""DP-FPL against hand-written computations: the refactorised context, the autograd gradients of u and v, the
reconstructed gradient of L, clipping and the noise scale, public-only uploads, the per-batch synchronous update,
simulator runs with the run-level accounting, and the FedML cross-silo engine against the simulator."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import Batch, FeatureSet
from fedml_pfedmoap.federated.simulator import ClientData, Simulator
from fedml_pfedmoap.privacy import PUBLIC_UPLOAD_METRICS, epsilon_pld

PUBLIC = set(PUBLIC_UPLOAD_METRICS) | {"dp_sigma_global", "dpfpl_sync_steps"}


@pytest.fixture(scope="module")
def rt(tiny_backbone):
    text = TextEncoder(tiny_backbone, ["cat", "dog", "sea turtle"], n_ctx=4)
    return Runtime(backbone=tiny_backbone, text=text, num_clients=3, seed=0, local_epochs=1, batch_size=4, rounds=3)


def feature_set(rt, n, seed):
    g = torch.Generator().manual_seed(seed)
    return FeatureSet(torch.randn(n, rt.backbone.embed_dim, generator=g),
                      torch.randint(0, rt.text.num_classes, (n,), generator=g))


def setup(rt, params, client=0, participants=3):
    algo = get_algorithm("dpfpl")(rt, {"rank": 2, **params})
    algo.init_server()
    algo.begin_round(0, list(range(participants)))
    state = algo.init_client_state(client)
    state["local_ctx"] = torch.randn(4, rt.ctx_shape[1], generator=torch.Generator().manual_seed(7)) * 0.05
    return algo, algo.client_payload(client), state


def hand_grad_ctx(rt, ctx, data):
    """G = ∂CE/∂ctx for a plain CoOp prompt ctx (an independent forward: text features, cosine logits, CE)."""
    leaf = ctx.detach().clone().requires_grad_(True)
    text = F.normalize(rt.text.features(leaf.unsqueeze(0))[0].float(), dim=-1)
    img = F.normalize(data.feats.float(), dim=-1)
    loss = F.cross_entropy(rt.logit_scale * img @ text.t(), data.labels)
    loss.backward()
    return leaf.grad


def test_context_is_g_plus_l_for_any_factorisation(rt):
    algo, payload, state = setup(rt, {})
    g, local = payload["global_prompt"], state["local_ctx"]
    model = algo.build_model(payload, state, train=True)
    seen = []
    for _ in range(5):  # a fresh Ω each call
        ctx = model.train_prompts()[0].detach()
        torch.testing.assert_close(ctx, g + local, atol=1e-6, rtol=0)
        u, v = model.u.detach(), model.v.detach()
        torch.testing.assert_close(u.t() @ u, torch.eye(2), atol=1e-5, rtol=0)  # orthonormal columns
        torch.testing.assert_close(v @ v.t(), torch.eye(2), atol=1e-5, rtol=0)  # orthonormal rows
        seen.append(u.clone())
    assert any(float((seen[0] - s).abs().max()) > 1e-3 for s in seen[1:])  # the factorisation really is random
    ev = algo.build_model(payload, state, train=False)
    torch.testing.assert_close(ev.ctx.detach(), g + local)


def test_gradients_and_reconstruction_against_the_formula(rt):
    algo, payload, state = setup(rt, {})
    data = feature_set(rt, 4, 1)
    model = algo.build_model(payload, state, train=True)
    loss = model.loss_from(rt.text.features(model.train_prompts()), Batch(data.feats, data.labels, None))
    loss.backward()
    u, v = model.u.detach(), model.v.detach()
    G = hand_grad_ctx(rt, payload["global_prompt"] + state["local_ctx"], data)
    torch.testing.assert_close(model.ctx.grad, G, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.u.grad, G @ v.t(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.v.grad, u.t() @ G, atol=1e-5, rtol=1e-4)
    assert model.local_ctx.grad is None  # L is not on the autograd path
    model.process_grads()  # no dp: no clipping, no noise
    gu, gv = (G @ v.t()).double(), (u.t() @ G).double()
    ud, vd = u.double(), v.double()
    expected = torch.zeros_like(G, dtype=torch.float64)
    for i in range(G.shape[0]):  # element-wise sums of (gu/10)·v + u·(gv/10) + u·uᵀ·(gu/10)·v
        for j in range(G.shape[1]):
            a = sum(gu[i, k] / 10 * vd[k, j] for k in range(2))
            b = sum(ud[i, k] * gv[k, j] / 10 for k in range(2))
            c = sum(ud[i, k] * ud[m, k] * gu[m, p] / 10 * vd[p, j] for k in range(2) for m in range(4)
                    for p in range(2))
            expected[i, j] = a + b + c
    torch.testing.assert_close(model.local_ctx.grad.double(), expected, atol=1e-6, rtol=1e-4)


def test_clipping_bounds_every_gradient(rt):
    algo, payload, state = setup(rt, {"dp": {"epsilon": "inf", "clip_grad": 1e-4}})
    data = feature_set(rt, 4, 2)
    model = algo.build_model(payload, state, train=True)
    model.loss_from(rt.text.features(model.train_prompts()), Batch(data.feats, data.labels, None)).backward()
    raw = {n: float(getattr(model, n).grad.norm()) for n in ("ctx", "u", "v")}
    assert min(raw.values()) > 1e-4  # the bound is active
    model.process_grads()
    for n in ("ctx", "u", "v"):
        assert float(getattr(model, n).grad.norm()) == pytest.approx(1e-4, rel=1e-5)


def test_noise_scale_matches_the_authors_calibration(rt):
    eps, delta, clip, k = 2.0, 1e-5, 10.0, 3
    algo, payload, state = setup(rt, {"dp": {"epsilon": eps}}, participants=k)
    state["dp_secret"] = "ab" * 32  # a fixed secret: deterministic draws
    sigma = math.sqrt(3 * math.log(1 / delta)) / eps * clip / 4  # T = 3 rounds, B = 4
    assert algo.sigma() == pytest.approx(sigma, rel=1e-12)
    model = algo.build_model(payload, state, train=True)
    draws = {"ctx": [], "u": [], "v": []}
    for _ in range(300):
        for n in draws:
            getattr(model, n).grad = torch.zeros_like(getattr(model, n))
        model.process_grads()
        for n in draws:
            draws[n].append(getattr(model, n).grad.flatten().double())
    for n, std in (("ctx", sigma / math.sqrt(k)), ("u", sigma), ("v", sigma)):
        x = (torch.cat(draws[n]) / std).numpy()
        assert abs(x.std() - 1) < 4 / math.sqrt(2 * len(x)) + 0.005, (n, x.std())
        assert abs(x.mean()) < 5 / math.sqrt(len(x))
        assert stats.kstest(x, "norm").pvalue > 1e-3
    again = algo.build_model(payload, state, train=True)  # same secret and context -> the same draw
    for n in draws:
        getattr(again, n).grad = torch.zeros_like(getattr(again, n))
    again.process_grads()
    torch.testing.assert_close(again.u.grad.flatten().double(), draws["u"][0])


@pytest.mark.parametrize("sync", ["round", "per_batch"])
def test_private_upload_carries_only_noised_tensors_and_public_numbers(rt, sync):
    algo, payload, state = setup(rt, {"sync": sync, "dp": {"epsilon": 1.0}})
    data = feature_set(rt, 8, 3)
    up = algo.local_train_many([payload], [state], [data])[0]
    assert set(up) == {"client_index", "n", "prompt", "metrics"}
    assert set(up["metrics"]) <= PUBLIC, set(up["metrics"]) - PUBLIC
    assert "train_loss" in state["dp_local_metrics"] and "dp_secret" in state
    # the uploaded g moved by the noise: far more than the clean, clipped steps could move it
    moved = float((up["prompt"] - payload["global_prompt"]).norm())
    assert moved > 10 * algo.hp.lr * algo.hp.dp.clip_grad * 2


def test_per_batch_and_round_equal_the_hand_written_step(rt):
    """One local step per round (n = B): round mode with the uniform mean and per_batch both give
    g' = g − lr·(mean_k G_k + wd·g), with G_k computed by hand for each client's personalised prompt g + L_k."""
    datas = [feature_set(rt, 4, 10 + k) for k in range(2)]
    results = {}
    for sync in ("round", "per_batch"):
        algo = get_algorithm("dpfpl")(rt, {"rank": 2, "sync": sync, "uniform_avg": True})
        algo.init_server()
        algo.begin_round(0, [0, 1])
        payloads = [algo.client_payload(k) for k in range(2)]
        states = [algo.init_client_state(k) for k in range(2)]
        g0, local0 = payloads[0]["global_prompt"].clone(), states[0]["local_ctx"].clone()
        ups = algo.local_train_many(payloads, states, datas)
        algo.aggregate(ups)
        results[sync] = algo.global_prompt
    grads = [hand_grad_ctx(rt, g0 + local0, d) for d in datas]
    expected = g0 - algo.hp.lr * ((grads[0] + grads[1]) / 2 + algo.hp.weight_decay * g0)
    for sync, g in results.items():
        torch.testing.assert_close(g, expected, atol=1e-6, rtol=1e-5, msg=sync)


def test_per_batch_is_rejected_outside_the_simulator(rt):
    algo, payload, state = setup(rt, {"sync": "per_batch"})
    with pytest.raises(ValueError, match=r"algorithm_args\.dpfpl\.sync"):
        algo.local_train(payload, state, feature_set(rt, 4, 4))


@pytest.mark.parametrize("params, key", [({"rank": 5}, "rank"), ({"sync": "lockstep"}, "sync"),
                                         ({"dp": {"epsilon": 1, "clip_update": 1}}, "dp"),
                                         ({"dp": {"epsilon": 1, "accounting": "release"}}, "dp")])
def test_bad_parameters_name_the_key(rt, params, key):
    with pytest.raises(ValueError, match=rf"algorithm_args\.dpfpl\.{key}"):
        get_algorithm("dpfpl")(rt, params)


@pytest.mark.parametrize("sync", ["round", "per_batch"])
def test_simulator_runs_and_reports_the_run_level_epsilon(rt, sync):
    clients = [ClientData(feature_set(rt, 8 + 4 * i, 20 + i), feature_set(rt, 6, 30 + i)) for i in range(3)]
    algo = get_algorithm("dpfpl")(rt, {"rank": 2, "sync": sync, "dp": {"epsilon": 4.0}})
    res = Simulator(algo, clients, rounds=3, progress=False).run()
    assert all(math.isfinite(r["acc_mean"]) and math.isfinite(r["test_loss"]) for r in res.rounds)
    sigma = math.sqrt(3 * math.log(1e5)) / 4.0 * 10.0 / 4
    z = sigma / (2 * 10.0 * math.sqrt(3 + 2))  # ∇g (σ/√K) and ∇u, ∇v (σ) composed, sensitivity 2C each
    steps = [2, 2, 2] if sync == "per_batch" else [2, 3, 4]  # per epoch: min over clients, or each client's own
    k = 3 * max(steps)
    assert res.rounds[-1]["dp_busiest_releases"] == k
    assert res.summary["dp_epsilon_run_pld"] == pytest.approx(epsilon_pld(z, k, 1e-5), rel=1e-9)
    assert res.rounds[0]["dp_sigma"] == pytest.approx(sigma)


@pytest.mark.fedml
@pytest.mark.slow
def test_grpc_cross_silo_equals_the_simulator(tmp_path):
    """1 server + 2 workers over gRPC, default sync, clipping on and ε = inf (deterministic): per-round metrics and
    the persisted client states equal the in-process simulator's."""
    from fedml_helpers import free_ports, grpc_csv, mlflow_metric, run_grpc_job, write_config
    from test_cross_silo import reference
    from tree_compare import deep_equal

    from fedml_pfedmoap.fedml_plugin.state import ClientStateStore

    csv = grpc_csv(tmp_path, free_ports(3))
    cfg = write_config(tmp_path, "cross_silo_grpc.yaml", {
        "train_args": {"federated_optimizer": "DPFPL", "comm_round": 2, "client_num_in_total": 2,
                       "client_num_per_round": 2},
        "device_args": {"worker_num": 2},
        "dpfpl_args": {"rank": 4, "dp": {"epsilon": "inf", "clip_grad": 0.5}},
        "comm_args": {"grpc_ipconfig_path": str(csv), "round_timeout_s": 120, "startup_timeout_s": 400,
                      "state_dir": str(tmp_path / "state")}})
    run_grpc_job(tmp_path, cfg, 3)
    ref, ref_states = reference(cfg)
    rows = [json.loads(x) for x in next((tmp_path / "out").glob("*/cross_silo_rounds.jsonl")).read_text().splitlines()]
    acc = mlflow_metric(tmp_path, "acc_mean")
    for r, row in enumerate(rows):
        sim = ref.rounds[r]
        assert acc[r] == pytest.approx(float(np.mean(ref.client_acc[r])), abs=1e-12)
        for key in ("dp_busiest_releases", "dp_noise_multiplier", "dp_clip_grad", "bytes_up", "bytes_down"):
            assert row[key] == pytest.approx(sim[key], abs=1e-12), key
        assert row["test_loss"] == pytest.approx(sim["test_loss"], abs=1e-6)
    tag = next((tmp_path / "state").iterdir()).name
    store = ClientStateStore(tmp_path / "state", tag, lambda i: {})
    for i, s in ref_states.items():
        s = {k: v for k, v in s.items() if k != "dp_secret"}  # each engine's client drew its own secret
        got = {k: v for k, v in store.load(i).items() if k != "dp_secret"}
        deep_equal(s, got, f"client {i}")


def test_perf_bench_naive_equals_optimized(tmp_path):
    """``pfedmoap-bench perf`` at tiny scale: same accuracy, max |Δlogit| <= 1e-4 in fp32, lockstep grouping only
    changes float blocking."""
    from benchmark_suite.cli import main

    out = tmp_path / "perf.json"
    rc = main(["perf", "--scale", "tiny", "--classes", "4", "--clients", "3", "--shots", "4", "--test", "3",
               "--batch", "2", "--rounds", "2", "--algorithms", "dpfpl", "--threads", "1",
               "--compare-lockstep", "3", "--out", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["algorithms"]
    assert "error" not in row, row
    assert row["acc_equal"] and row["max_abs_dlogit"] <= 1e-4
    assert row["lockstep_max_abs_dstate"] <= 1e-5
