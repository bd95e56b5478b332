"""FedPGP (Cui et al., "Harmonizing Generalization and Personalization in Federated Prompt Learning", ICML 2024;
docs/algorithms.md §FedPGP).

The prompt is ctx = σ + U·V: σ (n_ctx, W) is global and FedAvg-averaged, U (n_ctx, r) and V (r, W) are a private
low-rank part (rank r = 8), all initialized N(0, 0.02²). Local loss:

    CE(s·cos(Î, T̂(σ+UV))) + μ·L_con,
    L_con = mean_c CE([cos(f₀_c, f_σ_c), cos(f_σ_c, f_full_c)] / τ, target 0),

with f₀ the text features of the fixed initial "X … X {name}." embeddings (a cached constant), f_σ those of σ alone
and f_full those of σ+UV; μ = 0.5, τ = 0.5. The σ and σ+UV prompts are encoded in one batched call; the reference's
unused UV-only pass is skipped, and its quirks (``--num_prompt 2`` doubling the class axis, AMP dropping L_con) are
not replicated. Only σ is uploaded; evaluation uses σ_global + U_i·V_i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..federated.features import Batch
from ..seeding import normal_prompt
from .coop import CoOpModel
from .personal import PersonalParams, PersonalPromptAlgorithm
from .protocol import PromptParams, Runtime, register_algorithm


@dataclass
class FedPGPParams(PersonalParams):
    lr: float = 0.001
    rank: int = 8  # bottleneck r (script value; the argparse default is 4)
    mu: float = 0.5  # contrastive weight (script value; the argparse default is 1)
    tau: float = 0.5  # contrastive temperature


def contrastive_loss(f0: torch.Tensor, f_sigma: torch.Tensor, f_full: torch.Tensor, tau: float) -> torch.Tensor:
    """L_con over classes: 2-way CE, target 0, on [cos(f₀, f_σ), cos(f_σ, f_full)]/τ; inputs (C, D) normalized."""
    pos = (f0 * f_sigma).sum(-1)
    neg = (f_sigma * f_full).sum(-1)
    logits = torch.stack([pos, neg], dim=-1) / tau
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class FedPGPModel(CoOpModel):
    """``ctx`` is σ (global); ``U``, ``V`` are the private low-rank factors."""

    def __init__(self, rt: Runtime, ctx: torch.Tensor, hp: FedPGPParams, U: torch.Tensor, V: torch.Tensor) -> None:
        super().__init__(rt, ctx)
        self.hp = hp
        self.U = nn.Parameter(U.detach().clone().float().to(rt.device))
        self.V = nn.Parameter(V.detach().clone().float().to(rt.device))

    def param_groups(self, hp: PromptParams) -> List[Dict[str, Any]]:
        return [{"params": [self.ctx, self.U, self.V], "lr": hp.lr}]

    def full_prompt(self) -> torch.Tensor:
        return self.ctx + self.U @ self.V

    def initial_features(self) -> torch.Tensor:
        """f₀: normalized features of the fixed "X … X {name}." embeddings, computed once per text encoder."""
        key = ("fedpgp-f0", id(self.rt.text))
        if key not in self.rt.cache:
            with torch.no_grad():
                f0 = self.rt.text.features(self.rt.text.x_ctx)
            self.rt.cache[key] = F.normalize(f0.float(), dim=-1).to(self.rt.device)
        return self.rt.cache[key]

    def text_features(self) -> torch.Tensor:
        return F.normalize(self.rt.text.features(self.full_prompt()).float(), dim=-1)

    def train_prompts(self) -> torch.Tensor:
        """Training needs σ and σ + UV (one batched call); evaluation only σ + UV (``text_features``)."""
        return torch.stack([self.ctx, self.full_prompt()])

    def text_from(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats[-1].float(), dim=-1)

    def loss_from(self, feats: torch.Tensor, batch: Batch) -> torch.Tensor:
        both = F.normalize(feats.float(), dim=-1)
        f_sigma, f_full = both[0], both[1]
        ce = F.cross_entropy(self.logits_with(f_full, batch), batch.labels)
        return ce + self.hp.mu * contrastive_loss(self.initial_features(), f_sigma, f_full, self.hp.tau)


@register_algorithm("fedpgp")
class FedPGP(PersonalPromptAlgorithm):
    """σ is downloaded, trained and uploaded (FedAvg, n-weighted); U, V never leave the client.

    Parameters (``algorithm_args.fedpgp``): ``rank`` 8, ``mu`` 0.5, ``tau`` 0.5, SGD ``lr`` 0.001 with momentum 0.9
    and weight decay 5e-4.
    """

    Params = FedPGPParams
    model_cls = FedPGPModel
    local_keys = ("U", "V")

    def local_init(self) -> Dict[str, torch.Tensor]:
        n_ctx, width = self.rt.ctx_shape
        r = int(self.hp.rank)
        return {"U": normal_prompt((n_ctx, r), self.rt.seed, "fedpgp-U-init"),
                "V": normal_prompt((r, width), self.rt.seed, "fedpgp-V-init")}
