"""Per-client views of frozen image features, and the on-disk feature cache (docs/performance.md).

The image tower is frozen, so with a deterministic transform each image is encoded once per experiment grid: features
are cached on disk under a key that hashes (model identity, dataset fingerprint, split, transform, patch tokens).
Algorithms only ever see ``FeatureSet`` batches: pooled features (B,D), optional patch tokens (B,M,D), labels (B,).
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..clip.backbone import ClipBackbone
from ..clip.towers import visual_from_stream, visual_stream
from ..data.base import SplitData
from ..fileio import atomic_write_npz, build_once

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    feats: torch.Tensor  # (B,D) pooled image features, unnormalized
    labels: torch.Tensor  # (B,)
    patches: Optional[torch.Tensor] = None  # (B,M,D) projected patch tokens, or (B,L,W) stream tokens (below)


class FeatureSet:
    """A client's split as tensors: ``batches`` for training, ``chunks`` for evaluation (no shuffle).

    ``patches`` holds projected patch tokens (FedOTP) or, for methods that train the top of the image tower
    (``stream_block`` k set when encoding), the residual stream after visual block k (``clip/towers.py``)."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, patches: Optional[torch.Tensor] = None) -> None:
        if len(feats) != len(labels):
            raise ValueError("features and labels differ in length")
        self.feats, self.labels, self.patches = feats, labels.long(), patches

    def __len__(self) -> int:
        return int(len(self.labels))

    def _take(self, idx: torch.Tensor) -> Batch:
        patches = self.patches[idx] if self.patches is not None else None
        return Batch(self.feats[idx], self.labels[idx], patches)

    def batches(self, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> Iterator[Batch]:
        """One shuffled epoch; ``drop_last`` only applies when the client has at least one full batch."""
        n = len(self)
        order = torch.randperm(n, generator=generator)
        stop = n - n % batch_size if (drop_last and n >= batch_size) else n
        for s in range(0, stop, batch_size):
            yield self._take(order[s:s + batch_size])

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        n = len(self)
        return n // batch_size if (drop_last and n >= batch_size) else -(-n // batch_size)

    def chunks(self, batch_size: int = 1024) -> Iterator[Batch]:
        for s in range(0, len(self), batch_size):
            yield self._take(torch.arange(s, min(s + batch_size, len(self))))

    def subset(self, idx: Sequence[int]) -> "FeatureSet":
        return FeatureSet(*self._astuple(torch.as_tensor(np.asarray(idx, dtype=np.int64))))

    def _astuple(self, idx: torch.Tensor):
        b = self._take(idx)
        return b.feats, b.labels, b.patches

    def to(self, device: torch.device | str) -> "FeatureSet":
        p = self.patches.to(device) if self.patches is not None else None
        return FeatureSet(self.feats.to(device), self.labels.to(device), p)


def cache_key(backbone: ClipBackbone, dataset_fp: str, split: str, transform_desc: str, patches: bool,
              stream_block: Optional[int] = None) -> str:
    ident = [backbone.identity, dataset_fp, split, transform_desc, bool(patches)]
    blob = json.dumps(ident if stream_block is None else ident + [f"stream-after-block:{int(stream_block)}"])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def encode_images(backbone: ClipBackbone, imgs: torch.Tensor, patches: bool = False,
                  stream_block: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pooled features and, if ``patches``, the projected patch tokens or (``stream_block`` k) the fp32 residual
    stream after visual block k."""
    if stream_block is None or not patches:
        return backbone.encode_image(imgs, patches=patches)
    stream = visual_stream(backbone, imgs.float(), int(stream_block))
    return visual_from_stream(backbone, stream, int(stream_block)), stream


@torch.no_grad()
def encode_split(backbone: ClipBackbone, split: SplitData, transform: Callable, patches: bool = False,
                 batch_size: int = 256, device: str | torch.device = "cpu", desc: str = "encode",
                 stream_block: Optional[int] = None) -> dict:
    """Run the frozen image tower over a whole split (tqdm progress)."""
    pooled, toks = [], []
    for s in tqdm(range(0, len(split), batch_size), desc=desc, leave=False, disable=len(split) < 2 * batch_size):
        imgs = torch.stack([transform(split.image(i)) for i in range(s, min(s + batch_size, len(split)))])
        f, p = encode_images(backbone, imgs.to(device), patches, stream_block)
        pooled.append(f.float().cpu())
        if patches:
            toks.append(p.float().cpu())
    out = {"feats": torch.cat(pooled).numpy() if pooled else np.zeros((0, backbone.embed_dim), np.float32),
           "labels": split.labels}
    if patches:
        out["patches"] = torch.cat(toks).numpy()
    return out


class FeatureCache:
    """Disk cache of frozen image features, one ``.npz`` per (model, dataset, split, transform, patches) key."""

    def __init__(self, root: str | Path | None, mmap_min_bytes: Optional[int] = 256 * 2**20) -> None:
        self.root = Path(root) if root else None
        self.hits = 0
        self.misses = 0
        self.mmap_min_bytes = mmap_min_bytes  # files at least this large are memory-mapped (None: never)
        self.mapped = 0

    def load_or_encode(self, backbone: ClipBackbone, dataset_fp: str, split_name: str, split: SplitData,
                       transform: Callable, transform_desc: str, patches: bool = False,
                       device: str | torch.device = "cpu", stream_block: Optional[int] = None) -> FeatureSet:
        """The split's features from the cache, else encoded and cached. One writer per key across processes
        (``fileio.build_once``): a second process asking for the same key waits for the first and reads its file."""
        key = cache_key(backbone, dataset_fp, split_name, transform_desc, patches, stream_block)

        def encode() -> FeatureSet:
            self.misses += 1
            arrays = encode_split(backbone, split, transform, patches=patches, device=device,
                                  desc=f"encode {split_name}", stream_block=stream_block)
            if self.root is not None:
                atomic_write_npz(self.root / f"{key}.npz", **arrays)
            return _to_featureset(arrays)

        if self.root is None:
            return encode()
        return build_once(self.root / f"{key}.npz", lambda: self._load(self.root / f"{key}.npz"), encode)

    def _load(self, path: Path) -> Optional[FeatureSet]:
        """The cached file as a FeatureSet (memory-mapped when large); None (and a warning) when unreadable."""
        try:
            if self.mmap_min_bytes is not None and path.stat().st_size >= self.mmap_min_bytes:
                arrays = mmap_npz(path)
                self.mapped += 1
            else:
                with np.load(path) as z:
                    arrays = {k: z[k] for k in z.files}
            self.hits += 1
            return _to_featureset(arrays)
        except (OSError, ValueError, KeyError) as err:
            logger.warning("feature cache %s unreadable (%s); re-encoding", path, err)
            return None


def mmap_npz(path: str | Path) -> dict:
    """Memory-map every member of an uncompressed ``.npz`` (what ``np.savez`` writes): same file format, no read-in.

    Each member is a stored (uncompressed) ``.npy``; its data starts after the zip local header and the ``.npy``
    header, so ``np.memmap`` can address it directly. Copy-on-write mode: pages are read on first touch.
    """
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"{path}: member {info.filename!r} is compressed or not .npy; cannot memory-map")
            fh.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", fh.read(4))
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            if int(np.prod(shape)) == 0:
                out[info.filename[:-4]] = np.zeros(shape, dtype=dtype)
                continue
            if dtype.hasobject:
                raise ValueError(f"{path}: member {info.filename!r} holds Python objects; cannot memory-map")
            out[info.filename[:-4]] = np.memmap(fh.name, dtype=dtype, mode="c", offset=fh.tell(), shape=shape,
                                                order="F" if fortran else "C")
    return out


def _to_featureset(arrays: dict) -> FeatureSet:
    patches = torch.from_numpy(np.asarray(arrays["patches"])) if "patches" in arrays else None
    return FeatureSet(torch.from_numpy(np.asarray(arrays["feats"])), torch.from_numpy(np.asarray(arrays["labels"])),
                      patches)


# ---- patch-token cache sizing and on-the-fly patch tokens (FedOTP; docs/algorithms.md; docs/performance.md) ------------

def patch_cache_bytes(num_images: int, num_patches: int, dim: int, bytes_per_value: int = 4) -> int:
    """Bytes to hold patch tokens for ``num_images`` images in memory: N × M × D × 4 (fp32).

    E.g. ViT-B/16 (M = 196, D = 512): ~401 KB per image; RN50 (M = 49, D = 1024): ~201 KB per image.
    """
    return int(num_images) * int(num_patches) * int(dim) * int(bytes_per_value)


@torch.no_grad()
def patch_token_shape(backbone: ClipBackbone, device: str | torch.device = "cpu",
                      stream_block: Optional[int] = None) -> tuple[int, int]:
    """(M, D) of the patch tokens (or (L, W) of the stream after ``stream_block``), found from one blank image."""
    x = torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=device)
    _, tokens = encode_images(backbone, x, True, stream_block)
    return int(tokens.shape[1]), int(tokens.shape[2])


class LazyPatches:
    """Patch tokens computed on the fly from images (used when the patch cache would exceed its memory budget).

    Indexing (a LongTensor or a slice) returns a view of the selected items; ``materialize()`` encodes them through
    the frozen image tower -> (B, M, D) fp32 on ``device``. Only consumers that call ``materialize`` (FedOTP) accept
    it as ``Batch.patches``; pooled features stay cached as usual.
    """

    def __init__(self, backbone: ClipBackbone, split: SplitData, transform: Callable,
                 indices: Optional[torch.Tensor] = None, device: str | torch.device = "cpu",
                 stream_block: Optional[int] = None) -> None:
        self.backbone, self.split, self.transform, self.device = backbone, split, transform, device
        self.indices = torch.arange(len(split)) if indices is None else indices.reshape(-1).cpu()
        self.stream_block = stream_block  # set: materialize the residual stream after this visual block

    def __len__(self) -> int:
        return int(len(self.indices))

    def __getitem__(self, idx) -> "LazyPatches":
        idx = idx.cpu() if isinstance(idx, torch.Tensor) else idx
        return LazyPatches(self.backbone, self.split, self.transform, self.indices[idx], self.device,
                           self.stream_block)

    def to(self, device: str | torch.device) -> "LazyPatches":
        return LazyPatches(self.backbone, self.split, self.transform, self.indices, device, self.stream_block)

    @torch.no_grad()
    def materialize(self) -> torch.Tensor:
        imgs = torch.stack([self.transform(self.split.image(int(i))) for i in self.indices.tolist()])
        _, tokens = encode_images(self.backbone, imgs.to(self.device), True, self.stream_block)
        return tokens.float()
