"""The upload mechanism (pFedMoAP paper, ICLR 2025, App. C.2 / Table 6; docs/privacy.md).

The paper clips prompt gradients and adds noise to the uploaded prompts with δ = 0.05 but states no noise type, clip
norm, σ or accounting. The calibration chosen here:

1. every local step the prompt's batch gradient is clipped to L2 norm ``clip_grad`` = C_g (the gate is not clipped);
2. the round update Δ = ctx_i − P_g is clipped to ``clip_update`` = C_up (``auto``: lr·C_g·S/(1 − momentum) with S the
   client's local steps), and the client uploads P_g + clip(Δ) + N(0, σ² I), the noise from its secret (``noise``);
3. sensitivity under replacement of the client's whole dataset: Δ₂ = 2·C_up;
4. σ = Δ₂ / √(2ρ/m) with ρ the zCDP budget of (ε, δ); ``accounting: run`` uses m = T rounds, ``release`` m = 1.

Only the upload is noised; the client keeps its clean prompt (post-processing covers pool, KNN and FedAvg). A private
upload carries only the noised tensor and public numbers (``PUBLIC_UPLOAD_METRICS``); the clean training metrics stay
in the client's local state.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .accounting import gaussian_sigma
from .config import DPConfig
from .noise import client_secret, gaussian_noise

# what a private upload's metrics may carry: functions of the config, the schedule and n (public by assumption)
PUBLIC_UPLOAD_METRICS = ("dp_sigma", "dp_noise_multiplier", "dp_delta", "dp_clip_grad", "dp_clip_update",
                         "dp_accounting_releases", "dp_release")
LOCAL_METRICS = "dp_local_metrics"  # client-state entry: the clean metrics of the client's last private round
RELEASES = "dp_releases"  # client-state entry: how many private uploads the client has made


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


def reports_evaluation(hp: Any) -> bool:
    """False when ``dp.report_eval`` is off: cross-silo clients then keep their evaluation results."""
    cfg = getattr(hp, "dp", None)
    return cfg is None or bool(cfg.report_eval)


class GaussianUploadMechanism:
    """Applies docs/privacy.md to one client's upload: clip the round update, add N(0, σ²I) from the client's secret."""

    def __init__(self, cfg: DPConfig, lr: float, momentum: float, rounds: Optional[int]) -> None:
        if cfg.accounting == "run" and not rounds:
            raise ValueError("dp.accounting=run needs the number of rounds T (Runtime.rounds); "
                             "set it or use dp.accounting=release")
        self.cfg, self.lr, self.momentum = cfg, float(lr), float(momentum)
        self.releases = int(rounds) if cfg.accounting == "run" else 1

    def update_clip(self, steps: int) -> float:
        c = self.cfg.clip_update
        return auto_update_clip(self.lr, self.cfg.clip_grad, steps, self.momentum) if c == "auto" else float(c)

    @property
    def noise_multiplier(self) -> float:
        """z = σ/Δ₂, the same for every client (0 when ε = inf)."""
        return gaussian_sigma(1.0, self.cfg.epsilon, self.cfg.delta, self.releases)

    def sigma(self, steps: int) -> float:
        return gaussian_sigma(2.0 * self.update_clip(steps), self.cfg.epsilon, self.cfg.delta, self.releases)

    def privatize(self, trained: torch.Tensor, reference: torch.Tensor, steps: int, secret: str,
                  *context: Any) -> Tuple[torch.Tensor, float]:
        """(reference + clip(trained − reference) + N(0, σ²I), ‖trained − reference‖); noise keyed by
        (secret, context). When the update is within the bound and σ = 0 the trained tensor itself is returned."""
        trained = trained.detach().float().cpu()
        ref = reference.detach().float().cpu()
        delta = trained - ref
        norm = float(delta.norm())
        c_up = self.update_clip(steps)
        out = ref + delta * (c_up / norm) if norm > c_up else trained.clone()
        sigma = self.sigma(steps)
        if sigma > 0:
            out = out + gaussian_noise(out.shape, sigma, secret, *context)
        return out, norm

    def privatize_upload(self, up: Dict[str, Any], reference: torch.Tensor, state: Dict[str, Any], steps: int,
                         round_idx: int, clean: Mapping[str, float]) -> Dict[str, float]:
        """Replace ``up["prompt"]`` by its private version; the clean metrics (``clean``, the update norm, whether it
        was clipped) go to the client's state, and only public numbers are returned for the upload."""
        up["prompt"], norm = self.privatize(up["prompt"], reference, steps, client_secret(state), "upload", round_idx)
        c_up = self.update_clip(steps)
        state[RELEASES] = int(state.get(RELEASES, 0)) + 1
        state[LOCAL_METRICS] = {**clean, "update_norm": norm, "dp_update_clipped": float(norm > c_up)}
        return {"dp_sigma": self.sigma(steps), "dp_noise_multiplier": self.noise_multiplier,
                "dp_delta": self.cfg.delta, "dp_clip_grad": self.cfg.clip_grad, "dp_clip_update": c_up,
                "dp_accounting_releases": float(self.releases), "dp_release": float(state[RELEASES])}
