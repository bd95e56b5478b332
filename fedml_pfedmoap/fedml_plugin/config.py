"""FedML YAML / args namespace <-> the suite's typed ``Config`` (docs/fedml.md §Stack notes).

A FedML user's YAML uses the same sections as the suite (``common_args``, ``data_args``, ``model_args``,
``train_args``, ``device_args``, ``comm_args``, ``tracking_args``, ``algorithm_args``). On top of the suite's keys it may
carry FedML's own mechanics keys (``FEDML_KEYS``, passed to FedML untouched) and ``<algorithm>_args`` sections (the
hyperparameters of a registered algorithm, e.g. ``pfedmoap_args:``). ``train_args.federated_optimizer`` names an
algorithm of this package's registry; FedML's cross-silo switch only accepts ``FedAvg``, so the FedML namespace gets
``FedAvg`` and the real name travels as ``pfedmoap_algorithm``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from ..config import SECTIONS, Config, ConfigError, check_participation, from_dict, read_raw
from ..ranges import INT_POS

logger = logging.getLogger(__name__)

# FedML keys the suite does not model; accepted in any section and handed to FedML as they are.
FEDML_KEYS = frozenset({
    "using_mlops", "client_id_list", "frequency_of_the_test", "test_on_clients", "gpu_mapping_file",
    "gpu_mapping_key", "is_mobile", "data_cache_dir", "wandb_project", "wandb_entity", "wandb_name", "enable_contribution",
    "env_version", "skip_log_model_net", "server_config_path", "client_silo_config_paths",
})
# FedML keys that would silently mean something else here: the message says what to set instead.
REDIRECTED = {
    "learning_rate": "algorithm_args.<algorithm>.lr", "client_optimizer": "nothing (prompt methods use SGD, §10)",
    "weight_decay": "algorithm_args.<algorithm>.weight_decay", "partition_file": "data_args.partition_method",
}
# FedML keys with a meaning here (applied by ``apply_fedml_keys``) and FedML keys that are read but ignored.
FEDML_PARTITIONS = {"hetero": "dirichlet"}  # FedML's label-skew name; its partition_alpha is the Dirichlet α
IGNORED = {
    "client_id_list": "clients are 0..train_args.client_num_in_total-1, sampled by the run's seeded schedule",
    "gpu_id": "the device comes from device_args.device (cpu, cuda or cuda:N)",
}
_WARNED: Set[str] = set()
TRAINING_TYPES = ("simulation", "cross_silo")
CROSS_SILO_BACKENDS = ("MPI", "GRPC")
ALGORITHM_KEY = "pfedmoap_algorithm"  # the registry name (FedML's own ``federated_optimizer`` says FedAvg)
ROUNDS_KEY = "pfedmoap_comm_round"  # T (FedML's own ``comm_round`` is T + 1 in cross-silo)


@dataclasses.dataclass
class PluginConfig:
    """The validated suite config, the FedML-only keys, and where the YAML lives (relative paths resolve there)."""

    cfg: Config
    fedml_keys: Dict[str, Any]
    source: Optional[Path] = None

    @property
    def algorithm(self) -> str:
        return self.cfg.train_args.federated_optimizer.lower()


def split_raw(raw: Dict[str, Any], where: str = "") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Separate FedML-only keys and ``<algorithm>_args`` sections from the suite's sections."""
    from ..algorithms import list_algorithms

    algos = set(list_algorithms())
    suite: Dict[str, Any] = {}
    fedml_keys: Dict[str, Any] = {}
    for sec, body in (raw or {}).items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{sec}{where}: every top-level value must be a mapping (FedML flattens sections)")
        if sec.endswith("_args") and sec[:-5].lower() in algos:
            merged = suite.setdefault("algorithm_args", {})
            merged.setdefault(sec[:-5].lower(), {}).update(body)
            continue
        kept = {}
        for key, value in body.items():
            if key in REDIRECTED:
                raise ConfigError(f"{sec}.{key}{where}: not used by fedml_pfedmoap; set {REDIRECTED[key]} instead")
            if key in FEDML_KEYS:
                fedml_keys[key] = value
            else:
                kept[key] = value
        if sec == "algorithm_args":
            for algo, params in kept.items():
                suite.setdefault("algorithm_args", {}).setdefault(str(algo).lower(), {}).update(params or {})
        elif kept or not body:  # a section that only held FedML keys is not the suite's
            suite[sec] = kept
    return suite, fedml_keys


def load_plugin_config(path: str | Path, overrides: Optional[List[str]] = None) -> PluginConfig:
    """Read a FedML YAML (``--cf``), apply ``section.key=value`` overrides, validate, and check the FedML setup."""
    p = Path(path)
    raw = read_raw(p, overrides, what="--cf: config file")
    suite, fedml_keys = split_raw(raw, f" in {p}")
    apply_fedml_keys(suite, fedml_keys, p.resolve().parent)
    pc = PluginConfig(from_dict(suite, source=str(p)), fedml_keys, p.resolve().parent)
    validate(pc)
    return pc


def config_from_namespace(ns: Any) -> PluginConfig:
    """A FedML args namespace -> ``PluginConfig``: re-read its YAML when it has one, else match keys to sections."""
    yaml_file = getattr(ns, "yaml_config_file", "") or ""
    if yaml_file:
        return load_plugin_config(yaml_file)
    from ..algorithms import list_algorithms

    raw: Dict[str, Dict[str, Any]] = {}
    for sec, cls in SECTIONS.items():
        body = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
        if body:
            raw[sec] = body
    for key, field in ((ALGORITHM_KEY, "federated_optimizer"), (ROUNDS_KEY, "comm_round")):
        if getattr(ns, key, None) is not None:
            raw.setdefault("train_args", {})[field] = getattr(ns, key)
    raw["algorithm_args"] = {a: dict(getattr(ns, a)) for a in list_algorithms() if isinstance(getattr(ns, a, None), dict)}
    fedml_keys = {k: getattr(ns, k) for k in FEDML_KEYS if hasattr(ns, k)}
    apply_fedml_keys(raw, fedml_keys, None, warn=False)
    pc = PluginConfig(from_dict(raw, source="<fedml args>"), fedml_keys, None)
    validate(pc)
    return pc


def apply_fedml_keys(suite: Dict[str, Any], fedml_keys: Dict[str, Any], folder: Optional[Path],
                     warn: bool = True) -> None:
    """Give FedML's own keys their meaning in the suite's raw sections (before validation), and warn (once per key
    and process) about the ones that are ignored.

    ``partition_method: hetero`` -> ``dirichlet`` (with ``partition_alpha``); ``data_cache_dir`` -> the data root
    when ``data_args.data_root`` is not set; ``frequency_of_the_test`` -> ``train_args.eval_every`` (evaluation every
    N rounds and after the last one).
    """
    data = suite.setdefault("data_args", {})
    method = str(data.get("partition_method", ""))
    if method.lower() in FEDML_PARTITIONS:
        data["partition_method"] = FEDML_PARTITIONS[method.lower()]
    cache_dir = fedml_keys.get("data_cache_dir")
    if cache_dir and not data.get("data_root"):
        data["data_root"] = _relative_to(folder, os.path.expanduser(str(cache_dir)))
    if fedml_keys.get("frequency_of_the_test") is not None:
        every = INT_POS.check("frequency_of_the_test", fedml_keys["frequency_of_the_test"])
        train = suite.setdefault("train_args", {})
        if train.get("eval_every") not in (None, every):
            raise ConfigError(f"frequency_of_the_test={every} and train_args.eval_every={train['eval_every']} "
                              "disagree; set one of them")
        train["eval_every"] = every
    present = set(fedml_keys) | set(suite.get("device_args") or {})
    for key in sorted(set(IGNORED) & present):
        if warn and key not in _WARNED:
            _WARNED.add(key)
            logger.warning("%s is ignored by fedml_pfedmoap: %s", key, IGNORED[key])


def _relative_to(folder: Optional[Path], value: str) -> str:
    """A relative path in the YAML: relative to the YAML's folder when it exists there, else to the working dir."""
    p = Path(value)
    if not p.is_absolute() and folder is not None and (folder / p).exists():
        return str(folder / p)
    return str(p)


def resolve_path(pc: PluginConfig, value: Optional[str]) -> Optional[str]:
    """A relative path of the YAML (see ``_relative_to``), None and empty strings unchanged."""
    return _relative_to(pc.source, value) if value else value


def validate(pc: PluginConfig) -> None:
    """Errors that would otherwise surface as a FedML crash (and hung peers) after minutes of startup."""
    from ..algorithms import get_algorithm

    cfg = pc.cfg
    c, t = cfg.common_args, cfg.train_args
    try:
        get_algorithm(t.federated_optimizer).parse_params(cfg.algo_params(t.federated_optimizer))
    except KeyError as err:
        raise ConfigError(f"train_args.federated_optimizer: {err.args[0]}") from None
    if c.training_type not in TRAINING_TYPES:
        raise ConfigError(f"common_args.training_type: expected one of {TRAINING_TYPES}, got {c.training_type!r} "
                          "(FedML's own simulators ignore custom trainers; cross_device is not applicable)")
    if cfg.tracking_args.enable_tracking or cfg.tracking_args.enable_wandb or pc.fedml_keys.get("using_mlops"):
        raise ConfigError("tracking_args.enable_tracking / enable_wandb / using_mlops must be false: they need a "
                          "TensorOpera/wandb account and network; metrics go to MLflow (tracking_args.mlflow_*)")
    check_participation(cfg)
    if c.training_type == "simulation":
        if cfg.comm_args.backend not in ("sp",):
            raise ConfigError(f"comm_args.backend: simulation runs the in-process loop; expected 'sp', got "
                              f"{cfg.comm_args.backend!r} (use training_type: cross_silo for MPI/GRPC)")
        return
    if c.scenario != "horizontal":
        raise ConfigError(f"common_args.scenario: only 'horizontal' cross-silo is supported, got {c.scenario!r}")
    if cfg.comm_args.backend not in CROSS_SILO_BACKENDS:
        raise ConfigError(f"comm_args.backend: expected one of {CROSS_SILO_BACKENDS} for cross_silo, "
                          f"got {cfg.comm_args.backend!r}")
    workers = worker_num(cfg)
    if workers != t.client_num_per_round:
        raise ConfigError(f"device_args.worker_num={workers}: FedML cross-silo trains one client per worker per "
                          f"round, so it must equal train_args.client_num_per_round={t.client_num_per_round}")
    if cfg.comm_args.backend == "GRPC":
        check_grpc_ipconfig(resolve_path(pc, cfg.comm_args.grpc_ipconfig_path), workers)


def worker_num(cfg: Config) -> int:
    return int(cfg.device_args.worker_num or cfg.train_args.client_num_per_round)


def check_grpc_ipconfig(path: Optional[str], workers: int) -> None:
    """The CSV FedML 0.9.6 reads: header ``eid,rank,grpc_server_ip,grpc_server_port``, one row per rank 0..W."""
    if not path:
        raise ConfigError("comm_args.grpc_ipconfig_path: required for backend GRPC (CSV with header "
                          "eid,rank,grpc_server_ip,grpc_server_port; one row per rank, rank 0 = server)")
    if not Path(path).is_file():
        raise ConfigError(f"comm_args.grpc_ipconfig_path: file {path!r} does not exist")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = ["eid", "rank", "grpc_server_ip", "grpc_server_port"]
        if reader.fieldnames is None or any(k not in reader.fieldnames for k in need):
            raise ConfigError(f"comm_args.grpc_ipconfig_path {path!r}: header must be {','.join(need)} "
                              f"(got {reader.fieldnames}); the older receiver_id,ip format fails in FedML 0.9.6")
        try:
            ranks = {int(row["rank"]) for row in reader}
        except (TypeError, ValueError):
            raise ConfigError(f"comm_args.grpc_ipconfig_path {path!r}: rank must be an integer") from None
    missing = sorted(set(range(workers + 1)) - ranks)
    if missing:
        raise ConfigError(f"comm_args.grpc_ipconfig_path {path!r}: no row for rank(s) {missing} "
                          f"(need 0..{workers}: the server and {workers} workers)")


def to_fedml_namespace(pc: PluginConfig, rank: int = 0, role: Optional[str] = None, run_id: str = "0",
                       yaml_path: Optional[str] = None) -> argparse.Namespace:
    """The flat namespace ``fedml.init(args=...)`` expects, with the FedML translations applied.

    Cross-silo gets ``federated_optimizer: FedAvg`` and ``comm_round = T + 1``: the extra FedML round carries the
    evaluation of round T-1 (each round's evaluation is piggybacked on the next round's upload).
    """
    from .guard import offline_flags

    cfg = pc.cfg
    ns = argparse.Namespace()
    for sec in SECTIONS:
        for key, value in dataclasses.asdict(getattr(cfg, sec)).items():
            setattr(ns, key, value)
    for algo, params in cfg.algorithm_args.items():
        setattr(ns, algo, dict(params))
    for key, value in pc.fedml_keys.items():
        setattr(ns, key, value)
    ns.yaml_config_file = str(yaml_path or cfg.source or "")
    ns.rank, ns.run_id, ns.local_rank, ns.node_rank = int(rank), str(run_id), 0, 0
    ns.role = role or ("server" if int(rank) == 0 else "client")
    ns.run_device_id = "0"
    setattr(ns, ALGORITHM_KEY, cfg.train_args.federated_optimizer)
    setattr(ns, ROUNDS_KEY, cfg.train_args.comm_round)
    ns.worker_num = worker_num(cfg)
    ns.frequency_of_the_test = cfg.train_args.eval_every  # FedML's name of the same schedule
    ns.grpc_ipconfig_path = resolve_path(pc, cfg.comm_args.grpc_ipconfig_path)
    ns.random_seed = cfg.common_args.random_seed
    if cfg.common_args.training_type == "cross_silo":
        ns.federated_optimizer = "FedAvg"
        ns.comm_round = cfg.train_args.comm_round + 1
    ns.using_gpu = bool(cfg.device_args.using_gpu)
    return offline_flags(ns)
