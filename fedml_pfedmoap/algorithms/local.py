"""Local CoOp (Zhou et al., IJCV 2022): every client trains its own prompt from the shared init; nothing is sent."""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

from .promptfl import PromptAlgorithm
from .protocol import register_algorithm


@register_algorithm("local")
class LocalCoOp(PromptAlgorithm):
    """Each participant continues its own ``ctx_i`` (shared N(0, 0.02²) init at its first round); no communication."""

    uploads_prompt = False

    def client_payload(self, client_id: int) -> Dict[str, Any]:
        return {"client_index": int(client_id), "round": self.round}  # nothing is downloaded

    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> nn.Module:
        ctx = state["ctx"] if "ctx" in state else self.initial_prompt()
        return self.model_cls(self.rt, ctx)

    def keep_state(self, model: nn.Module, payload: Dict[str, Any], state: Dict[str, Any]) -> None:
        state["ctx"] = model.ctx.detach().cpu().clone()
