"""``pfedmoap-bench leaderboard``: LEADERBOARD.md, summary.csv and plots for a benchmark grid, read from MLflow.

The grid of ``--config`` says which cells belong to the benchmark (by cell hash); the numbers come from the newest
FINISHED MLflow run of each cell, never from memory. Per dataset × split (× override) and algorithm the table shows
mean ± std over seeds (population std, in %) of the headline (``acc_last5`` by default, or ``acc_last``), the other
of the two, the best round (``acc_best``, test-selected and therefore labelled optimistic) and the worst-10% clients,
with the paper's number beside it where the paper reports the same dataset, split and setting (``paper_results.yaml``,
quoted, not measured; a group run in another setting gets a footnote saying what differs instead). With one seed a
cell shows its mean and ``(n=1)``. Cautions are derived from the setting actually run (random-init or mini CLIP
backbone, packaged stand-in dataset), plus ``benchmark_args.caution`` when the config sets one. The best mean in each
column is bold. docs/benchmark.md §Reading the leaderboard explains the table; plots come from ``plots.py``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from fedml_pfedmoap.federated.metrics import (B2N_METRICS, EXTRA_ROUND_METRICS, PRIVACY_METRICS, ROUND_METRICS,
                                             SUMMARY_METRICS, VALIDATION_METRICS)
from fedml_pfedmoap.fileio import atomic_path, atomic_write_text
from fedml_pfedmoap.tracking import MlflowLogger

from .grid import Cell, CellRecord, expand_grid

logger = logging.getLogger(__name__)
HEADLINES = ("acc_last5", "acc_last")
PAPER_FILE = Path(__file__).with_name("paper_results.yaml")


# ---- reading MLflow -----------------------------------------------------------------------------------------------
def collect_from_mlflow(tracker: MlflowLogger, cells: Sequence[Cell]) -> Tuple[List[CellRecord], List[Cell]]:
    """Records for the grid's cells from their FINISHED runs, and the cells that have none."""
    runs = tracker.finished_runs({c.hash for c in cells})
    by_hash = {h: _record_from_run(tracker, run) for h, run in runs.items()}
    records = [by_hash[c.hash].relabel(c) for c in cells if c.hash in by_hash]
    return records, [c for c in cells if c.hash not in by_hash]


def _record_from_run(tracker: MlflowLogger, run: Any) -> CellRecord:
    """A finished MLflow run (``mlflow.entities.Run``) read back: tags, round metrics, summary, client accuracies."""
    from fedml_pfedmoap.tracking import read_client_acc_csv

    rid, tags, metrics = run.info.run_id, run.data.tags, run.data.metrics
    steps: Dict[int, Dict[str, float]] = {}
    for key in [k for k in ROUND_METRICS + EXTRA_ROUND_METRICS + B2N_METRICS if k in metrics]:
        for step, value in tracker.metric_history(rid, key):
            steps.setdefault(step, {"round": step})[key] = value
    client_acc: List[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracker.download_artifact(rid, "client_acc.csv", tmp)
            per_round = read_client_acc_csv(path)
            client_acc = per_round[max(per_round)] if per_round else []
    except Exception as err:  # noqa: BLE001 - a missing artifact only drops one plot
        logger.warning("run %s: no client_acc.csv artifact (%s); per-client plot skips it", rid, err)
    return CellRecord(tags.get("dataset", "?"), tags.get("split", "?"), tags.get("override", ""),
                      tags.get("algorithm", "?"), int(tags.get("seed", 0)), int(tags.get("data_seed", 0)),
                      tags.get("cell_hash", ""), [steps[s] for s in sorted(steps)],
                      {k: float(metrics[k]) for k in SUMMARY_METRICS + PRIVACY_METRICS + VALIDATION_METRICS if k in metrics}, client_acc, rid,
                      tags.get("partition_hash", ""), tags.get("git_commit", ""))


# ---- aggregation --------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return (float(a.mean()), float(a.std()), int(a.size)) if a.size else (float("nan"), float("nan"), 0)


def _last(r: CellRecord, key: str) -> Optional[float]:
    vals = [x[key] for x in r.rounds if key in x]
    return vals[-1] if vals else None


def table_rows(records: Sequence[CellRecord], headline: str) -> Dict[Tuple[str, str, str], List[Dict[str, Any]]]:
    """group -> rows (one per algorithm, grid order): column -> (mean, std, n) over seeds."""
    cols = column_names(headline, validated(records))
    groups: Dict[Tuple[str, str, str], Dict[str, List[CellRecord]]] = {}
    for r in records:
        groups.setdefault(r.group, {}).setdefault(r.algorithm, []).append(r)
    out = {}
    for g, algos in groups.items():
        rows = []
        for algo, recs in algos.items():
            row: Dict[str, Any] = {"algorithm": algo, "seeds": sorted({r.seed for r in recs})}
            for c in cols:
                vals = [_last(r, "acc_bottom10") if c == "acc_bottom10" else r.summary.get(c) for r in recs]
                row[c] = mean_std([v for v in vals if v is not None])
            row.update(b2n_columns(recs))
            row["comm"] = tuple(mean_std([x[k] for r in recs for x in r.rounds if k in x])[0]
                                for k in ("bytes_up", "bytes_down"))
            row["privacy"] = privacy_cell(recs)
            rows.append(row)
        out[g] = rows
    return out


B2N_NOTE = ("Base-to-novel (docs/algorithms.md §Base-to-novel): Local = each client's model on its own base classes "
            "(logits over all base classes, the same number as acc_last), Base = on the full base test set, Novel = on "
            "the full novel test set with the novel class names only, each averaged over clients at the final "
            "evaluated round; HM = 3-way harmonic mean, averaged over seeds.")
B2N_TITLES = {"acc_local": "Local", "acc_base": "Base", "acc_novel": "Novel", "acc_hm": "HM"}


def b2n_columns(recs: Sequence[CellRecord]) -> Dict[str, Tuple[float, float, int]]:
    """Base-to-novel cells: Local / Base / Novel / HM of the final evaluated round, mean ± std over seeds (the HM
    column averages each seed's HM); empty for label-shift cells."""
    if not any(_last(r, "acc_hm") is not None for r in recs):
        return {}
    return {c: mean_std([v for v in (_last(r, c) for r in recs) if v is not None]) for c in B2N_METRICS}


def validated(records: Sequence[CellRecord]) -> bool:
    """True when some run selected its round on a validation split (``data_args.val_fraction`` > 0)."""
    return any("acc_val_selected" in r.summary for r in records)


def column_names(headline: str, validation: bool = False) -> List[str]:
    """The headline, the other of acc_last5 / acc_last, acc_val_selected (validation on), acc_best, worst 10%."""
    if headline not in HEADLINES:
        raise ValueError(f"--headline: expected one of {', '.join(HEADLINES)}, got {headline!r}")
    val = ["acc_val_selected"] if validation else []
    return [headline, [h for h in HEADLINES if h != headline][0], *val, "acc_best", "acc_bottom10"]


def privacy_cell(recs: Sequence[CellRecord]) -> Optional[str]:
    """Run-level ε of the busiest client over the seeds' runs (worst seed): exact (PLD) / zCDP bound; None: no DP."""
    dp = [r.summary for r in recs if "dp_epsilon_run_pld" in r.summary]
    if not dp:
        return None
    worst = max(dp, key=lambda m: m["dp_epsilon_run_pld"])
    return (f"ε {worst['dp_epsilon_run_pld']:.3g} / {worst['dp_epsilon_run_zcdp']:.3g} "
            f"({int(worst['dp_busiest_releases'])} releases)")


COLUMN_TITLES = {"acc_last5": "acc_last5 (mean of last 5 rounds)", "acc_last": "acc_last (final round)",
                 "acc_best": "acc_best (best round, optimistic)",
                 "acc_val_selected": "acc_val_selected (round of best validation accuracy)",
                 "acc_bottom10": "worst-10% clients (final)"}


def load_paper() -> Dict[str, Any]:
    return yaml.safe_load(PAPER_FILE.read_text()) or {}


def paper_entry(paper: Dict[str, Any], dataset: str, split: str) -> Optional[Dict[str, Any]]:
    return (paper.get(dataset) or {}).get(split) if dataset != "settings" else None


def setting_mismatch(paper: Dict[str, Any], entry: Dict[str, Any], records: Sequence[CellRecord]) -> List[str]:
    """``key: ours (paper: theirs)`` for every key of the entry's paper setting that some record of a method the paper
    reports does not match (rows of other methods, e.g. on another backbone via ``algorithm_overrides``, get no paper
    number either way and are flagged by ``setting_cautions``)."""
    from .identity import PATH_VALUED, _file_name

    want = (paper.get("settings") or {}).get(entry.get("setting"), {})
    reported = entry.get("results") or {}
    records = [r for r in records if r.algorithm in reported] if reported else list(records)
    out: List[str] = []
    for key, accepted in want.items():
        accepted = accepted if isinstance(accepted, list) else [accepted]
        for r in records:
            got = r.setting.get(key)
            got = _file_name(got) if key in PATH_VALUED else got
            note = f"{key}: {got} (paper: {' or '.join(map(str, accepted))})"
            if got not in accepted and note not in out:
                out.append(note)
    return out


def setting_cautions(records: Sequence[CellRecord], configured: Optional[str] = None) -> List[str]:
    """One line per distinct caution of the settings run: a random-init backbone, the mini CLIP, a packaged stand-in
    dataset; ``benchmark_args.caution`` (``configured``) first when set."""
    from fedml_pfedmoap.data import base, embedded
    from fedml_pfedmoap.miniclip import MODEL_NAME

    out = [configured] if configured else []
    for r in records:
        model, pretrained = r.setting.get("model_args.model"), r.setting.get("model_args.pretrained")
        dataset = r.setting.get("data_args.dataset", r.dataset)
        lines = []
        if model and not pretrained:
            lines.append(f"backbone {model} has random weights (model_args.pretrained: null): the numbers check the "
                         "machinery, they are not CLIP results")
        elif model == MODEL_NAME:
            lines.append(f"backbone {model}: the packaged mini CLIP, pretrained offline on MNIST and animal "
                         "silhouettes; a miniature of CLIP: compare the methods with each other, not with CLIP "
                         "results or the paper")
        builder = base.DATASETS.get(dataset) if dataset in base.DATASETS else None
        if builder is not None and builder.__module__ == embedded.__name__:
            doc = (builder.__doc__ or "").strip().splitlines()[0].rstrip(".")
            lines.append(f"dataset {dataset}: a small packaged stand-in, not one of the paper's datasets; {doc}")
        out += [line for line in lines if line not in out]
    by_model: Dict[str, set] = {}
    for r in records:
        by_model.setdefault(str(r.setting.get("model_args.model")), set()).add(r.algorithm)
    if len(by_model) > 1:  # benchmark_args.algorithm_overrides gave some methods another backbone
        out.append("rows use different backbones: " + "; ".join(
            f"{m} ({', '.join(sorted(a))})" for m, a in sorted(by_model.items())))
    return out


def _pct(ms: Tuple[float, float, int]) -> str:
    """``mean ± std`` in %; a single seed has no spread: ``mean (n=1)``."""
    m, s, n = ms
    if n == 0:
        return "–"
    return f"{100 * m:.2f} (n=1)" if n == 1 else f"{100 * m:.2f} ± {100 * s:.2f}"


def group_title(g: Tuple[str, str, str]) -> str:
    return " · ".join(x for x in g if x)


def group_slug(g: Tuple[str, str, str]) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(x for x in g if x))


# ---- outputs ------------------------------------------------------------------------------------------------------
def markdown(records: Sequence[CellRecord], headline: str, title: str, caution: Optional[str], source: str,
             missing: Sequence[str] = ()) -> str:
    cols = column_names(headline, validated(records))
    paper = load_paper()
    lines = [f"# Leaderboard: {title}", ""]
    for c in setting_cautions(records, caution):
        lines += [f"> **Caution:** {c}", ""]
    lines += [f"Headline: **{headline}**. Accuracy is the unweighted mean over clients of each client's accuracy on "
              "its own test split, in %, mean ± std (population) over training seeds; `(n=1)` marks a single seed. "
              "`acc_best` picks the best round on the test split and is therefore optimistic; it is never the "
              "headline. The best mean per column is **bold**. A paper column quotes the pFedMoAP paper where the "
              "run's dataset, split and setting (backbone, weights, clients, rounds, shots) are the paper's; it is "
              "not measured here.", "", f"Source: {source}.", ""]
    for g, rows in table_rows(records, headline).items():
        lines += [f"## {group_title(g)}", ""]
        entry = paper_entry(paper, g[0], g[1]) if not g[2] else None
        differs = setting_mismatch(paper, entry, [r for r in records if r.group == g]) if entry else []
        pcol = f"paper ({entry['table']})" if entry and not differs else None
        private = any(r["privacy"] for r in rows)
        b2n = [c for c in B2N_METRICS if all(c in r for r in rows)]
        head = (["algorithm"] + [B2N_TITLES[c] for c in b2n] + [COLUMN_TITLES[c] for c in cols] + ["KB up / down per participant-round", "seeds"]
                + (["privacy: run ε, exact (PLD) / zCDP bound"] if private else []) + ([pcol] if pcol else []))
        if b2n:
            lines += [B2N_NOTE, ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        best = {c: max((r[c][0] for r in rows if r[c][2]), default=None) for c in b2n + cols}
        pvals = {r["algorithm"]: (entry["results"].get(r["algorithm"]) if entry else None) for r in rows}
        pbest = max((v[0] for v in pvals.values() if v), default=None)
        for r in rows:
            cells = [r["algorithm"]]
            for c in b2n + cols:
                txt = _pct(r[c])
                cells.append(f"**{txt}**" if r[c][2] and best[c] is not None and r[c][0] == best[c] else txt)
            up, down = r["comm"]
            cells.append("–" if not np.isfinite(up) else f"{up / 1024:.1f} / {down / 1024:.1f}")
            cells.append(",".join(map(str, r["seeds"])))
            if private:
                cells.append(r["privacy"] or "–")
            if pcol:
                pv = pvals[r["algorithm"]]
                txt = f"{pv[0]:.2f} ± {pv[1]:.2f}" if pv else "–"
                cells.append(f"**{txt}**" if pv and pv[0] == pbest else txt)
            lines.append("| " + " | ".join(cells) + " |")
        if pcol and entry.get("note"):
            lines.append(f"\nPaper column: {entry['note']}.")
        if differs:
            lines.append(f"\nNo paper column: the paper's {entry['table']} ran another setting ({'; '.join(differs)}).")
        lines += ["", f"![accuracy vs round](acc_vs_round-{group_slug(g)}.png) "
                      f"![per-client accuracy](client_acc-{group_slug(g)}.png)", ""]
    if missing:
        lines += ["## Missing cells (no finished run)", ""] + [f"- {m}" for m in missing] + [""]
    return "\n".join(lines)


def console_table(records: Sequence[CellRecord], caution: Optional[str]) -> str:
    """algorithm × acc_mean (final round), acc_last5 and the optimistic best, per group, with the caution lines."""
    out = []
    for g, rows in table_rows(records, "acc_last5").items():
        out.append(f"== {group_title(g)} ==")
        out.append(f"{'algorithm':<14}{'acc_mean (final)':>20}{'acc_last5':>18}{'acc_best*':>18}  seeds")
        for r in rows:
            out.append(f"{r['algorithm']:<14}{_pct(r['acc_last']):>20}{_pct(r['acc_last5']):>18}"
                       f"{_pct(r['acc_best']):>18}  {','.join(map(str, r['seeds']))}")
    out.append("* acc_best = best round on the test split (optimistic). Accuracy in %, mean ± std over seeds "
               "(n=1: one seed).")
    out += [f"CAUTION: {c}" for c in setting_cautions(records, caution)]
    return "\n".join(out)


CSV_COLUMNS = ["dataset", "split", "override", "algorithm", "seed", "data_seed", "round", *ROUND_METRICS,
               *SUMMARY_METRICS, *B2N_METRICS, "cell_hash", "run_id", "partition_hash", "git_commit"]


def write_summary_csv(records: Sequence[CellRecord], path: Path) -> Path:
    """Long form: one row per (cell, round) with that round's metrics; the cell's summary repeated on each row."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:  # readers never see half a file
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            base = {"dataset": r.dataset, "split": r.split, "override": r.override, "algorithm": r.algorithm,
                    "seed": r.seed, "data_seed": r.data_seed, "cell_hash": r.cell_hash, "run_id": r.run_id or "",
                    "partition_hash": r.partition_hash, "git_commit": r.git_commit,
                    **{k: repr(float(r.summary[k])) for k in SUMMARY_METRICS if k in r.summary}}
            for rnd in r.rounds:
                w.writerow({**base, "round": int(rnd["round"]),
                            **{k: repr(float(rnd[k])) for k in ROUND_METRICS + B2N_METRICS if k in rnd}})
    return path


def write_outputs(records: Sequence[CellRecord], out_dir: Path, title: str, caution: Optional[str], headline: str,
                  source: str, missing: Sequence[str] = (), sweep: Optional[Dict[str, Any]] = None) -> List[Path]:
    """summary.csv, LEADERBOARD.md and the two plots per group under ``out_dir``."""
    from .plots import accuracy_vs_round, client_distribution

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_summary_csv(records, out_dir / "summary.csv")]
    md = out_dir / "LEADERBOARD.md"
    atomic_write_text(md, markdown(records, headline, title, caution, source, missing))
    paths.append(md)
    groups: Dict[Tuple[str, str, str], List[CellRecord]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    for g, recs in groups.items():
        paths.append(accuracy_vs_round(recs, group_title(g), out_dir / f"acc_vs_round-{group_slug(g)}.png"))
        paths.append(client_distribution(recs, group_title(g), out_dir / f"client_acc-{group_slug(g)}.png"))
    if sweep:
        paths += sweep_plots(records, sweep, headline, out_dir)
    return paths


def sweep_plots(records: Sequence[CellRecord], sweep: Dict[str, Any], headline: str, out_dir: Path) -> List[Path]:
    """One ``acc_vs_<key>-<dataset>_<split>.png`` per dataset × split of a ``benchmark_args.sweep`` grid."""
    from .grid import sweep_points
    from .plots import accuracy_vs_value

    points = sweep_points(sweep)
    key = str(sweep["key"]).split(".")[-1]
    by_data: Dict[Tuple[str, str], List[CellRecord]] = {}
    for r in records:
        by_data.setdefault((r.dataset, r.split), []).append(r)
    return [accuracy_vs_value(recs, points, headline, key, group_title((*g, "")),
                              out_dir / f"acc_vs_{key}-{group_slug((*g, ''))}.png") for g, recs in by_data.items()]


# ---- subcommand ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the benchmark YAML (its grid selects the cells)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V1[,V2]",
                        help="restrict to cells (algo=, dataset=, split=, seed=, override=)")
    parser.add_argument("--headline", default="acc_last5", choices=HEADLINES, help="the headline column")
    parser.add_argument("--out", default=None, help="output folder (default <output_dir>/<benchmark name>)")


def main(args: argparse.Namespace) -> int:
    from fedml_pfedmoap.config import load_config
    from fedml_pfedmoap.tracking import tracker_from_config

    base = load_config(args.config, args.set)
    cells = expand_grid(base, args.only)
    tracker = tracker_from_config(base, args.set)
    if not isinstance(tracker, MlflowLogger):
        raise ValueError("tracking_args.mlflow_tracking_uri: the leaderboard reads MLflow; tracking is off")
    uri = tracker.uri
    records, missing = collect_from_mlflow(tracker, cells)
    if not records:
        raise ValueError(f"no finished runs of {args.config} in MLflow ({uri}, experiment {tracker.experiment!r}); "
                         "run `pfedmoap-bench run --config ...` first")
    out = Path(args.out) if args.out else Path(base.common_args.output_dir) / base.benchmark_args.name
    source = (f"MLflow `{uri}`, experiment `{tracker.experiment}`, {len(records)} finished cell runs, "
              f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    paths = write_outputs(records, out, base.benchmark_args.name, base.benchmark_args.caution, args.headline,
                          source, [c.label for c in missing], base.benchmark_args.sweep)
    print(console_table(records, base.benchmark_args.caution))
    if missing:
        print(f"{len(missing)} cell(s) have no finished run: {', '.join(c.label for c in missing[:5])}"
              f"{' ...' if len(missing) > 5 else ''}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
