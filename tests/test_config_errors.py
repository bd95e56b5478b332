"""Bad input fails before training with a message naming the key and the valid choices."""
import pytest

from fedml_pfedmoap.config import ConfigError, from_dict, load_config
from fedml_pfedmoap.experiment import build_experiment


def test_unknown_algorithm_lists_choices(quick_cfg):
    with pytest.raises(KeyError, match="valid choices: .*promptfl"):
        build_experiment(quick_cfg, "fedsomething", progress=False)


def test_unknown_model_lists_choices(quick_cfg):
    quick_cfg.model_args.model = "ViT-Q-99"
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'.*tiny-clip|unknown model 'ViT-Q-99'"):
        build_experiment(quick_cfg, "promptfl", progress=False)


def test_unknown_config_key_and_section():
    with pytest.raises(ConfigError, match=r"train_args.comm_rounds.*valid keys: .*comm_round"):
        from_dict({"train_args": {"comm_rounds": 3}})
    with pytest.raises(ConfigError, match="unknown section 'trainargs'"):
        from_dict({"trainargs": {}})


def test_strict_booleans_and_numbers():
    with pytest.raises(ConfigError, match="device_args.using_gpu: expected a boolean"):
        from_dict({"device_args": {"using_gpu": "maybe"}})
    assert from_dict({"device_args": {"using_gpu": "false"}}).device_args.using_gpu is False
    with pytest.raises(ConfigError, match="train_args.comm_round: expected an integer >= 1"):
        from_dict({"train_args": {"comm_round": "ten"}})
    with pytest.raises(ConfigError, match="benchmark_args.caution: expected a string, got a dict"):
        from_dict({"benchmark_args": {"caution": {"mini CLIP": "not CLIP"}}})  # an unquoted 'a: b' value
    with pytest.raises(ConfigError, match="data_args.dataset: expected a string"):
        from_dict({"data_args": {"dataset": ["digits"]}})
    assert from_dict({"benchmark_args": {"caution": "mini CLIP: not CLIP"}}).benchmark_args.caution == "mini CLIP: not CLIP"


def test_unknown_algorithm_param(quick_cfg):
    quick_cfg.algorithm_args["promptfl"] = {"lrr": 0.1}
    with pytest.raises(ValueError, match=r"algorithm_args.promptfl: unknown key\(s\) \['lrr'\]"):
        build_experiment(quick_cfg, "promptfl", progress=False)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
