"""Image transforms (docs/data.md): CLIP normalization; deterministic test transform; train augmentation modes.

``train_augment``: ``none`` (the test transform, so cached features serve training too), ``online``
(RandomResizedCrop(size, scale 0.08–1, bicubic) + horizontal flip, encoded every step) and ``bank:M`` (M precomputed
augmented views per image, cached). The description string of a transform is part of the feature-cache key.
Images are converted to RGB by the dataset (grayscale replicated to three channels).
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the constants of the reference's code lineage for its CIFAR quirk (docs/data.md; confirm before claiming parity)
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def parse_augment(mode: str) -> Tuple[str, int]:
    """``none`` -> ("none", 0); ``online`` -> ("online", 0); ``bank:M`` -> ("bank", M) with M >= 1."""
    mode = str(mode).strip().lower()
    if mode in ("none", "online"):
        return mode, 0
    if mode.startswith("bank:"):
        try:
            m = int(mode.split(":", 1)[1])
        except ValueError:
            m = 0
        if m >= 1:
            return "bank", m
    raise ValueError(f"data_args.train_augment: expected none | online | bank:M (M >= 1 views), got {mode!r}")


def test_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
                   ) -> Tuple[Callable, str]:
    """Resize the short side to ``size`` (bicubic) -> center crop -> tensor -> normalize; returns (fn, description)."""
    fn = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(mean, std)])
    return fn, f"test:resize{size}-bicubic-center-crop:mean{tuple(mean)}:std{tuple(std)}"


def augment_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Callable:
    """CoOp/Dassl training augmentation: RandomResizedCrop(size, scale (0.08, 1), bicubic) + flip + normalize.

    Its randomness comes from torch's CPU RNG; callers draw it inside ``torch.random.fork_rng`` with a private seed.
    """
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def train_transform(mode: str, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
                    ) -> Tuple[Callable, str]:
    """The training transform for ``data_args.train_augment``."""
    kind, _ = parse_augment(mode)
    if kind == "none":
        return test_transform(size, mean, std)
    return augment_transform(size, mean, std), \
        f"train:{mode}:rrc{size}-0.08-1-bicubic-flip:mean{tuple(mean)}:std{tuple(std)}"


def cifar_legacy_transform(dataset: str, size: int) -> Tuple[Callable, str]:
    """The reference's CIFAR quirk (``cifar_transform: legacy``): to tensor -> normalize with CIFAR statistics ->
    resize to ``size`` applied to the normalized tensor; for train and test alike."""
    if dataset not in CIFAR_STATS:
        raise ValueError(f"cifar_legacy_transform: dataset must be cifar10 or cifar100, got {dataset!r}")
    mean, std = CIFAR_STATS[dataset]
    fn = T.Compose([T.ToTensor(), T.Normalize(mean, std), T.Resize((size, size), antialias=True)])
    return fn, f"cifar-legacy:{dataset}:normalize-then-resize{size}"

