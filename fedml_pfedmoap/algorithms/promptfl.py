"""PromptFL (Guo et al., IEEE TMC 2023): FedAvg over CoOp prompts; the global prompt is evaluated on every client.

``PromptAlgorithm`` implements it with hooks that subclasses override (docs/architecture.md §Adding an algorithm):
which prompt the client starts from (``build_model``), the local model's logits and loss (``model_cls``, a
``coop.CoOpModel``), what is uploaded (``make_upload``) and kept (``keep_state``), and how the server aggregates
(``aggregate``). Local SGD itself is ``training.fit_clients``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..federated.features import FeatureSet
from ..privacy import DPConfig, GaussianUploadMechanism
from ..seeding import normal_prompt
from .coop import CoOpModel, eval_text_key
from .protocol import Algorithm, EvalResult, register_algorithm
from .training import fit_clients


def fedavg(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sample-count weighted average Σ (n_i/Σn) x_i (McMahan et al. 2017)."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if len(tensors) == 0 or float(w.sum()) <= 0:
        raise ValueError("fedavg needs at least one upload with a positive sample count")
    w = w / w.sum()
    stacked = torch.stack([t.detach().to(torch.float64) for t in tensors])
    return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(0).to(tensors[0].dtype)


class PromptAlgorithm(Algorithm):
    """PromptFL: the global CoOp prompt is FedAvg-averaged over participants by sample count."""

    model_cls: ClassVar[type] = CoOpModel
    uploads_prompt: ClassVar[bool] = True

    # ---- server
    def init_server(self) -> None:
        super().init_server()
        self.global_prompt = self.initial_prompt()

    def initial_prompt(self) -> torch.Tensor:
        """The shared init, identical for every client and method at a given train seed."""
        return normal_prompt(self.rt.ctx_shape, self.rt.seed, "ctx-init")

    def client_payload(self, client_id: int) -> Dict[str, Any]:
        return {**super().client_payload(client_id), "global_prompt": self.global_prompt.clone()}

    def aggregate(self, uploads: List[Dict[str, Any]]) -> None:
        ups = [u for u in uploads if "prompt" in u]
        if ups:
            self.global_prompt = fedavg([u["prompt"] for u in ups], [u["n"] for u in ups])

    def server_state(self) -> Dict[str, Any]:
        return {**super().server_state(), "global_prompt": self.global_prompt.clone()}

    def load_server_state(self, state: Dict[str, Any]) -> None:
        super().load_server_state(state)
        self.global_prompt = state["global_prompt"].clone()

    # ---- client hooks
    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> nn.Module:
        """The model a client trains (train=True) or is evaluated with; PromptFL: the global prompt."""
        return self.model_cls(self.rt, payload["global_prompt"])

    def keep_state(self, model: nn.Module, payload: Dict[str, Any], state: Dict[str, Any]) -> None:
        """Persist what the client keeps after training (nothing for PromptFL)."""

    def make_upload(self, model: nn.Module, payload: Dict[str, Any], state: Dict[str, Any], n: int) -> Dict[str, Any]:
        up: Dict[str, Any] = {"client_index": payload["client_index"], "n": n}
        if self.uploads_prompt:
            up["prompt"] = model.ctx.detach().cpu().clone()
        return up

    def extra_loss(self, model: nn.Module, payload: Dict[str, Any]) -> Optional[torch.Tensor]:
        """An additional loss term (FedProx's proximal term, ...); None by default."""
        return None

    def before_step(self, model: nn.Module) -> None:
        """Called between backward and the optimizer step (gradient clipping for DP)."""

    def local_train(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> Dict[str, Any]:
        return self.local_train_many([payload], [state], [data])[0]

    def local_train_many(self, payloads: Sequence[Dict[str, Any]], states: Sequence[Dict[str, Any]],
                         datas: Sequence[FeatureSet]) -> List[Dict[str, Any]]:
        """Train several clients, ``Runtime.train_clients_per_call`` at a time in lockstep (``fit_clients``); each
        client's optimizer, batches and RNG streams are its own, so the result does not depend on the grouping."""
        ups: List[Dict[str, Any]] = []
        k = max(1, int(self.rt.train_clients_per_call))
        for s in range(0, len(payloads), k):
            group = list(zip(payloads[s:s + k], states[s:s + k], datas[s:s + k]))
            models = [self.build_model(p, st, train=True) for p, st, _ in group]
            for m in models:
                m.prepare()
            losses = fit_clients(self, models, [p for p, _, _ in group], [d for _, _, d in group])
            for model, loss, (payload, state, data) in zip(models, losses, group):
                self.keep_state(model, payload, state)
                up = self.make_upload(model, payload, state, len(data))
                up["metrics"] = self.privatize_upload(up, payload, state, data,
                                                      {"train_loss": loss, **model.train_metrics()})
                ups.append(up)
        return ups

    @property
    def dp_mechanism(self) -> Optional[GaussianUploadMechanism]:
        """The upload mechanism when ``dp`` is configured (docs/privacy.md), else None."""
        cfg = DPConfig.parse(getattr(self.hp, "dp", None), f"algorithm_args.{self.name}.dp")
        if cfg is None or not self.uploads_prompt:
            return None
        if getattr(self, "_dp_mech", None) is None:
            self._dp_mech = GaussianUploadMechanism(cfg, self.hp.lr, self.hp.momentum, self.rt.rounds)
        return self._dp_mech

    def privatize_upload(self, up: Dict[str, Any], payload: Dict[str, Any], state: Dict[str, Any],
                         data: FeatureSet, clean: Dict[str, float]) -> Dict[str, float]:
        """The upload's metrics. Without DP: ``clean`` and the update norm ‖ctx_i − P_g‖. With DP the uploaded prompt
        becomes P_g + clip(Δ) + N(0, σ²I) and only public numbers are reported (docs/privacy.md)."""
        mech = self.dp_mechanism
        if "prompt" not in up or "global_prompt" not in payload:
            return dict(clean)
        ref = payload["global_prompt"]
        if mech is None:
            return {**clean, "update_norm": float((up["prompt"].float() - ref.float().cpu()).norm())}
        epochs = self.hp.epochs if self.hp.epochs is not None else self.rt.local_epochs
        steps = epochs * data.num_batches(self.rt.batch_size)
        return mech.privatize_upload(up, ref, state, steps, payload["round"], clean)

    @torch.no_grad()
    def before_eval(self, payloads: Dict[int, Dict[str, Any]], states: Dict[int, Dict[str, Any]],
                    prompts_per_call: int = 16) -> None:
        """``Runtime.batch_eval_text``: the distinct evaluation prompts of all clients (plain CoOp text path only)
        encoded ``prompts_per_call`` at a time, content-addressed in ``Runtime.cache`` for ``CoOpModel.scorer``."""
        if not self.rt.batch_eval_text:
            return
        for key in [k for k in self.rt.cache if isinstance(k, tuple) and k[:1] == ("eval-text",)]:
            del self.rt.cache[key]
        prompts: Dict[tuple, torch.Tensor] = {}
        for cid, payload in payloads.items():
            model = self.build_model(payload, states[cid], train=False)
            if all(getattr(type(model), f) is getattr(CoOpModel, f) for f in ("text_features", "text_from", "train_prompts")):
                prompts.setdefault(eval_text_key(model.ctx), model.ctx.detach())
        keys = list(prompts)
        for s in range(0, len(keys), prompts_per_call):
            chunk = keys[s:s + prompts_per_call]
            feats = F.normalize(self.rt.text.features(torch.stack([prompts[k] for k in chunk])).float(), dim=-1)
            for k, f in zip(chunk, feats):
                self.rt.cache[k] = f

    @torch.no_grad()
    def evaluate(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> EvalResult:
        model = self.build_model(payload, state, train=False)
        model.prepare()
        score = model.scorer()
        correct, loss_sum = 0, 0.0
        for batch in data.chunks(self.rt.eval_batch_size):
            logits = score(batch)
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(-1) == batch.labels).sum())
        return EvalResult(correct, len(data), loss_sum / max(1, len(data)))


@register_algorithm("promptfl")
class PromptFL(PromptAlgorithm):
    """Participants train the global ctx for E epochs; the server averages uploads weighted by sample count."""
