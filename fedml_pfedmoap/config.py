"""Typed configuration in FedML-style YAML sections (docs/fedml.md §Stack notes).

Every section is a dataclass with defaults; unknown sections or keys fail before any work with the list of valid
keys. Keys are unique across sections, because ``fedml.init`` flattens all sections into one namespace.
``algorithm_args`` maps an algorithm name to its hyperparameters (validated by the algorithm's ``Params``). Every
numeric key and hyperparameter is checked for type and range by its rule in ``ranges.py`` when the config is read.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)
from .ranges import CONFIG_RULES, check_params


@dataclass
class CommonArgs:
    training_type: str = "simulation"
    random_seed: int = 0  # the training seed: prompt init, client sampling, batch order
    data_seed: int = 0  # the partition seed, separate from the training seed
    run_name: str = "run"
    cache_dir: str = ".cache/fedml_pfedmoap"  # feature caches and partitions
    output_dir: str = "results"
    scenario: str = "horizontal"
    config_version: str = "release"


@dataclass
class DataArgs:
    dataset: str = "digits"
    data_root: Optional[str] = None
    layout: str = "auto"
    partition_method: str = "pathological"  # pathological | dirichlet | domain_dirichlet | legacy...
    shots: Optional[int] = 16  # None: all training images of the client's classes
    partition_alpha: float = 0.5
    min_size: int = 10
    clients_per_domain: int = 5
    train_augment: str = "none"  # none | online | bank:M
    num_workers: int = 0  # online augmentation: DataLoader workers decoding/augmenting the next batches
    cifar_transform: str = "clip"  # clip | legacy (D11 parity: CIFAR mean/std, then resize; CIFAR only)
    val_fraction: float = 0.0  # >0: that share of each client's training items held out for model selection
    dataset_options: Dict[str, Any] = field(default_factory=dict)
    partition_options: Dict[str, Any] = field(default_factory=dict)  # extra partitioner kwargs (remainder, ...)
    protocol: str = "label_shift"  # label_shift | base2novel (docs/data.md §Base-to-novel)
    base2novel_convention: str = "label_id"  # label_id | flip
    base2novel_legacy: bool = False  # label_id: replay the released code's seed-2023 draws


@dataclass
class ModelArgs:
    model: str = "tiny-clip"
    pretrained: Optional[str] = None
    n_ctx: int = 16
    force_quick_gelu: bool = False
    truncate_text: bool = True
    precision: str = "fp32"  # fp32 | bf16: autocast around the frozen towers; trainable parameters stay fp32
    compile_text: bool = False  # torch.compile the text transformer (opt-in; GPU)


@dataclass
class TrainArgs:
    federated_optimizer: str = "pFedMoAP"
    client_num_in_total: int = 10
    client_num_per_round: int = 10
    comm_round: int = 10
    epochs: int = 5
    batch_size: int = 32
    eval_every: int = 1
    eval_batch_size: int = 2048
    batch_eval_text: bool = False  # opt-in: all clients' evaluation prompts encoded in batched text-tower calls
    train_clients_per_call: int = 1  # >1: clients trained in lockstep, their prompts in one text-tower call (GPU)
    client_dropout: float = 0.0  # P(a selected client's upload is lost), per client and round (federated/schedule.py)


@dataclass
class DeviceArgs:
    using_gpu: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: Optional[int] = None
    worker_num: Optional[int] = None
    gpu_id: int = 0


@dataclass
class CommArgs:
    backend: str = "sp"
    grpc_ipconfig_path: Optional[str] = None
    round_timeout_s: float = 600.0
    startup_timeout_s: Optional[float] = None  # cross-silo: the first wait (imports, feature encoding); None -> round_timeout_s
    state_dir: Optional[str] = None


@dataclass
class TrackingArgs:
    enable_tracking: bool = False  # FedML's own (cloud) tracking: always off
    enable_wandb: bool = False
    mlflow_tracking_uri: Optional[str] = "sqlite:///results/mlflow.db"
    mlflow_experiment: Optional[str] = None
    log_file_dir: Optional[str] = None


@dataclass
class BenchmarkArgs:
    name: str = "benchmark"
    datasets: List[str] = field(default_factory=list)
    splits: List[Dict[str, Any]] = field(default_factory=list)
    algorithms: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [0])
    overrides: List[Dict[str, Any]] = field(default_factory=list)
    sweep: Optional[Dict[str, Any]] = None  # {key, values, also?, x?}: one override per value (benchmark_suite/grid.py)
    # per algorithm name: section.key overrides for that algorithm's cells only (e.g. a ViT model for ViT-only methods)
    algorithm_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    caution: Optional[str] = None


SECTIONS: Dict[str, type] = {
    "common_args": CommonArgs, "data_args": DataArgs, "model_args": ModelArgs, "train_args": TrainArgs,
    "device_args": DeviceArgs, "comm_args": CommArgs, "tracking_args": TrackingArgs,
    "benchmark_args": BenchmarkArgs,
}
FREE_SECTIONS = ("algorithm_args", "validation_args", "environment_args")


@dataclass
class Config:
    common_args: CommonArgs = field(default_factory=CommonArgs)
    data_args: DataArgs = field(default_factory=DataArgs)
    model_args: ModelArgs = field(default_factory=ModelArgs)
    train_args: TrainArgs = field(default_factory=TrainArgs)
    device_args: DeviceArgs = field(default_factory=DeviceArgs)
    comm_args: CommArgs = field(default_factory=CommArgs)
    tracking_args: TrackingArgs = field(default_factory=TrackingArgs)
    benchmark_args: BenchmarkArgs = field(default_factory=BenchmarkArgs)
    algorithm_args: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    extra_sections: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    source: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["algorithm_args"] = copy.deepcopy(self.algorithm_args)
        out.update(copy.deepcopy(self.extra_sections))
        return out

    def flat(self) -> Dict[str, Any]:
        """``section.key -> value`` (MLflow params)."""
        out: Dict[str, Any] = {}
        for sec, body in self.to_dict().items():
            for k, v in body.items():
                if isinstance(v, dict) and sec == "algorithm_args":
                    for k2, v2 in v.items():
                        out[f"{sec}.{k}.{k2}"] = v2
                else:
                    out[f"{sec}.{k}"] = v
        return out

    def algo_params(self, name: str) -> Dict[str, Any]:
        return dict(self.algorithm_args.get(name.lower(), {}) or {})


_BOOL = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _coerce(section: str, key: str, value: Any, default: Any, ftype: Any) -> Any:
    """Strict typing: numbers by their ``ranges.CONFIG_RULES`` rule; booleans never come from arbitrary strings (the
    reference's ``--ctx_init False`` defect D5); strings never from YAML mappings or lists."""
    rule = CONFIG_RULES.get(f"{section}.{key}")
    if rule is not None:
        return rule.check(f"{section}.{key}", value)
    tname = str(ftype)
    if value is None:
        return None
    if isinstance(default, bool) or tname in ("bool", "<class 'bool'>"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL:
            return _BOOL[value.lower()]
        raise ConfigError(f"{section}.{key}: expected a boolean (true/false), got {value!r}")
    if (tname in ("str", "<class 'str'>", "Optional[str]") or isinstance(default, str)) and \
            isinstance(value, (dict, list)):
        raise ConfigError(f"{section}.{key}: expected a string, got a {type(value).__name__} {value!r} "
                          "(YAML reads 'a: b' inside a value as a mapping: quote the whole value)")
    return value


def from_dict(raw: Dict[str, Any], source: Optional[str] = None) -> Config:
    """Validate a raw mapping into a ``Config``; every error names the section/key and the valid choices."""
    where = f" in {source}" if source else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"config{where}: expected a mapping of sections, got {type(raw).__name__}")
    cfg = Config(source=source)
    seen: Dict[str, str] = {}
    for sec, body in raw.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{sec}{where}: every top-level value must be a mapping (FedML flattens sections)")
        if sec in SECTIONS:
            cls = SECTIONS[sec]
            fields = {f.name: f for f in dataclasses.fields(cls)}
            kwargs = {}
            for k, v in body.items():
                if k not in fields:
                    raise ConfigError(f"{sec}.{k}{where}: unknown key; valid keys: {', '.join(sorted(fields))}")
                f = fields[k]
                default = f.default if f.default is not dataclasses.MISSING else None
                kwargs[k] = _coerce(sec, k, v, default, f.type)
            setattr(cfg, sec, cls(**kwargs))
        elif sec == "algorithm_args":
            cfg.algorithm_args = {}
            for algo, params in body.items():
                if params is not None and not isinstance(params, dict):
                    raise ConfigError(f"algorithm_args.{algo}{where}: expected a mapping of hyperparameters, "
                                      f"got {params!r}")
                name = str(algo).lower()
                cfg.algorithm_args[name] = check_params(f"algorithm_args.{name}", dict(params or {}))
        elif sec in FREE_SECTIONS or sec.endswith("_args"):
            cfg.extra_sections[sec] = dict(body)
        else:
            raise ConfigError(f"unknown section {sec!r}{where}; valid sections: "
                              f"{', '.join(sorted(list(SECTIONS) + list(FREE_SECTIONS)))}")
        for k in body:
            if k in seen and sec not in ("algorithm_args",):
                raise ConfigError(f"{sec}.{k}{where}: key also defined in {seen[k]} (FedML flattens sections; keys "
                                  "must be unique)")
            seen[k] = sec
    return cfg


def check_ranges(cfg: Config) -> None:
    """Check every numeric key of a built ``Config`` against its rule again (for a config changed in code)."""
    for dotted, rule in CONFIG_RULES.items():
        section, key = dotted.split(".")
        rule.check(dotted, getattr(getattr(cfg, section), key))


PRECISIONS = ("fp32", "bf16")  # model_args.precision (experiment.py maps them to the towers' autocast dtype)


def check_precision(cfg: Config) -> None:
    """``model_args.precision``: fp32 (exact) | bf16 (autocast around the frozen towers)."""
    if cfg.model_args.precision not in PRECISIONS:
        raise ConfigError(f"model_args.precision: expected one of {sorted(PRECISIONS)}, "
                          f"got {cfg.model_args.precision!r}")


def check_participation(cfg: Config) -> None:
    """``train_args.client_num_per_round`` within [1, client_num_in_total]."""
    t = cfg.train_args
    if t.client_num_per_round > t.client_num_in_total or t.client_num_per_round < 1:
        raise ConfigError("train_args.client_num_per_round must be in [1, client_num_in_total]")


def check_cifar_transform(cfg: Config) -> None:
    """``data_args.cifar_transform``: clip (default, the fix of D11) | legacy (CIFAR-10/100 only, no augmentation)."""
    d = cfg.data_args
    if d.cifar_transform not in ("clip", "legacy"):
        raise ConfigError(f"data_args.cifar_transform: expected 'clip' or 'legacy', got {d.cifar_transform!r}")
    if d.cifar_transform == "legacy" and (d.dataset not in ("cifar10", "cifar100") or d.train_augment != "none"):
        raise ConfigError("data_args.cifar_transform: 'legacy' reproduces the reference's CIFAR-10/100 transform "
                          f"(no augmentation); got dataset {d.dataset!r} with train_augment {d.train_augment!r}")


def validate(cfg: Config) -> None:
    """The cross-field checks of a built ``Config`` (one copy, for every entry point), then every numeric range."""
    check_precision(cfg)
    check_participation(cfg)
    check_cifar_transform(cfg)
    check_protocol(cfg)
    check_ranges(cfg)


PROTOCOLS = ("label_shift", "base2novel")  # data_args.protocol
B2N_CONVENTIONS = ("label_id", "flip")  # data_args.base2novel_convention (data/base2novel.CONVENTIONS)


def check_protocol(cfg: Config) -> None:
    """``data_args.protocol`` and the base-to-novel keys (docs/data.md §Base-to-novel)."""
    d = cfg.data_args
    if d.protocol not in PROTOCOLS:
        raise ConfigError(f"data_args.protocol: expected one of {list(PROTOCOLS)}, got {d.protocol!r}")
    if d.base2novel_convention not in B2N_CONVENTIONS:
        raise ConfigError(f"data_args.base2novel_convention: expected one of {list(B2N_CONVENTIONS)}, "
                          f"got {d.base2novel_convention!r}")
    if d.base2novel_legacy and d.base2novel_convention != "label_id":
        raise ConfigError("data_args.base2novel_legacy: the seed-2023 replay exists for the 'label_id' convention only")


PACKAGE_PREFIX = "package:"
ASSET_DIR = Path(__file__).resolve().parent / "assets"


def resolve_pretrained(value: Optional[str]) -> Optional[str]:
    """``model_args.pretrained``: ``package:<file>`` -> the checkpoint shipped in ``fedml_pfedmoap/assets/``; anything
    else (``None``, an open_clip tag, a local path) unchanged. The algorithms only ever see the resolved value."""
    if not value or not str(value).startswith(PACKAGE_PREFIX):
        return value
    name = str(value)[len(PACKAGE_PREFIX):]
    path = ASSET_DIR / name
    if not name or Path(name).name != name or not path.is_file():
        shipped = sorted(p.name for p in ASSET_DIR.glob("*.safetensors")) if ASSET_DIR.is_dir() else []
        raise ConfigError(f"model_args.pretrained={value!r}: no packaged checkpoint {name!r} in fedml_pfedmoap/assets "
                          f"(shipped: {', '.join(shipped) or 'none'}); the mini CLIP is regenerated by "
                          "`pfedmoap-bench pretrain-mini --out fedml_pfedmoap/assets/mini-clip.safetensors`")
    return str(path)


def read_raw(path: str | Path, overrides: Optional[List[str]] = None, what: str = "config file") -> Dict[str, Any]:
    """The YAML mapping of ``path`` with ``section.key=value`` overrides applied (values parsed as YAML)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({err})") from None
    for ov in overrides or []:
        apply_override(raw, ov)
    return raw


def load_config(path: str | Path, overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    return from_dict(read_raw(path, overrides), source=str(path))


def apply_override(raw: Dict[str, Any], override: str) -> None:
    """``section.key=value`` or ``algorithm_args.algo.key=value``."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value)
