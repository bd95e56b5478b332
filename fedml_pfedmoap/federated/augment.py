"""Training features under image augmentation (docs/data.md §Preprocessing): ``train_augment: online`` and ``bank:M``.

With augmentation the frozen image tower no longer sees a fixed image, so training batches cannot come from one
cached feature matrix:

* ``OnlineFeatureSet`` re-encodes every training batch from its images through RandomResizedCrop + flip (CoOp's
  augmentation); the crops are drawn from a private seed taken from the batch generator, so a run is reproducible
  for a given training seed and the global RNG is never touched.
* ``BankFeatureSet`` precomputes M augmented views per image once (each view cached on disk like any feature split,
  the view index and its seed in the cache key) and draws one view per item per batch from the batch generator.

Both keep the clean (test-transform) features in ``feats``, so ``chunks``/``feats`` users still work; only
``batches`` (what local training iterates) sees augmented features. The experiment (``experiment.Resources``)
composes them and owns their memo keys; this module takes explicit inputs only.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from ..clip.backbone import ClipBackbone
from ..data.base import ImageDataset, SplitData
from .features import Batch, FeatureCache, FeatureSet, encode_images


def _order(n: int, batch_size: int, generator: torch.Generator, drop_last: bool) -> list:
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    return [order[s:s + batch_size] for s in range(0, stop, batch_size)]


def augment_images(split: SplitData, items: torch.Tensor, transform: Callable, idx: torch.Tensor,
                   seed: int) -> torch.Tensor:
    """Decode and augment the items at positions ``idx`` with crops drawn from ``seed`` (global RNG restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return torch.stack([transform(split.image(int(items[i]))) for i in idx.tolist()])


class _AugmentJobs(torch.utils.data.Dataset):
    """One item per training batch: (positions, seed) -> augmented image tensor; run by DataLoader workers."""

    def __init__(self, split: SplitData, items: torch.Tensor, transform: Callable, jobs: list) -> None:
        self.split, self.items, self.transform, self.jobs = split, items, transform, jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, k: int) -> torch.Tensor:
        idx, seed = self.jobs[k]
        return augment_images(self.split, self.items, self.transform, idx, seed)


class OnlineFeatureSet(FeatureSet):
    """A split whose training batches are encoded on the fly from freshly augmented images.

    ``num_workers > 0`` (``data_args.num_workers``): JPEG decoding and augmentation of the next batches run in that
    many DataLoader worker processes (pinned memory on CUDA, ``prefetch`` batches ahead per worker) while the image
    tower encodes the current one. Every batch's permutation and crop seed are drawn from the batch generator before
    the epoch starts, in the same order as the in-process path, so the batches are bit-identical for any worker count.
    ``stream_block`` k (set by the experiment for methods that train the top of the image tower): the batches carry
    the residual stream after visual block k instead of projected patch tokens.
    """

    stream_block: Optional[int] = None

    def __init__(self, clean: FeatureSet, split: SplitData, items: torch.Tensor, backbone: ClipBackbone,
                 transform: Callable, patches: bool, device: torch.device | str, num_workers: int = 0,
                 prefetch: int = 2) -> None:
        super().__init__(clean.feats, clean.labels, clean.patches)
        self.split, self.items, self.backbone = split, items.long().cpu(), backbone
        self.transform, self.want_patches, self.device = transform, bool(patches), device
        self.num_workers, self.prefetch = int(num_workers), int(prefetch)

    @torch.no_grad()
    def encode_images(self, imgs: torch.Tensor, idx: torch.Tensor) -> Batch:
        feats, toks = encode_images(self.backbone, imgs.to(self.device, non_blocking=True), self.want_patches,
                                    self.stream_block)
        return Batch(feats.float(), self.labels[idx.to(self.labels.device)],
                     toks.float() if toks is not None else None)

    def encode(self, idx: torch.Tensor, seed: int) -> Batch:
        """Augment and encode the items at positions ``idx`` with crops drawn from ``seed``."""
        return self.encode_images(augment_images(self.split, self.items, self.transform, idx, seed), idx)

    def batches(self, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> Iterator[Batch]:
        jobs = [(idx, int(torch.randint(0, 2**62, (1,), generator=generator)))
                for idx in _order(len(self), batch_size, generator, drop_last)]
        if self.num_workers <= 0 or len(jobs) <= 1:
            for idx, seed in jobs:
                yield self.encode(idx, seed)
            return
        loader = torch.utils.data.DataLoader(
            _AugmentJobs(self.split, self.items, self.transform, jobs), batch_size=None,
            num_workers=min(self.num_workers, len(jobs)), prefetch_factor=self.prefetch,
            pin_memory=torch.device(self.device).type == "cuda")
        for (idx, _), imgs in zip(jobs, loader):
            yield self.encode_images(imgs, idx)

    def _like(self, clean: FeatureSet, items: torch.Tensor, device: torch.device | str) -> "OnlineFeatureSet":
        out = OnlineFeatureSet(clean, self.split, items, self.backbone, self.transform, self.want_patches, device,
                               self.num_workers, self.prefetch)
        out.stream_block = self.stream_block
        return out

    def subset(self, idx: Sequence[int]) -> "OnlineFeatureSet":
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return self._like(FeatureSet(*self._astuple(t)), self.items[t], self.device)

    def to(self, device: torch.device | str) -> "OnlineFeatureSet":
        return self._like(FeatureSet.to(self, device), self.items, device)


class BankFeatureSet(FeatureSet):
    """A split with M cached augmented views per item; each batch item gets one view chosen by the generator."""

    def __init__(self, clean: FeatureSet, views: torch.Tensor, view_patches: Optional[torch.Tensor] = None) -> None:
        super().__init__(clean.feats, clean.labels, clean.patches)
        if views.dim() != 3 or views.shape[1] != len(clean):
            raise ValueError(f"bank views must be (M, N={len(clean)}, D), got {tuple(views.shape)}")
        self.views, self.view_patches = views, view_patches

    @property
    def num_views(self) -> int:
        return int(self.views.shape[0])

    def batches(self, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> Iterator[Batch]:
        for idx in _order(len(self), batch_size, generator, drop_last):
            pick = torch.randint(0, self.num_views, (len(idx),), generator=generator)
            dev = self.views.device
            v, i = pick.to(dev), idx.to(dev)
            patches = self.view_patches[v, i] if self.view_patches is not None else None
            yield Batch(self.views[v, i], self.labels[idx.to(self.labels.device)], patches)

    def subset(self, idx: Sequence[int]) -> "BankFeatureSet":
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        vp = self.view_patches[:, t] if self.view_patches is not None else None
        return BankFeatureSet(FeatureSet(*self._astuple(t)), self.views[:, t], vp)

    def to(self, device: torch.device | str) -> "BankFeatureSet":
        vp = self.view_patches.to(device) if self.view_patches is not None else None
        return BankFeatureSet(FeatureSet.to(self, device), self.views.to(device), vp)


def bank_views(cache: FeatureCache, backbone: ClipBackbone, ds: ImageDataset, transform: Callable, desc: str,
               num_views: int, patches: bool, device: torch.device | str, seed: int = 0,
               stream_block: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Encode (or load) ``num_views`` augmented views of the train split; view m draws its crops from seed (seed, m)."""
    feats, toks = [], []
    for m in range(num_views):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 1000003 + m)
            fs = cache.load_or_encode(backbone, ds.fingerprint(), "train", ds.train, transform,
                                      f"{desc}:view{m}:seed{seed}", patches=patches, device=device,
                                      stream_block=stream_block)
        feats.append(fs.feats)
        if patches:
            toks.append(fs.patches)
    return torch.stack(feats), (torch.stack(toks) if patches else None)

