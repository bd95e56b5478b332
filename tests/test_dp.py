"""Differential privacy of uploaded prompts (docs/privacy.md): clipping, σ calibration, noise, ε = ∞, logging."""
import math

import pytest
import torch

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import FeatureSet
from fedml_pfedmoap.federated.schedule import sample_clients
from fedml_pfedmoap.federated.simulator import ClientData, Simulator
from fedml_pfedmoap.config import ConfigError
from fedml_pfedmoap.privacy import PUBLIC_UPLOAD_METRICS, DPConfig, gaussian_sigma

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LR, MOM = 0.002, 0.9
SECRET = "5e" * 32  # a fixed client secret: deterministic noise in tests


@pytest.fixture(scope="module")
def text(tiny_backbone):
    return TextEncoder(tiny_backbone, NAMES, n_ctx=16)


@pytest.fixture
def rt(tiny_backbone, text):
    return Runtime(backbone=tiny_backbone, text=text, num_clients=4, seed=0, local_epochs=2, batch_size=8, rounds=10)


def data(cid, n=24):
    g = torch.Generator().manual_seed(200 + cid)
    return FeatureSet(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def algo(rt, name="promptfl", **params):
    a = get_algorithm(name)(rt, params)
    a.init_server()
    return a


def train_once(a, cid=0, state=None):
    a.begin_round(0, [cid])
    payload = a.client_payload(cid)
    state = {} if state is None else state
    return a.local_train(payload, state, data(cid)), payload, state


def hand_sigma(eps, delta, c_up, m):
    """σ = 2·C_up / √(2ρ/m), ρ = (√(ε + ln 1/δ) − √(ln 1/δ))², written out."""
    lg = math.log(1 / delta)
    rho = (math.sqrt(eps + lg) - math.sqrt(lg)) ** 2
    return 2 * c_up / math.sqrt(2 * rho / m)


def test_sigma_matches_spec_table():
    table = {50: {1: 0.127, 10: 0.403, 25: 0.637, 120: 1.396}, 25: {1: 0.199, 10: 0.628, 25: 0.993, 120: 2.176}}
    for eps, row in table.items():
        for m, ratio in row.items():
            assert gaussian_sigma(1.0, eps, 0.05, m) == pytest.approx(ratio, abs=6e-4)
            assert gaussian_sigma(3.0, eps, 0.05, m) == pytest.approx(hand_sigma(eps, 0.05, 1.5, m), rel=1e-12)
    assert gaussian_sigma(1.0, math.inf, 0.05, 10) == 0.0


def test_config_validation():
    assert DPConfig.parse(None) is None and DPConfig.parse({}) is None
    cfg = DPConfig.parse({"epsilon": "inf"})
    assert math.isinf(cfg.epsilon) and cfg.delta == 0.05 and cfg.clip_update == "auto" and cfg.accounting == "run"
    assert cfg.report_eval is True
    # no noise: infinite clip norms are allowed (clipping is then a no-op)
    assert DPConfig.parse({"epsilon": "inf", "clip_grad": "inf", "clip_update": "inf"}).clip_grad == math.inf
    assert DPConfig.parse({"epsilon": 5, "clip_grad": "inf", "clip_update": 0.1}).clip_update == 0.1
    for bad, key in [({"delta": 0.1}, "epsilon"), ({"epsilon": -1}, "epsilon"), ({"epsilon": 0}, "epsilon"),
                     ({"epsilon": "nan"}, "epsilon"), ({"epsilon": True}, "epsilon"),
                     ({"epsilon": 1, "accounting": "rdp"}, "accounting"), ({"epsilon": 1, "sigma": 2}, "sigma"),
                     ({"epsilon": 1, "delta": 2}, "delta"), ({"epsilon": 1, "delta": 1}, "delta"),
                     ({"epsilon": 1, "delta": 0}, "delta"), ({"epsilon": 1, "delta": -0.1}, "delta"),
                     ({"epsilon": 1, "clip_update": "big"}, "clip_update"),
                     ({"epsilon": 1, "clip_update": 0}, "clip_update"), ({"epsilon": 1, "clip_grad": -2}, "clip_grad"),
                     ({"epsilon": 1, "clip_update": "inf"}, "clip_update"),
                     ({"epsilon": 1, "clip_grad": "inf"}, "clip_grad"),  # clip_update: auto derives C_up from it
                     ({"epsilon": 1, "report_eval": "no"}, "report_eval")]:
        with pytest.raises(ConfigError, match=rf"dp\.{key}\b|'{key}'") as err:
            DPConfig.parse(bad, "dp")
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"algorithm_args\.<algorithm>\.dp\.epsilon"):
        get_algorithm("promptfl").parse_params({"dp": {"delta": 0.05}})
    with pytest.raises(ConfigError, match=r"algorithm_args\.pfedmoap\.gate_aggregation: 'fedavg'.*dp"):
        get_algorithm("pfedmoap").parse_params({"dp": {"epsilon": 10}, "gate_aggregation": "fedavg"})
    assert get_algorithm("pfedmoap").parse_params({"gate_aggregation": "fedavg"}).dp is None


@pytest.mark.parametrize("name", ["promptfl", "pfedmoap"])
def test_upload_noise_has_configured_sigma_and_local_state_stays_clean(rt, name):
    dp = {"clip_grad": 1.0, "clip_update": 0.01, "accounting": "release"}
    clean_up, payload, clean_state = train_once(algo(rt, name, dp={**dp, "epsilon": math.inf}))
    noisy_up, _, noisy_state = train_once(algo(rt, name, dp={**dp, "epsilon": 50}), state={"dp_secret": SECRET})
    # reference: P_g + clip(Δ) by hand
    delta = clean_up["prompt"] - payload["global_prompt"]
    assert float(delta.norm()) <= 0.01 + 1e-6
    noise = noisy_up["prompt"] - clean_up["prompt"]
    sigma = hand_sigma(50, 0.05, 0.01, 1)
    assert noisy_up["metrics"]["dp_sigma"] == pytest.approx(sigma, rel=1e-9)
    assert float(noise.std()) == pytest.approx(sigma, rel=0.05)  # 1,024 draws
    assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(noise.numel())
    if name == "pfedmoap":  # the client keeps its clean prompt for inference
        assert torch.equal(noisy_state["ctx"], clean_state["ctx"]) and noisy_state["dp_secret"] == SECRET
        ref = payload["global_prompt"] + (clean_state["ctx"] - payload["global_prompt"]) * min(
            1.0, 0.01 / float((clean_state["ctx"] - payload["global_prompt"]).norm()))
        torch.testing.assert_close(clean_up["prompt"], ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", ["promptfl", "pfedmoap"])
def test_infinite_epsilon_equals_non_private_run(rt, name):
    clients = [ClientData(data(c), data(c + 10, 12)) for c in range(4)]
    runs = []
    for params in ({}, {"dp": {"epsilon": "inf", "clip_grad": 1e9, "clip_update": 1e9}}):
        sim = Simulator(algo(rt, name, **params), clients, rounds=3, frac=0.5, seed=0, progress=False)
        sim.run()
        runs.append(sim)
    assert torch.equal(runs[0].algo.global_prompt, runs[1].algo.global_prompt)
    assert [r["test_loss"] for r in runs[0].result.rounds] == [r["test_loss"] for r in runs[1].result.rounds]


def test_gradient_clipped_every_step(rt):
    norms = {}
    for key, params in (("dp", {"dp": {"epsilon": 10, "clip_grad": 1e-3}}), ("plain", {})):
        a = algo(rt, "pfedmoap", **params)
        seen = norms.setdefault(key, [])
        a.before_step = lambda model, seen=seen: seen.append(float(model.ctx.grad.norm()))
        train_once(a)
    assert len(norms["dp"]) == 2 * 3 and max(norms["dp"]) <= 1e-3 * (1 + 1e-5)
    assert max(norms["plain"]) > 1e-3  # the bound is not met without clipping


def test_auto_update_clip_bound(rt):
    up, payload, _ = train_once(algo(rt, dp={"epsilon": math.inf, "clip_grad": 1e-3, "accounting": "release"}))
    steps = 2 * 3  # E = 2 epochs x 24 samples / batch 8
    c_up = LR * 1e-3 * steps / (1 - MOM)
    assert up["metrics"]["dp_clip_update"] == pytest.approx(c_up, rel=1e-12)
    assert float((up["prompt"] - payload["global_prompt"]).norm()) <= c_up * (1 + 1e-5)


def test_run_accounting_uses_rounds(rt, tiny_backbone, text):
    up, _, _ = train_once(algo(rt, dp={"epsilon": 25, "clip_update": 0.01}))
    assert up["metrics"]["dp_accounting_releases"] == 10
    assert up["metrics"]["dp_noise_multiplier"] == pytest.approx(hand_sigma(25, 0.05, 0.5, 10), rel=1e-9)
    assert up["metrics"]["dp_sigma"] == pytest.approx(hand_sigma(25, 0.05, 0.01, 10), rel=1e-9)
    bare = Runtime(backbone=tiny_backbone, text=text, num_clients=4, seed=0, local_epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="accounting"):
        train_once(algo(bare, dp={"epsilon": 25}))


@pytest.mark.parametrize("name", ["promptfl", "fedpgp", "pfedmoap"])
def test_private_upload_carries_no_clean_metric(rt, name):
    """With DP on, the upload is the noised prompt, n, the client index and public numbers only; the clean metrics
    (training loss, update norm, whether the update was clipped) stay in the client's state."""
    plain, _, _ = train_once(algo(rt, name))
    assert {"train_loss", "update_norm"} <= set(plain["metrics"])  # the non-private upload reports them
    up, payload, state = train_once(algo(rt, name, dp={"epsilon": 50, "clip_update": 0.01}))
    assert set(up) == {"client_index", "n", "prompt", "metrics"}
    assert set(up["metrics"]) == set(PUBLIC_UPLOAD_METRICS)
    local = state["dp_local_metrics"]
    assert set(plain["metrics"]) | {"dp_update_clipped"} == set(local)
    free, _, _ = train_once(algo(rt, name, dp={"epsilon": math.inf, "clip_update": 1e9}))  # same training, no clip
    assert abs(float((free["prompt"] - payload["global_prompt"]).norm()) - local["update_norm"]) < 1e-6
    assert local["dp_update_clipped"] == float(local["update_norm"] > 0.01) == 1.0
    assert up["metrics"]["dp_release"] == 1 and state["dp_releases"] == 1
    numbers = [v for v in up["metrics"].values()]
    assert plain["metrics"]["train_loss"] not in numbers and local["update_norm"] not in numbers


def test_dp_metrics_reach_the_round_log(rt):
    clients = [ClientData(data(c), data(c + 10, 12)) for c in range(4)]
    sim = Simulator(algo(rt, "pfedmoap", dp={"epsilon": 50}), clients, rounds=2, frac=0.5, seed=0, progress=False)
    logged = [sim.run_round(t) for t in range(2)]
    m = logged[0]
    for key in ("dp_sigma", "dp_noise_multiplier", "dp_delta", "dp_clip_grad", "dp_clip_update",
                "dp_accounting_releases", "dp_busiest_releases"):
        assert key in m, key
    assert m["dp_sigma"] > 0 and m["dp_busiest_releases"] == 1
    for key in ("update_norm", "dp_update_clipped", "dp_release", "dp_epsilon"):
        assert key not in m, key
    assert math.isnan(m["train_loss"])  # clean training losses stay on the clients
    sampled = [set(sample_clients(4, 0.5, 0, t)) for t in range(2)]
    assert logged[1]["dp_busiest_releases"] == (2 if sampled[0] & sampled[1] else 1)
