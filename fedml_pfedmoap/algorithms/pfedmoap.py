"""pFedMoAP: Mixture of Experts Made Personalized: Federated Prompt Learning for Vision-Language Models.

J. Luo, C. Chen, S. Wu, ICLR 2025 (arXiv 2410.10114); specified in docs/algorithms.md §pFedMoAP.

Server: FedAvg of the uploaded prompts (the global prompt P_g) plus a pool of every client's latest upload. At the start
of round t the pool is frozen (snapshot 𝒫_{t−1}); each selected client receives P_g and the prompts of its K nearest
pool entries by Frobenius distance (ties by client index; none for a first-time participant), so payloads differ per
client and a participant downloads (K+1) prompts.

Client: restarts ``ctx`` from P_g, encodes the experts once (no grad; cached per (expert id, upload round) in
``Runtime.cache``), trains ``ctx`` (lr 0.002) and its private gate θ_i (lr 0.01) with fresh SGD on
logits = λ·s·cos(Î, T̂L) + s·⟨P(Î), T_MoE⟩, keeps θ_i by client index and uploads only ``ctx`` and n.

Ablations (paper Tables 6–9, Figs. 4–5): ``lam`` (alias ``lambda``; 0 drops the local term), ``gating: linear``,
``gate_aggregation: fedavg``, ``num_experts`` (K+1), ``d_gating``, ``expert_selection: random`` (the released code's
fixed random order, D1), ``pool_snapshot: live`` (D2 parity, in-process simulator only: each download sees the uploads
of earlier participants of the same round), ``uniform_gate`` (diagnostic), and ``dp`` (PromptParams, docs/privacy.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..federated.features import Batch
from ..gating import build_gate, moe_logits, resolve_d_gating
from ..seeding import make_generator
from .coop import CoOpModel
from .promptfl import PromptAlgorithm, fedavg
from .protocol import PromptParams, Runtime, register_algorithm

CACHE_TAG = "pfedmoap-expert"
SELECTIONS = {"knn": "knn", "random": "random", "legacy_fixed_permutation": "random"}


@dataclass
class PFedMoAPParams(PromptParams):
    """Defaults of docs/algorithms.md §pFedMoAP; ``lr`` is the prompt's learning rate, ``gate_lr`` the gate's."""

    lam: float = 0.5
    num_experts: int = 10  # K + 1 (counts the local expert)
    d_gating: Optional[int] = None  # None -> min(128, D); D must be a multiple (strided pooling)
    heads: int = 8
    scaling: float = 10.0
    gate_lr: float = 0.01
    gating: str = "attention"  # attention | linear
    gate_aggregation: str = "local"  # local | fedavg
    expert_selection: str = "knn"  # knn | random (legacy_fixed_permutation)
    pool_snapshot: str = "round_start"  # round_start | live (D2 parity: later clients see same-round uploads)
    uniform_gate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        where = "algorithm_args.pfedmoap"
        # numeric keys: type and range checked by ranges.PARAM_RULES in parse_params
        if not isinstance(self.uniform_gate, bool):
            raise ValueError(f"{where}.uniform_gate: expected true/false, got {self.uniform_gate!r}")
        if self.gating not in ("attention", "linear"):
            raise ValueError(f"{where}.gating: expected 'attention' or 'linear', got {self.gating!r}")
        if self.gate_aggregation not in ("local", "fedavg"):
            raise ValueError(f"{where}.gate_aggregation: expected 'local' or 'fedavg', got {self.gate_aggregation!r}")
        if self.gate_aggregation == "fedavg" and self.dp is not None:
            raise ConfigError(f"{where}.gate_aggregation: 'fedavg' uploads the gate without noise, which dp does not "
                              "cover; use gate_aggregation: local with dp")
        if self.expert_selection not in SELECTIONS:
            raise ValueError(f"{where}.expert_selection: expected one of {sorted(SELECTIONS)}, "
                             f"got {self.expert_selection!r}")
        self.expert_selection = SELECTIONS[self.expert_selection]
        if self.pool_snapshot not in ("round_start", "live"):
            raise ValueError(f"{where}.pool_snapshot: expected 'round_start' or 'live', got {self.pool_snapshot!r}")


class MoAPModel(CoOpModel):
    """CoOp prompt + optional private gate over frozen, normalized expert text features (K,C,D) (docs/algorithms.md)."""

    def __init__(self, rt: Runtime, ctx: torch.Tensor, gate: Optional[nn.Module] = None,
                 experts: Optional[torch.Tensor] = None, lam: float = 0.5, d_gating: int = 128) -> None:
        super().__init__(rt, ctx)
        self.gate = gate.to(rt.device) if gate is not None else None
        self.experts = experts.detach() if experts is not None else None
        self.lam, self.d_gating = float(lam), int(d_gating)

    @property
    def uses_moe(self) -> bool:
        return self.gate is not None and self.experts is not None and self.experts.shape[0] > 0

    def param_groups(self, hp: PFedMoAPParams) -> List[Dict[str, Any]]:
        groups = [{"params": [self.ctx], "lr": hp.lr}]
        if self.gate is not None:
            groups.append({"params": list(self.gate.parameters()), "lr": hp.gate_lr})
        return groups

    def _logits(self, text: torch.Tensor, batch: Batch):
        img = F.normalize(batch.feats.float(), dim=-1)
        gate, experts = (self.gate, self.experts) if self.uses_moe else (None, None)
        return moe_logits(img, text, experts, gate, self.rt.logit_scale, self.lam, self.d_gating)

    def logits_with(self, text: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._logits(text, batch)[0]

    @torch.no_grad()
    def attention(self, batch: Batch) -> Optional[torch.Tensor]:
        """Head-averaged gate weights (C,B,K+1), local expert first (paper Fig. 6); None without experts."""
        return self._logits(self.text_features(), batch)[1]


@register_algorithm("pfedmoap")
class PFedMoAP(PromptAlgorithm):
    """pFedMoAP (see the module docstring). Gate state lives in the client state under ``gate`` (plain tensors)."""

    Params = PFedMoAPParams
    model_cls = MoAPModel

    def __init__(self, runtime: Runtime, params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(runtime, params)
        self.d_gating = resolve_d_gating(runtime.backbone.embed_dim, self.hp.d_gating)
        if self.hp.gating == "attention" and self.d_gating % self.hp.heads != 0:
            raise ValueError(f"algorithm_args.{self.name}: d_gating={self.d_gating} is not divisible by "
                             f"heads={self.hp.heads}")
        self.k = self.hp.num_experts - 1

    @classmethod
    def parse_params(cls, params: Dict[str, Any]):
        params = dict(params)
        if "lambda" in params:  # ``lambda`` is a Python keyword: accept it as an alias of ``lam``
            if "lam" in params:
                raise ValueError(f"algorithm_args.{cls.name}: give either 'lambda' or 'lam', not both")
            params["lam"] = params.pop("lambda")
        return super().parse_params(params)

    def new_gate(self, client_id: Any) -> nn.Module:
        """PyTorch-default init from the private generator (train seed, client index) (docs/algorithms.md §pFedMoAP)."""
        return build_gate(self.hp.gating, self.d_gating, self.hp.num_experts, self.hp.heads, self.hp.scaling,
                          make_generator(self.rt.seed, "gate-init", client_id), self.hp.uniform_gate)

    # ---- server ------------------------------------------------------------------------------------------------
    def init_server(self) -> None:
        super().init_server()
        self.pool: Dict[int, Dict[str, Any]] = {}  # client -> {"prompt", "n", "round"} (latest upload)
        self.snapshot: Dict[int, Dict[str, Any]] = {}  # the pool at the start of the current round
        self.trained_with: Dict[int, List[int]] = {}  # this round's participants -> their expert ids
        self.sent: Dict[int, Dict[int, Dict[str, Any]]] = {}  # live mode: the pool entries each participant got
        perm = torch.randperm(self.rt.num_clients, generator=make_generator(self.rt.seed, "expert-permutation"))
        self.permutation: List[int] = perm.tolist()
        self.global_gate: Optional[Dict[str, torch.Tensor]] = None
        if self.hp.gate_aggregation == "fedavg":
            self.global_gate = _plain_state(self.new_gate("global"))

    def begin_round(self, round_idx: int, selected: Sequence[int]) -> None:
        super().begin_round(round_idx, selected)
        self.snapshot = dict(self.pool)  # entries are replaced, never mutated, so a shallow copy freezes it
        self.sent = {}
        self.trained_with = {} if self.sequential else \
            {int(i): self.select_experts(int(i), self.snapshot) for i in selected}
        self._evict_expert_cache()

    @property
    def sequential(self) -> bool:
        """``pool_snapshot: live`` (D2 parity, in-process simulator only): each participant's download is built after
        the previous participants' uploads entered the pool, as in the released code's sequential loop."""
        return self.hp.pool_snapshot == "live"

    def observe_upload(self, upload: Dict[str, Any]) -> None:
        if self.sequential:
            self._pool_add(upload)

    def _pool_add(self, u: Dict[str, Any]) -> None:
        if "prompt" in u:
            self.pool[int(u["client_index"])] = {"prompt": u["prompt"].detach().cpu().clone(), "n": int(u["n"]),
                                                 "round": self.round}

    def select_experts(self, client_id: int, pool: Dict[int, Dict[str, Any]]) -> List[int]:
        """KNN(i, 𝒫): the K nearest other entries by ‖𝒫[i] − 𝒫[j]‖_F (ties: lower id); ∅ if i is not in 𝒫."""
        if client_id not in pool or self.k == 0:
            return []
        cands = [j for j in pool if j != client_id]
        if self.hp.expert_selection == "random":  # D1 parity: first K pool members of a fixed permutation
            return [j for j in self.permutation if j in cands][: self.k]
        own = pool[client_id]["prompt"].float()
        dist = {j: float((own - pool[j]["prompt"].float()).norm()) for j in cands}
        return sorted(cands, key=lambda j: (dist[j], j))[: self.k]

    def _payload(self, client_id: int, ids: List[int], pool: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
        payload = super().client_payload(client_id)
        shape = self.global_prompt.shape
        payload["experts"] = (torch.stack([pool[j]["prompt"] for j in ids]) if ids
                              else torch.zeros((0, *shape), dtype=self.global_prompt.dtype))
        payload["expert_ids"] = list(ids)
        payload["expert_rounds"] = [int(pool[j]["round"]) for j in ids]
        if self.global_gate is not None:
            payload["global_gate"] = {k: v.clone() for k, v in self.global_gate.items()}
        return payload

    def client_payload(self, client_id: int) -> Dict[str, Any]:
        if self.sequential:  # the live pool, frozen per participant for its evaluation
            ids = self.trained_with[client_id] = self.select_experts(client_id, self.pool)
            self.sent[client_id] = {j: self.pool[j] for j in ids}
            return self._payload(client_id, ids, self.sent[client_id])
        ids = self.trained_with.get(client_id)
        if ids is None:
            ids = self.select_experts(client_id, self.snapshot)
        return self._payload(client_id, ids, self.snapshot)

    def eval_payload(self, client_id: int) -> Dict[str, Any]:
        """Participants: the experts they trained with; others: KNN over the end-of-round pool (docs/algorithms.md)."""
        if client_id in self.trained_with:
            return self._payload(client_id, self.trained_with[client_id], self.sent.get(client_id, self.snapshot))
        return self._payload(client_id, self.select_experts(client_id, self.pool), self.pool)

    def aggregate(self, uploads: List[Dict[str, Any]]) -> None:
        super().aggregate(uploads)  # P_g <- FedAvg over this round's participants
        for u in uploads:
            self._pool_add(u)
        gates = [u for u in uploads if "gate" in u]
        if self.global_gate is not None and gates:
            self.global_gate = {k: fedavg([u["gate"][k] for u in gates], [u["n"] for u in gates])
                                for k in self.global_gate}

    def server_state(self) -> Dict[str, Any]:
        return {**super().server_state(), "pool": _copy_pool(self.pool), "snapshot": _copy_pool(self.snapshot),
                "trained_with": {k: list(v) for k, v in self.trained_with.items()},
                "permutation": list(self.permutation), "global_gate": self.global_gate}

    def load_server_state(self, state: Dict[str, Any]) -> None:
        super().load_server_state(state)
        self.pool, self.snapshot = _copy_pool(state["pool"]), _copy_pool(state["snapshot"])
        self.trained_with = {int(k): list(v) for k, v in state["trained_with"].items()}
        self.permutation = list(state["permutation"])
        self.global_gate = state.get("global_gate")

    def _evict_expert_cache(self) -> None:
        """Drop cached expert features of prompts no longer in the pool (an entry was overwritten by a new upload)."""
        live = {(cid, int(rec["round"])) for cid, rec in self.pool.items()}
        for key in [k for k in self.rt.cache if isinstance(k, tuple) and k[:1] == (CACHE_TAG,)]:
            if (key[1], key[2]) not in live:
                del self.rt.cache[key]

    # ---- client ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def expert_features(self, payload: Dict[str, Any]) -> torch.Tensor:
        """Normalized expert text features (K,C,D), encoded once per (expert id, upload round) in one batched call.

        The key also holds a checksum of the prompt so that runs sharing one ``Runtime`` never reuse stale features.
        """
        prompts = payload["experts"]
        keys = [(CACHE_TAG, int(j), int(r), float(p.double().sum()))
                for j, r, p in zip(payload["expert_ids"], payload["expert_rounds"], prompts)]
        missing = [i for i, k in enumerate(keys) if k not in self.rt.cache]
        if missing:
            feats = F.normalize(self.rt.text.features(prompts[missing].to(self.rt.device).float()).float(), dim=-1)
            for i, f in zip(missing, feats):
                self.rt.cache[keys[i]] = f
        return torch.stack([self.rt.cache[k] for k in keys])

    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> nn.Module:
        """Train: ctx <- P_g. Eval: ctx_i (P_g if never trained). MoE only with experts and (train or a kept gate)."""
        cid = payload["client_index"]
        ctx = payload["global_prompt"] if train or "ctx" not in state else state["ctx"]
        has_experts = len(payload.get("expert_ids", [])) > 0
        if not has_experts or not (train or state.get("moe_trained", False)):
            return self.model_cls(self.rt, ctx, None, None, self.hp.lam, self.d_gating)
        gate = self.new_gate(cid)  # first MoE round: fresh private init, never another client's gate
        source = payload.get("global_gate") if self.hp.gate_aggregation == "fedavg" else state.get("gate")
        if source is not None:
            gate.load_state_dict(source)
        return self.model_cls(self.rt, ctx, gate, self.expert_features(payload), self.hp.lam, self.d_gating)

    def keep_state(self, model: nn.Module, payload: Dict[str, Any], state: Dict[str, Any]) -> None:
        state["ctx"] = model.ctx.detach().cpu().clone()
        if model.gate is not None:
            state["gate"] = _plain_state(model.gate)
            state["moe_trained"] = True

    def make_upload(self, model: nn.Module, payload: Dict[str, Any], state: Dict[str, Any], n: int) -> Dict[str, Any]:
        up = super().make_upload(model, payload, state, n)  # prompt + n; the gate stays local ...
        if self.hp.gate_aggregation == "fedavg" and model.gate is not None:
            up["gate"] = _plain_state(model.gate)  # ... except in the Table 7 "gate aggregated" ablation
        return up


@register_algorithm("pfedmoap_lambda0")
class PFedMoAPLambda0(PFedMoAP):
    """Ablation λ = 0 (paper Fig. 4): logits are the MoE term only (with experts)."""

    @classmethod
    def parse_params(cls, params: Dict[str, Any]):
        if "lam" in params or "lambda" in params:
            raise ValueError(f"algorithm_args.{cls.name}: λ is fixed to 0; use 'pfedmoap' with lam for other values")
        return super().parse_params({**params, "lam": 0.0})


def _plain_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _copy_pool(pool: Dict[int, Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
    return {int(k): {**v, "prompt": v["prompt"].clone()} for k, v in pool.items()}
