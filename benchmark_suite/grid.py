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
* ``sweep``: ``{key: data_args.shots, values: [1, 2, 4], also: {other.key: [..]}, x: [..]}``: one override per value
  (labelled ``shots=1``...), ``also`` sets further keys value by value, ``x`` the plotted value (default the value);
  the leaderboard adds accuracy against the swept value per method (instead of ``overrides``, not with them);
* ``algorithm_overrides``: ``{algorithm: {section.key: value}}`` applied to that algorithm's cells only (after
  ``overrides``), e.g. a ViT model for the methods that adapt a ViT image tower in an RN50 grid.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from fedml_pfedmoap.config import Config, ConfigError, DataArgs, from_dict

from .identity import cell_hash, cell_setting

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
    if b.get("sweep") is not None:
        if b.get("overrides"):
            raise GridError("benchmark_args.sweep: set sweep or overrides, not both")
        overrides = sweep_overrides(b["sweep"])
    per_algo = b.get("algorithm_overrides") or {}
    if not isinstance(per_algo, dict):
        raise GridError(f"benchmark_args.algorithm_overrides: expected a mapping of algorithm name to a mapping of "
                        f"section.key: value, got {per_algo!r}")
    for a, ov in per_algo.items():
        if str(a).lower() not in ALGORITHMS or not isinstance(ov, dict):
            raise GridError(f"benchmark_args.algorithm_overrides.{a}: expected a registered algorithm name mapped "
                            f"to section.key: value, got {a!r}: {ov!r}")
    per_algo = {str(a).lower(): ov for a, ov in per_algo.items()}

    cells: List[Cell] = []
    labels: Dict[str, int] = {}
    for d in datasets:
        for si, s in enumerate(splits):
            for oi, ov in enumerate(overrides):
                for seed in seeds:
                    for a in algorithms:
                        cell = _make_cell(raw_base, base.source, d, si, s, oi, ov, int(seed), a,
                                          per_algo.get(a, {}))
                        if cell.label in labels:
                            raise GridError(f"benchmark_args: two grid entries resolve to the same cell "
                                            f"{cell.label!r}; give splits/overrides distinct 'name' keys")
                        labels[cell.label] = 1
                        cells.append(cell)
    return filter_cells(cells, only)


def _make_cell(raw_base: Dict[str, Any], source: Optional[str], dataset: str, si: int, split: Dict[str, Any],
               oi: int, ov: Dict[str, Any], seed: int, algo: str, algo_ov: Optional[Dict[str, Any]] = None) -> Cell:
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
    for k, v in _flatten(algo_ov or {}).items():
        _set(raw, k, v, f"benchmark_args.algorithm_overrides.{algo}")
    try:
        cfg = from_dict(raw, source=source)
    except ConfigError as err:
        ctx = f"benchmark_args.algorithm_overrides.{algo}" if algo_ov else \
            (where if ov else f"benchmark_args.splits[{si}]")
        raise GridError(f"{ctx}: {err}") from None
    try:
        get_algorithm(algo).parse_params(cfg.algo_params(algo))
    except (TypeError, ValueError) as err:
        raise GridError(f"algorithm_args.{algo} (cell {dataset}/{algo}): {err}") from None
    cell = Cell(dataset.lower(), split_label(split, cfg.data_args), override_label(ov), seed, algo, cfg)
    # the resolved config describes this cell alone (its split and override are already applied), so the logged
    # config.yaml re-runs exactly this cell
    b = cfg.benchmark_args
    b.datasets, b.splits, b.algorithms, b.seeds, b.overrides, b.sweep = [cell.dataset], [], [algo], [seed], [], None
    b.algorithm_overrides = {}
    cell.hash = cell_hash(cfg, algo)
    return cell


def sweep_overrides(sweep: Any) -> List[Dict[str, Any]]:
    """``benchmark_args.sweep`` -> one named override per value (see the module docstring)."""
    where = "benchmark_args.sweep"
    if not isinstance(sweep, Mapping) or set(sweep) - {"key", "values", "also", "x"} or "key" not in sweep:
        raise GridError(f"{where}: expected a mapping with key, values and optionally also, x; got {sweep!r}")
    key, values = sweep["key"], sweep.get("values")
    if not isinstance(key, str) or key.count(".") != 1:
        raise GridError(f"{where}.key: expected section.key (e.g. data_args.shots), got {key!r}")
    if not isinstance(values, list) or not values:
        raise GridError(f"{where}.values: expected a non-empty list, got {values!r}")
    also = sweep.get("also") or {}
    lists = {"x": sweep["x"]} if "x" in sweep else {}
    lists.update({f"also.{k}": v for k, v in (also.items() if isinstance(also, Mapping) else [])})
    if not isinstance(also, Mapping):
        raise GridError(f"{where}.also: expected a mapping of section.key: [values], got {also!r}")
    for name, v in lists.items():
        if not isinstance(v, list) or len(v) != len(values):
            raise GridError(f"{where}.{name}: expected a list of {len(values)} entries (one per value), got {v!r}")
    short = key.split(".")[-1]
    return [{"name": f"{short}={_fmt(v)}", key: v, **{k: also[k][i] for k in also}} for i, v in enumerate(values)]


def sweep_points(sweep: Mapping[str, Any]) -> Dict[str, float]:
    """Override label -> plotted x value of a (validated) ``benchmark_args.sweep``."""
    xs = sweep.get("x") or sweep["values"]
    return {ov["name"]: float(x) for ov, x in zip(sweep_overrides(sweep), xs)}


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
