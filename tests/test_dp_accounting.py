"""DP accounting (docs/privacy.md): the reported run-level ε against independent computations, the labelled figures of
a simulated run, and the leaderboard's privacy column."""
import math
from collections import Counter

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from scipy.optimize import brentq
from scipy.stats import norm

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import FeatureSet
from fedml_pfedmoap.federated.schedule import sample_clients
from fedml_pfedmoap.federated.simulator import ClientData, Simulator
from fedml_pfedmoap.privacy import accounting_metrics, epsilon_pld, epsilon_zcdp


def closed_form_epsilon(z, k, delta):
    """k composed Gaussian mechanisms with noise multiplier z are one Gaussian with μ = √k/z (Dong, Roth & Su);
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), solved for ε."""
    mu = math.sqrt(k) / z
    f = lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e + norm.logcdf(-e / mu - mu / 2)) - delta  # noqa: E731
    return 0.0 if f(0.0) <= 0 else brentq(f, 0.0, 1e4, xtol=1e-12)


def hand_z(eps, delta, m):
    lg = math.log(1 / delta)
    return 1 / math.sqrt(2 * (math.sqrt(eps + lg) - math.sqrt(lg)) ** 2 / m)


CASES = [(50, 0.05, 120, 120), (25, 0.05, 25, 25), (50, 0.05, 120, 12), (50, 0.05, 1, 30), (8, 1e-5, 10, 10),
         (2, 1e-5, 1, 1)]


@pytest.mark.parametrize("eps,delta,m,k", CASES)
def test_reported_epsilon_matches_independent_accountants(eps, delta, m, k):
    z = hand_z(eps, delta, m)  # σ/Δ₂ calibrated for m releases; the busiest client made k
    exact = closed_form_epsilon(z, k, delta)
    got = epsilon_pld(z, k, delta)
    assert exact <= got <= exact * 1.002 + 1e-3  # PLD is pessimistic, and tight
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k))
    assert got <= acc.get_epsilon(delta) + 1e-9  # RDP is a looser upper bound
    zc = epsilon_zcdp(z, k, delta)
    assert zc >= got
    if k == m:
        assert zc == pytest.approx(eps, rel=1e-9)  # the calibration's own claim is the zCDP bound


def test_issue_figures():
    """Table 6 (ε = 50, δ = 0.05, T = 120 releases): 42.8 exact where 50 is claimed."""
    assert epsilon_pld(hand_z(50, 0.05, 120), 120, 0.05) == pytest.approx(42.79, abs=0.01)
    assert accounting_metrics(0.0, 0.05, 3)["dp_epsilon_run_pld"] == math.inf  # no noise: no guarantee
    assert accounting_metrics(1.0, 0.05, 0)["dp_epsilon_run_pld"] == 0.0


@pytest.mark.parametrize("accounting", ["run", "release"])
def test_simulated_run_reports_labelled_epsilons(tiny_backbone, accounting):
    text = TextEncoder(tiny_backbone, ["zero", "one", "two", "three"], n_ctx=4)
    rounds, n_clients, frac = 5, 4, 0.5
    rt = Runtime(backbone=tiny_backbone, text=text, num_clients=n_clients, seed=3, local_epochs=1, batch_size=8,
                 rounds=rounds)
    gen = torch.Generator().manual_seed(5)
    clients = [ClientData(FeatureSet(torch.randn(8, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)),
                          FeatureSet(torch.randn(4, 32, generator=gen), torch.randint(0, 4, (4,), generator=gen)))
               for _ in range(n_clients)]
    dp = {"epsilon": 20, "delta": 1e-3, "clip_update": 0.05, "accounting": accounting}
    sim = Simulator(get_algorithm("promptfl")(rt, {"dp": dp}), clients, rounds=rounds, frac=frac, seed=3,
                    progress=False)
    summary = sim.run().summary
    busiest = max(Counter(c for t in range(rounds) for c in sample_clients(n_clients, frac, 3, t)).values())
    z = hand_z(20, 1e-3, rounds if accounting == "run" else 1)
    assert summary["dp_busiest_releases"] == busiest
    assert summary["dp_epsilon_run_pld"] == pytest.approx(closed_form_epsilon(z, busiest, 1e-3), rel=2e-3)
    assert summary["dp_epsilon_release_pld"] == pytest.approx(closed_form_epsilon(z, 1, 1e-3), rel=2e-3, abs=1e-3)
    assert summary["dp_epsilon_run_zcdp"] == pytest.approx(
        busiest / (2 * z * z) + 2 * math.sqrt(busiest / (2 * z * z) * math.log(1e3)), rel=1e-9)
    if accounting == "release":
        assert summary["dp_epsilon_release_zcdp"] == pytest.approx(20, rel=1e-9)
        assert summary["dp_epsilon_run_zcdp"] > 20 * 1.5  # the run spends far more than one release's ε
    else:
        assert summary["dp_epsilon_run_zcdp"] <= 20 + 1e-9
    assert "dp_epsilon" not in summary and all("dp_epsilon" not in r for r in sim.result.rounds)


def test_leaderboard_privacy_column():
    from benchmark_suite.grid import CellRecord
    from benchmark_suite.leaderboard import markdown

    def rec(algo, seed, summary):
        return CellRecord("digits", "pathological", "", algo, seed, 0, f"h{algo}{seed}",
                          rounds=[{"round": 0, "acc_mean": 0.5, "acc_bottom10": 0.1}],
                          summary={"acc_last": 0.5, "acc_last5": 0.5, "acc_best": 0.5, **summary})

    dp = {"dp_epsilon_run_pld": 10.74, "dp_epsilon_run_zcdp": 50.0, "dp_busiest_releases": 12.0}
    md = markdown([rec("promptfl", 0, dp), rec("promptfl", 1, {**dp, "dp_epsilon_run_pld": 11.2}),
                   rec("local", 0, {})], "acc_last5", "t", None, "test")
    assert "privacy: run ε, exact (PLD) / zCDP bound" in md
    assert "ε 11.2 / 50 (12 releases)" in md  # the worst seed
    assert "| local |" in md and md.split("| local |")[1].split("\n")[0].rstrip().endswith("| – |")
    plain = markdown([rec("local", 0, {})], "acc_last5", "t", None, "test")
    assert "privacy" not in plain
