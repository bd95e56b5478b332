"""Batched entropic OT (fedml_pfedmoap.ot) against an independent plain-loop float64 solver and its properties."""
import math

import numpy as np
import pytest
import torch

from fedml_pfedmoap.ot import OTNumericalError, entropic_ot, transport_similarity


def reference_ot(cost, eps, method="cot", gamma=1.0, thresh=1e-3, max_iter=100, shift=True):
    """Slow reference: FedOTP's iteration written with explicit loops in float64 (docs/algorithms.md §FedOTP).

    All problems iterate together and stop when the mean |change| over the whole batch is below ``thresh``.
    Returns (plan as a nested numpy array (P, M, N), iterations).
    """
    cost = np.asarray(cost, dtype=np.float64)
    P, M, N = cost.shape
    mu = 1.0 / M
    nu = (gamma if method == "cot" else 1.0) / N
    K = np.zeros((P, M, N))
    for p in range(P):
        cmin = min(cost[p, m, n] for m in range(M) for n in range(N)) if shift else 0.0
        for m in range(M):
            for n in range(N):
                K[p, m, n] = math.exp(-(cost[p, m, n] - cmin) / eps)
    u = [[1.0] * M for _ in range(P)]
    v = [[1.0] * N for _ in range(P)]
    it = 0
    for it in range(1, max_iter + 1):
        prev = [row[:] for row in (v if method == "cot" else u)]
        for p in range(P):
            for m in range(M):
                kv = sum(K[p, m, n] * v[p][n] for n in range(N))
                u[p][m] = min(mu / kv, 1.0) if method == "cot" else mu / kv
        for p in range(P):
            for n in range(N):
                ktu = sum(K[p, m, n] * u[p][m] for m in range(M))
                v[p][n] = nu / ktu
        cur = v if method == "cot" else u
        diffs = [abs(cur[p][j] - prev[p][j]) for p in range(P) for j in range(len(cur[p]))]
        if sum(diffs) / len(diffs) < thresh:
            break
    plan = np.zeros((P, M, N))
    for p in range(P):
        for m in range(M):
            for n in range(N):
                plan[p, m, n] = u[p][m] * K[p, m, n] * v[p][n]
    return plan, it


def clip_like_costs(P, M, N, seed, lo=0.6, hi=0.9):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(P, M, N, generator=g)


CONVERGED = dict(thresh=1e-7, max_iter=6000, check_every=10)


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.1, 0.5])
@pytest.mark.parametrize("gamma", [0.5, 0.8, 1.0])
def test_cot_plan_properties(eps, gamma):
    M, N = 9, 2
    cost = clip_like_costs(12, M, N, seed=int(eps * 1000 + gamma * 10))
    res = entropic_ot(cost, eps, method="cot", gamma=gamma, **CONVERGED)
    T = res.plan
    assert res.nonfinite == 0 and T.dtype == torch.float32 and T.shape == cost.shape
    assert (T >= 0).all()
    assert (T.sum(-1) <= 1.0 / M + 1e-6).all()  # a patch may be left partly unmatched
    assert torch.allclose(T.sum(-2), torch.full((12, N), gamma / N), atol=1e-4)
    # with the default (unconverged) budget the column marginal still holds exactly: v is updated last
    T100 = entropic_ot(cost, eps, method="cot", gamma=gamma).plan
    assert (T100 >= 0).all() and torch.allclose(T100.sum(-2), torch.full((12, N), gamma / N), atol=1e-4)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.5])
def test_balanced_sinkhorn_gives_both_marginals(eps):
    M, N = 7, 3
    cost = clip_like_costs(10, M, N, seed=3)
    T = entropic_ot(cost, eps, method="sinkhorn", gamma=0.3, **CONVERGED).plan  # gamma unused when balanced
    assert (T >= 0).all()
    assert torch.allclose(T.sum(-1), torch.full((10, M), 1.0 / M), atol=1e-5)
    assert torch.allclose(T.sum(-2), torch.full((10, N), 1.0 / N), atol=1e-4)


@pytest.mark.parametrize("method", ["cot", "sinkhorn"])
@pytest.mark.parametrize("eps,gamma", [(0.01, 0.8), (0.05, 0.5), (0.1, 1.0), (1.0, 0.8)])
def test_matches_slow_reference_in_parity_mode(method, eps, gamma):
    cost = clip_like_costs(5, 6, 2, seed=11, lo=0.5, hi=1.0)
    res = entropic_ot(cost, eps, method=method, gamma=gamma, check_every=1)
    ref, it = reference_ot(cost.numpy(), eps, method=method, gamma=gamma)
    assert res.iterations == it
    np.testing.assert_allclose(res.plan.double().numpy(), ref, atol=1e-5, rtol=0)


def test_periodic_convergence_check_agrees_with_reference_at_convergence():
    cost = clip_like_costs(6, 8, 2, seed=5, lo=0.4, hi=1.0)
    got = entropic_ot(cost, 0.1, method="cot", gamma=0.8, thresh=1e-9, max_iter=3000, check_every=7).plan
    # the reference without the min-cost shift (float64, no underflow at eps 0.1): the shift is exact at the optimum
    ref, _ = reference_ot(cost.numpy(), 0.1, method="cot", gamma=0.8, thresh=1e-12, max_iter=3000, shift=False)
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_at_small_eps_do_not_nan(dtype):
    g = torch.Generator().manual_seed(0)
    B, C, M, D = 4, 10, 49, 32
    patches = torch.nn.functional.normalize(torch.randn(B, M, D, generator=g) + 0.6, dim=-1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(2, C, D, generator=g) + 0.6, dim=-1).to(dtype)
    sim = torch.einsum("bmd,ncd->bcmn", patches, text)  # CLIP-like similarities, cost 1 - sim around 0.7
    assert sim.dtype == dtype
    if dtype == torch.float16:  # the problem is real: the unshifted half-precision kernel underflows to 0
        assert (torch.exp(-(1 - sim) / 0.01) == 0).any()
    score, res = transport_similarity(sim, 0.01, method="cot", gamma=0.8)
    assert res.nonfinite == 0
    assert torch.isfinite(res.plan).all() and torch.isfinite(score).all()
    assert torch.allclose(res.plan.sum(-2), torch.full((B, C, 2), 0.4), atol=1e-4)
    # the cost is formed in fp32 from the half-precision similarities (not rounded in half precision)
    assert torch.equal(res.plan, transport_similarity(sim.float(), 0.01, method="cot", gamma=0.8)[1].plan)


def test_nonfinite_problem_is_replaced_and_counted():
    M, N = 5, 2
    cost = clip_like_costs(4, M, N, seed=2)
    cost[1, :, 1] += 1.5  # at eps 0.01 this column's kernel underflows to exactly 0 -> v = inf -> NaN plan
    cost[3, 2, 0] = float("nan")
    res = entropic_ot(cost, 0.01, method="cot", gamma=0.8)
    assert res.nonfinite == 2
    mu_nu = torch.full((M, N), (1.0 / M) * (0.8 / N))
    assert torch.allclose(res.plan[1], mu_nu) and torch.allclose(res.plan[3], mu_nu)
    assert torch.isfinite(res.plan).all()
    assert torch.allclose(res.plan[[0, 2]].sum(-2), torch.full((2, N), 0.4), atol=1e-4)


def test_nonfinite_raise_mode_names_the_batch():
    cost = clip_like_costs(3, 4, 2, seed=1)
    cost[2, 0, 0] = float("nan")
    with pytest.raises(OTNumericalError, match="client 7 round 3 batch 12"):
        entropic_ot(cost, 0.01, on_nonfinite="raise", context="fedotp client 7 round 3 batch 12")


def test_gradient_flows_only_through_sim():
    g = torch.Generator().manual_seed(4)
    sim = (0.2 + 0.3 * torch.rand(3, 4, 6, 2, generator=g)).requires_grad_(True)
    score, res = transport_similarity(sim, 0.05, gamma=0.8)
    assert not res.plan.requires_grad
    score.sum().backward()
    assert torch.allclose(sim.grad, res.plan)  # d/dsim Σ T·sim with T held constant


def test_bad_arguments_fail_clearly():
    cost = clip_like_costs(2, 3, 2, seed=0)
    with pytest.raises(ValueError, match="method"):
        entropic_ot(cost, 0.1, method="emd")
    with pytest.raises(ValueError, match="gamma"):
        entropic_ot(cost, 0.1, gamma=1.5)
    with pytest.raises(ValueError, match="eps"):
        entropic_ot(cost, 0.0)
