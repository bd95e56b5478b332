"""pFedMMA (Ghiasvand et al., ICLR 2026): multimodal adapters in the upper blocks of both frozen CLIP towers; only the
per-layer shared projection is federated (docs/algorithms.md §pFedMMA).

In every adapted block l of tower m ∈ {text, visual}, with block input x and x' = x + Attn(LN1(x)):

    out = x' + MLP(LN2(x')) + s_a · Up_l^m(Sh_l(Down_l^m(LN1(x)))),
    Down^m = ReLU∘Linear(d_m→r),  Sh_l = ReLU∘Linear(r→r) (one module per layer, both towers),  Up^m = Linear(r→d_m)

The adapter's input passes GS(·, s_a) and its output GS(·, 1/s_a) (``grad_scale``: identity forward, gradient times
the factor backward), so the residual stream receives the true gradient and the adapter parameters 1/s_a times it.
The lower blocks are frozen and unchanged: training runs from the cached residual stream after the last unadapted
block of each tower (``clip/towers.py``). Only Sh is uploaded and FedAvg-averaged; Down/Up stay on the client.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.backbone import ClipBackbone
from ..clip.towers import (require_vit, text_depth, text_from_stream, text_stream, text_tokens, visual_depth,
                           visual_from_stream)
from ..federated.features import Batch, FeatureSet
from ..seeding import make_generator
from .promptfl import fedavg
from .protocol import Algorithm, EvalResult, PromptParams, Runtime, register_algorithm, score_split
from .training import fit_one


class GradScale(torch.autograd.Function):
    """Identity in the forward pass; the incoming gradient is multiplied by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return GradScale.apply(x, scale)


def adapted_start(depth: int, start: Optional[int]) -> int:
    """The first adapted block (1-indexed): ``adapter_start`` or round(depth/3) + 1 (5 of 12 at ViT-B/16; 2 of 2
    or 3 for the tiny/mini test models), so the lower third of the tower stays unchanged and is cached."""
    first = int(start) if start is not None else round(depth / 3) + 1
    if not 1 <= first <= depth:
        raise ValueError(f"algorithm_args.pfedmma.adapter_start: expected 1..{depth} (the tower depth), got {first}")
    return first


def _kaiming(out_f: int, in_f: int, gen: torch.Generator) -> nn.Linear:
    """Linear with kaiming-normal weights (fan_out, ReLU gain: std √(2/out)) and zero bias, from ``gen``."""
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) * math.sqrt(2.0 / out_f))
        lin.bias.zero_()
    return lin


class MMAAdapters(nn.Module):
    """Down/Up per adapted layer of each tower and one shared projection per layer position (top-aligned: position j
    is the j-th adapted block of each tower counted from its last block)."""

    def __init__(self, d_text: int, d_vis: int, n_text: int, n_vis: int, dim: int, gen: torch.Generator) -> None:
        super().__init__()
        self.shared = nn.ModuleList(nn.Sequential(_kaiming(dim, dim, gen), nn.ReLU()) for _ in range(max(n_text, n_vis)))
        self.text_down = nn.ModuleList(nn.Sequential(_kaiming(dim, d_text, gen), nn.ReLU()) for _ in range(n_text))
        self.text_up = nn.ModuleList(_kaiming(d_text, dim, gen) for _ in range(n_text))
        self.vis_down = nn.ModuleList(nn.Sequential(_kaiming(dim, d_vis, gen), nn.ReLU()) for _ in range(n_vis))
        self.vis_up = nn.ModuleList(_kaiming(d_vis, dim, gen) for _ in range(n_vis))

    def shared_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k.startswith("shared.")}

    def local_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not k.startswith("shared.")}


def adapter_block(block: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor], down: nn.Module, shared: nn.Module,
                  up: nn.Module, scale: float) -> torch.Tensor:
    """One frozen open_clip block with a parallel adapter branch from LN1(x) (module docstring)."""
    h = block.ln_1(x)
    x2 = x + block.ls_1(block.attention(q_x=h, attn_mask=mask))
    out = x2 + block.ls_2(block.mlp(block.ln_2(x2)))
    y = grad_scale(up(shared(down(grad_scale(h, scale)))), 1.0 / scale)
    return out + scale * y


class PFedMMAModel(nn.Module):
    """A client's adapters on the frozen towers, run from the cached streams after the unadapted blocks."""

    def __init__(self, rt: Runtime, hp: "PFedMMAParams", adapters: MMAAdapters) -> None:
        super().__init__()
        self.rt, self.hp, self.adapters = rt, hp, adapters.to(rt.device)
        bb = rt.backbone
        self.vis_start = adapted_start(visual_depth(bb), hp.adapter_start) - 1  # 0-based first adapted block
        self.text_start = adapted_start(text_depth(bb), hp.adapter_start) - 1
        self.vis_depth, self.text_depth = visual_depth(bb), text_depth(bb)

    def param_groups(self, hp: PromptParams) -> List[Dict[str, Any]]:
        return [{"params": list(self.adapters.parameters()), "lr": hp.lr}]

    def _block_fn(self, tower: str):
        a, depth = self.adapters, (self.vis_depth if tower == "vis" else self.text_depth)
        downs, ups = (a.vis_down, a.vis_up) if tower == "vis" else (a.text_down, a.text_up)
        start = self.vis_start if tower == "vis" else self.text_start

        def fn(i: int, block: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
            j = i - start
            return adapter_block(block, x, mask, downs[j], a.shared[depth - 1 - i], ups[j], self.hp.adapter_scale)

        return fn

    def image_features(self, tokens: Any) -> torch.Tensor:
        if hasattr(tokens, "materialize"):  # over the token_cache_gb budget: encoded on the fly (features.LazyPatches)
            tokens = tokens.materialize()
        return F.normalize(visual_from_stream(self.rt.backbone, tokens.float(), self.vis_start,
                                              self._block_fn("vis")), dim=-1)

    def text_features(self) -> torch.Tensor:
        stream, eot = text_input_stream(self.rt, self.hp.template, self.text_start)
        return F.normalize(text_from_stream(self.rt.backbone, stream, eot, self.text_start, self._block_fn("text")),
                           dim=-1)

    def logits(self, batch: Batch, text: torch.Tensor) -> torch.Tensor:
        return self.rt.logit_scale * self.image_features(batch.patches) @ text.t()

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch, self.text_features()), batch.labels)


@torch.no_grad()
def text_input_stream(rt: Runtime, template: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed prompts' text stream after ``block`` blocks (C, L*, W) and EOT indices, once per process."""
    names = tuple(rt.text.classnames)
    key = ("text-stream", rt.backbone.identity, names, template, int(block))
    if key not in rt.cache:
        tokens, eot = text_tokens(rt.backbone, [template.format(n) for n in names])
        rt.cache[key] = (text_stream(rt.backbone, tokens.to(rt.device), int(block)).float(), eot.to(rt.device))
    return rt.cache[key]


@dataclass
class PFedMMAParams(PromptParams):
    lr: float = 0.001
    epochs: Optional[int] = 1  # one local epoch per round (the authors' default)
    adapter_dim: int = 32  # r, the adapter bottleneck
    adapter_scale: float = 0.001  # s_a
    adapter_start: Optional[int] = None  # first adapted block (1-indexed); None: round(depth/3) + 1
    template: str = "a photo of a {}."  # the fixed text input
    token_cache_gb: Optional[float] = 16.0  # budget of the cached visual stream (train + test); above it: on the fly
    parity_stale_text_cache: bool = False  # released code: evaluation reuses the first evaluation's text features

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dp is not None:
            raise ValueError("algorithm_args.pfedmma.dp: differential privacy is not implemented for pFedMMA's "
                             "adapter uploads; remove the dp key")


@register_algorithm("pfedmma")
class PFedMMA(Algorithm):
    """Adapters in the upper blocks of both towers; the shared projections are FedAvg-averaged."""

    Params = PFedMMAParams

    @classmethod
    def stream_block_for(cls, backbone: ClipBackbone, hp: PFedMMAParams) -> int:
        """The number of unchanged visual blocks whose output stream the experiment caches (ResNet: an error)."""
        require_vit(backbone, cls.name)
        return adapted_start(visual_depth(backbone), hp.adapter_start) - 1

    def initial_adapters(self) -> MMAAdapters:
        """The common init of every client (kaiming normal from the private generator of the train seed)."""
        bb = self.rt.backbone
        require_vit(bb, self.name)
        nt = text_depth(bb) - adapted_start(text_depth(bb), self.hp.adapter_start) + 1
        nv = visual_depth(bb) - adapted_start(visual_depth(bb), self.hp.adapter_start) + 1
        vis_width = int(bb.model.visual.transformer.width)
        return MMAAdapters(bb.text_width, vis_width, nt, nv, self.hp.adapter_dim,
                           make_generator(self.rt.seed, "pfedmma-init"))

    # ---- server
    def init_server(self) -> None:
        super().init_server()
        self.shared = self.initial_adapters().shared_state()

    def client_payload(self, client_id: int) -> Dict[str, Any]:
        return {**super().client_payload(client_id), "shared": {k: v.clone() for k, v in self.shared.items()}}

    def aggregate(self, uploads: List[Dict[str, Any]]) -> None:
        ups = [u for u in uploads if "shared" in u]
        if ups:
            self.shared = {k: fedavg([u["shared"][k] for u in ups], [u["n"] for u in ups]) for k in self.shared}

    def server_state(self) -> Dict[str, Any]:
        return {**super().server_state(), "shared": {k: v.clone() for k, v in self.shared.items()}}

    def load_server_state(self, state: Dict[str, Any]) -> None:
        super().load_server_state(state)
        self.shared = {k: v.clone() for k, v in state["shared"].items()}

    # ---- client
    def init_client_state(self, client_id: int) -> Dict[str, Any]:
        return {"adapters": self.initial_adapters().local_state()}

    def build_model(self, payload: Dict[str, Any], state: Dict[str, Any]) -> PFedMMAModel:
        adapters = self.initial_adapters()
        adapters.load_state_dict({**state["adapters"], **payload["shared"]})
        return PFedMMAModel(self.rt, self.hp, adapters)

    def local_train(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> Dict[str, Any]:
        model = self.build_model(payload, state)
        loss = fit_one(self, model, payload, data)
        state["adapters"] = model.adapters.local_state()
        return {"client_index": payload["client_index"], "n": len(data), "shared": model.adapters.shared_state(),
                "metrics": {"train_loss": loss}}

    def eval_text(self, model: PFedMMAModel) -> torch.Tensor:
        """The client's own text features over ``rt.text``'s class names; ``parity_stale_text_cache``: the first
        evaluation's over the same class list, reused forever (a novel class list gets its own first evaluation)."""
        if not self.hp.parity_stale_text_cache:
            return model.text_features()
        stale: Dict[tuple, torch.Tensor] = self.__dict__.setdefault("_stale_text", {})
        names = tuple(self.rt.text.classnames)
        if names not in stale:
            stale[names] = model.text_features()
        return stale[names]

    @torch.no_grad()
    def eval_logits(self, payload: Dict[str, Any], state: Dict[str, Any], batch: Batch) -> torch.Tensor:
        """Evaluation logits of one batch (``pfedmoap-bench perf`` compares them across its two paths)."""
        model = self.build_model(payload, state)
        return model.logits(batch, self.eval_text(model))

    @torch.no_grad()
    def evaluate(self, payload: Dict[str, Any], state: Dict[str, Any], data: FeatureSet) -> EvalResult:
        model = self.build_model(payload, state)
        text = self.eval_text(model)
        return score_split(lambda batch: model.logits(batch, text), data, self.rt.eval_batch_size)
