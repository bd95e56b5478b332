"""A FedML user's own fedml_config.yaml: FedML's partition, data-folder, test-frequency and device keys."""
import logging
import shutil

import pytest

from fedml_helpers import ROOT, write_config
from fedml_pfedmoap.config import ConfigError
from fedml_pfedmoap.data.base import DatasetError
from fedml_pfedmoap.fedml_plugin import config as plugin_config
from fedml_pfedmoap.fedml_plugin.config import config_from_namespace, load_plugin_config, to_fedml_namespace

pytestmark = pytest.mark.fedml


def test_hetero_partition_is_dirichlet_with_partition_alpha(tmp_path):
    path = write_config(tmp_path, "simulation.yaml", {"data_args": {"partition_method": "hetero",
                                                                    "partition_alpha": 0.3}})
    data = load_plugin_config(path).cfg.data_args
    assert (data.partition_method, data.partition_alpha) == ("dirichlet", 0.3)


def test_data_cache_dir_is_the_data_root_unless_data_root_is_set(tmp_path):
    (tmp_path / "fedml_data").mkdir()
    path = write_config(tmp_path, "simulation.yaml", {"data_args": {"data_cache_dir": "fedml_data"}})
    assert load_plugin_config(path).cfg.data_args.data_root == str(tmp_path / "fedml_data")  # next to the YAML
    path = write_config(tmp_path, "simulation.yaml", {"data_args": {"data_cache_dir": "fedml_data",
                                                                    "data_root": "/elsewhere"}})
    assert load_plugin_config(path).cfg.data_args.data_root == "/elsewhere"


def test_dataset_missing_under_data_cache_dir_names_both_keys(tmp_path):
    from fedml_pfedmoap.experiment import Resources

    missing = tmp_path / "no_such_folder"
    path = write_config(tmp_path, "simulation.yaml", {"data_args": {"dataset": "caltech101",
                                                                    "data_cache_dir": str(missing)}})
    with pytest.raises(DatasetError) as err:
        Resources().dataset(load_plugin_config(path).cfg)
    assert str(missing) in str(err.value) and "data_args.data_root" in str(err.value)
    assert "data_cache_dir" in str(err.value)


def test_frequency_of_the_test_sets_the_evaluation_rounds(tmp_path):
    from fedml_pfedmoap.experiment import build_experiment

    path = write_config(tmp_path, "simulation.yaml", {
        "validation_args": {"frequency_of_the_test": 2},
        "train_args": {"comm_round": 5, "client_num_in_total": 3, "client_num_per_round": 3,
                       "federated_optimizer": "PromptFL"},
        "model_args": {"n_ctx": 2}, "data_args": {"shots": 2}})
    pc = load_plugin_config(path)
    assert pc.cfg.train_args.eval_every == 2
    ns = to_fedml_namespace(pc)
    assert ns.frequency_of_the_test == 2
    ns.yaml_config_file = ""
    assert config_from_namespace(ns).cfg.train_args.eval_every == 2
    result = build_experiment(pc.cfg, progress=False).simulator.run()
    evaluated = [r["round"] for r in result.rounds if "acc_mean" in r]
    assert evaluated == [1, 3, 4]  # rounds 2 and 4 (1-based), and the last round


@pytest.mark.parametrize("patch,message", [
    ({"validation_args": {"frequency_of_the_test": 0}}, "frequency_of_the_test: expected an integer >= 1"),
    ({"validation_args": {"frequency_of_the_test": 2}, "train_args": {"eval_every": 3}},
     "frequency_of_the_test=2 and train_args.eval_every=3 disagree"),
])
def test_bad_frequency_of_the_test(tmp_path, patch, message):
    with pytest.raises(ConfigError, match=message):
        load_plugin_config(write_config(tmp_path, "simulation.yaml", patch))


def test_ignored_fedml_keys_are_warned_about_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(plugin_config, "_WARNED", set())
    path = write_config(tmp_path, "simulation.yaml", {"device_args": {"gpu_id": 1},
                                                      "train_args": {"client_id_list": "[]"}})
    with caplog.at_level(logging.WARNING, logger=plugin_config.__name__):
        load_plugin_config(path)
        load_plugin_config(path)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("client_id_list is ignored") for m in messages) == 1
    assert sum(m.startswith("gpu_id is ignored") and "device_args.device" in m for m in messages) == 1


@pytest.mark.parametrize("name", ["simulation.yaml", "cross_silo_mpi.yaml", "cross_silo_grpc.yaml"])
def test_example_configs_use_the_packaged_mini_clip_and_a_valid_split(tmp_path, name):
    from pathlib import Path

    from fedml_pfedmoap.config import resolve_pretrained
    from fedml_pfedmoap.data.base import build_dataset
    from fedml_pfedmoap.data.partition import make_partition
    from fedml_pfedmoap.experiment import _partition_params

    shutil.copy(ROOT / "configs" / "fedml" / "grpc_ipconfig.csv", tmp_path)  # named relative to the YAML
    cfg = load_plugin_config(write_config(tmp_path, name, {})).cfg
    assert cfg.model_args.model == "mini-clip"  # trained weights, not tiny-clip's random init
    assert Path(resolve_pretrained(cfg.model_args.pretrained)).name == "mini-clip.safetensors"
    part = make_partition(build_dataset(cfg.data_args.dataset), cfg.data_args.partition_method,
                          cfg.train_args.client_num_in_total, cfg.common_args.data_seed, **_partition_params(cfg))
    assert min(len(t) for t in part.train) > 0
