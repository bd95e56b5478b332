"""Resume: checkpoint/restore continues a run identically; a SIGKILLed grid restarted ends with the metrics of an
uninterrupted run and does not rerun finished cells; corrupt or truncated checkpoints are detected."""
import logging
import os
import signal

import numpy as np
import pytest
import torch

from bench_helpers import child_runs, cli, history, start_stalled_run, write_grid
from tree_compare import deep_equal

DETERMINISTIC = ("acc_mean", "acc_weighted", "acc_std", "acc_bottom10", "train_loss", "test_loss", "bytes_up",
                 "bytes_down")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


def _experiment(tmp_path, cache, algo, rounds=4):
    from fedml_pfedmoap.config import load_config
    from fedml_pfedmoap.experiment import build_experiment

    cfg = load_config(write_grid(tmp_path, cache, uri=None), [f"train_args.comm_round={rounds}"])
    return build_experiment(cfg, algo, 0, progress=False)


class Crash(BaseException):
    """A simulated hard crash (not an error the grid reports and continues after)."""


@pytest.mark.parametrize("algo", ["local", "promptfl", "pfedmma", "fedmgp"])
def test_snapshot_restore_continues_identically(tmp_path, cache, algo):
    from fedml_pfedmoap.checkpoint import CheckpointStore, restore, snapshot

    full = _experiment(tmp_path, cache, algo).simulator
    ref = full.run()
    store = CheckpointStore(tmp_path / "ck", "cell")
    draws = {}

    def crash_after_round_1(m, sim):
        store.save(snapshot(sim, "h"))
        if m["round"] == 1:
            draws["after"] = (torch.rand(3), np.random.rand(2))
            raise Crash

    first = _experiment(tmp_path, cache, algo).simulator
    first.on_round = crash_after_round_1
    with pytest.raises(Crash):
        first.run()
    second = _experiment(tmp_path, cache, algo).simulator
    torch.manual_seed(123)  # scrambled global RNGs must be put back by restore
    np.random.seed(7)
    ck = store.load("h")
    restore(second, ck)
    assert second.next_round == 2 and (torch.rand(3) == draws["after"][0]).all()
    assert (np.random.rand(2) == draws["after"][1]).all()
    got = second.run()
    for a, b in zip(ref.rounds, got.rounds):
        assert {k: a[k] for k in DETERMINISTIC if k in a} == {k: b[k] for k in DETERMINISTIC if k in b}
    assert got.client_acc == ref.client_acc and got.summary == ref.summary and len(got.rounds) == 4
    assert sorted(second.states) == sorted(full.states)
    for cid, st in full.states.items():  # bit-identical, nested containers included (pFedMMA's adapter dicts)
        deep_equal(st, second.states[cid], f"state {cid}", atol=0.0, rtol=0.0)
    if algo == "promptfl":
        assert torch.equal(full.algo.global_prompt, second.algo.global_prompt)


def _body(next_round, cid_value):
    from fedml_pfedmoap.checkpoint import FORMAT, rng_state

    return {"format": FORMAT, "cell_hash": "h", "next_round": next_round, "finished": False, "mlflow_run_id": "r",
            "result": {"rounds": [{"round": t, "acc_mean": 0.5} for t in range(next_round)], "client_acc": [],
                       "summary": {}},
            "server": {"round": next_round - 1, "global_prompt": torch.full((2, 3), cid_value)},
            "clients": {0: {"ctx": torch.full((2, 3), cid_value), "arr": {"__ndarray__": torch.arange(3)}}, 4: {}},
            "rng": rng_state()}


def test_corrupt_or_truncated_checkpoint_falls_back(tmp_path):
    from fedml_pfedmoap.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path, "cell")
    store.save(_body(1, 1.0))
    store.save(_body(2, 2.0))
    raw = torch.load(store.path, weights_only=True)  # plain data: loads with weights_only
    assert raw["next_round"] == 2 and isinstance(raw["digest"], str) and store.prev.exists()
    assert store.load("h")["clients"][0]["ctx"][0, 0] == 2.0

    # silent corruption that still unpickles: caught by the content digest
    raw["clients"][0]["ctx"][0, 0] = 9.0
    torch.save(raw, store.path)
    with pytest.warns(RuntimeWarning, match="digest mismatch.*resuming from the previous checkpoint"):
        assert store.load("h")["next_round"] == 1
    # a truncated file (killed mid-write without the atomic rename, disk full, ...)
    data = store.prev.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="unreadable.*resuming from the previous checkpoint"):
        got = store.load("h")
    assert got["next_round"] == 1 and got["clients"][4] == {}
    # both unusable: start over
    store.prev.write_bytes(b"\0" * 100)
    with pytest.warns(RuntimeWarning, match="no valid checkpoint left, restarting the cell from round 0"):
        assert store.load("h") is None
    # a checkpoint of another cell is never used
    store.save(_body(3, 3.0))
    with pytest.warns(RuntimeWarning, match="belongs to cell h, not other"):
        assert store.load("other") is None


def test_plain_data_conversion():
    from fedml_pfedmoap.checkpoint import CheckpointError, from_plain, to_plain

    state = {"ctx": torch.ones(2), "counts": np.arange(4), "flag": np.bool_(True), "ids": [1, (2, 3)], 5: None}
    back = from_plain(to_plain(state))
    assert isinstance(back["counts"], np.ndarray) and back["counts"].tolist() == [0, 1, 2, 3]
    assert back["flag"] is True and back["ids"] == [1, (2, 3)] and back[5] is None
    with pytest.raises(CheckpointError, match=r"client\[3\].opt: SGD is not checkpointable"):
        to_plain({"opt": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)}, "client[3]")


def test_runner_resumes_from_previous_when_latest_is_corrupt(tmp_path, cache, monkeypatch, caplog):
    import benchmark_suite.runner as runner

    caplog.set_level(logging.INFO, logger="benchmark_suite.runner")

    kw = dict(uri=None, train_args={"comm_round": 4}, benchmark_args={"name": "tiny", "algorithms": ["local"]})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    grid, ref = write_grid(tmp_path / "a", cache, **kw), write_grid(tmp_path / "b", cache, **kw)

    def fault(label, t):
        if t == 2:
            raise Crash

    monkeypatch.setattr(runner, "_fault_injection", fault)
    with pytest.raises(Crash):
        cli("run", "--config", str(grid), "--no-progress")
    monkeypatch.undo()
    ck = next((tmp_path / "a" / "out" / "tiny" / "checkpoints").glob("*local*[0-9a-f].pt"))
    ck.write_bytes(ck.read_bytes()[:200])  # truncated: round 2's checkpoint is lost, round 1's is the previous
    with pytest.warns(RuntimeWarning, match="resuming from the previous checkpoint"):
        rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 0 and "resume digits/pathological/local/seed0 from round 2" in caplog.text
    assert cli("run", "--config", str(ref), "--no-progress")[0] == 0
    a = (tmp_path / "a" / "out" / "tiny" / "summary.csv").read_text().splitlines()
    b = (tmp_path / "b" / "out" / "tiny" / "summary.csv").read_text().splitlines()
    cols = a[0].split(",")
    keep = [cols.index(k) for k in (*DETERMINISTIC, "acc_last", "acc_last5", "acc_best")]
    assert len(a) == 5 and [[r.split(",")[i] for i in keep] for r in a] == [[r.split(",")[i] for i in keep] for r in b]


def test_sigkill_mid_cell_then_resume_equals_uninterrupted(tmp_path, cache, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    from fedml_pfedmoap.checkpoint import CheckpointStore

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    grid = write_grid(tmp_path / "a", cache, train_args={"comm_round": 4})
    proc = start_stalled_run(grid, "promptfl@1")  # promptfl: round 1 checkpointed, not yet logged
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    uri = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parents, children = child_runs(uri, "tiny")
    before = {r.data.tags["algorithm"]: r for r in children}
    assert {a: r.info.status for a, r in before.items()} == {"zeroshot": "FINISHED", "local": "FINISHED",
                                                             "promptfl": "RUNNING"}
    assert [s for s, _ in history(client, before["promptfl"].info.run_id, "acc_mean")] == [0]
    ck_dir = tmp_path / "a" / "out" / "tiny" / "checkpoints"
    slug = next(ck_dir.glob("*promptfl*[0-9a-f].pt")).stem
    assert CheckpointStore(ck_dir, slug).load(before["promptfl"].data.tags["cell_hash"])["next_round"] == 2

    caplog.set_level(logging.INFO, logger="benchmark_suite.runner")
    rc, out, err = cli("run", "--config", str(grid), "--no-progress")
    assert rc == 0, err
    assert "ran 1 cell(s), 2 already finished" in out
    assert "resume digits/pathological/promptfl/seed0 from round 2" in caplog.text
    parents2, children2 = child_runs(uri, "tiny")
    after = {r.data.tags["algorithm"]: r for r in children2}
    assert len(children2) == 3 and len(parents2) == 2
    for algo in ("zeroshot", "local"):  # finished cells were not rerun
        assert after[algo].info.run_id == before[algo].info.run_id
        assert after[algo].info.end_time == before[algo].info.end_time
    pf = after["promptfl"]
    assert pf.info.run_id == before["promptfl"].info.run_id and pf.info.status == "FINISHED"
    assert pf.data.tags["resumed"] == "true" and pf.data.tags["mlflow.parentRunId"] == parents2[1].info.run_id
    assert client.get_run(parents2[0].info.run_id).info.status == "KILLED"

    ref = write_grid(tmp_path / "b", cache, train_args={"comm_round": 4})
    assert cli("run", "--config", str(ref), "--no-progress")[0] == 0
    ref_uri = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    ref_client = MlflowClient(tracking_uri=ref_uri)
    ref_runs = {r.data.tags["algorithm"]: r for r in child_runs(ref_uri, "tiny")[1]}
    for algo, run in after.items():
        for key in DETERMINISTIC:
            got = history(client, run.info.run_id, key)
            assert got == history(ref_client, ref_runs[algo].info.run_id, key), (algo, key)
            if key == "acc_mean":
                assert [s for s, _ in got] == [0, 1, 2, 3]
        for key in ("acc_last", "acc_last5", "acc_best"):
            assert run.data.metrics[key] == ref_runs[algo].data.metrics[key]
