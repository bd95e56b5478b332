"""From a resolved config to a ready simulator: backbone, dataset, partition, cached features, algorithm.

``build_experiment(cfg, algorithm, seed)`` is the single place where these pieces meet; the benchmark CLI, the FedML
entry point and the tests all go through it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .algorithms import get_algorithm
from .algorithms.base import Algorithm, Runtime
from .clip.backbone import ClipBackbone, load_clip
from .clip.prompt import TextEncoder
from .config import Config, ConfigError, check_ranges, resolve_pretrained
from .data.base import ImageDataset, build_dataset
from .data.partition import Partition, make_partition
from .data.transforms import cifar_legacy_transform, test_transform, train_transform
from .federated.features import FeatureCache, FeatureSet, LazyPatches, patch_cache_bytes, patch_token_shape
from .federated.simulator import ClientData, Simulator

logger = logging.getLogger(__name__)


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.device_args.device
    if want == "auto":
        want = "cuda" if (cfg.device_args.using_gpu and torch.cuda.is_available()) else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device_args.device={want!r} but no CUDA device is available")
    return torch.device(want)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def precision_dtype(cfg: Config) -> Optional[torch.dtype]:
    """model_args.precision -> the autocast dtype of the frozen towers (None: exact fp32)."""
    if cfg.model_args.precision not in PRECISIONS:
        raise ConfigError(f"model_args.precision: expected one of {sorted(PRECISIONS)}, "
                          f"got {cfg.model_args.precision!r}")
    return PRECISIONS[cfg.model_args.precision]


class Resources:
    """Process-wide memo of the expensive, frozen pieces (backbone, dataset, features) shared by grid cells."""

    def __init__(self) -> None:
        self.backbones: Dict[Tuple, ClipBackbone] = {}
        self.datasets: Dict[Tuple, ImageDataset] = {}
        self.features: Dict[Tuple, FeatureSet] = {}

    def backbone(self, cfg: Config, device: torch.device) -> ClipBackbone:
        m = cfg.model_args
        key = (m.model, m.pretrained, m.force_quick_gelu, str(device), m.precision)
        if key not in self.backbones:
            torch.manual_seed(0)  # random-init models (tests, perf) are then identical across processes
            self.backbones[key] = load_clip(m.model, resolve_pretrained(m.pretrained), device=device,
                                            force_quick_gelu=m.force_quick_gelu)
            self.backbones[key].autocast_dtype = precision_dtype(cfg)
        return self.backbones[key]

    def dataset(self, cfg: Config) -> ImageDataset:
        d = cfg.data_args
        key = (d.dataset, d.data_root, d.layout, tuple(sorted(d.dataset_options.items())))
        if key not in self.datasets:
            opts = dict(d.dataset_options)
            if d.layout != "auto":
                opts["layout"] = d.layout
            self.datasets[key] = build_dataset(d.dataset, d.data_root, **opts)
        return self.datasets[key]

    def split_features(self, cfg: Config, backbone: ClipBackbone, ds: ImageDataset, split: str, patches: bool,
                       device: torch.device, lazy_patches: bool = False) -> FeatureSet:
        """Cached features of a split; ``lazy_patches``: pooled features cached, patch tokens encoded on the fly."""
        size = backbone.image_size
        if split == "train" and cfg.data_args.train_augment != "none":  # online / bank:M (federated/augment.py)
            from .federated.augment import augmented_train_features

            return augmented_train_features(self, cfg, backbone, ds, patches or lazy_patches, device)
        if cfg.data_args.cifar_transform == "legacy":  # D11 parity, both splits (validated in build_experiment)
            fn, desc = cifar_legacy_transform(cfg.data_args.dataset, size)
        elif split == "train":
            fn, desc = train_transform(cfg.data_args.train_augment, size, backbone.image_mean, backbone.image_std)
        else:
            fn, desc = test_transform(size, backbone.image_mean, backbone.image_std)
        key = (backbone.identity, ds.fingerprint(), split, desc, patches)
        if key not in self.features:
            cache = FeatureCache(Path(cfg.common_args.cache_dir) / "features")
            fs = cache.load_or_encode(backbone, ds.fingerprint(), split, getattr(ds, split), fn, desc,
                                      patches=patches, device=device)
            self.features[key] = fs.to(device)
        if lazy_patches:
            fs = self.features[key]
            return FeatureSet(fs.feats, fs.labels, LazyPatches(backbone, getattr(ds, split), fn, device=device))
        return self.features[key]


@dataclass
class Experiment:
    cfg: Config
    algorithm_name: str
    seed: int
    dataset: ImageDataset
    partition: Partition
    algorithm: Algorithm
    simulator: Simulator


def check_cifar_transform(cfg: Config) -> None:
    """``data_args.cifar_transform``: clip (default, the fix of D11) | legacy (CIFAR-10/100 only, no augmentation)."""
    d = cfg.data_args
    if d.cifar_transform not in ("clip", "legacy"):
        raise ConfigError(f"data_args.cifar_transform: expected 'clip' or 'legacy', got {d.cifar_transform!r}")
    if d.cifar_transform == "legacy" and (d.dataset not in ("cifar10", "cifar100") or d.train_augment != "none"):
        raise ConfigError("data_args.cifar_transform: 'legacy' reproduces the reference's CIFAR-10/100 transform "
                          f"(no augmentation); got dataset {d.dataset!r} with train_augment {d.train_augment!r}")


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
    precision_dtype(cfg)
    seed = cfg.common_args.random_seed if seed is None else int(seed)
    t = cfg.train_args
    if t.client_num_per_round > t.client_num_in_total or t.client_num_per_round < 1:
        raise ConfigError("train_args.client_num_per_round must be in [1, client_num_in_total]")
    check_cifar_transform(cfg)
    check_ranges(cfg)
    if cfg.device_args.num_threads:
        torch.set_num_threads(int(cfg.device_args.num_threads))
    device = resolve_device(cfg)
    ds = res.dataset(cfg)
    d = cfg.data_args
    part = make_partition(ds, d.partition_method, t.client_num_in_total, cfg.common_args.data_seed,
                          out_dir=Path(cfg.common_args.cache_dir) / "partitions",
                          **_partition_params(cfg))
    backbone = res.backbone(cfg, device)
    patches = bool(getattr(algo_cls, "needs_patches", False))
    lazy = patches and _patches_over_budget(algo_cls.parse_params(params), backbone, ds, device)
    train_fs = res.split_features(cfg, backbone, ds, "train", patches and not lazy, device, lazy_patches=lazy)
    test_fs = res.split_features(cfg, backbone, ds, "test", patches and not lazy, device, lazy_patches=lazy)
    text_key = ("text", backbone.identity, tuple(ds.classnames), cfg.model_args.n_ctx, cfg.model_args.truncate_text,
                cfg.model_args.compile_text)
    if text_key not in res.features:
        res.features[text_key] = TextEncoder(backbone, ds.classnames, cfg.model_args.n_ctx,
                                             truncate=cfg.model_args.truncate_text).to(device)
        res.features[text_key].autocast_dtype = precision_dtype(cfg)
        if cfg.model_args.compile_text:
            res.features[text_key].compile_transformer()
    rt = Runtime(backbone=backbone, text=res.features[text_key], num_clients=t.client_num_in_total, seed=seed,
                 local_epochs=t.epochs, batch_size=t.batch_size, template=ds.template, device=device,
                 eval_batch_size=t.eval_batch_size, rounds=t.comm_round,
                 batch_eval_text=t.batch_eval_text, train_clients_per_call=t.train_clients_per_call)
    algo = algo_cls(rt, params)
    clients = [ClientData(train_fs.subset(part.train[i]), test_fs.subset(part.test[i]))
               for i in range(t.client_num_in_total)]
    frac = t.client_num_per_round / t.client_num_in_total
    sim = Simulator(algo, clients, rounds=t.comm_round, frac=frac, seed=seed, eval_every=t.eval_every,
                    progress=progress)
    return Experiment(cfg, name, seed, ds, part, algo, sim)


def _patches_over_budget(hp: Any, backbone: ClipBackbone, ds: ImageDataset, device: torch.device) -> bool:
    """True when the algorithm's ``patch_cache_gb`` budget (None: unlimited) is below N×M×D×4 bytes (train+test)."""
    budget = getattr(hp, "patch_cache_gb", None)
    if budget is None:
        return False
    m, d = patch_token_shape(backbone, device)
    need = patch_cache_bytes(len(ds.train) + len(ds.test), m, d)
    if need <= budget * 2**30:
        return False
    logger.info("patch tokens need %.2f GB > patch_cache_gb=%s: encoding them on the fly", need / 2**30, budget)
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


def list_partition_methods() -> List[str]:
    from .data.partition import PARTITIONERS

    return PARTITIONERS.names()
