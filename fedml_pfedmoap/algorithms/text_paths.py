"""CoOp text paths other than the run's own: another context length or another class list (docs/algorithms.md
§FedTPG, §FedPHA).

``TextEncoder`` tokenizes ``"X … X {name}."`` once for ONE (class list, n_ctx); a method that needs prompts of several
lengths (FedPHA's per-client local prompts) or class lists (FedTPG on any evaluated label space) gets one encoder per
distinct pair from ``EncoderCache``, built like the run's encoder (same backbone, truncation and autocast) and kept
for the life of the algorithm object. ``MaxLengthEOTEncoder`` reproduces FedPHA's released-code EOT offset.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..clip.prompt import TextEncoder
from .protocol import Runtime


class MaxLengthEOTEncoder(TextEncoder):
    """Parity encoder (``parity_eot_maxlen``): every prompt, whatever its length n ≤ ``max_ctx``, is built from the
    tokenization with ``max_ctx`` placeholders: [SOT, ctx(n), suffix after max_ctx X's], zero-padded to the context
    length, and read at that tokenization's EOT index, i.e. (max_ctx − n) positions after its true EOT."""

    def __init__(self, backbone, classnames: Sequence[str], max_ctx: int, truncate: bool = True) -> None:
        super().__init__(backbone, classnames, n_ctx=max_ctx, truncate=False)  # keep the full suffix
        self.cut = bool(truncate)  # causal: positions after the (shifted) EOT never matter

    def prompt_embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        p, c, n = ctx.shape[0], self.num_classes, ctx.shape[-2]
        if n > self.n_ctx:
            raise ValueError(f"MaxLengthEOTEncoder: a prompt of {n} tokens exceeds the maximum {self.n_ctx}")
        ctx = ctx.to(self.prefix.dtype).unsqueeze(1).expand(p, c, *ctx.shape[1:])
        prefix = self.prefix.unsqueeze(0).expand(p, *self.prefix.shape)
        suffix = self.suffix.unsqueeze(0).expand(p, *self.suffix.shape)
        x = torch.cat([prefix, ctx, suffix], dim=2)
        x = F.pad(x, (0, 0, 0, self.length - x.shape[2]))  # the released code's pad_to_77 (zeros at the end)
        if self.cut:
            x = x[:, :, :int(self.eot.max()) + 1]
        return x.reshape(p * c, x.shape[2], -1)


class EncoderCache:
    """One ``TextEncoder`` per (n_ctx, class list), built like ``rt.text``; ``rt.text`` itself where it matches."""

    def __init__(self, rt: Runtime) -> None:
        self.base = rt.text
        self.device = rt.device
        self.names: Tuple[str, ...] = tuple(rt.text.classnames)  # the default class list (swapped by ``over``)
        self._items: Dict[Tuple, TextEncoder] = {}

    @contextmanager
    def over(self, classnames: Sequence[str]) -> Iterator[None]:
        """Inside: ``get(n, None)`` means ``classnames`` (an evaluation over another label space)."""
        saved, self.names = self.names, tuple(classnames)
        try:
            yield
        finally:
            self.names = saved

    def get(self, n_ctx: int, classnames: Optional[Sequence[str]] = None,
            max_eot_ctx: Optional[int] = None, fixed: str = "") -> TextEncoder:
        """The encoder of ``n_ctx``-token prompts over ``classnames`` (default: the run's); ``max_eot_ctx``: the
        parity encoder tokenized with that many placeholders instead (``MaxLengthEOTEncoder``); ``fixed``: frozen
        words between the ctx and each name (FedMGP's "of a")."""
        names = tuple(c.replace("_", " ") for c in (classnames if classnames is not None else self.names))
        if max_eot_ctx is not None and max_eot_ctx == n_ctx:
            max_eot_ctx = None  # the longest prompts are tokenized correctly either way
        fixed = fixed.strip()
        if max_eot_ctx is not None and fixed:
            raise ValueError("EncoderCache.get: fixed words are not supported with max_eot_ctx")
        if (max_eot_ctx is None and n_ctx == self.base.n_ctx and list(names) == list(self.base.classnames)
                and fixed == getattr(self.base, "fixed", "")):
            return self.base
        key = (int(n_ctx), names, max_eot_ctx, fixed)
        if key not in self._items:
            truncate = bool(getattr(self.base, "truncate", True))
            if max_eot_ctx is None:
                enc = TextEncoder(self.base.backbone, names, n_ctx=int(n_ctx), truncate=truncate, fixed=fixed)
            else:
                enc = MaxLengthEOTEncoder(self.base.backbone, names, int(max_eot_ctx), truncate=truncate)
            enc = enc.to(self.device)
            enc.autocast_dtype = getattr(self.base, "autocast_dtype", None)
            self._items[key] = enc
        return self._items[key]


class OwnEncoders:
    """Mixin of an algorithm whose text paths come from ``self.encoders`` (an ``EncoderCache``): evaluation over
    another class list also switches the cache's default class list."""

    encoders: EncoderCache

    @contextmanager
    def over_classes(self, text: TextEncoder) -> Iterator[None]:
        with self.encoders.over(text.classnames), super().over_classes(text):  # type: ignore[misc]
            yield
