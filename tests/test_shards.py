"""``run --shard i/n``: a deterministic partition of the grid; shards run one after the other, or at the same time
through one tracking server, merge with ``leaderboard`` into exactly the unsharded run's summary."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench_helpers import ROOT, cli, write_grid

GRID = {"train_args": {"comm_round": 2}, "benchmark_args": {"name": "tiny", "algorithms": ["zeroshot", "promptfl"],
                                                            "seeds": [0, 1]}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shard-cache")


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory, cache):
    """The 4-cell grid run in one invocation: its summary.csv rows."""
    tmp = tmp_path_factory.mktemp("unsharded")
    rc, out, err = cli("run", "--config", str(write_grid(tmp, cache, **GRID)), "--no-progress")
    assert rc == 0, err
    return _accuracies(tmp / "out" / "tiny" / "summary.csv")


def _accuracies(path: Path):
    """Per row: the cell, the round and every accuracy column, as the strings in the file."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = ["dataset", "split", "algorithm", "seed", "round", "cell_hash"] + [k for k in rows[0] if
                                                                            k.startswith("acc_")]
    return [{k: r[k] for k in keys} for r in rows]


def _dry_run(grid: Path, *extra: str):
    rc, out, err = cli("run", "--config", str(grid), "--dry-run", *extra)
    assert rc == 0, err
    return [line.rsplit("[", 1)[1].rstrip("]") for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("spec", ["4/4", "2/1", "-1/2", "1/0", "1", "a/b", "1/2/3", ""])
def test_bad_shard_specs_are_one_line_errors(tmp_path, spec):
    grid = write_grid(tmp_path, tmp_path / "cache", **GRID)
    rc, out, err = cli("run", "--config", str(grid), "--dry-run", f"--shard={spec}")
    assert rc == 2 and err.strip() == f"pfedmoap-bench run: error: --shard: expected i/n with 0 <= i < n, got {spec!r}"


def test_assignment_longest_first_to_the_least_loaded_shard():
    from benchmark_suite.shards import assign

    cells = [("d", 5), ("a", 3), ("c", 3), ("b", 2), ("e", 2), ("f", 1)]
    # by hand: d5 -> 0 (5,0); a3 -> 1 (5,3); c3 -> 1 (5,6); b2 -> 0 (7,6); e2 -> 1 (7,8); f1 -> 0 (8,8)
    want = {"d": 0, "a": 1, "c": 1, "b": 0, "e": 1, "f": 0}
    assert assign(cells, 2) == want and assign(reversed(cells), 2) == want
    assert assign(cells, 1) == dict.fromkeys(want, 0)
    assert sorted(assign(cells, 8).values()) == [0, 1, 2, 3, 4, 5]  # more shards than cells: some stay empty


def test_dry_run_shards_partition_the_grid_independently_of_only(tmp_path):
    grid = write_grid(tmp_path, tmp_path / "cache", train_args={"comm_round": 2},
                      benchmark_args={"name": "tiny", "algorithms": ["zeroshot", "local", "promptfl"], "seeds": [0, 1]})
    full = _dry_run(grid)
    assert len(set(full)) == 6
    for n in (1, 2, 4, 7):
        shards = [_dry_run(grid, "--shard", f"{i}/{n}") for i in range(n)]
        # equal rounds: longest-first is a deal in hash order, cell k of the sorted hashes to shard k mod n
        assert [sorted(s) for s in shards] == [sorted(full)[i::n] for i in range(n)]
    only = set(_dry_run(grid, "--only", "algo=local,promptfl"))
    for i in range(3):
        assert set(_dry_run(grid, "--shard", f"{i}/3", "--only", "algo=local,promptfl")) == \
            set(_dry_run(grid, "--shard", f"{i}/3")) & only


def test_sharded_runs_merge_into_the_unsharded_summary(tmp_path, cache, unsharded):
    grid = write_grid(tmp_path, cache, **GRID)
    shard_cells = [set(_dry_run(grid, "--shard", f"{i}/2")) for i in range(2)]
    rc, out, err = cli("run", "--config", str(grid), "--no-progress", "--shard", "1/2")
    assert rc == 0, err
    part = _accuracies(tmp_path / "out" / "tiny" / "shards" / "1-of-2" / "summary.csv")
    assert {r["cell_hash"] for r in part} == shard_cells[1]  # a shard's own outputs hold its cells only
    assert not (tmp_path / "out" / "tiny" / "summary.csv").exists()
    rc, out, err = cli("leaderboard", "--config", str(grid))
    assert rc == 0, err
    assert f"{len(shard_cells[0])} cell(s) have no finished run" in out
    labels = [line.split("  [")[0] for line in cli("run", "--config", str(grid), "--dry-run", "--shard", "0/2")[1]
              .splitlines() if line.strip()]
    assert all(label in out for label in labels)
    rc, out, err = cli("run", "--config", str(grid), "--no-progress", "--shard", "0/2")
    assert rc == 0, err
    rc, out, err = cli("leaderboard", "--config", str(grid))
    assert rc == 0 and "no finished run" not in out, err
    assert _accuracies(tmp_path / "out" / "tiny" / "summary.csv") == unsharded


@pytest.mark.slow
def test_two_shards_at_once_through_one_tracking_server(tmp_path, cache, unsharded):
    """Two shard processes at the same time log through one server over the grid's sqlite store; the leaderboard,
    read straight from sqlite afterwards, equals the unsharded run, client accuracies (artifacts) included."""
    from benchmark_suite.mlflow_server import tracking_server

    grid = write_grid(tmp_path, cache, **GRID)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tracking_server("auto", f"sqlite:///{tmp_path / 'mlflow.db'}") as uri:
        procs = [subprocess.Popen([sys.executable, "-m", "benchmark_suite.cli", "run", "--config", str(grid),
                                   "--no-progress", "--shard", f"{i}/2", "--mlflow-server", uri], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outs]
    assert all(f"MLflow: {uri}" in o for o, _ in outs)
    rc, out, err = cli("leaderboard", "--config", str(grid))
    assert rc == 0 and "no finished run" not in out and "no client_acc.csv" not in err, err
    assert _accuracies(tmp_path / "out" / "tiny" / "summary.csv") == unsharded
