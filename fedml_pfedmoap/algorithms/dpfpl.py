"""DP-FPL (Tran et al., "Privacy-Preserving Personalized Federated Prompt Learning for Multimodal Large Language
Models", ICLR 2025; docs/algorithms.md §DP-FPL, docs/privacy.md §DP-FPL).

Each client has the global prompt g and a private local prompt L (both n_ctx × W). Before every training forward L
is refactorised with a fresh Gaussian sketch Ω (W × r): u = orth(L·Ω), v = orth(Lᵀ·u)ᵀ, R = L − u·v (R detached), and
the prompt is ctx = g + u·v + R (numerically g + L). With G = ∂ℓ/∂ctx autograd gives ∇g = G, ∇u = G·vᵀ, ∇v = uᵀ·G;
L itself gets the reconstructed gradient

    ∇L = (∇u/10)·v + u·(∇v/10) + u·uᵀ·(∇u/10)·v                                    (as released: "+", 1/10)

With ``dp`` on, every step first clips ∇g, ∇u and ∇v (each to Frobenius norm C = ``clip_grad``) and adds noise
drawn from the client's secret (``fedml_pfedmoap.privacy``): N(0, σ²) on ∇u and ∇v and N(0, σ²/K) on ∇g (K
participants; the mean of K such terms carries the authors' server noise N(0, (σ/K)²)), with the authors'
calibration σ = √(T·ln(1/δ))/ε · C/B (T rounds, B the batch size).

``sync: round`` (default; every engine): E local epochs of such steps on g and L, the trained g is uploaded and
averaged (an approximation of the authors' protocol). ``sync: per_batch`` (in-process simulator only): the authors'
lock-step federated SGD on g: at every step all participants' processed ∇g are averaged into ḡ and every client
steps g with ḡ; each epoch is truncated to the smallest participant's number of batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..federated.features import Batch, FeatureSet
from ..privacy import client_secret, clip_grad_, gaussian_noise
from ..privacy.mechanism import LOCAL_METRICS, RELEASES
from ..seeding import make_generator, normal_prompt
from .coop import CoOpModel
from .personal import PersonalParams, PersonalPromptAlgorithm
from .promptfl import fedavg
from .protocol import PromptParams, Runtime, register_algorithm

SYNC_MODES = ("round", "per_batch")
# DP-FPL's defaults for the shared `dp:` entry (the authors' δ and norm threshold); keys it does not use are rejected
DP_DEFAULTS = {"delta": 1e-5, "clip_grad": 10.0}
DP_UNUSED = ("clip_update", "accounting")


@dataclass
class DPFPLParams(PersonalParams):
    lr: float = 0.001
    rank: int = 8  # r of the factorisation u·v (the authors sweep {1, 2, 4, 8})
    sync: str = "round"  # round (shared loop, every engine) | per_batch (authors' lock-step FedSGD on g; simulator)
    uniform_avg: bool = False  # parity: unweighted mean of the clients' g (authors); default n-weighted

    def __post_init__(self) -> None:
        where = "algorithm_args.dpfpl"
        if isinstance(self.dp, Mapping) and self.dp:
            unused = sorted(k for k in DP_UNUSED if k in self.dp)
            if unused:
                raise ValueError(f"{where}.dp: key(s) {unused} are not used by DP-FPL (per-step clipping and noise "
                                 "with the authors' calibration; docs/privacy.md §DP-FPL)")
            self.dp = {**DP_DEFAULTS, **self.dp}
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{where}.rank: expected an integer >= 1, got {self.rank!r}")
        if self.sync not in SYNC_MODES:
            raise ValueError(f"{where}.sync: expected one of {list(SYNC_MODES)}, got {self.sync!r}")


def orthonormal_columns(m: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt of the columns of ``m`` (as the reduced QR with a positive diagonal of R)."""
    q, r = torch.linalg.qr(m)
    sign = torch.sign(torch.diagonal(r))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign)


def factorize(local: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, v, R) with u = orth(L·Ω) (n × r), v = orth(Lᵀ·u)ᵀ (r × W), R = L − u·v; L = u·v + R exactly."""
    u = orthonormal_columns(local @ omega)
    v = orthonormal_columns(local.t() @ u).t()
    return u, v, local - u @ v


def reconstruct_local_grad(u: torch.Tensor, v: torch.Tensor, grad_u: torch.Tensor, grad_v: torch.Tensor,
                           scale: float = 0.1) -> torch.Tensor:
    """∇L = (s∇u)·v + u·(s∇v) + u·uᵀ·(s∇u)·v with s = 1/10, the released code's reconstruction."""
    gu_v = (grad_u * scale) @ v
    return gu_v + u @ (grad_v * scale) + u @ (u.t() @ gu_v)


def authors_sigma(rounds: int, epsilon: float, delta: float, clip: float, batch_size: int) -> float:
    """σ = √(T·ln(1/δ))/ε · C/B (the released calibration; 0 when ε = inf)."""
    if math.isinf(epsilon):
        return 0.0
    return math.sqrt(rounds * math.log(1.0 / delta)) / epsilon * clip / batch_size


def joint_noise_multiplier(sigma: float, clip: float, participants: int) -> float:
    """z of one step's joint release (∇g with σ/√K, ∇u and ∇v with σ, each of sensitivity 2C): the composed Gaussian
    has 1/z² = Σ (Δ_i/σ_i)² = (2C/σ)²·(K + 2)."""
    return sigma / (2.0 * clip * math.sqrt(participants + 2))


class DPFPLModel(CoOpModel):
    """Training model: ``ctx`` is g, ``local_ctx`` L; ``u``, ``v`` are refactorised before every forward."""

    def __init__(self, rt: Runtime, ctx: torch.Tensor, hp: DPFPLParams, local_ctx: torch.Tensor) -> None:
        super().__init__(rt, ctx)
        self.hp = hp
        self.local_ctx = nn.Parameter(local_ctx.detach().clone().float().to(rt.device))
        n, w = self.local_ctx.shape
        self.u = nn.Parameter(torch.zeros(n, hp.rank, device=rt.device))
        self.v = nn.Parameter(torch.zeros(hp.rank, w, device=rt.device))
        self.register_buffer("residual", torch.zeros(n, w, device=rt.device))
        self.omega_gen: Optional[torch.Generator] = None
        self.step = 0
        self.noise: Optional[Dict[str, Any]] = None  # {secret, round, sigma, sigma_g, clip} when dp is on

    def param_groups(self, hp: PromptParams) -> List[Dict[str, Any]]:
        return [{"params": [self.ctx, self.local_ctx], "lr": hp.lr}]

    @torch.no_grad()
    def refactorize(self) -> None:
        if self.omega_gen is None:
            self.omega_gen = make_generator(self.rt.seed, "dpfpl-omega")
        w = self.local_ctx.shape[1]
        omega = torch.randn(w, self.hp.rank, generator=self.omega_gen).to(self.local_ctx.device)
        u, v, res = factorize(self.local_ctx.detach(), omega)
        self.u.copy_(u)
        self.v.copy_(v)
        self.residual.copy_(res)

    def train_prompts(self) -> torch.Tensor:
        self.refactorize()
        return (self.ctx + self.u @ self.v + self.residual).unsqueeze(0)

    def process_grads(self) -> None:
        """Clip ∇g, ∇u, ∇v; add the client's secret noise; set ∇L by the reconstruction (docs/algorithms.md)."""
        grads = {"g": self.ctx, "u": self.u, "v": self.v}
        for p in grads.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.noise is not None:
            nz = self.noise
            for name, p in grads.items():
                clip_grad_(p, nz["clip"])
                sigma = nz["sigma_g"] if name == "g" else nz["sigma"]
                if sigma > 0:
                    p.grad.add_(gaussian_noise(p.shape, sigma, nz["secret"], "dpfpl", nz["round"], self.step, name)
                                .to(p.grad.device))
        self.local_ctx.grad = reconstruct_local_grad(self.u.detach(), self.v.detach(), self.u.grad, self.v.grad)
        self.step += 1


@register_algorithm("dpfpl")
class DPFPL(PersonalPromptAlgorithm):
    """Global prompt g (uploaded, averaged), private L = u·v + R trained through the reconstructed gradient.

    Parameters (``algorithm_args.dpfpl``): ``rank`` 8, ``sync`` round | per_batch, ``uniform_avg`` false, SGD ``lr``
    0.001 with momentum 0.9 and weight decay 5e-4, ``dp`` {epsilon, delta: 1e-5, clip_grad: 10} (off by default).
    """

    Params = DPFPLParams
    model_cls = DPFPLModel
    local_keys = ("local_ctx",)

    def __init__(self, runtime: Runtime, params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(runtime, params)
        n_ctx = runtime.ctx_shape[0]
        if self.hp.rank > n_ctx:
            raise ValueError(f"algorithm_args.dpfpl.rank: expected 1 <= rank <= n_ctx = {n_ctx}, got {self.hp.rank}")
        if self.hp.dp is not None and not runtime.rounds:
            raise ValueError("algorithm_args.dpfpl.dp: the calibration needs the number of rounds T (Runtime.rounds)")

    def local_init(self) -> Dict[str, torch.Tensor]:
        return {"local_ctx": normal_prompt(self.rt.ctx_shape, self.rt.seed, "dpfpl-local-init")}

    # ---- server
    def begin_round(self, round_idx: int, selected: Sequence[int]) -> None:
        super().begin_round(round_idx, selected)
        self.num_participants = len(selected)

    def client_payload(self, client_id: int) -> Dict[str, Any]:
        return {**super().client_payload(client_id), "participants": int(getattr(self, "num_participants", 1))}

    def aggregate(self, uploads: List[Dict[str, Any]]) -> None:
        ups = [u for u in uploads if "prompt" in u]
        if ups:
            weights = [1.0] * len(ups) if self.hp.uniform_avg else [u["n"] for u in ups]
            self.global_prompt = fedavg([u["prompt"] for u in ups], weights)

    # ---- client
    @property
    def dp_mechanism(self) -> None:
        """DP-FPL privatizes every step itself (``DPFPLModel.process_grads``), not the round's upload."""
        return None

    def sigma(self) -> float:
        cfg = self.hp.dp
        return authors_sigma(int(self.rt.rounds), cfg.epsilon, cfg.delta, cfg.clip_grad, self.rt.batch_size)

    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any], train: bool) -> nn.Module:
        local = state.get("local_ctx", self._local_init()["local_ctx"])
        if not train:  # evaluation: the personalised prompt g + L (the refactorisation does not change it)
            return CoOpModel(self.rt, payload["global_prompt"].float() + local.float())
        model = super().build_model(payload, state, train)
        model.omega_gen = make_generator(self.rt.seed, "dpfpl-omega", payload["client_index"], payload["round"])
        cfg = self.hp.dp
        if cfg is not None:
            sigma, k = self.sigma(), max(1, int(payload.get("participants", 1)))
            model.noise = {"secret": client_secret(state), "round": payload["round"], "sigma": sigma,
                           "sigma_g": sigma / math.sqrt(k), "clip": cfg.clip_grad}
        return model

    def before_step(self, model: nn.Module) -> None:
        model.process_grads()

    def local_train(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> Dict[str, Any]:
        if self.hp.sync == "per_batch":
            raise ValueError("algorithm_args.dpfpl.sync: 'per_batch' synchronises g at every batch across all "
                             "participants and needs the in-process simulator; expected 'round' on this engine")
        return super().local_train(payload, state, data)

    def local_train_many(self, payloads: Sequence[Dict[str, Any]], states: Sequence[Dict[str, Any]],
                         datas: Sequence[FeatureSet]) -> List[Dict[str, Any]]:
        if self.hp.sync != "per_batch":
            return super().local_train_many(payloads, states, datas)
        models = [self.build_model(p, st, train=True) for p, st in zip(payloads, states)]
        losses, steps = fit_per_batch(self, models, payloads, datas)
        ups = []
        for model, loss, payload, state, data in zip(models, losses, payloads, states, datas):
            self.keep_state(model, payload, state)
            up = self.make_upload(model, payload, state, len(data))
            up["metrics"] = {**self.privatize_upload(up, payload, state, data, {"train_loss": loss},
                                                     steps=model.step), "dpfpl_sync_steps": float(steps)}
            ups.append(up)
        return ups

    def privatize_upload(self, up: Dict[str, Any], payload: Dict[str, Any], state: Dict[str, Any],
                         data: FeatureSet, clean: Dict[str, float], steps: Optional[int] = None) -> Dict[str, float]:
        """Without DP: the clean metrics and ‖g_i − g‖. With DP the upload is already private (every step was
        noised); the clean metrics go to the client's state and only public numbers are returned."""
        if self.hp.dp is None:
            return super().privatize_upload(up, payload, state, data, clean)
        if steps is None:
            epochs = self.hp.epochs if self.hp.epochs is not None else self.rt.local_epochs
            steps = epochs * data.num_batches(self.rt.batch_size)
        ref = payload["global_prompt"].float().cpu()
        state[RELEASES] = int(state.get(RELEASES, 0)) + int(steps)
        state[LOCAL_METRICS] = {**clean, "update_norm": float((up["prompt"].float() - ref).norm())}
        cfg, sigma, k = self.hp.dp, self.sigma(), max(1, int(payload.get("participants", 1)))
        return {"dp_sigma": sigma, "dp_sigma_global": sigma / math.sqrt(k),
                "dp_noise_multiplier": joint_noise_multiplier(sigma, cfg.clip_grad, k), "dp_delta": cfg.delta,
                "dp_clip_grad": cfg.clip_grad, "dp_accounting_releases": float(self.rt.rounds),
                "dp_release": float(state[RELEASES])}


def sync_stream(algo: DPFPL, payload: Dict[str, Any], data: FeatureSet, per_epoch: int) -> Iterator[Batch]:
    """E epochs of the client's shuffled batches (the shared stream's generator), each cut to ``per_epoch``."""
    gen = make_generator(algo.rt.seed, "batches", payload["client_index"], payload["round"])
    epochs = algo.hp.epochs if algo.hp.epochs is not None else algo.rt.local_epochs
    for _ in range(epochs):
        for j, batch in enumerate(data.batches(algo.rt.batch_size, gen)):
            if j < per_epoch:
                yield batch


def fit_per_batch(algo: DPFPL, models: Sequence[DPFPLModel], payloads: Sequence[Dict[str, Any]],
                  datas: Sequence[FeatureSet]) -> tuple[List[float], int]:
    """``sync: per_batch``: all participants step in lock-step; after each backward every client's ∇g, ∇u, ∇v are
    clipped and noised (``process_grads``), the processed ∇g are averaged (n-weighted, or uniform) into ḡ and every
    client steps g with ḡ and L with its own ∇L. Returns each client's mean loss and the number of steps."""
    hp, rt = algo.hp, algo.rt
    opts = [torch.optim.SGD(m.param_groups(hp), momentum=hp.momentum, weight_decay=hp.weight_decay) for m in models]
    per_epoch = min(d.num_batches(rt.batch_size) for d in datas)
    streams = [sync_stream(algo, p, d, per_epoch) for p, d in zip(payloads, datas)]
    w = torch.tensor([1.0 if hp.uniform_avg else float(len(d)) for d in datas], dtype=torch.float64)
    w = (w / w.sum()).tolist()
    group = max(1, int(rt.train_clients_per_call))
    totals, steps = [0.0] * len(models), 0
    for batches in zip(*streams):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        for s in range(0, len(models), group):  # text calls of `group` clients; the gradients are per client
            chunk = list(range(s, min(s + group, len(models))))
            feats = rt.text.features(torch.cat([models[i].train_prompts() for i in chunk])).split(1)
            losses = [models[i].loss_from(f, batches[i]) for i, f in zip(chunk, feats)]
            torch.stack(losses).sum().backward()
            for i, loss in zip(chunk, losses):
                totals[i] += float(loss.detach())
        for m in models:
            m.process_grads()
        g_bar = sum(wi * m.ctx.grad for wi, m in zip(w, models))
        for m, opt in zip(models, opts):
            m.ctx.grad = g_bar.clone()
            opt.step()
        steps += 1
    if any(not math.isfinite(t) for t in totals):
        raise FloatingPointError(f"{algo.name}: non-finite training loss in a per_batch round")
    return [t / max(1, steps) for t in totals], steps
