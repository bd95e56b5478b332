"""A cell's identity (docs/benchmark.md §Cell identity): which config keys change a cell's numbers (RESULT keys, in its
hash) and which only say where and how it runs (RUN keys, logged as MLflow params only)."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Dict

from fedml_pfedmoap.config import PACKAGE_PREFIX, Config

# Every config key is either a RUN key (where files live, which device and how many threads or workers compute it,
# tracking, progress, bookkeeping, and execution strategies documented to give the same numbers) or a RESULT key.
# RUN keys stay out of a cell's identity (they are logged as MLflow params only), so moving the data, switching to CUDA
# or pointing at another cache still finds finished cells and resumes checkpoints. A key in neither list counts as a
# RESULT key (the safe side); docs/benchmark.md lists both.
RUN_KEYS = frozenset({
    "common_args.training_type", "common_args.run_name", "common_args.cache_dir", "common_args.output_dir",
    "common_args.scenario", "common_args.config_version",
    "data_args.data_root", "data_args.num_workers",
    "model_args.compile_text",
    "train_args.federated_optimizer",  # the cell's algorithm enters the identity on its own
    "train_args.eval_batch_size", "train_args.batch_eval_text", "train_args.train_clients_per_call",
    "device_args.using_gpu", "device_args.device", "device_args.num_threads", "device_args.worker_num",
    "device_args.gpu_id",
    "comm_args.backend", "comm_args.grpc_ipconfig_path", "comm_args.round_timeout_s", "comm_args.startup_timeout_s",
    "comm_args.state_dir",
    "tracking_args.enable_tracking", "tracking_args.enable_wandb", "tracking_args.mlflow_tracking_uri",
    "tracking_args.mlflow_experiment", "tracking_args.log_file_dir",
    "benchmark_args.name", "benchmark_args.datasets", "benchmark_args.splits", "benchmark_args.algorithms",
    "benchmark_args.seeds", "benchmark_args.overrides", "benchmark_args.algorithm_overrides", "benchmark_args.caution",
    "benchmark_args.sweep",
})
RESULT_KEYS = frozenset({
    "common_args.random_seed", "common_args.data_seed",
    "data_args.dataset", "data_args.layout", "data_args.partition_method", "data_args.shots",
    "data_args.partition_alpha", "data_args.min_size", "data_args.clients_per_domain", "data_args.train_augment",
    "data_args.cifar_transform", "data_args.dataset_options", "data_args.partition_options",
    "data_args.protocol", "data_args.base2novel_convention", "data_args.base2novel_legacy",
    "model_args.model", "model_args.pretrained", "model_args.n_ctx", "model_args.force_quick_gelu",
    "model_args.truncate_text", "model_args.precision",
    "train_args.client_num_in_total", "train_args.client_num_per_round", "train_args.comm_round",
    "train_args.epochs", "train_args.batch_size", "train_args.eval_every",
    "train_args.client_dropout", "data_args.val_fraction",
})  # plus the cell's algorithm and its own algorithm_args
# dataset_options entries that only say where files are (or check them): left out of the identity
RUN_DATASET_OPTIONS = frozenset({"image_root", "pickle_dir", "verify_md5"})
# values that may be file paths: only the file name enters the identity (moving the file keeps the cell)
PATH_VALUED = ("model_args.pretrained", "data_args.dataset_options.split_file")


def cell_setting(cfg: Config) -> Dict[str, Any]:
    """The result keys of a cell's config (``section.key -> value``): what paper matching and cautions look at. The
    cell hash covers them, so the grid's config describes a finished run of the same hash exactly."""
    return {k: v for k, v in cfg.flat().items() if k in RESULT_KEYS}


def _file_name(value: Any) -> Any:
    """A path-like string -> its file name; anything else (``openai``, ``package:x``, None) unchanged."""
    if isinstance(value, str) and not value.startswith(PACKAGE_PREFIX):
        return re.split(r"[\\/]", value.rstrip("\\/"))[-1] or value
    return value


def identity_items(cfg: Config, algorithm: str) -> Dict[str, Any]:
    """What a cell's hash covers: the result keys that differ from the defaults (a new key with a behaviour-preserving
    default leaves every finished cell intact), file names instead of paths, plus the algorithm and its own
    hyperparameters."""
    defaults = Config().flat()
    flat: Dict[str, Any] = {}
    for k, v in cfg.flat().items():
        if k in RUN_KEYS or k.startswith("algorithm_args.") or (k in defaults and defaults[k] == v):
            continue
        if k.split(".", 1)[0] in cfg.extra_sections:  # FedML's free sections (environment_args, ...): unused here
            continue
        if k == "data_args.dataset_options":
            v = {o: _file_name(x) if f"{k}.{o}" in PATH_VALUED else x for o, x in v.items()
                 if o not in RUN_DATASET_OPTIONS}
            if not v:
                continue
        flat[k] = _file_name(v) if k in PATH_VALUED else v
    flat["algorithm"] = algorithm
    flat["algorithm_args"] = cfg.algo_params(algorithm)
    return flat


def cell_hash(cfg: Config, algorithm: str) -> str:
    """sha256 (12 hex) of :func:`identity_items`."""
    return hashlib.sha256(json.dumps(identity_items(cfg, algorithm), sort_keys=True, default=str).encode()
                          ).hexdigest()[:12]
