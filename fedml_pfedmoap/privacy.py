"""Differential privacy for uploaded prompts (pFedMoAP paper, ICLR 2025, App. C.2 / Table 6; docs/privacy.md).

The paper clips prompt gradients and adds noise to the uploaded prompts with δ = 0.05 but states no noise type, clip
norm, σ or accounting. The calibration chosen here (documented in docs/privacy.md):

1. every local step the prompt's batch gradient is clipped to L2 norm ``clip_grad`` = C_g (the gate is not clipped);
2. the round update Δ = ctx_i − P_g is clipped to ``clip_update`` = C_up (``auto``: lr·C_g·S/(1 − momentum) with S the
   client's local steps), and the client uploads P_g + clip(Δ) + N(0, σ² I);
3. sensitivity under replacement of the client's whole dataset: Δ₂ = 2·C_up;
4. Gaussian mechanism in zero-concentrated DP (Bun & Steinke 2016): ρ = (√(ε + ln(1/δ)) − √(ln(1/δ)))², each of m
   releases gets ρ/m, σ = Δ₂ / √(2ρ/m); ``accounting: run`` uses m = T rounds (worst case: every round), ``release``
   uses m = 1.

Only the upload is noised; the client keeps its clean prompt (post-processing covers pool, KNN and FedAvg).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

ACCOUNTING = ("run", "release")


@dataclass(frozen=True)
class DPConfig:
    """``dp:`` entry of ``algorithm_args.<algo>``: ε (``inf``: no noise), δ, C_g, C_up (number or ``auto``), m rule."""

    epsilon: float
    delta: float = 0.05
    clip_grad: float = 1.0
    clip_update: Union[float, str] = "auto"
    accounting: str = "run"

    @classmethod
    def parse(cls, raw: Optional[Mapping[str, Any]], where: str = "dp") -> Optional["DPConfig"]:
        """``None``/empty -> DP off; otherwise validate every key and return the config (one clear error each)."""
        if raw is None:
            return None
        if isinstance(raw, DPConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected a mapping {{epsilon, delta, clip_grad, clip_update, accounting}}, "
                             f"got {type(raw).__name__}")
        if not raw:
            return None
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - valid)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
        if "epsilon" not in raw:
            raise ValueError(f"{where}.epsilon is required (a positive number, or inf for no noise)")
        eps = _positive(raw["epsilon"], f"{where}.epsilon", allow_inf=True)
        delta = _positive(raw.get("delta", 0.05), f"{where}.delta")
        if delta >= 1:
            raise ValueError(f"{where}.delta: expected 0 < delta < 1, got {delta}")
        clip_grad = _positive(raw.get("clip_grad", 1.0), f"{where}.clip_grad", allow_inf=True)
        cu = raw.get("clip_update", "auto")
        clip_update: Union[float, str] = "auto" if cu == "auto" else _positive(cu, f"{where}.clip_update",
                                                                               allow_inf=True)
        acc = str(raw.get("accounting", "run"))
        if acc not in ACCOUNTING:
            raise ValueError(f"{where}.accounting: expected one of {list(ACCOUNTING)}, got {acc!r}")
        return cls(eps, delta, clip_grad, clip_update, acc)


def _positive(value: Any, key: str, allow_inf: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a positive number, got {value!r}") from None
    if not (x > 0) or (math.isinf(x) and not allow_inf):
        what = "number or inf" if allow_inf else "finite number"
        raise ValueError(f"{key}: expected a positive {what}, got {value!r}")
    return x


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


def auto_update_clip(lr: float, clip_grad: float, steps: int, momentum: float) -> float:
    """C_up = lr·C_g·S/(1 − momentum): the update bound of S momentum-SGD steps with clipped gradients, no decay."""
    return lr * clip_grad * max(1, int(steps)) / (1.0 - momentum)


def clip_grad_(param: torch.Tensor, max_norm: float) -> float:
    """Scale ``param.grad`` in place to L2 norm <= max_norm; returns the norm before clipping."""
    if param.grad is None:
        return 0.0
    norm = float(param.grad.detach().float().norm())
    if norm > max_norm:
        param.grad.mul_(max_norm / norm)
    return norm


class GaussianUploadMechanism:
    """Applies docs/privacy.md to one client's upload: clip the round update, add N(0, σ²I), report σ and norms."""

    def __init__(self, cfg: DPConfig, lr: float, momentum: float, rounds: Optional[int]) -> None:
        if cfg.accounting == "run" and not rounds:
            raise ValueError("dp.accounting=run needs the number of rounds T (Runtime.rounds); "
                             "set it or use dp.accounting=release")
        self.cfg, self.lr, self.momentum = cfg, float(lr), float(momentum)
        self.releases = int(rounds) if cfg.accounting == "run" else 1

    def update_clip(self, steps: int) -> float:
        c = self.cfg.clip_update
        return auto_update_clip(self.lr, self.cfg.clip_grad, steps, self.momentum) if c == "auto" else float(c)

    def sigma(self, steps: int) -> float:
        return gaussian_sigma(2.0 * self.update_clip(steps), self.cfg.epsilon, self.cfg.delta, self.releases)

    def privatize(self, trained: torch.Tensor, reference: torch.Tensor, steps: int,
                  generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Upload = reference + clip(trained − reference) + N(0, σ²I).

        When the update is within the bound and σ = 0 the trained tensor itself is returned (bit-exact non-private run).
        """
        trained = trained.detach().float().cpu()
        delta = trained - reference.detach().float().cpu()
        norm = float(delta.norm())
        c_up = self.update_clip(steps)
        out = reference.detach().float().cpu() + delta * (c_up / norm) if norm > c_up else trained.clone()
        sigma = self.sigma(steps)
        if sigma > 0:
            out = out + sigma * torch.randn(out.shape, generator=generator)
        metrics = {"dp_sigma": sigma, "dp_epsilon": self.cfg.epsilon, "dp_delta": self.cfg.delta,
                   "dp_clip_grad": self.cfg.clip_grad, "dp_clip_update": c_up, "dp_releases": float(self.releases),
                   "dp_update_clipped": float(norm > c_up)}
        return out, metrics
