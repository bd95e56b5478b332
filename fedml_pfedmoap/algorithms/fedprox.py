"""PromptFL + FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, arXiv:1812.06127;
docs/algorithms.md §PromptFL+FedProx).

Identical to PromptFL except for the local loss, which adds the proximal term (μ/2)·‖ctx − ctx_global‖², where
``ctx_global`` is the prompt the client downloaded this round (a constant).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from .promptfl import PromptAlgorithm
from .protocol import PromptParams, register_algorithm


@dataclass
class FedProxParams(PromptParams):
    mu: float = 0.5  # proximal weight μ


@register_algorithm("fedprox")
class FedProx(PromptAlgorithm):
    """PromptFL whose clients minimize CE + (μ/2)·‖ctx − ctx_global‖² (μ = 0.5); the server is plain FedAvg."""

    Params = FedProxParams

    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> nn.Module:
        model = super().build_model(payload, state, train)
        model.register_buffer("prox_anchor", payload["global_prompt"].detach().float().to(self.rt.device).clone())
        return model

    def extra_loss(self, model: nn.Module, payload: Dict[str, Any]) -> Optional[torch.Tensor]:
        return 0.5 * self.hp.mu * (model.ctx - model.prox_anchor).pow(2).sum()
