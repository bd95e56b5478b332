"""The *naive* reference path of ``pfedmoap-bench perf``: what the released pFedMoAP/FedOTP code does per round.

The SAME algorithm modules run in both modes; only what they are handed differs (docs/performance.md; defect D14):

* ``RawImageSet`` — a ``FeatureSet`` holding raw uint8 images: every training step and every test batch runs the
  frozen image tower (normalize -> ``encode_image``), instead of reading cached features;
* ``TextEncoder(truncate=False)`` — full 77-token sequences instead of the causal truncation to ``L*``;
* ``NeverHitCache`` — the runtime cache never hits, so frozen derived tensors (expert text features, zero-shot text,
  FedPGP's initial features) are re-encoded whenever asked for (every expert download and every evaluation);
* ``naive_algorithm(cls)`` — a subclass whose evaluation model re-encodes all class prompts for every test batch
  (``model(batch)``) instead of ``CoOpModel.scorer`` (text encoded once per evaluation);
* ``RawImageSet.with_stream(k)`` — for methods that train the top of the image tower (pFedMMA): every batch runs
  the whole image tower from the pixels (visual blocks 1..k included) instead of reading the cached stream after
  block k, and ``NeverHitCache`` re-runs the lower text blocks over the fixed prompts every step.

It also holds the synthetic, deterministic benchmark data (random uint8 images, pathological one-class-per-client or
C/N-classes-per-client split) shared by both paths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from fedml_pfedmoap.algorithms.promptfl import PromptAlgorithm
from fedml_pfedmoap.algorithms.protocol import Algorithm
from fedml_pfedmoap.seeding import make_generator
from fedml_pfedmoap.clip.backbone import ClipBackbone
from fedml_pfedmoap.federated.features import Batch, FeatureSet, encode_images


class RawImageSet(FeatureSet):
    """A client split as raw uint8 images (N,3,H,W); ``batches``/``chunks`` encode every batch with the image tower."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, backbone: ClipBackbone,
                 patches: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"RawImageSet: expected uint8 images (N,3,H,W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError("RawImageSet: images and labels differ in length")
        self.images, self.labels, self.backbone, self.with_patches = images, labels.long(), backbone, bool(patches)
        self.feats = None  # never cached: see _take
        self.patches = None
        self.stream_block: Optional[int] = None  # set: batches carry the residual stream after this visual block

    def _take(self, idx: torch.Tensor) -> Batch:
        feats, patches = encode_raw(self.backbone, self.images[idx], self.with_patches, self.stream_block)
        return Batch(feats, self.labels[idx].to(feats.device), patches)

    def _like(self, images: torch.Tensor, labels: torch.Tensor, stream_block: Optional[int]) -> "RawImageSet":
        out = RawImageSet(images, labels, self.backbone, self.with_patches or stream_block is not None)
        out.stream_block = stream_block
        return out

    def with_stream(self, block: int) -> "RawImageSet":
        """The same images, each batch carrying the residual stream after visual ``block`` (computed per batch)."""
        return self._like(self.images, self.labels, int(block))

    def subset(self, idx: Sequence[int]) -> "RawImageSet":
        idx_t = torch.as_tensor(list(idx), dtype=torch.long)
        return self._like(self.images[idx_t], self.labels[idx_t], self.stream_block)

    def to(self, device: torch.device | str) -> "RawImageSet":
        return self._like(self.images.to(device), self.labels.to(device), self.stream_block)


def normalize_images(backbone: ClipBackbone, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> CLIP-normalized float, on the backbone's device (the per-step transform)."""
    dev = backbone.model.logit_scale.device
    x = images.to(dev).float().div_(255.0)
    mean = torch.tensor(backbone.image_mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(backbone.image_std, device=dev).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_raw(backbone: ClipBackbone, images: torch.Tensor, patches: bool = False,
               stream_block: Optional[int] = None):
    """The frozen image tower on raw images: pooled (B,D) and optionally patch tokens (B,M,D) or the stream."""
    return encode_images(backbone, normalize_images(backbone, images), patches, stream_block)


@torch.no_grad()
def encode_all(backbone: ClipBackbone, raw: RawImageSet, patches: bool, batch_size: int = 64,
               stream_block: Optional[int] = None) -> FeatureSet:
    """The optimized path's one-off feature extraction: every image once, in large batches."""
    feats: List[torch.Tensor] = []
    toks: List[torch.Tensor] = []
    for s in range(0, len(raw), batch_size):
        f, p = encode_raw(backbone, raw.images[s:s + batch_size], patches, stream_block)
        feats.append(f.float())
        if patches:
            toks.append(p.float())
    pooled = torch.cat(feats) if feats else torch.zeros(0, backbone.embed_dim)
    return FeatureSet(pooled, raw.labels.to(pooled.device), torch.cat(toks) if patches else None)


class NeverHitCache(dict):
    """A runtime cache that stores but never reports a hit: frozen derived tensors are recomputed on every request."""

    def __contains__(self, key: object) -> bool:
        return False

    def get(self, key: Any, default: Any = None) -> Any:
        return default

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self[key] = default
        return default


_NAIVE_CLASSES: Dict[type, type] = {}


def naive_algorithm(cls: type) -> type:
    """``cls`` with evaluation that re-encodes all class prompts per test batch (the released code's behaviour)."""
    if not issubclass(cls, PromptAlgorithm):
        return cls  # zero-shot: its text is a runtime-cache entry, re-encoded per evaluation by NeverHitCache
    if cls not in _NAIVE_CLASSES:
        def build_model(self, payload, state, train):  # noqa: ANN001 - same signature as PromptAlgorithm
            model = cls.build_model(self, payload, state, train)
            if not train:  # instance attribute shadows CoOpModel.scorer: forward (text re-encoded) per test batch
                object.__setattr__(model, "scorer", lambda: (lambda batch: model(batch)))
            return model

        _NAIVE_CLASSES[cls] = type(f"Naive{cls.__name__}", (cls,), {"build_model": build_model})
    return _NAIVE_CLASSES[cls]


@dataclass
class SyntheticData:
    """Deterministic benchmark data: class names, per-client raw train/test image sets (same images in both paths)."""

    classnames: List[str]
    train: List[RawImageSet]
    test: List[RawImageSet]

    @property
    def num_images(self) -> int:
        return sum(len(s) for s in self.train) + sum(len(s) for s in self.test)


def client_classes(num_classes: int, num_clients: int) -> List[List[int]]:
    """Pathological split: C ≥ N -> client i gets classes {i, i+N, ...}; C < N -> class i mod C."""
    if num_classes >= num_clients:
        return [list(range(i, num_classes, num_clients)) for i in range(num_clients)]
    return [[i % num_classes] for i in range(num_clients)]


def synthetic_data(backbone: ClipBackbone, num_classes: int, num_clients: int, shots: int, test_per_client: int,
                   patches: bool = False, seed: int = 0) -> SyntheticData:
    """Random uint8 images at the backbone's resolution; ``shots`` train and ``test_per_client`` test images per
    client, labels cycling over the client's classes; class names ``"object k"`` (two BPE tokens, like real names)."""
    if num_classes < 1 or num_clients < 1 or shots < 1 or test_per_client < 1:
        raise ValueError("perf: --classes, --clients, --shots and --test must be >= 1")
    size = backbone.image_size
    gen = make_generator(seed, "perf-images")
    names = [f"object {k}" for k in range(num_classes)]
    train, test = [], []
    for classes in client_classes(num_classes, num_clients):
        for n, out in ((shots, train), (test_per_client, test)):
            imgs = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
            labels = torch.tensor([classes[j % len(classes)] for j in range(n)], dtype=torch.long)
            out.append(RawImageSet(imgs, labels, backbone, patches))
    return SyntheticData(names, train, test)


def needs_patches(algos: Sequence[type]) -> bool:
    return any(bool(getattr(a, "needs_patches", False)) for a in algos)


def algorithm_params(name: str, experts: int) -> Optional[Dict[str, Any]]:
    """Per-algorithm overrides for the benchmark: pFedMoAP's ``num_experts`` counts the local one (K + 1)."""
    return {"num_experts": experts + 1} if name == "pfedmoap" else None


def is_prompt_algorithm(algo: Algorithm) -> bool:
    return isinstance(algo, PromptAlgorithm)
