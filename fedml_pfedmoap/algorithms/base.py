"""The algorithm protocol shared by every engine (in-process simulator, FedML cross-silo adapters).

An ``Algorithm`` has a server half and a client half that exchange plain-data payload dicts:

* server: ``init_server`` -> per round ``begin_round(t, selected)``; ``client_payload(i)`` (may differ per client);
  ``aggregate(uploads)``; ``eval_payload(i)``; ``server_state``/``load_server_state`` for checkpoints;
* client: ``init_client_state(i)`` (a dict of tensors/plain data, persisted by client index by the engine);
  ``local_train(payload, state, data) -> upload`` (always carries ``client_index`` and ``n``);
  ``evaluate(payload, state, test) -> EvalResult``.

``PromptAlgorithm`` implements CoOp prompt FedAvg (PromptFL, Guo et al. 2023) with hooks that subclasses override:
which prompt the client starts from (``build_model``), the local model's logits and loss (the model class), what is
uploaded (``make_upload``) and kept (``keep_state``), and how the server aggregates (``aggregate``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.backbone import ClipBackbone
from ..clip.prompt import TextEncoder
from ..errors import ConfigError
from ..federated.features import Batch, FeatureSet
from ..privacy import DPConfig, GaussianUploadMechanism
from ..ranges import check_params
from ..registry import Registry
from .training import fit_clients

ALGORITHMS: Registry[type] = Registry("algorithm")
register_algorithm = ALGORITHMS.register


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (train seed, purpose, client, round): private, order-independent streams."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def normal_prompt(shape: Sequence[int], *parts: Any, std: float = 0.02) -> torch.Tensor:
    """CoOp init: i.i.d. N(0, std²) from a private generator (docs/algorithms.md §Shared setting)."""
    return torch.randn(*shape, generator=make_generator(*parts)) * std


def fedavg(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sample-count weighted average Σ (n_i/Σn) x_i (McMahan et al. 2017)."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if len(tensors) == 0 or float(w.sum()) <= 0:
        raise ValueError("fedavg needs at least one upload with a positive sample count")
    w = w / w.sum()
    stacked = torch.stack([t.detach().to(torch.float64) for t in tensors])
    return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(0).to(tensors[0].dtype)


@dataclass
class Runtime:
    """What is shared and frozen inside one process: the backbone, the dataset's text path, seeds and budgets."""

    backbone: ClipBackbone
    text: TextEncoder
    num_clients: int
    seed: int = 0
    local_epochs: int = 5
    batch_size: int = 32
    template: str = "a photo of a {}."
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    eval_batch_size: int = 2048
    cache: Dict[Any, Any] = field(default_factory=dict)  # per-process derived-tensor cache (e.g. expert features)
    rounds: Optional[int] = None  # T, the run's communication rounds (DP accounting over the run)
    batch_eval_text: bool = False  # opt-in: every client's evaluation prompt encoded in batched text calls per round
    train_clients_per_call: int = 1  # >1: that many clients trained in lockstep, their prompts in one text call

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.backbone.logit_scale.to(self.device)

    @property
    def ctx_shape(self) -> tuple[int, int]:
        return self.text.ctx_shape


@dataclass
class EvalResult:
    correct: int
    total: int
    loss: float
    predictions: Optional[torch.Tensor] = None

    @property
    def acc(self) -> float:
        return self.correct / max(1, self.total)


@dataclass
class PromptParams:
    """Hyperparameters every prompt method shares (docs/algorithms.md §Shared defaults)."""

    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: Optional[int] = None  # None -> the run's local epochs E
    # differential privacy of the uploaded prompt (see fedml_pfedmoap/privacy/ and docs/privacy.md):
    # {epsilon, delta: 0.05, clip_grad: 1.0, clip_update: auto, accounting: run|release}; None -> off
    dp: Optional[Any] = None

    def __post_init__(self) -> None:
        self.dp = DPConfig.parse(self.dp, "algorithm_args.<algorithm>.dp")


class Algorithm:
    """Base class; see the module docstring for the protocol."""

    name: ClassVar[str] = "base"
    Params: ClassVar[type] = PromptParams
    trains: ClassVar[bool] = True

    def __init__(self, runtime: Runtime, params: Optional[Dict[str, Any]] = None) -> None:
        self.rt = runtime
        self.hp = self.parse_params(params or {})

    @classmethod
    def parse_params(cls, params: Dict[str, Any]):
        valid = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ConfigError(f"algorithm_args.{cls.name}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls.Params(**check_params(f"algorithm_args.{cls.name}", params))

    # ---- server half -------------------------------------------------------------------------------------------
    def init_server(self) -> None:
        self.round = 0

    sequential: ClassVar[bool] = False  # True: a download may depend on earlier uploads of the same round

    def observe_upload(self, upload: Dict[str, Any]) -> None:
        """Called after each participant's upload when ``sequential`` (before ``aggregate``); no-op by default."""

    def participants(self, round_idx: int, sampled: Sequence[int], num_clients: int) -> List[int]:
        """The round's participants given the shared schedule's sample (a parity flag may override it)."""
        return list(sampled)

    def begin_round(self, round_idx: int, selected: Sequence[int]) -> None:
        self.round = int(round_idx)

    def client_payload(self, client_id: int) -> Dict[str, Any]:
        return {"client_index": int(client_id), "round": self.round}

    def aggregate(self, uploads: List[Dict[str, Any]]) -> None:
        pass

    def eval_payload(self, client_id: int) -> Dict[str, Any]:
        return self.client_payload(client_id)

    def server_state(self) -> Dict[str, Any]:
        return {"round": self.round}

    def load_server_state(self, state: Dict[str, Any]) -> None:
        self.round = int(state["round"])

    # ---- client half -------------------------------------------------------------------------------------------
    def init_client_state(self, client_id: int) -> Dict[str, Any]:
        return {}

    def local_train(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> Dict[str, Any]:
        return {"client_index": payload["client_index"], "n": len(data)}

    def local_train_many(self, payloads: Sequence[Dict[str, Any]], states: Sequence[Dict[str, Any]],
                         datas: Sequence[FeatureSet]) -> List[Dict[str, Any]]:
        """All of a round's participants (the simulator's call); prompt methods may batch them (lockstep)."""
        return [self.local_train(p, st, d) for p, st, d in zip(payloads, states, datas)]

    def evaluate(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> EvalResult:
        raise NotImplementedError

    def before_eval(self, payloads: Dict[int, Dict[str, Any]], states: Dict[int, Dict[str, Any]]) -> None:
        """Called once per evaluation round with every client's eval payload and state (batching hook; no-op)."""


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
    def scorer(self):
        """Evaluation: text features encoded once, then a matmul per test chunk."""
        text = self.rt.cache.get(eval_text_key(self.ctx)) if self.rt.batch_eval_text else None
        text = self.text_features() if text is None else text
        return lambda batch: self.logits_with(text, batch)


class PromptAlgorithm(Algorithm):
    """PromptFL: the global CoOp prompt is FedAvg-averaged over participants by sample count."""

    name = "promptfl"
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

    def fit(self, model: nn.Module, payload: Dict[str, Any], data: FeatureSet) -> float:
        """E epochs of SGD for one client (``fit_clients`` with a single client); returns the mean training loss."""
        return fit_clients(self, [model], [payload], [data])[0]

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
        correct, loss_sum, preds = 0, 0.0, []
        for batch in data.chunks(self.rt.eval_batch_size):
            logits = score(batch)
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            pred = logits.argmax(-1)
            correct += int((pred == batch.labels).sum())
            preds.append(pred.cpu())
        preds_t = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        return EvalResult(correct, len(data), loss_sum / max(1, len(data)), preds_t)
