"""CoOp on frozen CLIP: the local model every prompt method builds on (docs/algorithms.md §Shared setting)."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..federated.features import Batch
from .protocol import PromptParams, Runtime


def eval_text_key(ctx: torch.Tensor) -> tuple:
    """Content address of a prompt: identical prompts (PromptFL's global one) share one evaluation encoding."""
    return ("eval-text", hashlib.sha1(ctx.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest())


class CoOpModel(nn.Module):
    """CoOp on frozen CLIP: logits = s · cos(Î, T̂(ctx)) over all C classes."""

    def __init__(self, rt: Runtime, ctx: torch.Tensor) -> None:
        super().__init__()
        self.rt = rt
        self.ctx = nn.Parameter(ctx.detach().clone().float().to(rt.device))

    def param_groups(self, hp: PromptParams) -> List[Dict[str, Any]]:
        return [{"params": [self.ctx], "lr": hp.lr}]

    def prepare(self) -> None:
        """Per-round precomputation (frozen features, e.g. experts); called once before training/evaluation."""

    def train_prompts(self) -> torch.Tensor:
        """The prompts (P, n_ctx, W) whose text features a training step needs. ``fit_clients`` encodes several
        clients' prompts in one text-tower call (``Runtime.train_clients_per_call``), then calls ``loss_from``."""
        return self.ctx.unsqueeze(0)

    def text_from(self, feats: torch.Tensor) -> torch.Tensor:
        """Unnormalized features (P, C, D) of ``train_prompts()`` -> the text features the logits use."""
        return F.normalize(feats[0].float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        return self.text_from(self.rt.text.features(self.train_prompts()))

    def logits_with(self, text: torch.Tensor, batch: Batch) -> torch.Tensor:
        img = F.normalize(batch.feats.float(), dim=-1)
        return self.rt.logit_scale * img @ text.t()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logits_with(self.text_features(), batch)

    def loss_from(self, feats: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The training loss given the unnormalized features of ``train_prompts()``."""
        return F.cross_entropy(self.logits_with(self.text_from(feats), batch), batch.labels)

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.loss_from(self.rt.text.features(self.train_prompts()), batch)

    def train_metrics(self) -> Dict[str, float]:
        """Per-client numbers reported with the upload after training (e.g. FedOTP's non-finite plan count)."""
        return {}

    @torch.no_grad()
    def scorer(self) -> Callable[[Batch], torch.Tensor]:
        """Evaluation: text features encoded once, then a matmul per test chunk."""
        text = self.rt.cache.get(eval_text_key(self.ctx)) if self.rt.batch_eval_text else None
        text = self.text_features() if text is None else text
        return lambda batch: self.logits_with(text, batch)

