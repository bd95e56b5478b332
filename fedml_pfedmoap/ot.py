"""Batched entropic optimal transport for FedOTP (Li et al., CVPR 2024; docs/algorithms.md §FedOTP).

``entropic_ot(cost, eps, ...)`` solves many small problems at once: ``cost`` has shape ``(..., M, N)`` (one problem
per leading index, e.g. images × classes), the kernel is ``K = exp(-(C - min C)/ε)`` and the plan is
``T = diag(u) K diag(v)``.

* ``method="cot"`` (FedOTP's default, unbalanced): ``u ← min(μ ⊘ (K v), 1)``, ``v ← ν ⊘ (Kᵀ u)``, so that
  ``T·1 ≤ μ`` and ``Tᵀ·1 = ν``; μ = 1/M, ν = γ/N.
* ``method="sinkhorn"`` (balanced): ``r ← μ ⊘ (K c)``, ``c ← ν ⊘ (Kᵀ r)``, μ = 1/M, ν = 1/N (γ is not used).

Both stop when the mean absolute change of the tracked scaling (v for COT, r for Sinkhorn), taken over the **whole
batch**, falls below ``thresh``, or after ``max_iter`` iterations. The convergence test is only evaluated every
``check_every`` iterations, so a GPU run does not synchronize with the host on every iteration;
``check_every=1`` is the reference's (parity) behaviour.

Stability (the reference returns ``None`` on NaN and then crashes): the solve runs in fp32 without gradients, the
cost of each problem is shifted by its own minimum before exponentiating (exact at the optimum: the transported mass
is fixed, so a constant cost shift changes the objective by a constant), and a problem whose plan is still
non-finite has its plan replaced by μνᵀ and is counted (``on_nonfinite="replace"``, logged) or makes the solve
raise an error naming the offending batch (``on_nonfinite="raise"``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import torch

logger = logging.getLogger(__name__)

METHODS = ("cot", "sinkhorn")
NONFINITE_MODES = ("replace", "raise")


class OTNumericalError(FloatingPointError):
    """An optimal transport plan was non-finite and ``on_nonfinite="raise"`` was requested."""


@dataclass
class OTResult:
    """The plan (..., M, N) in fp32, the iterations run, and how many problems were replaced by μνᵀ."""

    plan: torch.Tensor
    iterations: int
    nonfinite: int


def _marginals(m: int, n: int, method: str, gamma: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mu = torch.full((m,), 1.0 / m, dtype=torch.float32, device=device)
    total = gamma if method == "cot" else 1.0
    nu = torch.full((n,), total / n, dtype=torch.float32, device=device)
    return mu, nu


def _validate(cost: torch.Tensor, eps: float, method: str, gamma: float, max_iter: int, check_every: int,
              on_nonfinite: str) -> None:
    if method not in METHODS:
        raise ValueError(f"ot method must be one of {METHODS}, got {method!r}")
    if on_nonfinite not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape (..., M, N), got {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"ot eps must be > 0, got {eps}")
    if method == "cot" and not 0 < gamma <= 1:
        raise ValueError(f"ot gamma (top_percent) must be in (0, 1], got {gamma}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(f"max_iter and check_every must be >= 1, got {max_iter}, {check_every}")


def _finite_mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean |a - b| over the whole batch, non-finite entries counted as 0 (they are handled after the loop)."""
    d = (a - b).abs()
    return torch.where(torch.isfinite(d), d, torch.zeros_like(d)).mean()


@torch.no_grad()
def entropic_ot(cost: torch.Tensor, eps: float, *, method: str = "cot", gamma: float = 1.0, thresh: float = 1e-3,
                max_iter: int = 100, check_every: int = 5, on_nonfinite: str = "replace",
                context: str = "") -> OTResult:
    """Solve a batch of entropic OT problems; ``context`` names the batch in warnings and errors."""
    _validate(cost, eps, method, gamma, max_iter, check_every, on_nonfinite)
    shape = cost.shape
    m, n = int(shape[-2]), int(shape[-1])
    c = cost.detach().to(torch.float32).reshape(-1, m, n)
    c = c - c.amin(dim=(1, 2), keepdim=True)
    kern = torch.exp(-c / eps)  # (P, M, N), max entry 1 per problem
    kern_t = kern.transpose(1, 2)
    mu, nu = _marginals(m, n, method, gamma, c.device)
    u = torch.ones(c.shape[0], m, dtype=torch.float32, device=c.device)
    v = torch.ones(c.shape[0], n, dtype=torch.float32, device=c.device)
    it = 0
    for it in range(1, max_iter + 1):
        check = it % check_every == 0 or it == max_iter
        if check:
            prev = v.clone() if method == "cot" else u.clone()
        if method == "cot":
            u = torch.clamp(mu / (kern @ v.unsqueeze(-1)).squeeze(-1), max=1.0)
        else:
            u = mu / (kern @ v.unsqueeze(-1)).squeeze(-1)
        v = nu / (kern_t @ u.unsqueeze(-1)).squeeze(-1)
        if check and it < max_iter:
            err = _finite_mean_abs(v if method == "cot" else u, prev)
            if float(err) < thresh:  # the only host synchronization, every check_every iterations
                break
    plan = u.unsqueeze(-1) * kern * v.unsqueeze(-2)
    bad = ~torch.isfinite(plan).flatten(1).all(dim=1)
    n_bad = int(bad.sum())
    if n_bad:
        where = f" in {context}" if context else ""
        idx = torch.nonzero(bad).flatten()[:8].tolist()
        msg = (f"optimal transport ({method}, eps={eps}){where}: {n_bad} of {plan.shape[0]} problems gave a "
               f"non-finite plan (first flat problem indices {idx}; input cost finite: "
               f"{bool(torch.isfinite(cost).all())})")
        if on_nonfinite == "raise":
            raise OTNumericalError(msg)
        logger.warning("%s; replaced by mu nu^T", msg)
        plan[bad] = (mu.unsqueeze(-1) * nu.unsqueeze(0)).expand(n_bad, m, n)
    return OTResult(plan.reshape(shape), it, n_bad)


def transport_similarity(sim: torch.Tensor, eps: float, *, method: str = "cot", gamma: float = 1.0,
                         thresh: float = 1e-3, max_iter: int = 100, check_every: int = 5,
                         on_nonfinite: str = "replace", context: str = "") -> tuple[torch.Tensor, OTResult]:
    """FedOTP's score Σ_{m,n} T[m,n]·sim[m,n] for sim (..., M, N), with T from cost 1 - sim (no gradient).

    Gradients reach the prompts only through ``sim``; the returned score has shape (...,) in fp32. The cost is formed
    in fp32 (in bfloat16, 1 − sim near 0.7 is rounded in steps of ~4e-3, i.e. 0.4 in the exponent at ε = 0.01).
    """
    res = entropic_ot(1.0 - sim.detach().float(), eps, method=method, gamma=gamma, thresh=thresh, max_iter=max_iter,
                      check_every=check_every, on_nonfinite=on_nonfinite, context=context)
    return (res.plan * sim.float()).sum(dim=(-2, -1)), res


__all__ = ["entropic_ot", "transport_similarity", "OTResult", "OTNumericalError", "METHODS"]
