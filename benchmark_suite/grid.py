"""Benchmark grids: ``benchmark_args`` expanded into cells (datasets × splits × overrides × seeds × algorithms), and
the record of a finished cell (:class:`CellRecord`) that the runner produces and the leaderboard reads
(docs/benchmark.md §Running a grid, §Cell identity).

Every cell is a fully resolved :class:`~fedml_pfedmoap.config.Config`. The whole grid is validated before any run:
a malformed entry raises :class:`GridError` naming the key (``benchmark_args.splits[1].partition_alpha``) and the
reason. A cell's ``hash`` covers everything that changes its numbers and nothing else (``RUN_KEYS``: not the data
root, device, tracking URI, cache and output folders or thread counts), so a rerun of the same config recognises
finished cells wherever the data now lives, and cells that differ only in another algorithm's hyperparameters (a λ
ablation seen from PromptFL) share one run.

``benchmark_args`` keys:

* ``datasets``: dataset names (empty: ``data_args.dataset``);
* ``splits``: partition method names or mappings of ``data_args`` overrides, e.g.
  ``{partition_method: dirichlet, partition_alpha: 0.5}`` (labelled ``dirichlet-0.5``; a ``name`` key sets the label);
  empty: the split of ``data_args``;
* ``algorithms``: registered algorithm names (empty: ``train_args.federated_optimizer``);
* ``seeds``: training seeds (``common_args.random_seed``); the partition seed stays ``common_args.data_seed``;
* ``overrides``: mappings of ``section.key: value`` (or nested ``section: {key: value}``) applied per cell, for
  ablations such as ``{algorithm_args.pfedmoap.lam: 1.0}``; a ``name`` key sets the label.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from fedml_pfedmoap.config import PACKAGE_PREFIX, Config, ConfigError, DataArgs, from_dict

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
    "benchmark_args.seeds", "benchmark_args.overrides", "benchmark_args.caution",
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
})  # plus the cell's algorithm and its own algorithm_args
# dataset_options entries that only say where files are (or check them): left out of the identity
RUN_DATASET_OPTIONS = frozenset({"image_root", "pickle_dir", "verify_md5"})
# values that may be file paths: only the file name enters the identity (moving the file keeps the cell)
PATH_VALUED = ("model_args.pretrained", "data_args.dataset_options.split_file")
ONLY_KEYS = {"algo": "algorithm", "algorithm": "algorithm", "dataset": "dataset", "split": "split",
             "seed": "seed", "override": "override"}


class GridError(ConfigError):
    """A malformed benchmark grid; the message names the ``benchmark_args`` key and the reason."""


@dataclass
class Cell:
    """One run of the grid: (dataset, split, override, seed, algorithm) with its resolved config."""

    dataset: str
    split: str
    override: str
    seed: int
    algorithm: str
    cfg: Config = field(repr=False)
    hash: str = ""

    @property
    def data_seed(self) -> int:
        return int(self.cfg.common_args.data_seed)

    @property
    def label(self) -> str:
        parts = [self.dataset, self.split, self.algorithm, f"seed{self.seed}"]
        return "/".join(parts + ([self.override] if self.override else []))

    @property
    def run_name(self) -> str:
        """The MLflow run name, what differs first (the UI cuts long names): ``promptfl · seed0 · dirichlet-0.5 ·
        digits`` (the override after the algorithm)."""
        parts = [self.algorithm] + ([self.override] if self.override else []) + [f"seed{self.seed}", self.split,
                                                                                 self.dataset]
        return " · ".join(parts)

    @property
    def slug(self) -> str:
        """A file-name-safe, unique id: readable label plus the hash."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.label.replace("/", "__")) + "-" + self.hash

    @property
    def partition_key(self) -> Tuple[str, str, int]:
        return (self.dataset, self.split, self.data_seed)

    def tags(self) -> Dict[str, str]:
        return {"dataset": self.dataset, "split": self.split, "override": self.override, "algorithm": self.algorithm,
                "seed": str(self.seed), "data_seed": str(self.data_seed), "cell_hash": self.hash,
                "cell": self.label}



@dataclass
class CellRecord:
    """One finished cell: labels, per-round metrics, summary and the last round's per-client accuracies."""

    dataset: str
    split: str
    override: str
    algorithm: str
    seed: int
    data_seed: int
    cell_hash: str
    rounds: List[Dict[str, float]] = field(default_factory=list)
    summary: Dict[str, float] = field(default_factory=dict)
    client_acc: List[float] = field(default_factory=list)
    run_id: Optional[str] = None
    partition_hash: str = ""
    git_commit: str = ""
    setting: Dict[str, Any] = field(default_factory=dict)  # the cell's result keys (flat config), see cell_setting

    @property
    def group(self) -> Tuple[str, str, str]:
        return (self.dataset, self.split, self.override)

    def relabel(self, cell: Cell) -> "CellRecord":
        """The same numbers under an alias cell's labels (cells sharing a hash share a run)."""
        return dataclasses.replace(self, dataset=cell.dataset, split=cell.split, override=cell.override,
                                   algorithm=cell.algorithm, seed=cell.seed, data_seed=cell.data_seed,
                                   setting=cell_setting(cell.cfg))

    @classmethod
    def from_result(cls, cell: Cell, result: Any, run_id: Optional[str] = None, partition_hash: str = "",
                    git_commit: str = "") -> "CellRecord":
        """The record of a run's ``RunResult`` (from a finished run or checkpoint)."""
        return cls(cell.dataset, cell.split, cell.override, cell.algorithm, cell.seed, cell.data_seed, cell.hash,
                   [dict(r) for r in result.rounds], dict(result.summary),
                   list(result.client_acc[-1]) if result.client_acc else [], run_id, partition_hash, git_commit,
                   cell_setting(cell.cfg))


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


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def split_label(overrides: Mapping[str, Any], data: DataArgs) -> str:
    """``pathological``, ``pathological-4shot``, ``dirichlet-0.5``, ``domain_dirichlet-0.3``; plus ``k=v`` extras."""
    if "name" in overrides:
        return str(overrides["name"])
    method = data.partition_method
    parts = [method]
    if "dirichlet" in method:
        parts.append(_fmt(data.partition_alpha))
    if "pathological" in method and "shots" in overrides:
        parts.append(f"{data.shots}shot" if data.shots is not None else "allshot")
    extras = [f"{k}={_fmt(v)}" for k, v in sorted(overrides.items())
              if k not in ("name", "partition_method", "partition_alpha", "shots")]
    return "-".join(parts + extras)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{a: {b: 1}}`` -> ``{"a.b": 1}``; a nested mapping under a known leaf key (dataset_options, dp) stays whole."""
    out: Dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        depth = key.count(".")
        nested_ok = isinstance(v, Mapping) and (depth == 0 or (key.startswith("algorithm_args.") and depth == 1))
        if nested_ok:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def override_label(ov: Mapping[str, Any]) -> str:
    if "name" in ov:
        return str(ov["name"])
    return ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in sorted(_flatten(ov).items()))


def _set(raw: Dict[str, Any], dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) < 2:
        raise GridError(f"{where}: key {dotted!r} must be section.key (e.g. train_args.comm_round)")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise GridError(f"{where}: {dotted!r}: {p} is not a section")
    node[parts[-1]] = copy.deepcopy(value)


def _list(b: Mapping[str, Any], key: str, kinds: tuple, what: str) -> List[Any]:
    val = b.get(key) or []
    if not isinstance(val, list):
        raise GridError(f"benchmark_args.{key}: expected a list of {what}, got {type(val).__name__} {val!r}")
    for i, item in enumerate(val):
        if not isinstance(item, kinds) or isinstance(item, bool):
            raise GridError(f"benchmark_args.{key}[{i}]: expected {what}, got {type(item).__name__} {item!r}")
    return val


def _valid_datasets() -> List[str]:
    from fedml_pfedmoap.data import base, embedded, loaders  # noqa: F401  (registration)

    return base.DATASETS.names()


def expand_grid(base: Config, only: Sequence[str] = ()) -> List[Cell]:
    """All cells of ``base.benchmark_args`` (validated), filtered by ``--only key=v1,v2`` selectors."""
    from fedml_pfedmoap.algorithms import ALGORITHMS
    from fedml_pfedmoap.data.partition import PARTITIONERS

    raw_base = base.to_dict()
    b = raw_base["benchmark_args"]
    if not isinstance(b.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9._-]+", b["name"]):
        raise GridError(f"benchmark_args.name: expected a short name of letters, digits, '.', '_' or '-', "
                        f"got {b.get('name')!r}")
    datasets = _list(b, "datasets", (str,), "dataset names") or [base.data_args.dataset]
    valid = _valid_datasets()
    for i, d in enumerate(datasets):
        if d.lower() not in valid:
            raise GridError(f"benchmark_args.datasets[{i}]: unknown dataset {d!r}; valid choices: {', '.join(valid)}")
    algorithms = [a.lower() for a in _list(b, "algorithms", (str,), "algorithm names")] or \
        [base.train_args.federated_optimizer.lower()]
    for i, a in enumerate(algorithms):
        if a not in ALGORITHMS:
            raise GridError(f"benchmark_args.algorithms[{i}]: unknown algorithm {a!r}; valid choices: "
                            f"{', '.join(ALGORITHMS.names())}")
    seeds = _list(b, "seeds", (int,), "integer seeds") or [base.common_args.random_seed]
    splits_raw = _list(b, "splits", (str, dict), "a partition method or a mapping of data_args overrides") or [{}]
    data_fields = set(DataArgs.__dataclass_fields__) - {"dataset"}
    splits: List[Dict[str, Any]] = []
    for i, s in enumerate(splits_raw):
        s = {"partition_method": s} if isinstance(s, str) else dict(s)
        for k in s:
            if k != "name" and k not in data_fields:
                raise GridError(f"benchmark_args.splits[{i}].{k}: not a data_args key; valid keys: name, "
                                f"{', '.join(sorted(data_fields))}")
        if "partition_method" in s and s["partition_method"] not in PARTITIONERS:
            raise GridError(f"benchmark_args.splits[{i}].partition_method: unknown method {s['partition_method']!r};"
                            f" valid choices: {', '.join(PARTITIONERS.names())}")
        splits.append(s)
    overrides = _list(b, "overrides", (dict,), "a mapping of section.key: value") or [{}]

    cells: List[Cell] = []
    labels: Dict[str, int] = {}
    for d in datasets:
        for si, s in enumerate(splits):
            for oi, ov in enumerate(overrides):
                for seed in seeds:
                    for a in algorithms:
                        cell = _make_cell(raw_base, base.source, d, si, s, oi, ov, int(seed), a)
                        if cell.label in labels:
                            raise GridError(f"benchmark_args: two grid entries resolve to the same cell "
                                            f"{cell.label!r}; give splits/overrides distinct 'name' keys")
                        labels[cell.label] = 1
                        cells.append(cell)
    return filter_cells(cells, only)


def _make_cell(raw_base: Dict[str, Any], source: Optional[str], dataset: str, si: int, split: Dict[str, Any],
               oi: int, ov: Dict[str, Any], seed: int, algo: str) -> Cell:
    from fedml_pfedmoap.algorithms import get_algorithm

    raw = copy.deepcopy(raw_base)
    raw["data_args"]["dataset"] = dataset.lower()
    for k, v in split.items():
        if k != "name":
            raw["data_args"][k] = copy.deepcopy(v)
    raw["common_args"]["random_seed"] = seed
    raw["train_args"]["federated_optimizer"] = algo
    where = f"benchmark_args.overrides[{oi}]"
    for k, v in _flatten({k: v for k, v in ov.items() if k != "name"}).items():
        _set(raw, k, v, where)
    try:
        cfg = from_dict(raw, source=source)
    except ConfigError as err:
        ctx = where if ov else f"benchmark_args.splits[{si}]"
        raise GridError(f"{ctx}: {err}") from None
    try:
        get_algorithm(algo).parse_params(cfg.algo_params(algo))
    except (TypeError, ValueError) as err:
        raise GridError(f"algorithm_args.{algo} (cell {dataset}/{algo}): {err}") from None
    cell = Cell(dataset.lower(), split_label(split, cfg.data_args), override_label(ov), seed, algo, cfg)
    # the resolved config describes this cell alone (its split and override are already applied), so the logged
    # config.yaml re-runs exactly this cell
    b = cfg.benchmark_args
    b.datasets, b.splits, b.algorithms, b.seeds, b.overrides = [cell.dataset], [], [algo], [seed], []
    cell.hash = cell_hash(cfg, algo)
    return cell


def filter_cells(cells: Iterable[Cell], only: Sequence[str]) -> List[Cell]:
    """``--only algo=local,promptfl --only seed=0``: keep the cells matching every selector."""
    out = list(cells)
    for sel in only:
        if "=" not in sel:
            raise GridError(f"--only {sel!r}: expected key=value[,value...] with key in {sorted(set(ONLY_KEYS))}")
        key, vals = sel.split("=", 1)
        attr = ONLY_KEYS.get(key.strip().lower())
        if attr is None:
            raise GridError(f"--only {sel!r}: unknown key {key!r}; valid keys: {', '.join(sorted(ONLY_KEYS))}")
        wanted = {v.strip().lower() for v in vals.split(",") if v.strip()}
        present = {str(getattr(c, attr)).lower() for c in out}
        missing = sorted(wanted - present)
        if missing:
            raise GridError(f"--only {sel!r}: {', '.join(missing)} not in the grid; choices: "
                            f"{', '.join(sorted(present))}")
        out = [c for c in out if str(getattr(c, attr)).lower() in wanted]
    return out


def unique_cells(cells: Sequence[Cell]) -> List[Cell]:
    """The first cell of every distinct hash, in grid order (aliases share one run)."""
    seen, out = set(), []
    for c in cells:
        if c.hash not in seen:
            seen.add(c.hash)
            out.append(c)
    return out
