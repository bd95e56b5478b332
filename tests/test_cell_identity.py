"""Cell identity: keys that do not change a cell's numbers (paths, device, workers, caches, tracking) stay out of its
hash, so the README's real-data commands (a run with ``--set data_args.data_root=... --set device_args.device=...``,
then a bare ``leaderboard --config``) find the runs; a failed pre-run check leaves no MLflow experiment behind; MLflow
run names put what differs first."""
import pytest
import yaml

from bench_helpers import ROOT, child_runs, cli
from fixtures_data import make_coop


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory):
    """A CoOp-layout Caltech101 with 4 classes (4 train, 1 val, 2 test images each): nothing is downloaded."""
    root = tmp_path_factory.mktemp("data")
    make_coop(root, "caltech101", per_class=(4, 1, 2))
    return root


def paper_table1_small(tmp, **changes):
    """configs/benchmarks/paper_table1.yaml as shipped (data_root null, device auto), shrunk for a CPU test in its
    result keys only: tiny random-init CLIP, 2 clients, 2 rounds, 2 shots, one dataset, two algorithms, one seed."""
    raw = yaml.safe_load((ROOT / "configs" / "benchmarks" / "paper_table1.yaml").read_text())
    assert raw["data_args"]["data_root"] is None and raw["device_args"]["device"] == "auto"
    raw["common_args"].update(cache_dir=str(tmp / "cache"), output_dir=str(tmp / "out"))
    raw["data_args"].update(shots=2, train_augment="none")
    raw["model_args"].update(model="tiny-clip", pretrained=None, n_ctx=4)
    raw["train_args"].update(client_num_in_total=2, client_num_per_round=2, comm_round=2, epochs=1, batch_size=8)
    raw["tracking_args"] = {"mlflow_tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    raw["benchmark_args"].update(datasets=["caltech101"], algorithms=["zeroshot", "local"], seeds=[0])
    for dotted, value in changes.items():
        sec, key = dotted.split(".")
        raw[sec][key] = value
    path = tmp / "paper_table1.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_readme_commands_run_with_overrides_then_bare_leaderboard(tmp_path, data_tree, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PFEDMOAP_DATA_ROOT", raising=False)
    cfg = str(paper_table1_small(tmp_path))
    rc, out, err = cli("run", "--config", cfg, "--set", f"data_args.data_root={data_tree}",
                       "--set", "device_args.device=cpu", "--no-progress")
    assert rc == 0, err
    assert "ran 2 cell(s)" in out
    rc, out, err = cli("leaderboard", "--config", cfg)  # the README's bare second command
    assert rc == 0, err
    assert "== caltech101 · pathological ==" in out and "have no finished run" not in out
    assert {line.split()[0] for line in out.splitlines()[2:4]} == {"zeroshot", "local"}
    # the data moved and another device: the same cells, finished (nothing reruns)
    moved = tmp_path / "moved"
    data_tree.rename(moved)
    try:
        rc, out, err = cli("run", "--config", cfg, "--set", f"data_args.data_root={moved}", "--no-progress",
                           "--set", "device_args.num_threads=1", "--set", "data_args.num_workers=1")
    finally:
        moved.rename(data_tree)
    assert rc == 0, err
    assert "ran 0 cell(s), 2 already finished" in out
    # MLflow run names: what differs first (the UI cuts long names); the locations are recorded as params
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    children = child_runs(uri, "paper_table1")[1]
    assert sorted(r.info.run_name for r in children) == ["local · seed0 · pathological · caltech101",
                                                          "zeroshot · seed0 · pathological · caltech101"]
    for r in children:
        assert r.data.params["data_args.data_root"] == str(data_tree)
        assert r.data.params["device_args.device"] == "cpu"


def _hashes(path, sets=()):
    from benchmark_suite.grid import expand_grid
    from fedml_pfedmoap.config import load_config

    return {c.label: c.hash for c in expand_grid(load_config(path, list(sets)))}


RUN_CHANGES = ["data_args.data_root=/elsewhere/data", "device_args.device=cuda:1", "device_args.using_gpu=false",
               "device_args.num_threads=7", "device_args.worker_num=3", "device_args.gpu_id=2",
               "data_args.num_workers=4", "common_args.cache_dir=/tmp/other-cache", "common_args.output_dir=/o",
               "common_args.run_name=renamed", "common_args.training_type=cross_silo",
               "tracking_args.mlflow_tracking_uri=http://127.0.0.1:1", "tracking_args.mlflow_experiment=x",
               "comm_args.backend=GRPC", "comm_args.state_dir=/s", "comm_args.round_timeout_s=5",
               "model_args.compile_text=true", "train_args.batch_eval_text=true",
               "train_args.train_clients_per_call=2", "train_args.eval_batch_size=7",
               "benchmark_args.caution=other words", "environment_args.bootstrap=x.sh",
               "data_args.dataset_options={image_root: /imgs, verify_md5: true}"]
RESULT_CHANGES = ["train_args.comm_round=3", "train_args.epochs=2", "train_args.batch_size=4",
                  "train_args.client_num_in_total=3", "train_args.eval_every=2", "data_args.shots=3",
                  "data_args.layout=torchvision", "data_args.train_augment=online", "model_args.n_ctx=8",
                  "model_args.precision=bf16", "model_args.model=mini-clip", "common_args.data_seed=1",
                  "model_args.pretrained=/weights/other.pt", "data_args.dataset_options={split_file: mine.json}",
                  "algorithm_args.local.lr=0.5"]


def test_identity_ignores_run_keys_and_follows_result_keys(tmp_path):
    cfg = paper_table1_small(tmp_path, **{"model_args.pretrained": "/weights/RN50.pt"})
    h0 = _hashes(cfg)
    assert len(set(h0.values())) == 2
    assert _hashes(cfg, RUN_CHANGES) == h0
    assert _hashes(cfg, ["model_args.pretrained=/moved/elsewhere/RN50.pt"]) == h0  # same file, moved
    for change in RESULT_CHANGES:
        got = _hashes(cfg, [change])
        changed = {k for k in h0 if got[k] != h0[k]}
        want = {k for k in h0 if "/local/" in k} if change.startswith("algorithm_args.local") else set(h0)
        assert changed == want, change


def test_every_config_key_is_classified():
    """A new config key must be decided (and documented in docs/benchmark.md): RUN keys stay out of the identity."""
    from benchmark_suite.identity import RESULT_KEYS, RUN_KEYS
    from fedml_pfedmoap.config import Config

    keys = set(Config().flat())
    assert not RUN_KEYS & RESULT_KEYS
    assert keys == RUN_KEYS | RESULT_KEYS, keys ^ (RUN_KEYS | RESULT_KEYS)
    doc = (ROOT / "docs" / "benchmark.md").read_text().split("### Cell identity")[1].split("\n### ")[0]
    run_doc, result_doc = doc.split("**Result keys")
    for k in keys:
        section, key = k.split(".", 1)
        part = run_doc if k in RUN_KEYS else result_doc
        bullet = part[part.index(f"* `{section}`:"):].split("\n  * ")[0]
        assert f"`{key}`" in bullet, (k, bullet)


def test_run_names_put_what_differs_first(tmp_path):
    from benchmark_suite.grid import expand_grid
    from fedml_pfedmoap.config import load_config

    cfg = paper_table1_small(tmp_path)
    cells = expand_grid(load_config(cfg, ["benchmark_args.overrides=[{algorithm_args.local.lr: 0.1}]",
                                          "benchmark_args.splits=[{partition_method: dirichlet, partition_alpha: 0.5}]",
                                          "benchmark_args.seeds=[3]"]))
    assert [c.run_name for c in cells] == ["zeroshot · lr=0.1 · seed3 · dirichlet-0.5 · caltech101",
                                           "local · lr=0.1 · seed3 · dirichlet-0.5 · caltech101"]


def _experiments(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = client.search_experiments()
    return sorted(e.name for e in exps), client.search_runs([e.experiment_id for e in exps])


@pytest.mark.parametrize("change", [
    {"data_args.data_root": "MISSING"},  # no data
    {"train_args.client_num_in_total": 9, "train_args.client_num_per_round": 9},  # 4 classes for 9 clients
    {"model_args.model": "no-such-clip"},
])
def test_failed_pre_run_check_leaves_no_mlflow_experiment(tmp_path, data_tree, monkeypatch, change):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PFEDMOAP_DATA_ROOT", raising=False)
    root = str(tmp_path / "missing") if change.get("data_args.data_root") == "MISSING" else str(data_tree)
    cfg = paper_table1_small(tmp_path, **{**change, "data_args.data_root": root})
    try:
        rc = cli("run", "--config", str(cfg), "--no-progress")[0]
    except Exception:  # noqa: BLE001 - how the error is printed is the command line's concern, not this test's
        rc = None
    assert rc != 0
    names, runs = _experiments(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert names == ["Default"] and runs == []
    assert not (tmp_path / "out" / "paper_table1" / "checkpoints").exists()


def test_algorithm_overrides_apply_to_that_algorithm_only_and_are_flagged(tmp_path):
    from benchmark_suite.grid import expand_grid
    from benchmark_suite.leaderboard import setting_cautions
    from fedml_pfedmoap.config import load_config

    cfg = paper_table1_small(tmp_path)
    cells = expand_grid(load_config(cfg, ["benchmark_args.algorithms=[local, pfedmma]"]))
    model = {c.algorithm: c.cfg.model_args for c in cells}
    assert (model["local"].model, model["local"].pretrained) == ("tiny-clip", None)
    assert (model["pfedmma"].model, model["pfedmma"].pretrained) == ("ViT-B-16", "openai")  # as shipped
    assert all(c.cfg.benchmark_args.algorithm_overrides == {} for c in cells)  # the logged config is this cell alone
    plain = expand_grid(load_config(cfg, ["benchmark_args.algorithms=[local, pfedmma]",
                                          "benchmark_args.algorithm_overrides={}"]))
    assert [c.hash for c in plain][0] == cells[0].hash and plain[1].hash != cells[1].hash

    class Rec:
        def __init__(self, algorithm, model):
            self.algorithm, self.dataset = algorithm, "caltech101"
            self.setting = {"model_args.model": model, "model_args.pretrained": "openai"}

    lines = setting_cautions([Rec("local", "RN50"), Rec("pfedmma", "ViT-B-16"), Rec("fedmgp", "ViT-B-16")])
    assert lines == ["rows use different backbones: RN50 (local); ViT-B-16 (fedmgp, pfedmma)"]
    assert setting_cautions([Rec("local", "RN50"), Rec("promptfl", "RN50")]) == []
