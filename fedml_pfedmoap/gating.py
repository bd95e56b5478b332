"""pFedMoAP's per-client gating networks (Luo, Chen, Wu, ICLR 2025, arXiv 2410.10114, §4.2; docs/algorithms.md).

* ``pool_features``: the strided sub-sampling P(z) = z[..., ::r], r = D/d_g, of already L2-normalized features (no
  averaging, no re-normalization).
* ``AttentionGate``: 4 × Linear(d_g, d_g) with bias (W_q, W_k, W_v, W_o), 8 heads, scores 10·Q·Kᵀ (not 1/√d_h),
  softmax over the K+1 experts, output projection; no dropout, mask, layer norm or residual. Batched over classes:
  query (B,d_g) shared by all classes, keys = values (C,K+1,d_g). 4·(d_g² + d_g) parameters (66,048 at d_g = 128).
* ``LinearGate``: the Table 7 ablation "linear projection": softmax(Linear(d_g, num_experts)(P(Î))) gives per-image
  weights over the expert slots (local first, then the experts in the order sent: nearest first), mixing the pooled
  text features. Unlike attention it depends on the slot order and needs num_experts outputs.

Both return (T_MoE (C,B,d_g), head-averaged attention (C,B,K+1)) and are initialized like PyTorch's default ``Linear``
from a private generator (train seed, client index).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

DEFAULT_D_GATING = 128


def resolve_d_gating(embed_dim: int, d_gating: Optional[int]) -> int:
    """d_g: ``None`` -> min(128, D) (128 for RN50 and ViT-B/16, D for small test models); D must be a multiple."""
    d = min(DEFAULT_D_GATING, int(embed_dim)) if d_gating is None else int(d_gating)
    if d < 1 or d > embed_dim or embed_dim % d != 0:
        raise ValueError(f"algorithm_args.pfedmoap.d_gating={d_gating}: must divide the CLIP embedding dim "
                         f"D={embed_dim} (strided pooling z[..., ::D/d_g]); leave it unset for min(128, D)")
    return d


def pool_features(z: torch.Tensor, d_gating: int) -> torch.Tensor:
    """P(z) = z[..., ::D/d_g]: keep dims 0, r, 2r, ... of the (already normalized) last axis."""
    dim = z.shape[-1]
    if dim % d_gating != 0:
        raise ValueError(f"pooling: feature dim {dim} is not a multiple of d_gating {d_gating}")
    return z[..., :: dim // d_gating]


def _default_linear_init_(layer: nn.Linear, generator: Optional[torch.Generator]) -> None:
    """PyTorch's ``Linear.reset_parameters`` (U(±1/√fan_in) for weight and bias), drawn from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if layer.bias is not None:
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


class AttentionGate(nn.Module):
    """Multi-head attention gate of docs/algorithms.md (``uniform=True``: every expert weighted 1/(K+1), a diagnostic).

    Parameters
    ----------
    d : int
        Gating dimension d_g (128 in the paper).
    heads : int
        Number of heads (8); d must be divisible by it.
    scale : float
        Score multiplier (10, replicated from the released code: docs/algorithms.md, defect D8).
    generator : torch.Generator, optional
        Private generator for the default ``Linear`` init.
    uniform : bool
        Replace the attention weights by 1/(K+1) (ablation of the gate's selectivity).
    """

    def __init__(self, d: int, heads: int = 8, scale: float = 10.0, generator: Optional[torch.Generator] = None,
                 uniform: bool = False) -> None:
        super().__init__()
        if d % heads != 0:
            raise ValueError(f"gating dim {d} is not divisible by the number of heads {heads}")
        self.d, self.heads, self.scale, self.uniform = int(d), int(heads), float(scale), bool(uniform)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            _default_linear_init_(layer, generator)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """query (B,d) shared over classes, kv (C,E,d) -> (T_MoE (C,B,d), head-mean attention (C,B,E))."""
        b, c, e, h = query.shape[0], kv.shape[0], kv.shape[1], self.heads
        q = self.q_proj(query).view(b, h, -1)  # (B,h,dh)
        k = self.k_proj(kv).view(c, e, h, -1)  # (C,E,h,dh)
        v = self.v_proj(kv).view(c, e, h, -1)
        if self.uniform:
            attn = torch.full((c, b, h, e), 1.0 / e, dtype=v.dtype, device=v.device)
        else:
            attn = torch.softmax(self.scale * torch.einsum("bhx,cehx->cbhe", q, k), dim=-1)  # over experts
        mixed = torch.einsum("cbhe,cehx->cbhx", attn, v).reshape(c, b, self.d)
        return self.out_proj(mixed), attn.mean(dim=2)


class LinearGate(nn.Module):
    """Linear-projection gate (Table 7): w = softmax(W P(Î) + b)[:K+1], T_MoE[c,b] = Σ_e w[b,e]·P(T̂_e,c)."""

    def __init__(self, d: int, num_experts: int, generator: Optional[torch.Generator] = None,
                 uniform: bool = False) -> None:
        super().__init__()
        self.d, self.num_experts, self.uniform = int(d), int(num_experts), bool(uniform)
        self.proj = nn.Linear(d, num_experts)
        _default_linear_init_(self.proj, generator)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        c, e = kv.shape[0], kv.shape[1]
        if e > self.num_experts:
            raise ValueError(f"linear gate has {self.num_experts} expert slots but got {e} experts")
        if self.uniform:
            w = torch.full((query.shape[0], e), 1.0 / e, dtype=kv.dtype, device=kv.device)
        else:
            w = torch.softmax(self.proj(query)[:, :e], dim=-1)  # (B,E): only the slots that are filled
        return torch.einsum("be,ced->cbd", w, kv), w.unsqueeze(0).expand(c, -1, -1)


def build_gate(kind: str, d: int, num_experts: int, heads: int = 8, scale: float = 10.0,
               generator: Optional[torch.Generator] = None, uniform: bool = False) -> nn.Module:
    """``attention`` (default) or ``linear`` (Table 7 ablation)."""
    if kind == "attention":
        return AttentionGate(d, heads, scale, generator, uniform)
    if kind == "linear":
        return LinearGate(d, num_experts, generator, uniform)
    raise ValueError(f"algorithm_args.pfedmoap.gating: expected 'attention' or 'linear', got {kind!r}")


def moe_logits(img: torch.Tensor, local_text: torch.Tensor, experts: Optional[torch.Tensor], gate: Optional[nn.Module],
               scale: torch.Tensor, lam: float, d_gating: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """docs/algorithms.md §pFedMoAP on normalized features: λ·s·Î T̂Lᵀ + s·⟨P(Î), T_MoE⟩, or s·Î T̂Lᵀ without experts.

    img (B,D), local_text (C,D), experts (K,C,D) normalized and frozen; returns (logits (B,C), attention or None).
    """
    local = scale * img @ local_text.t()
    if gate is None or experts is None or experts.shape[0] == 0:
        return local, None
    q = pool_features(img, d_gating)  # (B,d)
    stack = torch.cat([local_text.unsqueeze(0), experts.to(local_text.dtype)], dim=0)  # (K+1,C,D), local first
    kv = pool_features(stack, d_gating).transpose(0, 1)  # (C,K+1,d)
    t_moe, attn = gate(q, kv)  # (C,B,d)
    moe = scale * torch.einsum("bd,cbd->bc", q, t_moe)
    return lam * local + moe, attn


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["AttentionGate", "LinearGate", "build_gate", "moe_logits", "pool_features", "resolve_d_gating",
           "num_parameters"]
