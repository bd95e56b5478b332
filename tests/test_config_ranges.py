"""Every numeric config key and algorithm hyperparameter has a type and range, checked when the config is read."""
import dataclasses

import pytest

from bench_helpers import cli, write_grid
from fedml_pfedmoap.algorithms import get_algorithm, list_algorithms
from fedml_pfedmoap.config import SECTIONS, ConfigError, from_dict
from fedml_pfedmoap.errors import UserError
from fedml_pfedmoap.ranges import CONFIG_RULES, PARAM_RULES

# (section.key, bad value, expected phrase): hand-written from the meaning of each key
BAD_CONFIG = [
    ("train_args.comm_round", -1, "an integer >= 1"),
    ("train_args.comm_round", 0, "an integer >= 1"),
    ("train_args.comm_round", 2.5, "an integer >= 1"),
    ("train_args.comm_round", "ten", "an integer >= 1"),
    ("train_args.comm_round", True, "an integer >= 1"),
    ("train_args.batch_size", 0, "an integer >= 1"),
    ("train_args.epochs", 0, "an integer >= 1"),
    ("train_args.client_num_in_total", 0, "an integer >= 1"),
    ("train_args.client_num_per_round", -3, "an integer >= 1"),
    ("train_args.eval_every", 0, "an integer >= 1"),
    ("train_args.eval_batch_size", 0, "an integer >= 1"),
    ("train_args.train_clients_per_call", 0, "an integer >= 1"),
    ("common_args.random_seed", -1, "an integer >= 0"),
    ("common_args.data_seed", "x", "an integer >= 0"),
    ("data_args.shots", 0, "an integer >= 1 or null"),
    ("data_args.partition_alpha", 0, "a number > 0"),
    ("data_args.partition_alpha", float("nan"), "a number > 0"),
    ("data_args.partition_alpha", float("inf"), "a number > 0"),
    ("data_args.min_size", -1, "an integer >= 0"),
    ("data_args.clients_per_domain", 0, "an integer >= 1"),
    ("data_args.num_workers", -1, "an integer >= 0"),
    ("model_args.n_ctx", 0, "an integer >= 1"),
    ("device_args.num_threads", 0, "an integer >= 1 or null"),
    ("device_args.worker_num", 0, "an integer >= 1 or null"),
    ("device_args.gpu_id", -1, "an integer >= 0"),
    ("comm_args.round_timeout_s", 0, "a number > 0"),
    ("comm_args.startup_timeout_s", -5, "a number > 0 or null"),
]

BAD_PARAMS = [
    ("promptfl", "lr", "abc", "a number > 0"),
    ("promptfl", "lr", -1, "a number > 0"),
    ("promptfl", "lr", 0, "a number > 0"),
    ("promptfl", "momentum", 1.0, r"a number in \[0, 1\)"),
    ("local", "weight_decay", -0.1, "a number >= 0"),
    ("promptfl", "epochs", 0, "an integer >= 1 or null"),
    ("pfedmoap", "lr", "abc", "a number > 0"),
    ("pfedmoap", "lam", -0.5, "a number >= 0"),
    ("pfedmoap", "num_experts", 0, "an integer >= 1"),
    ("pfedmoap", "heads", 2.5, "an integer >= 1"),
    ("pfedmoap", "scaling", 0, "a number > 0"),
    ("pfedmoap", "gate_lr", -1, "a number >= 0"),
    ("pfedmoap", "d_gating", 0, "an integer >= 1 or null"),
    ("fedprox", "mu", -1, "a number >= 0"),
    ("fedpgp", "rank", 0, "an integer >= 1"),
    ("fedpgp", "tau", 0, "a number > 0"),
    ("fedotp", "eps", 0, "a number > 0"),
    ("fedotp", "gamma", 0, r"a number in \(0, 1\]"),
    ("fedotp", "gamma", 1.5, r"a number in \(0, 1\]"),
    ("fedotp", "max_iter", 0, "an integer >= 1"),
    ("fedotp", "patch_cache_gb", -1, "a number >= 0 or null"),
    ("promptfolio", "theta", 1.2, r"a number in \[0, 1\]"),
]


def _raw(dotted, value):
    sec, key = dotted.split(".")
    return {sec: {key: value}}


@pytest.mark.parametrize("dotted,value,expected", BAD_CONFIG)
def test_bad_numeric_config_key_names_key_and_range(dotted, value, expected):
    with pytest.raises(ConfigError, match=rf"^{dotted}: expected {expected}, got "):
        from_dict(_raw(dotted, value))


@pytest.mark.parametrize("algo,key,value,expected", BAD_PARAMS)
def test_bad_hyperparameter_fails_when_read_and_when_parsed(algo, key, value, expected):
    where = f"algorithm_args.{algo}.{key}"
    with pytest.raises(ConfigError, match=rf"^{where}: expected {expected}, got "):
        from_dict({"algorithm_args": {algo: {key: value}}})
    with pytest.raises(ConfigError, match=rf"^{where}: expected {expected}, got "):
        get_algorithm(algo).parse_params({key: value})


def test_good_values_are_converted():
    cfg = from_dict({"train_args": {"comm_round": "3", "batch_size": 8.0}, "data_args": {"shots": None,
                     "partition_alpha": "1e-1"}, "algorithm_args": {"pfedmoap": {"lr": "1e-3", "num_experts": 4.0}}})
    assert (cfg.train_args.comm_round, cfg.train_args.batch_size) == (3, 8)
    assert isinstance(cfg.train_args.batch_size, int)
    assert cfg.data_args.shots is None and cfg.data_args.partition_alpha == 0.1
    assert cfg.algorithm_args["pfedmoap"] == {"lr": 0.001, "num_experts": 4}
    hp = get_algorithm("pfedmoap").parse_params({"lr": "1e-3", "lambda": 0})
    assert hp.lr == 0.001 and hp.lam == 0.0


def _numeric(f: dataclasses.Field) -> bool:
    t = str(f.type)
    return any(n in t for n in ("int", "float")) and "Dict" not in t and ("List" not in t or "int" in t)


def test_every_numeric_key_has_a_rule_and_its_default_obeys_it():
    for sec, cls in SECTIONS.items():
        if sec == "benchmark_args":  # its lists are checked by the grid; each seed meets common_args.random_seed
            continue
        for f in dataclasses.fields(cls):
            if _numeric(f) and f.type != "bool":
                key = f"{sec}.{f.name}"
                assert key in CONFIG_RULES, f"{key} has no rule in ranges.CONFIG_RULES"
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert CONFIG_RULES[key].check(key, default) == default
    for name in list_algorithms():
        params = get_algorithm(name).Params
        for f in dataclasses.fields(params):
            if _numeric(f) and f.type != "bool":
                assert f.name in PARAM_RULES, f"algorithm_args.{name}.{f.name} has no rule in ranges.PARAM_RULES"
                default = getattr(params(), f.name)
                assert PARAM_RULES[f.name].check(f.name, default) == default
    assert all(f"{k.split('.')[0]}" in SECTIONS for k in CONFIG_RULES)


@pytest.mark.parametrize("override,key", [("train_args.comm_round=-1", "train_args.comm_round"),
                                          ("train_args.batch_size=0", "train_args.batch_size"),
                                          ("algorithm_args.promptfl.lr=abc", "algorithm_args.promptfl.lr"),
                                          ("algorithm_args.promptfl.lr=-1", "algorithm_args.promptfl.lr")])
def test_cli_rejects_bad_number_in_one_line_before_training(tmp_path, override, key):
    path = write_grid(tmp_path, tmp_path / "cache")
    rc, out, err = cli("run", "--config", str(path), "--set", override)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pfedmoap-bench run: error: {key}: expected ")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_user_errors_share_one_base():
    from benchmark_suite.grid import GridError
    from fedml_pfedmoap.checkpoint import CheckpointError
    from fedml_pfedmoap.data.base import DatasetError
    from fedml_pfedmoap.data.partition import PartitionError

    for cls in (ConfigError, CheckpointError, DatasetError, PartitionError, GridError):
        assert issubclass(cls, UserError)
