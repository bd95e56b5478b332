"""FedPHA (Fang et al., "FedPHA: Federated Prompt Learning for Heterogeneous Client Adaptation", ICML 2025;
docs/algorithms.md §FedPHA).

Each client holds the global prompt P_G ∈ R^{n_g×W} (FedAvg-averaged) and a private local prompt P_L ∈ R^{n_k×W} whose
length n_k may differ per client. With the thin SVD P_G = U·S·Vᵀ and c = ⌊n_g·(1 − ratio)⌋,

    Π = V₂·V₂ᵀ,  V₂ = V[:, c:]  (the n_g − c right singular vectors of the SMALLEST singular values),  P̃_L = P_L·Π

and with t_L, t_G, t_P the normalized text features of P_L, P_G and P̃_L (each prompt tokenized with its own length):

    loss = CE(s·Î t_Lᵀ) + CE(s·Î t_Gᵀ) + MSE(t_L, t_P) + mean_c ReLU(α − ‖t_L,c − t_G,c‖₂)

Gradients flow through the SVD into P_G. Only P_G is uploaded; a client is evaluated with its local prompt alone.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..federated.features import Batch
from ..seeding import normal_prompt
from .coop import CoOpModel
from .personal import PersonalParams, PersonalPromptAlgorithm
from .protocol import PromptParams, Runtime, register_algorithm
from ..clip.prompt import TextEncoder
from .text_paths import EncoderCache, OwnEncoders


@dataclass
class FedPHAParams(PersonalParams):
    lr: float = 0.001
    epochs: Optional[int] = 1  # one local epoch per round (the authors' default)
    alpha: float = 1.0  # margin of the push term
    ratio: float = 0.8  # Π keeps the n_g − ⌊n_g·(1 − ratio)⌋ smallest right singular directions of P_G
    local_lengths: Optional[List[int]] = None  # n_k per client index; None: every n_k = n_g (= model_args.n_ctx)
    local_length_range: Optional[List[int]] = None  # [lo, hi]: n_k uniform in lo..hi (Python random, train seed)
    parity_eot_maxlen: bool = False  # released-code EOT offset: every prompt read at the longest prompt's EOT index

    def __post_init__(self) -> None:
        super().__post_init__()
        where = "algorithm_args.fedpha"
        if not 0.0 < self.ratio <= 1.0 or self.alpha < 0:
            raise ValueError(f"{where}: expected 0 < ratio <= 1 and alpha >= 0, "
                             f"got ratio={self.ratio}, alpha={self.alpha}")
        if self.local_lengths is not None and self.local_length_range is not None:
            raise ValueError(f"{where}: set at most one of local_lengths and local_length_range")
        if self.local_lengths is not None and (not isinstance(self.local_lengths, (list, tuple))
                                               or any(int(n) < 1 for n in self.local_lengths)):
            raise ValueError(f"{where}.local_lengths: expected a list of integers >= 1, got {self.local_lengths!r}")
        rng = self.local_length_range
        if rng is not None and (not isinstance(rng, (list, tuple)) or len(rng) != 2
                                or not 1 <= int(rng[0]) <= int(rng[1])):
            raise ValueError(f"{where}.local_length_range: expected [lo, hi] with 1 <= lo <= hi, got {rng!r}")


def svd_projector(global_prompt: torch.Tensor, ratio: float) -> torch.Tensor:
    """Π = V₂V₂ᵀ (W, W) from the right singular vectors of P_G with the smallest singular values (differentiable)."""
    n_g = global_prompt.shape[0]
    _, _, vh = torch.linalg.svd(global_prompt.float(), full_matrices=False)
    c = int(n_g * (1.0 - ratio))
    v2 = vh[c:].t()
    return v2 @ v2.t()


def fedpha_loss(img: torch.Tensor, labels: torch.Tensor, t_local: torch.Tensor, t_global: torch.Tensor,
                t_proj: torch.Tensor, scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """The four terms on normalized image (B, D) and text features (C, D), every weight 1."""
    ce = F.cross_entropy(scale * img @ t_local.t(), labels) + F.cross_entropy(scale * img @ t_global.t(), labels)
    pull = F.mse_loss(t_local, t_proj)
    push = F.relu(alpha - (t_local - t_global).norm(dim=-1)).mean()
    return ce + pull + push


class FedPHAModel(CoOpModel):
    """``ctx`` is P_G (global), ``local_ctx`` is P_L (private, n_k tokens); evaluation uses P_L alone."""

    def __init__(self, rt: Runtime, ctx: torch.Tensor, hp: FedPHAParams, local_ctx: torch.Tensor,
                 local_text: nn.Module) -> None:
        super().__init__(rt, ctx)
        self.hp = hp
        self.local_ctx = nn.Parameter(local_ctx.detach().clone().float().to(rt.device))
        object.__setattr__(self, "local_text", local_text)  # shared frozen encoder, not a submodule
        self.joint = local_text is rt.text  # one encoder serves all three prompts: one batched call

    def param_groups(self, hp: PromptParams) -> List[Dict[str, Any]]:
        return [{"params": [self.ctx, self.local_ctx], "lr": hp.lr}]

    def projected_local(self) -> torch.Tensor:
        return self.local_ctx @ svd_projector(self.ctx, self.hp.ratio)

    def train_prompts(self) -> torch.Tensor:
        """[P_G, P_L, P̃_L] when all share one encoder, else [P_G] (the local pair goes through its own encoder)."""
        if self.joint:
            return torch.stack([self.ctx, self.local_ctx, self.projected_local()])
        return self.ctx.unsqueeze(0)

    def loss_from(self, feats: torch.Tensor, batch: Batch) -> torch.Tensor:
        t = F.normalize(feats.float(), dim=-1)
        t_global = t[0]
        if self.joint:
            t_local, t_proj = t[1], t[2]
        else:
            pair = self.local_text.features(torch.stack([self.local_ctx, self.projected_local()]))
            t_local, t_proj = F.normalize(pair.float(), dim=-1)
        img = F.normalize(batch.feats.float(), dim=-1)
        return fedpha_loss(img, batch.labels, t_local, t_global, t_proj, self.rt.logit_scale, self.hp.alpha)

    def text_features(self) -> torch.Tensor:
        """Inference: the local prompt only."""
        return F.normalize(self.local_text.features(self.local_ctx).float(), dim=-1)

    @torch.no_grad()
    def scorer(self):
        text = self.text_features()
        return lambda batch: self.logits_with(text, batch)


@register_algorithm("fedpha")
class FedPHA(OwnEncoders, PersonalPromptAlgorithm):
    """P_G is downloaded, trained and uploaded (FedAvg, n-weighted); P_L (any length) never leaves the client.

    Parameters (``algorithm_args.fedpha``): see ``FedPHAParams``; SGD lr 0.001 (CIFAR-100: 0.002), momentum 0.9,
    weight decay 5e-4, one local epoch, α 1.0, ratio 0.8. Per-dataset defaults: ``defaults_for``.
    """

    Params = FedPHAParams
    model_cls = FedPHAModel
    local_keys = ("local_ctx",)

    @classmethod
    def defaults_for(cls, dataset: str) -> Dict[str, Any]:
        """The authors' per-dataset settings (under the user's ``algorithm_args.fedpha``): CIFAR-10/100 use
        heterogeneous local lengths in 4..32, CIFAR-100 lr 0.002; every other dataset equal lengths."""
        return {"cifar10": {"local_length_range": [4, 32]},
                "cifar100": {"lr": 0.002, "local_length_range": [4, 32]}}.get(str(dataset).lower(), {})

    def __init__(self, runtime: Runtime, params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(runtime, params)
        self.encoders = EncoderCache(runtime)
        self.shape = runtime.ctx_shape  # (n_g, W): the global prompt has model_args.n_ctx tokens
        self.lengths = self._resolve_lengths()
        self.max_len = max([runtime.text.n_ctx, *self.lengths]) if self.hp.parity_eot_maxlen else None
        self.rt = dataclasses.replace(runtime, text=self.encoders.get(runtime.text.n_ctx, max_eot_ctx=self.max_len))

    def text_over(self, text: TextEncoder) -> TextEncoder:
        return self.encoders.get(self.shape[0], text.classnames, max_eot_ctx=self.max_len)

    def initial_prompt(self) -> torch.Tensor:
        return normal_prompt(self.shape, self.rt.seed, "ctx-init")  # the shared init of every method

    def _resolve_lengths(self) -> List[int]:
        n, n_g, hp = self.rt.num_clients, self.shape[0], self.hp
        if hp.local_lengths is not None:
            if len(hp.local_lengths) != n:
                raise ValueError(f"algorithm_args.fedpha.local_lengths: expected {n} lengths (one per client), "
                                 f"got {len(hp.local_lengths)}")
            return [int(x) for x in hp.local_lengths]
        if hp.local_length_range is not None:
            rng = random.Random(self.rt.seed)
            return [rng.randint(int(hp.local_length_range[0]), int(hp.local_length_range[1])) for _ in range(n)]
        return [n_g] * n

    def local_text(self, client_id: int) -> nn.Module:
        return self.encoders.get(self.lengths[client_id], max_eot_ctx=self.max_len)

    def local_init_for(self, client_id: int) -> torch.Tensor:
        """N(0, 0.02²); one shared init per length (at n_k = n_g the same tensor as the other methods' local init)."""
        n_k, (n_g, width) = self.lengths[client_id], self.shape
        if n_k == n_g:
            return normal_prompt((n_g, width), self.rt.seed, "local-ctx-init")
        return normal_prompt((n_k, width), self.rt.seed, "local-ctx-init", n_k)

    def init_client_state(self, client_id: int) -> Dict[str, Any]:
        return {"local_ctx": self.local_init_for(client_id)}

    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> FedPHAModel:
        cid = int(payload["client_index"])
        local = state["local_ctx"] if "local_ctx" in state else self.local_init_for(cid)
        return FedPHAModel(self.rt, payload["global_prompt"], self.hp, local, self.local_text(cid))
