"""The suite's one accountant: σ calibration in zCDP, and ε of k releases both as the zCDP bound and exactly (PLD).

A release is one Gaussian mechanism with L2 sensitivity Δ₂ and noise σ, i.e. noise multiplier z = σ/Δ₂. Its privacy
depends on z only, so every client of a run (whatever its C_up) has the same z, and the run-level ε of the busiest
client follows from its number of releases k:

* ``epsilon_zcdp``: k releases are (k/(2z²))-zCDP (Bun & Steinke 2016), converted with ε = ρ + 2√(ρ ln(1/δ)); this is
  the bound the calibration uses;
* ``epsilon_pld``: the exact ε(δ) of the k-fold composition, from ``dp-accounting``'s privacy loss distribution
  (Google's library; pessimistic discretization, so never below the true value).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Mapping, Sequence

import numpy as np


def zcdp_rho(epsilon: float, delta: float) -> float:
    """ρ such that ρ-zCDP implies (ε, δ)-DP: ρ = (√(ε + ln(1/δ)) − √(ln(1/δ)))² (Bun & Steinke 2016, Prop. 1.3)."""
    if math.isinf(epsilon):
        return math.inf
    log_inv = math.log(1.0 / delta)
    return (math.sqrt(epsilon + log_inv) - math.sqrt(log_inv)) ** 2


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float, releases: int = 1) -> float:
    """σ of the Gaussian mechanism giving each of ``releases`` releases ρ/m zCDP: σ = Δ₂/√(2ρ/m); 0 when ε = inf."""
    if releases < 1:
        raise ValueError(f"releases must be >= 1, got {releases}")
    rho = zcdp_rho(epsilon, delta)
    if math.isinf(rho) or sensitivity == 0:
        return 0.0
    return sensitivity / math.sqrt(2.0 * rho / releases)


def epsilon_zcdp(noise_multiplier: float, releases: int, delta: float) -> float:
    """The zCDP bound on ε after ``releases`` Gaussian releases with noise multiplier z = σ/Δ₂ (inf when z = 0)."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    rho = releases / (2.0 * noise_multiplier ** 2)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def _pld_module():
    """``dp_accounting``'s PLD module. Importing it imports ``absl.logging``, whose handler adopts the current
    ``sys.stderr`` and closes it when a later ``logging.config.dictConfig`` (MLflow's import does one) shuts every
    handler down; under a redirected stderr (Jupyter, pytest) that would close the caller's stream, so the handler
    is pointed at the process's own stderr, which it never closes."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    release_absl_stderr()
    return pld


def release_absl_stderr() -> None:
    """Point absl's (otherwise unused) Python handler at ``sys.__stderr__``; see ``_pld_module``."""
    import sys

    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


@functools.lru_cache(maxsize=256)
def epsilon_pld(noise_multiplier: float, releases: int, delta: float) -> float:
    """Exact ε(δ) of ``releases`` composed Gaussian releases with noise multiplier z, by ``dp-accounting``'s PLD."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    pld = _pld_module()
    dist = pld.from_gaussian_mechanism(float(noise_multiplier), value_discretization_interval=1e-4)
    return float(dist.self_compose(int(releases)).get_epsilon_for_delta(float(delta)))


def accounting_metrics(noise_multiplier: float, delta: float, busiest_releases: int) -> Dict[str, float]:
    """The labelled figures logged per run: ε of one release and of the busiest client's k releases, each as the
    zCDP bound and exactly (PLD), at the configured δ."""
    k = int(busiest_releases)
    return {"dp_busiest_releases": float(k),
            "dp_epsilon_release_zcdp": epsilon_zcdp(noise_multiplier, 1, delta),
            "dp_epsilon_release_pld": epsilon_pld(noise_multiplier, 1, delta),
            "dp_epsilon_run_zcdp": epsilon_zcdp(noise_multiplier, k, delta),
            "dp_epsilon_run_pld": epsilon_pld(noise_multiplier, k, delta)}


def round_upload_metrics(per_key: Mapping[str, List[float]], earlier_rounds: Sequence[Mapping[str, float]]
                         ) -> Dict[str, float]:
    """A round's metrics from its uploads' numbers gathered by name: the mean of each, except the clients' release
    counts (``dp_release``), whose maximum with the earlier rounds' is the busiest client's count so far."""
    out = {k: float(np.mean(v)) for k, v in per_key.items() if k != "dp_release"}
    if per_key.get("dp_release"):
        before = [r["dp_busiest_releases"] for r in earlier_rounds if "dp_busiest_releases" in r]
        out["dp_busiest_releases"] = float(max([*before, *per_key["dp_release"]]))
    return out


def run_accounting(rounds: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """``accounting_metrics`` for the last round that logged private uploads (empty without DP)."""
    private = [r for r in rounds if "dp_busiest_releases" in r]
    if not private:
        return {}
    last = private[-1]
    return accounting_metrics(last["dp_noise_multiplier"], last["dp_delta"], int(last["dp_busiest_releases"]))
