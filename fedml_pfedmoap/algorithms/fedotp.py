"""FedOTP (Li et al., "Global and Local Prompts Cooperation via Optimal Transport for Federated Learning", CVPR 2024;
docs/algorithms.md §FedOTP).

Each client holds a global prompt (``ctx``, FedAvg-averaged) and a private local prompt (``local_ctx``), giving text
features t ∈ R^{2×C×D} from one batched text-encoder call. For image b and class c, with normalized projected patch
tokens f ∈ R^{M×D}:

    sim[m,n] = ⟨f_m, t_{n,c}⟩,   T = OT(cost = 1 − sim; μ = 1/M, ν = γ/N, ε),   logit_{b,c} = s·Σ_{m,n} T ⊙ sim,

with T from unbalanced entropic OT ("COT", default) or balanced Sinkhorn (``fedml_pfedmoap.ot``), computed without
gradient. Plain cross-entropy. Non-finite plans are replaced by μνᵀ and counted (``ot_nonfinite`` train metric) or,
with ``on_nonfinite: raise``, stop the run with an error naming the client, round and batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..federated.features import Batch
from ..ot import METHODS, NONFINITE_MODES, transport_similarity
from ..seeding import normal_prompt
from .personal import DualPromptModel, PersonalParams, PersonalPromptAlgorithm
from .protocol import Runtime, register_algorithm

logger = logging.getLogger(__name__)


@dataclass
class FedOTPParams(PersonalParams):
    lr: float = 0.001
    ot_method: str = "cot"  # cot (unbalanced, FedOTP's default) | sinkhorn (balanced; FLiP's variant)
    eps: float = 0.01  # entropic regularization (0.01 for the CLIP datasets, 0.1 for CIFAR-like ones)
    gamma: float = 0.8  # top_percent: mass γ carried by the prompts
    thresh: float = 1e-3  # stop when mean |v - v_prev| < thresh over the whole batch
    max_iter: int = 100
    check_every: int = 5  # convergence test every k iterations (no host sync in between); 1 = reference parity
    on_nonfinite: str = "replace"  # replace (μνᵀ, counted) | raise
    eval_chunk: int = 256  # images per OT solve at evaluation (bounds memory: chunk·C·M·2 floats)
    # in-memory patch-token budget (train + test, N×M×D×4 bytes); above it, patch tokens are encoded on the fly
    # each step instead of cached (features.LazyPatches). None: always cache.
    patch_cache_gb: Optional[float] = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        where = "algorithm_args.fedotp"
        if self.ot_method not in METHODS:
            raise ValueError(f"{where}.ot_method: expected one of {METHODS}, got {self.ot_method!r}")
        if self.on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"{where}.on_nonfinite: expected one of {NONFINITE_MODES}, got {self.on_nonfinite!r}")


def patch_text_similarity(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """sim[b,c,m,n] = ⟨f̂_{b,m}, t_{n,c}⟩ for patches (B,M,D) and normalized text (N,C,D) -> (B,C,M,N)."""
    return torch.einsum("bmd,ncd->bcmn", F.normalize(patches.float(), dim=-1), text)


class FedOTPModel(DualPromptModel):
    """[global; local] prompts scored against patch tokens through an optimal transport plan."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nonfinite = 0
        self.calls = 0
        self.tag = "fedotp"

    def train_metrics(self) -> Dict[str, float]:
        return {"ot_nonfinite": self.nonfinite}

    def logits_with(self, text: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.patches is None:
            raise ValueError("fedotp needs patch tokens (Batch.patches); build the features with needs_patches")
        patches = batch.patches
        if not isinstance(patches, torch.Tensor):  # on-the-fly patch tokens (features.LazyPatches)
            patches = patches.materialize()
        hp = self.hp
        self.calls += 1
        score, res = transport_similarity(
            patch_text_similarity(patches, text), hp.eps, method=hp.ot_method, gamma=hp.gamma, thresh=hp.thresh,
            max_iter=hp.max_iter, check_every=hp.check_every, on_nonfinite=hp.on_nonfinite,
            context=f"{self.tag} batch {self.calls}")
        self.nonfinite += res.nonfinite
        return self.rt.logit_scale * score

    @torch.no_grad()
    def scorer(self) -> Callable[[Batch], torch.Tensor]:
        text = self.text_features()
        chunk = int(self.hp.eval_chunk)

        def score(batch: Batch) -> torch.Tensor:
            parts = []
            for s in range(0, len(batch.labels), chunk):
                sl = slice(s, s + chunk)
                parts.append(self.logits_with(text, Batch(batch.feats[sl], batch.labels[sl], batch.patches[sl])))
            return torch.cat(parts) if parts else torch.zeros(0, text.shape[1], device=self.rt.device)

        return score


@register_algorithm("fedotp")
class FedOTP(PersonalPromptAlgorithm):
    """Prompt 0 (global) is uploaded and FedAvg-averaged; prompt 1 (local) stays in the client's state.

    Parameters (``algorithm_args.fedotp``): see ``FedOTPParams``; defaults COT, γ 0.8, ε 0.01, thresh 1e-3,
    max_iter 100, SGD lr 0.001 with momentum 0.9 and weight decay 5e-4.
    """

    Params = FedOTPParams
    model_cls = FedOTPModel
    local_keys = ("local_ctx",)
    needs_patches = True

    def __init__(self, runtime: Runtime, params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(runtime, params)
        hp = self.hp  # log the resolved values: the reference's argparse defaults differ from its scripts
        logger.info("fedotp: ot_method=%s eps=%s gamma=%s thresh=%s max_iter=%s check_every=%s lr=%s",
                    hp.ot_method, hp.eps, hp.gamma, hp.thresh, hp.max_iter, hp.check_every, hp.lr)

    def local_init(self) -> Dict[str, torch.Tensor]:
        return {"local_ctx": normal_prompt(self.rt.ctx_shape, self.rt.seed, "local-ctx-init")}

    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> FedOTPModel:
        model = super().build_model(payload, state, train)
        model.tag = f"fedotp client {payload['client_index']} round {payload['round']} {'train' if train else 'eval'}"
        return model

