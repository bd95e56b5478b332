"""Frozen ViT towers split at a block: the residual stream after the last unchanged block, and the rest run per step.

Methods that change the top of a frozen tower (pFedMMA's adapters in the upper blocks) need the lower blocks only
once per image: ``visual_stream`` returns the residual stream after block k (the tokens [L, W] that enter block
k+1), and ``visual_from_stream`` runs blocks k+1..depth (each through a caller-supplied block function, so adapters
can wrap them), then the stock pooling (ln_post, class token) and projection. Running both halves equals the full
``encode_image`` (docs/performance.md §Cached lower layers). The text tower is split the same way for a fixed input
(``text_stream`` / ``text_from_stream``). Only open_clip ``VisionTransformer`` towers can be split:
``require_vit`` rejects ResNet backbones naming the model.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .backbone import ClipBackbone
from .openclip import get_open_clip

BlockFn = Callable[[int, nn.Module, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def plain_block(index: int, block: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """A frozen block as it is (``index`` is the 0-based block number)."""
    return block(x, attn_mask=mask)


def require_vit(backbone: ClipBackbone, method: str) -> None:
    """One ``ConfigError`` naming the model when its image tower is not an open_clip VisionTransformer."""
    vis = backbone.model.visual
    if not (hasattr(vis, "transformer") and hasattr(vis, "_embeds") and hasattr(vis, "_pool")):
        raise ConfigError(f"algorithm {method}: model_args.model {backbone.name!r} has a {type(vis).__name__} image "
                          "tower; this method adapts transformer blocks and needs a ViT model (e.g. ViT-B-16)")


def visual_depth(backbone: ClipBackbone) -> int:
    return len(backbone.model.visual.transformer.resblocks)


def text_depth(backbone: ClipBackbone) -> int:
    return len(backbone.model.transformer.resblocks)


def _blocks(transformer: nn.Module, x: torch.Tensor, start: int, stop: int, mask: Optional[torch.Tensor],
            block_fn: BlockFn) -> torch.Tensor:
    """Blocks start..stop-1 (0-based) of a batch-first residual stream x (N, L, W)."""
    seq_first = not getattr(transformer, "batch_first", True)
    if seq_first:  # pragma: no cover - sequence-first transformers
        x = x.transpose(0, 1)
    for i in range(start, stop):
        x = block_fn(i, transformer.resblocks[i], x, mask)
    return x.transpose(0, 1) if seq_first else x


def visual_stream(backbone: ClipBackbone, images: torch.Tensor, block: int) -> torch.Tensor:
    """The residual stream (B, L, W) after the first ``block`` visual blocks (0: the ln_pre output)."""
    vis = backbone.model.visual
    return _blocks(vis.transformer, vis._embeds(images), 0, block, None, plain_block)


def visual_from_stream(backbone: ClipBackbone, x: torch.Tensor, block: int,
                       block_fn: BlockFn = plain_block) -> torch.Tensor:
    """Blocks ``block``..depth-1 of the stream, then pooling and projection -> pooled features (B, D), unnormalized."""
    vis = backbone.model.visual
    x = _blocks(vis.transformer, x, block, visual_depth(backbone), None, block_fn)
    pooled, _ = vis._pool(x)
    return pooled @ vis.proj if vis.proj is not None else pooled


@functools.lru_cache(maxsize=64)
def _tokenize(model_name: str, prompts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = get_open_clip().get_tokenizer(model_name)(list(prompts))
    eot = tokens.argmax(dim=-1)
    return tokens[:, :int(eot.max()) + 1], eot


def text_tokens(backbone: ClipBackbone, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenized fixed prompts truncated after the longest EOT (exact for the causal text tower) and their EOTs
    (memoized per model name and prompt list: tokenizing is not part of either tower)."""
    tokens, eot = _tokenize(backbone.name, tuple(prompts))
    return tokens.clone(), eot.clone()


def _text_mask(backbone: ClipBackbone, length: int) -> Optional[torch.Tensor]:
    mask = backbone.model.attn_mask
    return mask[:length, :length] if mask is not None else None


def text_stream(backbone: ClipBackbone, tokens: torch.Tensor, block: int) -> torch.Tensor:
    """The text residual stream (C, L, W) after the first ``block`` text blocks for fixed token ids (C, L)."""
    model = backbone.model
    x = model.token_embedding(tokens) + model.positional_embedding[:tokens.shape[1]]
    return _blocks(model.transformer, x, 0, block, _text_mask(backbone, tokens.shape[1]), plain_block)


def text_from_stream(backbone: ClipBackbone, x: torch.Tensor, eot: torch.Tensor, block: int,
                     block_fn: BlockFn = plain_block) -> torch.Tensor:
    """Text blocks ``block``..depth-1, ln_final, the EOT token and the projection -> (C, D), unnormalized."""
    model = backbone.model
    x = _blocks(model.transformer, x, block, text_depth(backbone), _text_mask(backbone, x.shape[1]), block_fn)
    x = model.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    if isinstance(proj, nn.Linear):
        return proj(x)
    return x @ proj if proj is not None else x
