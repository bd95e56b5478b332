"""FedTPG (Qiu et al., "Text-driven Prompt Generation for Vision-Language Models in Federated Learning", ICLR 2024;
docs/algorithms.md §FedTPG).

A prompt generator maps the class names of the evaluated label space to ONE class-agnostic CoOp context:

    E   = normalize(g_text(name_c)),  c = 1..C          (bare names, frozen, cached per class list)
    A   = MHA(LN_q(Q0), LN_kv(E), LN_kv(E))              (learnable queries Q0 ∈ R^{n_ctx×W}; no query residual)
    ctx = A + W2·GEGLU(W1·LN(A)),  GEGLU(z) = z_a ⊙ GELU(z_b) for the two halves of z

then logits = s·cos(Î, T̂(ctx)) and plain cross-entropy. The whole generator is uploaded and FedAvg-averaged; nothing
is kept locally (not personalized). ``FedTPGModel.context_for(names)`` builds the context of any class list, so a
trained generator can be scored on unseen classes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..seeding import make_generator, normal_prompt
from .coop import CoOpModel
from .promptfl import PromptAlgorithm, fedavg
from .protocol import PromptParams, Runtime, register_algorithm
from ..clip.prompt import TextEncoder
from .text_paths import EncoderCache, OwnEncoders

SCHEDULES = ("cosine", "constant")


@dataclass
class FedTPGParams(PromptParams):
    lr: float = 0.003
    weight_decay: float = 1e-5
    epochs: Optional[int] = 1  # one local epoch per round (the authors' 1 epoch at batch 200)
    n_ctx: int = 4  # generated context length (independent of model_args.n_ctx)
    heads: int = 4  # attention heads of the generator
    lr_schedule: str = "cosine"  # cosine over rounds (eta_min 0) | constant
    cosine_t_max: Optional[int] = None  # T_max of the cosine; None -> the run's rounds (the authors: 500 = rounds)
    parity_fp16_generator: bool = False  # generator parameters and SGD updates in fp16, no master weights
    parity_persistent_client_optim: bool = False  # per-client momentum and cosine step persist across rounds
    parity_uniform_avg: bool = False  # unweighted mean of the uploaded generators

    def __post_init__(self) -> None:
        super().__post_init__()
        where = "algorithm_args.fedtpg"
        if self.dp is not None:
            raise ValueError(f"{where}.dp: not supported (the uploaded generator has no DP mechanism; docs/privacy.md)")
        if self.n_ctx < 1 or self.heads < 1:
            raise ValueError(f"{where}: expected n_ctx >= 1 and heads >= 1, got {self.n_ctx}, {self.heads}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"{where}.lr_schedule: expected one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.cosine_t_max is not None and self.cosine_t_max < 1:
            raise ValueError(f"{where}.cosine_t_max: expected an integer >= 1 or null, got {self.cosine_t_max}")


def geglu(z: torch.Tensor) -> torch.Tensor:
    a, b = z.chunk(2, dim=-1)
    return a * F.gelu(b)


class PromptGenerator(nn.Module):
    """Learnable queries attending over the class-name embeddings, then a GEGLU feed-forward with residual."""

    def __init__(self, n_ctx: int, width: int, kv_dim: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"algorithm_args.fedtpg.heads: {heads} does not divide the text width {width}")
        self.query = nn.Parameter(torch.zeros(n_ctx, width))
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(kv_dim)
        self.attn = nn.MultiheadAttention(width, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.ln_ff = nn.LayerNorm(width)
        self.ff_in = nn.Linear(width, 8 * width)
        self.ff_out = nn.Linear(4 * width, width)

    def forward(self, names: torch.Tensor) -> torch.Tensor:
        """Class-name embeddings (C, D) -> context (n_ctx, W)."""
        kv = self.ln_kv(names.to(self.query.dtype)).unsqueeze(0)
        a = self.attn(self.ln_q(self.query).unsqueeze(0), kv, kv, need_weights=False)[0][0]
        return a + self.ff_out(geglu(self.ff_in(self.ln_ff(a))))


class FedTPGModel(CoOpModel):
    """CoOp with a generated context: ``ctx`` is the generator's output for the run's class list (a property)."""

    def __init__(self, algo: "FedTPG", generator: Dict[str, torch.Tensor], lr: float,
                 momentum: Optional[List[torch.Tensor]] = None) -> None:
        nn.Module.__init__(self)  # no ctx parameter: the context is generated
        self.algo, self.rt, self.lr = algo, algo.rt, float(lr)
        self.generator = algo.new_generator()
        self.generator.load_state_dict(generator)
        self.momentum = momentum
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def ctx(self) -> torch.Tensor:  # type: ignore[override]
        return self.context_for(None)

    def context_for(self, classnames: Optional[Sequence[str]]) -> torch.Tensor:
        """The generated context (n_ctx, W) for ``classnames`` (None: the run's class list)."""
        return self.generator(self.algo.name_embeddings(classnames))

    @torch.no_grad()
    def text_features_for(self, classnames: Sequence[str]) -> torch.Tensor:
        """Normalized text features (C', D) of any class list: its own context and its own CoOp prompts."""
        enc = self.algo.encoders.get(self.algo.hp.n_ctx, classnames)
        return F.normalize(enc.features(self.context_for(classnames)).float(), dim=-1)

    def param_groups(self, hp: PromptParams) -> List[Dict[str, Any]]:
        return [{"params": list(self.generator.parameters()), "lr": self.lr}]

    def attach_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """``parity_persistent_client_optim``: restore this client's momentum buffers into the round's SGD."""
        self.optimizer = opt
        if self.momentum is not None:
            for p, buf in zip(self.generator.parameters(), self.momentum):
                opt.state[p]["momentum_buffer"] = buf.detach().clone().to(p.device, p.dtype)


@register_algorithm("fedtpg")
class FedTPG(OwnEncoders, PromptAlgorithm):
    """The generator is downloaded, trained one local epoch, uploaded whole and averaged (sample-weighted by default).

    Parameters (``algorithm_args.fedtpg``): see ``FedTPGParams``; SGD lr 0.003 (cosine over rounds), momentum 0.9,
    weight decay 1e-5, n_ctx 4, 4 heads.
    """

    Params = FedTPGParams
    model_cls = FedTPGModel

    def __init__(self, runtime: Runtime, params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(runtime, params)
        self.encoders = EncoderCache(runtime)
        self.rt = dataclasses.replace(runtime, text=self.encoders.get(self.hp.n_ctx))

    def text_over(self, text: TextEncoder) -> TextEncoder:
        return self.encoders.get(self.hp.n_ctx, text.classnames)

    # ---- generator and class-name embeddings
    def new_generator(self) -> PromptGenerator:
        """Q0 ~ N(0, 0.02²); every other layer PyTorch's default init, from a private seed (global RNG untouched)."""
        bb = self.rt.backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(make_generator(self.rt.seed, "fedtpg-init").initial_seed())
            gen = PromptGenerator(self.hp.n_ctx, bb.text_width, bb.embed_dim, self.hp.heads)
        with torch.no_grad():
            gen.query.copy_(normal_prompt((self.hp.n_ctx, bb.text_width), self.rt.seed, "fedtpg-query-init"))
        gen = gen.to(self.rt.device)
        return gen.half() if self.hp.parity_fp16_generator else gen

    def name_embeddings(self, classnames: Optional[Sequence[str]] = None) -> torch.Tensor:
        """E = normalize(text tower(bare class name)) (C, D), frozen; cached per class list in ``Runtime.cache``."""
        enc = self.encoders.get(self.hp.n_ctx, classnames)
        key = ("fedtpg-names", tuple(enc.classnames))
        if key not in self.rt.cache:
            self.rt.cache[key] = enc.template_features("{}").to(self.rt.device)
        return self.rt.cache[key]

    def round_lr(self, payload: Dict[str, Any], state: Dict[str, Any]) -> float:
        """lr · (1 + cos(π·t/T))/2 at step t: the round (default) or the client's own participations (parity)."""
        if self.hp.lr_schedule == "constant":
            return float(self.hp.lr)
        t_max = self.hp.cosine_t_max or self.rt.rounds
        if not t_max:
            raise ValueError("algorithm_args.fedtpg.cosine_t_max: needed when the run's number of rounds is unknown")
        t = int(state.get("steps", 0)) if self.hp.parity_persistent_client_optim else int(payload["round"])
        return float(self.hp.lr) * 0.5 * (1.0 + math.cos(math.pi * t / t_max))

    # ---- server
    def init_server(self) -> None:
        self.round = 0
        self.generator = {k: v.detach().cpu().clone() for k, v in self.new_generator().state_dict().items()}

    def client_payload(self, client_id: int) -> Dict[str, Any]:
        return {"client_index": int(client_id), "round": self.round,
                "generator": {k: v.clone() for k, v in self.generator.items()}}

    def aggregate(self, uploads: List[Dict[str, Any]]) -> None:
        ups = [u for u in uploads if "generator" in u]
        if ups:
            weights = [1.0] * len(ups) if self.hp.parity_uniform_avg else [u["n"] for u in ups]
            self.generator = {k: fedavg([u["generator"][k] for u in ups], weights) for k in self.generator}

    def server_state(self) -> Dict[str, Any]:
        return {"round": self.round, "generator": {k: v.clone() for k, v in self.generator.items()}}

    def load_server_state(self, state: Dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.generator = {k: v.clone() for k, v in state["generator"].items()}

    # ---- client
    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> FedTPGModel:
        momentum = state.get("momentum") if self.hp.parity_persistent_client_optim else None
        return FedTPGModel(self, payload["generator"], self.round_lr(payload, state), momentum)

    def keep_state(self, model: nn.Module, payload: Dict[str, Any], state: Dict[str, Any]) -> None:
        """Parity only: the client's momentum buffers and scheduler step survive to its next participation."""
        if not self.hp.parity_persistent_client_optim or model.optimizer is None:
            return
        bufs = [model.optimizer.state.get(p, {}).get("momentum_buffer") for p in model.generator.parameters()]
        if all(b is not None for b in bufs):
            state["momentum"] = [b.detach().cpu().clone() for b in bufs]
        state["steps"] = int(state.get("steps", 0)) + 1

    def make_upload(self, model: nn.Module, payload: Dict[str, Any], state: Dict[str, Any], n: int) -> Dict[str, Any]:
        gen = {k: v.detach().cpu().clone() for k, v in model.generator.state_dict().items()}
        return {"client_index": payload["client_index"], "n": n, "generator": gen}
