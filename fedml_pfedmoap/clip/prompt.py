"""The CoOp text path on a frozen open_clip text tower (Zhou et al., IJCV 2022; docs/algorithms.md §Shared setting).

``TextEncoder`` tokenizes ``"X X ... X {name}."`` (or ``"X ... X {fixed} {name}."``) once per class list, keeps the
frozen SOT embedding (prefix) and the fixed-word/class-name/EOT/padding embeddings (suffix), and maps learnable
context tensors ``ctx`` of shape ``(..., n_ctx, W)`` to text features ``(..., C, D)``: prefix + ctx + suffix ->
+ positional -> causal transformer -> ln_final -> EOT token -> text_projection, exactly like ``encode_text``.

Exact fast path: the transformer is causal, so tokens after the EOT never influence it; every sequence is truncated to
``L* = max EOT position + 1`` across the classes (docs/performance.md). Several prompts (experts, FedOTP's pair)
are encoded in one batched call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .backbone import ClipBackbone, with_autocast
from .openclip import get_open_clip


def _is_causal(mask: Optional[torch.Tensor]) -> bool:
    if mask is None:
        return False
    upper = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
    return bool(torch.isinf(mask[upper]).all() and (mask[~upper] == 0).all())


class TextEncoder(nn.Module):
    """Frozen CoOp text path for one class list: ``features(ctx)`` and ``template_features(template)``."""

    autocast_dtype: Optional[torch.dtype] = None  # model_args.precision: bf16 -> autocast around the text tower

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], n_ctx: int = 16,
                 truncate: bool = True, fixed: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        model = backbone.model
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.n_ctx = int(n_ctx)
        self.fixed = fixed.strip()  # frozen words between the ctx and the name (part of the suffix)
        self.tokenizer = get_open_clip().get_tokenizer(backbone.name)
        self.truncate = bool(truncate) and _is_causal(getattr(model, "attn_mask", None))
        prompts = [" ".join(["X"] * self.n_ctx + ([self.fixed] if self.fixed else [])) + f" {name}."
                   for name in self.classnames]
        tokens = self.tokenizer(prompts)
        self.register_buffer("tokens", tokens, persistent=False)
        eot = tokens.argmax(dim=-1)
        if int(eot.min()) <= self.n_ctx:
            raise ValueError("a class prompt was truncated by the tokenizer's context length")
        self.register_buffer("eot", eot, persistent=False)
        self.length = int(eot.max()) + 1 if self.truncate else tokens.shape[1]
        with torch.no_grad():
            emb = model.token_embedding(tokens.to(model.token_embedding.weight.device))
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + self.n_ctx:self.length].clone(), persistent=False)
        self.register_buffer("x_ctx", emb[0, 1:1 + self.n_ctx].clone(), persistent=False)  # the "X" embeddings

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def ctx_shape(self) -> tuple[int, int]:
        return (self.n_ctx, self.backbone.text_width)

    @with_autocast
    def _run(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Sequence embeddings (N,L,W) -> projected EOT features (N,D); mirrors open_clip's ``encode_text``."""
        model = self.backbone.model
        length = x.shape[1]
        cast = model.transformer.get_cast_dtype() if hasattr(model.transformer, "get_cast_dtype") else x.dtype
        x = x.to(cast) + model.positional_embedding[:length].to(cast)
        mask = model.attn_mask
        mask = mask[:length, :length] if mask is not None else None
        compiled = self.__dict__.get("_compiled")
        transformer = compiled if compiled is not None else model.transformer
        if getattr(model.transformer, "batch_first", True):
            x = transformer(x, attn_mask=mask)
        else:  # pragma: no cover - sequence-first transformers
            x = transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = model.text_projection
        if isinstance(proj, nn.Linear):
            return proj(x)
        return x @ proj if proj is not None else x

    def compile_transformer(self, **kwargs) -> None:
        """Opt-in ``torch.compile`` of the frozen text transformer (``model_args.compile_text``; off by default).

        Kept out of the module tree (no duplicate parameters); shapes vary with the number of prompts, so expect one
        compilation per distinct (prompts × classes, L*) shape."""
        object.__setattr__(self, "_compiled", torch.compile(self.backbone.model.transformer, **kwargs))

    def prompt_embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx (P, n_ctx, W) -> prompt embeddings (P*C, L*, W) with the class token at the end."""
        p, c = ctx.shape[0], self.num_classes
        ctx = ctx.to(self.prefix.dtype).unsqueeze(1).expand(p, c, *ctx.shape[1:])
        prefix = self.prefix.unsqueeze(0).expand(p, *self.prefix.shape)
        suffix = self.suffix.unsqueeze(0).expand(p, *self.suffix.shape)
        return torch.cat([prefix, ctx, suffix], dim=2).reshape(p * c, self.length, -1)

    def features(self, ctx: torch.Tensor) -> torch.Tensor:
        """Unnormalized text features: ctx (n_ctx,W) -> (C,D); ctx (*P, n_ctx, W) -> (*P, C, D)."""
        lead = ctx.shape[:-2]
        flat = ctx.reshape(-1, *ctx.shape[-2:])
        out = self._run(self.prompt_embeddings(flat), self.eot.repeat(flat.shape[0]))
        return out.reshape(*lead, self.num_classes, -1)

    @torch.no_grad()
    def template_features(self, templates: str | List[str]) -> torch.Tensor:
        """Hand-crafted prompts (zero-shot CLIP): mean of the normalized features over templates -> (C,D) normalized."""
        templates = [templates] if isinstance(templates, str) else list(templates)
        model = self.backbone.model
        feats = []
        for tpl in templates:
            tokens = self.tokenizer([tpl.format(c) for c in self.classnames]).to(self.tokens.device)
            eot = tokens.argmax(dim=-1)
            length = int(eot.max()) + 1 if self.truncate else tokens.shape[1]
            emb = model.token_embedding(tokens[:, :length])
            feats.append(nn.functional.normalize(self._run(emb, eot).float(), dim=-1))
        return nn.functional.normalize(torch.stack(feats).mean(0), dim=-1)
