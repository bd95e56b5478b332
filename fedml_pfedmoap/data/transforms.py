"""Image transforms (DATA.md §6): CLIP normalization; deterministic test transform; train augmentation modes.

``train_augment``: ``none`` (the test transform, so cached features serve training too), ``online``
(RandomResizedCrop(size, scale 0.08–1, bicubic) + horizontal flip, encoded every step) and ``bank:M`` (M precomputed
augmented views per image, cached). The description string of a transform is part of the feature-cache key.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
                   ) -> Tuple[Callable, str]:
    """Resize the short side to ``size`` (bicubic) -> center crop -> tensor -> normalize; returns (fn, description)."""
    fn = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(mean, std)])
    return fn, f"test:resize{size}-bicubic-center-crop:mean{tuple(mean)}:std{tuple(std)}"


def train_transform(mode: str, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
                    ) -> Tuple[Callable, str]:
    """The training transform for ``data_args.train_augment``."""
    if mode == "none":
        return test_transform(size, mean, std)
    if mode == "online" or mode.startswith("bank:"):
        fn = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        return fn, f"train:{mode}:rrc{size}-0.08-1-bicubic-flip:mean{tuple(mean)}:std{tuple(std)}"
    raise ValueError(f"data_args.train_augment: expected none | online | bank:M, got {mode!r}")
