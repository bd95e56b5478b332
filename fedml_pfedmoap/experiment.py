"""From a resolved config to a ready simulator: backbone, dataset, partition, cached features, algorithm.

``build_experiment(cfg, algorithm, seed)`` is the single place where these pieces meet (pure composition; the config's
cross-field checks live in ``config.validate``); the benchmark CLI, the FedML entry point and the tests all go through
it (docs/architecture.md §Layers).
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar

import torch

from .algorithms import get_algorithm
from .algorithms.protocol import Algorithm, Runtime
from .clip.backbone import ClipBackbone, load_clip
from .clip.prompt import TextEncoder
from .config import Config, ConfigError, ModelArgs, resolve_pretrained, validate
from .data.base import ImageDataset, build_dataset
from .data.base2novel import Base2NovelSplit, LabelSpace, split_flip, split_label_id
from .data.partition import Partition, make_partition
from .data.transforms import cifar_legacy_transform, parse_augment, test_transform, train_transform
from .data.validation import validation_split
from .federated.augment import BankFeatureSet, OnlineFeatureSet, bank_views
from .federated.base2novel_eval import Base2NovelEval
from .federated.features import FeatureCache, FeatureSet, LazyPatches, patch_cache_bytes, patch_token_shape
from .federated.simulator import ClientData, Simulator

logger = logging.getLogger(__name__)
V = TypeVar("V")


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.device_args.device
    if want == "auto":
        want = "cuda" if (cfg.device_args.using_gpu and torch.cuda.is_available()) else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device_args.device={want!r} but no CUDA device is available")
    return torch.device(want)


AUTOCAST_DTYPES: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16}  # config.PRECISIONS


class BackboneKey(NamedTuple):
    model: str
    pretrained: Optional[str]
    force_quick_gelu: bool
    device: str
    precision: str


class DatasetKey(NamedTuple):
    dataset: str
    data_root: Optional[str]
    layout: str
    options: Tuple[Tuple[str, Any], ...]


class FeatureKey(NamedTuple):
    """One encoded split: backbone identity, dataset fingerprint, split, transform description, patch tokens (the
    residual stream after visual block ``stream_block`` when that is set)."""

    backbone: str
    dataset: str
    split: str
    transform: str
    patches: bool
    stream_block: Optional[int] = None


class TextKey(NamedTuple):
    backbone: str
    classnames: Tuple[str, ...]
    n_ctx: int
    truncate: bool
    compile: bool


def make_backbone(m: ModelArgs, device: torch.device) -> ClipBackbone:
    """The frozen CLIP of ``model_args`` with the towers' autocast dtype of ``model_args.precision`` (``load_clip``
    takes no precision argument, so it is set here, in this one factory)."""
    torch.manual_seed(0)  # random-init models (tests, perf) are then identical across processes
    backbone = load_clip(m.model, resolve_pretrained(m.pretrained), device=device, force_quick_gelu=m.force_quick_gelu)
    backbone.autocast_dtype = AUTOCAST_DTYPES[m.precision]
    return backbone


def make_text_encoder(m: ModelArgs, backbone: ClipBackbone, classnames: Any, device: torch.device) -> TextEncoder:
    """The CoOp text path of the dataset's class names, in ``model_args.precision`` (optionally compiled)."""
    text = TextEncoder(backbone, classnames, m.n_ctx, truncate=m.truncate_text).to(device)
    text.autocast_dtype = AUTOCAST_DTYPES[m.precision]
    if m.compile_text:
        text.compile_transformer()
    return text


class Resources:
    """Process-wide memo of the expensive, frozen pieces (backbone, dataset, features, text path) shared by grid
    cells; each memo is keyed by a small typed key (the experiment owns the cache keys)."""

    def __init__(self) -> None:
        self.backbones: Dict[BackboneKey, ClipBackbone] = {}
        self.datasets: Dict[DatasetKey, ImageDataset] = {}
        self.features: Dict[FeatureKey, FeatureSet] = {}
        self.texts: Dict[TextKey, TextEncoder] = {}

    @staticmethod
    def _memo(memo: Dict[Any, V], key: Any, make: Callable[[], V]) -> V:
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def backbone(self, cfg: Config, device: torch.device) -> ClipBackbone:
        m = cfg.model_args
        key = BackboneKey(m.model, m.pretrained, m.force_quick_gelu, str(device), m.precision)
        return self._memo(self.backbones, key, lambda: make_backbone(m, device))

    def dataset(self, cfg: Config) -> ImageDataset:
        d = cfg.data_args
        key = DatasetKey(d.dataset, d.data_root, d.layout, tuple(sorted(d.dataset_options.items())))
        opts = dict(d.dataset_options, **({"layout": d.layout} if d.layout != "auto" else {}))
        return self._memo(self.datasets, key, lambda: build_dataset(d.dataset, d.data_root, **opts))

    def text(self, cfg: Config, backbone: ClipBackbone, ds: ImageDataset, device: torch.device) -> TextEncoder:
        return self.text_of(cfg, backbone, ds.classnames, device)

    def text_of(self, cfg: Config, backbone: ClipBackbone, classnames: Any, device: torch.device) -> TextEncoder:
        """The memoised text path of one class list (the dataset's, or a base / novel half)."""
        m = cfg.model_args
        key = TextKey(backbone.identity, tuple(classnames), m.n_ctx, m.truncate_text, m.compile_text)
        return self._memo(self.texts, key, lambda: make_text_encoder(m, backbone, list(classnames), device))

    def encoded(self, cfg: Config, backbone: ClipBackbone, ds: ImageDataset, split: str, fn: Callable, desc: str,
                patches: bool, device: torch.device, stream_block: Optional[int] = None) -> FeatureSet:
        """A split encoded through ``fn`` (described by ``desc``): memo, then the on-disk feature cache."""
        cache = FeatureCache(Path(cfg.common_args.cache_dir) / "features")
        key = FeatureKey(backbone.identity, ds.fingerprint(), split, desc, patches, stream_block if patches else None)
        return self._memo(self.features, key, lambda: cache.load_or_encode(
            backbone, ds.fingerprint(), split, getattr(ds, split), fn, desc, patches=patches, device=device,
            stream_block=stream_block).to(device))

    def split_features(self, cfg: Config, backbone: ClipBackbone, ds: ImageDataset, split: str, patches: bool,
                       device: torch.device, lazy_patches: bool = False,
                       stream_block: Optional[int] = None) -> FeatureSet:
        """Cached features of a split; ``lazy_patches``: pooled features cached, patch tokens encoded on the fly;
        ``stream_block`` k: the tokens are the residual stream after visual block k (clip/towers.py)."""
        size = backbone.image_size
        if split == "train" and cfg.data_args.train_augment != "none":  # online / bank:M (federated/augment.py)
            return self.augmented_train(cfg, backbone, ds, patches or lazy_patches, device, stream_block)
        if cfg.data_args.cifar_transform == "legacy":  # D11 parity, both splits (config.check_cifar_transform)
            fn, desc = cifar_legacy_transform(cfg.data_args.dataset, size)
        elif split == "train":
            fn, desc = train_transform(cfg.data_args.train_augment, size, backbone.image_mean, backbone.image_std)
        else:
            fn, desc = test_transform(size, backbone.image_mean, backbone.image_std)
        fs = self.encoded(cfg, backbone, ds, split, fn, desc, patches, device, stream_block)
        if lazy_patches:
            return FeatureSet(fs.feats, fs.labels, LazyPatches(backbone, getattr(ds, split), fn, device=device,
                                                               stream_block=stream_block))
        return fs

    def augmented_train(self, cfg: Config, backbone: ClipBackbone, ds: ImageDataset, patches: bool,
                        device: torch.device, stream_block: Optional[int] = None) -> FeatureSet:
        """The train split under ``train_augment`` online / bank:M (docs/data.md §Preprocessing)."""
        kind, m = parse_augment(cfg.data_args.train_augment)
        size, mean, std = backbone.image_size, backbone.image_mean, backbone.image_std
        aug, desc = train_transform(cfg.data_args.train_augment, size, mean, std)
        clean_fn, clean_desc = test_transform(size, mean, std)
        clean = self.encoded(cfg, backbone, ds, "train", clean_fn, clean_desc, patches and kind == "bank", device,
                             stream_block)
        if kind == "online":
            online = OnlineFeatureSet(clean, ds.train, torch.arange(len(ds.train)), backbone, aug, patches, device,
                                      num_workers=cfg.data_args.num_workers)
            online.stream_block = stream_block
            return online

        def bank() -> FeatureSet:
            cache = FeatureCache(Path(cfg.common_args.cache_dir) / "features")
            views, view_patches = bank_views(cache, backbone, ds, aug, desc, m, patches, device,
                                             seed=cfg.common_args.data_seed, stream_block=stream_block)
            return BankFeatureSet(clean, views, view_patches).to(device)

        key = FeatureKey(backbone.identity, ds.fingerprint(), "train", desc, patches, stream_block if patches else None)
        return self._memo(self.features, key, bank)

    def clean_train(self, cfg: Config, backbone: ClipBackbone, ds: ImageDataset, patches: bool,
                    device: torch.device) -> FeatureSet:
        """The train split under the test transform (validation items when training views are augmented)."""
        fn, desc = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
        return self.encoded(cfg, backbone, ds, "train", fn, desc, patches, device)


@dataclass
class Experiment:
    cfg: Config
    algorithm_name: str
    seed: int
    dataset: ImageDataset
    partition: Partition
    algorithm: Algorithm
    simulator: Simulator


def build_experiment(cfg: Config, algorithm: Optional[str] = None, seed: Optional[int] = None,
                     resources: Optional[Resources] = None, progress: bool = True) -> Experiment:
    """Everything a run needs; fails before any training on a bad algorithm, model, dataset or partition."""
    res = resources or Resources()
    name = (algorithm or cfg.train_args.federated_optimizer).lower()
    algo_cls = get_algorithm(name)
    params = cfg.algo_params(name)
    family = getattr(algo_cls, "defaults_for", None)  # per-dataset defaults (e.g. FedPHA's), under the user's keys
    if family is not None:
        params = {**family(cfg.data_args.dataset), **params}
    algo_cls.parse_params(params)  # validate before any heavy work
    validate(cfg)
    seed = cfg.common_args.random_seed if seed is None else int(seed)
    t = cfg.train_args
    if cfg.device_args.num_threads:
        torch.set_num_threads(int(cfg.device_args.num_threads))
    device = resolve_device(cfg)
    ds = res.dataset(cfg)
    d = cfg.data_args
    b2n = None
    if d.protocol == "base2novel":
        b2n = _b2n_split(ds, cfg)
        part = _b2n_partition(b2n, cfg)
    else:
        part = make_partition(ds, d.partition_method, t.client_num_in_total, cfg.common_args.data_seed,
                              out_dir=Path(cfg.common_args.cache_dir) / "partitions",
                              **_partition_params(cfg))
    backbone = res.backbone(cfg, device)
    hp = algo_cls.parse_params(params)
    stream_for = getattr(algo_cls, "stream_block_for", None)  # methods that train the top of the image tower
    block = stream_for(backbone, hp) if stream_for is not None else None
    patches = bool(getattr(algo_cls, "needs_patches", False)) or block is not None
    lazy = patches and _patches_over_budget(hp, backbone, ds, device, block)
    train_fs = res.split_features(cfg, backbone, ds, "train", patches and not lazy, device, lazy, block)
    test_fs = res.split_features(cfg, backbone, ds, "test", patches and not lazy, device, lazy, block)
    run_text = res.text(cfg, backbone, ds, device) if b2n is None else res.text_of(cfg, backbone, b2n.base.names,
                                                                                   device)
    rt = Runtime(backbone=backbone, text=run_text, num_clients=t.client_num_in_total,
                 seed=seed, local_epochs=t.epochs, batch_size=t.batch_size, template=ds.template, device=device,
                 eval_batch_size=t.eval_batch_size, rounds=t.comm_round,
                 batch_eval_text=t.batch_eval_text, train_clients_per_call=t.train_clients_per_call)
    algo = algo_cls(rt, params)
    clients = client_data(cfg, part, ds, train_fs, test_fs,
                          lambda: res.clean_train(cfg, backbone, ds, patches and not lazy, device))
    frac = t.client_num_per_round / t.client_num_in_total
    b2n_eval = None if b2n is None else Base2NovelEval(
        _relabel(test_fs.subset(b2n.base_test), b2n.base), _relabel(test_fs.subset(b2n.novel_test), b2n.novel),
        res.text_of(cfg, backbone, b2n.novel.names, device), b2n.convention)
    if b2n is not None:  # every label in the base list's local indices (flip: sorted-name order)
        clients = [ClientData(_relabel(c.train, b2n.base), _relabel(c.test, b2n.base),
                              None if c.val is None else _relabel(c.val, b2n.base)) for c in clients]
    sim = Simulator(algo, clients, rounds=t.comm_round, frac=frac, seed=seed, eval_every=t.eval_every,
                    progress=progress, dropout=t.client_dropout, base2novel=b2n_eval)
    return Experiment(cfg, name, seed, ds, part, algo, sim)


def client_data(cfg: Config, part: Partition, ds: ImageDataset, train_fs: FeatureSet, test_fs: FeatureSet,
                clean_train: Callable[[], FeatureSet]) -> List[ClientData]:
    """Each client's train / test features; with ``data_args.val_fraction`` > 0 a validation split is held out of its
    training items (``data/validation.py``: the same items for every method) and scored on clean (un-augmented)
    features from ``clean_train``."""
    n = cfg.train_args.client_num_in_total
    frac = float(cfg.data_args.val_fraction)
    if frac <= 0:
        return [ClientData(train_fs.subset(part.train[i]), test_fs.subset(part.test[i])) for i in range(n)]
    kept, val = validation_split([part.train[i] for i in range(n)], ds.train.labels, cfg.common_args.data_seed,
                                 fraction=frac)
    clean = train_fs if cfg.data_args.train_augment == "none" else clean_train()
    return [ClientData(train_fs.subset(kept[i]), test_fs.subset(part.test[i]), clean.subset(val[i]))
            for i in range(n)]


def _patches_over_budget(hp: Any, backbone: ClipBackbone, ds: ImageDataset, device: torch.device,
                         stream_block: Optional[int] = None) -> bool:
    """True when the algorithm's ``patch_cache_gb`` (stream tokens: ``token_cache_gb``) budget (None: unlimited) is
    below N×M×D×4 bytes (train+test); the choice is logged either way for stream tokens."""
    key = "patch_cache_gb" if stream_block is None else "token_cache_gb"
    budget = getattr(hp, key, None)
    if budget is None:
        return False
    m, d = patch_token_shape(backbone, device, stream_block)
    need = patch_cache_bytes(len(ds.train) + len(ds.test), m, d)
    what = "patch tokens" if stream_block is None else f"residual stream after visual block {stream_block}"
    if need <= budget * 2**30:
        if stream_block is not None:
            logger.info("%s: %.3f GB <= %s=%s: cached (memory-mapped when large)", what, need / 2**30, key, budget)
        return False
    logger.info("%s needs %.2f GB > %s=%s: encoding on the fly", what, need / 2**30, key, budget)
    return True


def _partition_params(cfg: Config) -> Dict[str, Any]:
    d = cfg.data_args
    extra = dict(d.partition_options or {})
    if d.partition_method.endswith("pathological"):
        return {"shots": d.shots, **extra}
    if d.partition_method.endswith("domain_dirichlet"):
        return {"alpha": d.partition_alpha, "min_size": d.min_size, "clients_per_domain": d.clients_per_domain,
                **extra}
    return {"alpha": d.partition_alpha, "min_size": d.min_size, **extra}



# ---- base-to-novel composition (docs/data.md §Base-to-novel) ------------------------------------------------------
def _relabel(fs: FeatureSet, space: LabelSpace) -> FeatureSet:
    """``fs`` with its global label ids mapped to ``space``'s local indices (any label outside it is an error)."""
    out = copy.copy(fs)
    out.labels = torch.as_tensor(space.remap(fs.labels.cpu().numpy()), device=fs.labels.device)
    return out


def _b2n_split(ds: ImageDataset, cfg: Config) -> Base2NovelSplit:
    d, k, seed = cfg.data_args, cfg.train_args.client_num_in_total, cfg.common_args.data_seed
    if d.base2novel_convention == "flip":
        return split_flip(ds, k, seed, shots=d.shots, alpha=d.partition_alpha, min_size=d.min_size)
    return split_label_id(ds, k, seed, shots=d.shots, legacy=d.base2novel_legacy)


def _b2n_partition(split: Base2NovelSplit, cfg: Config) -> Partition:
    """The clients' train / Local test indices of a base-to-novel split as a ``Partition`` (content-hashed)."""
    d = cfg.data_args
    args = {"protocol": "base2novel", "convention": split.convention, "legacy": d.base2novel_legacy,
            "shots": d.shots, "clients": split.num_clients, "data_seed": cfg.common_args.data_seed}
    if split.convention == "flip":
        args.update(alpha=d.partition_alpha, min_size=d.min_size)
    h = hashlib.sha256(repr(sorted(args.items())).encode())
    for a in [*split.train, *split.local_test, split.base_test, split.novel_test]:
        h.update(a.astype("int64").tobytes() + b"|")
    return Partition(f"b2n-{h.hexdigest()[:12]}", args, list(split.train), list(split.local_test))
