"""The algorithm protocol every engine calls (docs/architecture.md §Algorithm protocol).

An ``Algorithm`` has a server half and a client half that exchange plain-data dicts, named here as TypedDicts:

* server: ``init_server`` -> per round ``participants`` (hook on the shared schedule's sample), ``begin_round(t,
  selected)``, ``client_payload(i)`` (a ``ClientPayload``, may differ per client), ``aggregate(uploads)``,
  ``eval_payload(i)`` (an ``EvalPayload``); ``server_state``/``load_server_state`` for checkpoints;
* client: ``init_client_state(i)`` (a ``ClientState``, persisted by client index by the engine);
  ``local_train(payload, state, data) -> Upload`` (always carries ``client_index`` and ``n``);
  ``evaluate(payload, state, test) -> EvalResult``.

Engines never look at an algorithm's name; ``register_algorithm("x")`` registers a class and sets its ``name``.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, TypedDict, TypeVar

import torch

from ..clip.backbone import ClipBackbone
from ..clip.prompt import TextEncoder
from ..errors import ConfigError
from ..federated.features import FeatureSet
from ..privacy import DPConfig
from ..ranges import check_params
from ..registry import Registry


class ClientPayload(TypedDict, total=False):
    """A download (server -> client i for round t); ``client_index`` and ``round`` are always present."""

    client_index: int
    round: int
    global_prompt: torch.Tensor  # prompt methods: the global CoOp prompt (n_ctx, W)
    experts: torch.Tensor  # pFedMoAP: the downloaded expert prompts (K, n_ctx, W)
    expert_ids: List[int]
    expert_rounds: List[int]
    global_gate: Dict[str, torch.Tensor]  # pFedMoAP's gate_aggregation: fedavg ablation
    generator: Dict[str, torch.Tensor]  # FedTPG: the prompt generator's parameters
    shared: Dict[str, torch.Tensor]  # pFedMMA: the global shared projections


EvalPayload = ClientPayload  # the payload a client is evaluated with (same keys)


class UploadMetrics(TypedDict, total=False):
    """Per-client numbers reported with an upload, gathered by name by the round schedule (federated/schedule.py)."""

    train_loss: float
    update_norm: float
    dp_release: float  # DP: this client's release count so far (the busiest client's count is accounted)


class Upload(TypedDict, total=False):
    """What a client sends back after ``local_train``; ``client_index`` and ``n`` (train samples) always present."""

    client_index: int
    n: int
    prompt: torch.Tensor  # prompt methods: the trained (possibly privatized) global part
    gate: Dict[str, torch.Tensor]  # pFedMoAP's gate_aggregation: fedavg ablation
    generator: Dict[str, torch.Tensor]  # FedTPG
    shared: Dict[str, torch.Tensor]  # pFedMMA: the trained shared projections
    metrics: Dict[str, float]  # see UploadMetrics; never counted in bytes_up


class ClientState(TypedDict, total=False):
    """A client's private state, kept by client index across rounds (prompt methods add their own tensors)."""

    ctx: torch.Tensor  # pFedMoAP: the client's last prompt
    local_ctx: torch.Tensor  # personalized methods: the private prompt
    gate: Dict[str, torch.Tensor]
    moe_trained: bool
    momentum: List[torch.Tensor]  # FedTPG parity_persistent_client_optim
    adapters: Dict[str, torch.Tensor]  # pFedMMA: the private Down/Up adapters of both towers
    steps: int


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
    """One client's evaluation: correct predictions, test samples, mean cross-entropy."""

    correct: int
    total: int
    loss: float

    @property
    def acc(self) -> float:
        return self.correct / max(1, self.total)


def score_split(score: Callable[[Any], torch.Tensor], data: FeatureSet, batch_size: int) -> EvalResult:
    """Accuracy and mean cross-entropy of ``score(batch) -> logits`` over ``data`` in chunks of ``batch_size``."""
    correct, loss_sum = 0, 0.0
    for batch in data.chunks(batch_size):
        logits = score(batch)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        correct += int((logits.argmax(-1) == batch.labels).sum())
    return EvalResult(correct, len(data), loss_sum / max(1, len(data)))


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


class Algorithm(ABC):
    """Base class of every method; see the module docstring for the protocol."""

    name: ClassVar[str] = "base"  # set by register_algorithm
    Params: ClassVar[type] = PromptParams
    trains: ClassVar[bool] = True
    sequential: ClassVar[bool] = False  # True: a download may depend on earlier uploads of the same round

    def __init__(self, runtime: Runtime, params: Optional[Dict[str, Any]] = None) -> None:
        self.rt = runtime
        self.hp = self.parse_params(params or {})

    @classmethod
    def parse_params(cls, params: Dict[str, Any]) -> Any:
        valid = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ConfigError(f"algorithm_args.{cls.name}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls.Params(**check_params(f"algorithm_args.{cls.name}", params))

    # ---- server half -------------------------------------------------------------------------------------------
    def init_server(self) -> None:
        self.round = 0

    def observe_upload(self, upload: Upload) -> None:
        """Called after each participant's upload when ``sequential`` (before ``aggregate``); no-op by default."""

    def participants(self, round_idx: int, sampled: Sequence[int], num_clients: int) -> List[int]:
        """The round's participants given the shared schedule's sample (a parity flag may override it)."""
        return list(sampled)

    def begin_round(self, round_idx: int, selected: Sequence[int]) -> None:
        self.round = int(round_idx)

    def client_payload(self, client_id: int) -> ClientPayload:
        return {"client_index": int(client_id), "round": self.round}

    def aggregate(self, uploads: List[Upload]) -> None:
        """Update the server state from the round's delivered uploads; no-op by default."""

    def eval_payload(self, client_id: int) -> EvalPayload:
        return self.client_payload(client_id)

    def server_state(self) -> Dict[str, Any]:
        return {"round": self.round}

    def load_server_state(self, state: Dict[str, Any]) -> None:
        self.round = int(state["round"])

    # ---- client half -------------------------------------------------------------------------------------------
    def init_client_state(self, client_id: int) -> ClientState:
        return {}

    def local_train(self, payload: ClientPayload, state: ClientState, data: FeatureSet) -> Upload:
        return {"client_index": payload["client_index"], "n": len(data)}

    def local_train_many(self, payloads: Sequence[ClientPayload], states: Sequence[ClientState],
                         datas: Sequence[FeatureSet]) -> List[Upload]:
        """All of a round's participants (the simulator's call); prompt methods may batch them (lockstep)."""
        return [self.local_train(p, st, d) for p, st, d in zip(payloads, states, datas)]

    @abstractmethod
    def evaluate(self, payload: EvalPayload, state: ClientState, data: FeatureSet) -> EvalResult:
        """Client i's accuracy and loss on ``data`` (its own test split)."""

    def before_eval(self, payloads: Dict[int, EvalPayload], states: Dict[int, ClientState]) -> None:
        """Called once per evaluation round with every client's eval payload and state (batching hook; no-op)."""

    # ---- another label space (base-to-novel; docs/algorithms.md §Base-to-novel) ---------------------------------
    def text_over(self, text: TextEncoder) -> TextEncoder:
        """The run-level text path over ``text``'s class list (a method with its own encoders rebuilds it)."""
        return text

    @contextmanager
    def over_classes(self, text: TextEncoder) -> Iterator[None]:
        """Inside: every text path of this algorithm reads ``text``'s class names (the engine evaluates novel classes
        here). ``Runtime.text`` is swapped and ``Runtime.cache`` replaced by an empty one, so no tensor derived from
        the run's class list can be reused; both are restored on exit."""
        rt = self.rt
        saved = rt.text, rt.cache
        rt.text, rt.cache = self.text_over(text), {}
        try:
            yield
        finally:
            rt.text, rt.cache = saved


ALGORITHMS: Registry[type] = Registry("algorithm")
A = TypeVar("A", bound=type)


def register_algorithm(name: str) -> Callable[[A], A]:
    """Class decorator: register under ``name`` (case-insensitive) and set the class's ``name`` to it."""

    def deco(cls: A) -> A:
        cls.name = name
        return ALGORITHMS.register(name)(cls)

    return deco
