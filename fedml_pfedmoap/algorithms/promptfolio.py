"""PromptFolio (Pan et al., "Federated Learning from Vision-Language Foundation Models: Theoretical Analysis and
Method", NeurIPS 2024; docs/algorithms.md §PromptFolio): a global and a private prompt, their text features mixed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..seeding import normal_prompt
from .personal import DualPromptModel, PersonalParams, PersonalPromptAlgorithm
from .protocol import register_algorithm


@dataclass
class PromptFolioParams(PersonalParams):
    theta: float = 0.4  # frac_p: weight of the local text feature (README value; FLiP uses 0.2)


class PromptFolioModel(DualPromptModel):
    """logits = s · Î · ((1-θ)·T̂_g + θ·T̂_l)ᵀ; each text feature normalized before mixing, the mix is not."""

    def text_from(self, feats: torch.Tensor) -> torch.Tensor:
        t = super().text_from(feats)
        theta = float(self.hp.theta)
        return (1.0 - theta) * t[0] + theta * t[1]


@register_algorithm("promptfolio")
class PromptFolio(PersonalPromptAlgorithm):
    """Global prompt g (uploaded, FedAvg) and private prompt l; both trained locally every round.

    Parameters (``algorithm_args.promptfolio``): ``theta`` = 0.4 (mixing weight of the local features), plus the
    shared SGD settings (lr 0.002, momentum 0.9, weight decay 5e-4; the spec fixes no other lr for PromptFolio).
    """

    Params = PromptFolioParams
    model_cls = PromptFolioModel
    local_keys = ("local_ctx",)

    def local_init(self) -> Dict[str, torch.Tensor]:
        return {"local_ctx": normal_prompt(self.rt.ctx_shape, self.rt.seed, "local-ctx-init")}
