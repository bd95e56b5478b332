"""Zero-shot CLIP (Radford et al., ICML 2021) with the dataset's hand-crafted template (docs/algorithms.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..federated.features import FeatureSet
from .protocol import Algorithm, EvalResult, register_algorithm


@dataclass
class ZeroShotParams:
    templates: Optional[List[str]] = None  # None -> the dataset's template


@register_algorithm("zeroshot")
class ZeroShotCLIP(Algorithm):
    """No training, no communication: logits = s·cos(Î, T̂(template)) over all C classes."""

    Params = ZeroShotParams
    trains = False

    def _text(self) -> torch.Tensor:
        key = ("zeroshot-text", tuple(self.hp.templates or [self.rt.template]))
        if key not in self.rt.cache:
            self.rt.cache[key] = self.rt.text.template_features(list(key[1])).to(self.rt.device)
        return self.rt.cache[key]

    @torch.no_grad()
    def evaluate(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> EvalResult:
        text = self._text()
        correct, loss = 0, 0.0
        for batch in data.chunks(self.rt.eval_batch_size):
            logits = self.rt.logit_scale * F.normalize(batch.feats.float(), dim=-1) @ text.t()
            loss += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(-1) == batch.labels).sum())
        return EvalResult(correct, len(data), loss / max(1, len(data)))
