"""Benchmark grids: expansion, labels, cell hashes, --only, validation before any run, and a tracking-off run."""
import csv

import pytest

from bench_helpers import cli, write_grid


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


def _cells(path, sets=(), only=()):
    from benchmark_suite.grid import expand_grid
    from fedml_pfedmoap.config import load_config

    return expand_grid(load_config(path, list(sets)), list(only))


def test_grid_expansion_labels_and_aliases(tmp_path, cache):
    grid = write_grid(tmp_path, cache, uri=None, benchmark_args={
        "name": "g", "algorithms": ["zeroshot", "promptfl"], "seeds": [0, 1],
        "splits": ["pathological", {"partition_method": "dirichlet", "partition_alpha": 0.5, "min_size": 2},
                   {"partition_method": "pathological", "shots": 4}],
        "overrides": [{"name": "base"}, {"algorithm_args": {"promptfl": {"lr": 0.01}}}]})
    cells = _cells(grid)
    assert len(cells) == 3 * 2 * 2 * 2
    labels = {c.label for c in cells}
    assert "digits/dirichlet-0.5-min_size=2/promptfl/seed1/lr=0.01" in labels
    assert "digits/pathological-4shot/zeroshot/seed0/base" in labels
    c = next(c for c in cells if c.split.startswith("dirichlet") and c.algorithm == "promptfl" and c.seed == 1
             and c.override == "lr=0.01")
    assert c.cfg.data_args.partition_method == "dirichlet" and c.cfg.data_args.partition_alpha == 0.5
    assert c.cfg.data_args.min_size == 2 and c.cfg.common_args.random_seed == 1
    assert c.cfg.algo_params("promptfl") == {"lr": 0.01}
    assert c.cfg.train_args.federated_optimizer == "promptfl"
    # the lr override only concerns promptfl: zero-shot cells of both overrides are one run (same hash)
    zs = [x for x in cells if x.algorithm == "zeroshot" and x.split == "pathological" and x.seed == 0]
    assert len(zs) == 2 and zs[0].hash == zs[1].hash
    pf = [x for x in cells if x.algorithm == "promptfl" and x.split == "pathological" and x.seed == 0]
    assert pf[0].hash != pf[1].hash
    from benchmark_suite.grid import unique_cells

    assert len(unique_cells(cells)) == len(cells) - 3 * 2  # one zero-shot alias per (split, seed)
    # one partition per (dataset, split, data seed): seeds and algorithms share it
    assert len({x.partition_key for x in cells}) == 3


def test_cell_hash_ignores_bookkeeping_not_semantics(tmp_path, cache):
    grid = write_grid(tmp_path, cache, uri=None)
    h0 = {c.label: c.hash for c in _cells(grid)}
    same = {c.label: c.hash for c in _cells(grid, ["tracking_args.mlflow_tracking_uri=http://127.0.0.1:1",
                                                   "device_args.num_threads=2", "common_args.output_dir=elsewhere"])}
    assert h0 == same
    other = {c.label: c.hash for c in _cells(grid, ["train_args.comm_round=4"])}
    assert set(other) == set(h0) and all(other[k] != h0[k] for k in h0)
    assert len(set(h0.values())) == 3


def test_only_selects_cells(tmp_path, cache):
    grid = write_grid(tmp_path, cache, uri=None, benchmark_args={"name": "g", "seeds": [0, 1],
                                                                 "algorithms": ["zeroshot", "local", "promptfl"]})
    cells = _cells(grid, only=["algo=local,promptfl", "seed=1"])
    assert sorted((c.algorithm, c.seed) for c in cells) == [("local", 1), ("promptfl", 1)]
    from benchmark_suite.grid import GridError

    with pytest.raises(GridError, match="fedavg not in the grid"):
        _cells(grid, only=["algo=fedavg"])
    with pytest.raises(GridError, match="unknown key 'colour'"):
        _cells(grid, only=["colour=red"])


@pytest.mark.parametrize("bench, expected", [
    ({"algorithms": ["promptfl", "fedsgd"]}, r"benchmark_args.algorithms\[1\]: unknown algorithm 'fedsgd'; "
                                             r"valid choices: .*promptfl"),
    ({"splits": ["pathological", {"partition_method": "dirichlet", "partition_alpa": 0.5}]},
     r"benchmark_args.splits\[1\].partition_alpa: not a data_args key"),
    ({"splits": ["iid-ish"]}, r"benchmark_args.splits\[0\].partition_method: unknown method 'iid-ish'"),
    ({"seeds": [0, "one"]}, r"benchmark_args.seeds\[1\]: expected integer seeds"),
    ({"seeds": 3}, r"benchmark_args.seeds: expected a list"),
    ({"datasets": ["digits", "imagenet-21k"]}, r"benchmark_args.datasets\[1\]: unknown dataset 'imagenet-21k'"),
    ({"overrides": [{"train_args.comm_rounds": 3}]}, r"benchmark_args.overrides\[0\]: train_args.comm_rounds.*"
                                                     r"unknown key"),
    ({"overrides": [{"algorithm_args.promptfl.lrate": 0.1}]}, r"algorithm_args.promptfl.*lrate"),
    ({"name": "my grid!"}, r"benchmark_args.name"),
    ({"algorithm_overrides": {"nosuch": {"model_args.model": "ViT-B-16"}}},
     r"benchmark_args.algorithm_overrides.nosuch: expected a registered algorithm"),
    ({"algorithms": ["local"], "algorithm_overrides": {"local": {"model_args.modell": "x"}}},
     r"benchmark_args.algorithm_overrides.local: .*modell"),
])
def test_malformed_grid_fails_before_any_run(tmp_path, cache, bench, expected):
    import re

    grid = write_grid(tmp_path, cache, benchmark_args={"name": "bad", **bench})
    rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 2, (out, err)
    assert re.search(expected, err), err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()  # nothing ran


def test_run_without_tracking_writes_summary_and_skips_finished(tmp_path, cache):
    grid = write_grid(tmp_path, cache, uri=None)
    rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 0, err
    assert "CAUTION: tiny random-init CLIP" in out and "ran 3 cell(s)" in out
    table = out.split("== digits · pathological ==")[1]
    for algo in ("zeroshot", "local", "promptfl"):
        assert f"\n{algo} " in table
    rows = list(csv.DictReader(open(tmp_path / "out" / "tiny" / "summary.csv")))
    for col in ("dataset", "split", "algorithm", "seed", "round", "acc_mean", "acc_last5", "acc_best"):
        assert col in rows[0]
    assert len(rows) == 3 * 3
    for algo in ("zeroshot", "local", "promptfl"):
        accs = [float(r["acc_mean"]) for r in rows if r["algorithm"] == algo]
        last5 = {float(r["acc_last5"]) for r in rows if r["algorithm"] == algo}
        best = {float(r["acc_best"]) for r in rows if r["algorithm"] == algo}
        assert len(accs) == 3 and last5 == {sum(accs) / 3} and best == {max(accs)}
    assert (tmp_path / "out" / "tiny" / "LEADERBOARD.md").exists()
    rc, out2, _ = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 0 and "ran 0 cell(s), 3 already finished" in out2
    rows2 = list(csv.DictReader(open(tmp_path / "out" / "tiny" / "summary.csv")))
    assert [r["acc_mean"] for r in rows2] == [r["acc_mean"] for r in rows]
