"""The global + private split shared by PromptFolio, FedOTP, FedPGP, FedPHA and DP-FPL (docs/algorithms.md).

``PersonalPromptAlgorithm`` is PromptFL whose model has one **global** part, the parameter ``ctx`` (downloaded,
uploaded, FedAvg-averaged by the base class, and the only tensor a DP hook ever sees), and **private** parts named by
``local_keys``: plain tensors kept in the client's state dict, started from one shared init (same for every client at
a given train seed) and never uploaded. A never-trained client is evaluated with [latest global; shared init].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .coop import CoOpModel
from .promptfl import PromptAlgorithm
from .protocol import PromptParams, Runtime


@dataclass
class PersonalParams(PromptParams):
    """Shared-schedule flag of the personalized baselines (docs/algorithms.md: ``round0_all_clients``)."""

    round0_all_clients: bool = False  # reference parity: every client trains in round 0, then `frac` is sampled


class PersonalPromptAlgorithm(PromptAlgorithm):
    """Global ``ctx`` averaged by the server; private tensors ``local_keys`` kept per client index in its state."""

    local_keys: ClassVar[Tuple[str, ...]] = ()
    Params = PersonalParams

    def local_init(self) -> Dict[str, torch.Tensor]:
        """The shared init of the private tensors (identical for every client at a given train seed)."""
        raise NotImplementedError

    def _local_init(self) -> Dict[str, torch.Tensor]:
        if not hasattr(self, "_local_init_cache"):
            self._local_init_cache = self.local_init()
        return self._local_init_cache

    def init_client_state(self, client_id: int) -> Dict[str, Any]:
        return {k: v.clone() for k, v in self._local_init().items()}

    def participants(self, round_idx: int, sampled: Sequence[int], num_clients: int) -> List[int]:
        """``round0_all_clients`` (docs/algorithms.md §FedOTP, the FedOTP/FedPGP references): all clients in round 0."""
        if self.hp.round0_all_clients and round_idx == 0:
            return list(range(num_clients))
        return list(sampled)

    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> nn.Module:
        init = self._local_init()
        local = {k: state[k] if k in state else init[k] for k in self.local_keys}
        return self.model_cls(self.rt, payload["global_prompt"], self.hp, **local)

    def keep_state(self, model: nn.Module, payload: Dict[str, Any], state: Dict[str, Any]) -> None:
        for k in self.local_keys:
            state[k] = getattr(model, k).detach().cpu().clone()


class DualPromptModel(CoOpModel):
    """A global prompt ``ctx`` and a private prompt ``local_ctx`` (n_ctx, W), trained together by one SGD."""

    def __init__(self, rt: Runtime, ctx: torch.Tensor, hp: Any, local_ctx: torch.Tensor) -> None:
        super().__init__(rt, ctx)
        self.hp = hp
        self.local_ctx = nn.Parameter(local_ctx.detach().clone().float().to(rt.device))

    def param_groups(self, hp: PromptParams) -> List[Dict[str, Any]]:
        return [{"params": [self.ctx, self.local_ctx], "lr": hp.lr}]

    def train_prompts(self) -> torch.Tensor:
        return torch.stack([self.ctx, self.local_ctx])

    def text_from(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalized text features of [global; local] (2, C, D), both from ONE batched text-encoder call."""
        return F.normalize(feats.float(), dim=-1)
