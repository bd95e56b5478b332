"""Local SGD of one or several clients; several clients run in lockstep with their prompts in ONE text-tower call.

The only irreducible per-step work of prompt learning on a frozen CLIP is the text tower's forward and backward over
the C class prompts of the trainable prompt(s) (docs/performance.md). For one client that is a batch of P·C sequences,
too small to fill a GPU; ``Runtime.train_clients_per_call = k`` stacks the prompts of k clients into one batch of
k·P·C sequences. Clients are independent: each keeps its own model, optimizer (SGD, fresh per round), private batch
stream and DP clipping, and the summed loss Σ_i L_i has ∂/∂θ_i = ∂L_i/∂θ_i, so grouping changes only the floating-
point blocking of the batched matmuls (|Δ| ~ 1e-7 in fp32; ``tests/test_lockstep.py``). Clients with fewer batches
drop out of the group when their stream ends.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence

import torch
from torch import nn

from ..federated.features import Batch, FeatureSet
from ..privacy import GaussianUploadMechanism, clip_grad_
from ..seeding import make_generator
from .protocol import Runtime


class LocalTrainer(Protocol):
    """What local SGD needs from a prompt algorithm (``promptfl.PromptAlgorithm`` provides it)."""

    name: str
    rt: Runtime
    hp: Any

    @property
    def dp_mechanism(self) -> Optional[GaussianUploadMechanism]: ...

    def extra_loss(self, model: nn.Module, payload: Dict[str, Any]) -> Optional[torch.Tensor]: ...

    def before_step(self, model: nn.Module) -> None: ...


def batch_stream(algo: LocalTrainer, payload: Dict[str, Any], data: FeatureSet) -> Iterator[Batch]:
    """E epochs of shuffled mini-batches from the private generator of (train seed, client, round)."""
    gen = make_generator(algo.rt.seed, "batches", payload["client_index"], payload["round"])
    epochs = algo.hp.epochs if algo.hp.epochs is not None else algo.rt.local_epochs
    for _ in range(epochs):
        yield from data.batches(algo.rt.batch_size, gen)


def make_optimizer(model: nn.Module, hp: Any) -> torch.optim.Optimizer:
    """The round's SGD of one client; a model with ``attach_optimizer(opt)`` may restore or keep optimizer state
    (FedTPG's ``parity_persistent_client_optim``)."""
    opt = torch.optim.SGD(model.param_groups(hp), momentum=hp.momentum, weight_decay=hp.weight_decay)
    attach = getattr(model, "attach_optimizer", None)
    if attach is not None:
        attach(opt)
    return opt


def fit_clients(algo: LocalTrainer, models: Sequence[nn.Module], payloads: Sequence[Dict[str, Any]],
                datas: Sequence[FeatureSet]) -> List[float]:
    """SGD (momentum, weight decay; fresh optimizer per client and round) for every model in lockstep; returns each
    client's mean training loss. One text-tower call per step for all clients that still have a batch."""
    hp = algo.hp
    opts = [make_optimizer(m, hp) for m in models]
    streams = [batch_stream(algo, p, d) for p, d in zip(payloads, datas)]
    pending: List[Optional[Batch]] = [next(s, None) for s in streams]
    totals, steps = [0.0] * len(models), [0] * len(models)
    dp = algo.dp_mechanism
    while True:
        active = [i for i, b in enumerate(pending) if b is not None]
        if not active:
            break
        prompts = [models[i].train_prompts() for i in active]
        if len(active) == 1:
            feats = [algo.rt.text.features(prompts[0])]
        else:
            feats = list(algo.rt.text.features(torch.cat(prompts)).split([p.shape[0] for p in prompts]))
        losses = []
        for i, f in zip(active, feats):
            loss = models[i].loss_from(f, pending[i])
            extra = algo.extra_loss(models[i], payloads[i])
            losses.append(loss if extra is None else loss + extra)
        for i in active:
            opts[i].zero_grad(set_to_none=True)
        (losses[0] if len(losses) == 1 else torch.stack(losses).sum()).backward()
        for i, loss in zip(active, losses):
            if dp is not None:  # DP: per-step clip of each client's own prompt gradient to C_g
                clip_grad_(models[i].ctx, dp.cfg.clip_grad)
            algo.before_step(models[i])
            opts[i].step()
            totals[i] += float(loss.detach())
            steps[i] += 1
            pending[i] = next(streams[i], None)
    for i, total in enumerate(totals):
        if steps[i] and not math.isfinite(total):
            raise FloatingPointError(
                f"{algo.name}: non-finite training loss for client {payloads[i]['client_index']}")
    return [t / max(1, n) for t, n in zip(totals, steps)]


def fit_one(algo: LocalTrainer, model: nn.Module, payload: Dict[str, Any], data: FeatureSet) -> float:
    """SGD of one client whose model computes its own loss (``model.loss(batch)``: methods that train inside the
    towers, pFedMMA and FedMGP); same optimizer and batch stream as ``fit_clients``; returns the mean loss."""
    opt = make_optimizer(model, algo.hp)
    total, steps = 0.0, 0
    for batch in batch_stream(algo, payload, data):
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, steps = total + float(loss.detach()), steps + 1
    if steps and not math.isfinite(total):
        raise FloatingPointError(f"{algo.name}: non-finite training loss for client {payload['client_index']}")
    return total / max(1, steps)
