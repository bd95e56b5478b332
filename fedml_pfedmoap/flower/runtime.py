"""What the ServerApp and the ClientApp share: the run config, the experiment cache, the node's partition.

The app's run config (``[tool.flwr.app.config]`` of ``configs/flower/pyproject.toml``, or ``flwr run --run-config``)
names the suite's YAML (``config``, a path: absolute, or relative to the working directory of the process that runs the
app) and optional ``overrides`` (``"section.key=value ..."``, shell-quoted). Every process builds the experiment from
it once (``build_experiment``: the same composition as the simulator, so the same seeds give the same partitions,
features and initial prompts) and keeps it for later messages of the same run config.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

from ..config import Config, load_config
from ..errors import ConfigError
from ..netaudit import maybe_install_audit_from_env

maybe_install_audit_from_env()  # every app process (ServerApp, ClientApp, Ray actor) before it opens a socket

_EXPERIMENTS: Dict[Tuple[str, str], Any] = {}


def load_run_config(run_config: Mapping[str, Any]) -> Config:
    """The suite config named by the Flower run config (see the module docstring)."""
    path = run_config.get("config")
    if not path:
        raise ConfigError("Flower run config 'config': missing; set it in [tool.flwr.app.config] of the app's "
                          "pyproject.toml or pass --run-config 'config=\"path/to/config.yaml\"'")
    if not Path(str(path)).is_file():
        raise ConfigError(f"Flower run config 'config': file {str(path)!r} does not exist (relative paths are read "
                          f"from {Path.cwd()})")
    cfg = load_config(str(path), shlex.split(str(run_config.get("overrides", "") or "")))
    from ..federated.rounds import check_label_shift

    check_label_shift(cfg, "Flower")
    return cfg


def experiment(run_config: Mapping[str, Any]) -> Any:
    """The process's experiment for this run config (built on first use)."""
    key = (str(run_config.get("config")), str(run_config.get("overrides", "")))
    if key not in _EXPERIMENTS:
        from ..experiment import build_experiment

        _EXPERIMENTS[key] = build_experiment(load_run_config(run_config), progress=False)
    return _EXPERIMENTS[key]


def partition_of(node_config: Mapping[str, Any]) -> Tuple[int, int]:
    """``(partition-id, num-partitions)`` of a SuperNode (Flower's simulation sets both; a deployed SuperNode gets
    them from ``flower-supernode --node-config "partition-id=K num-partitions=P"``)."""
    try:
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"SuperNode node config {dict(node_config)}: expected integer 'partition-id' and "
                          "'num-partitions' (flower-supernode --node-config \"partition-id=K num-partitions=P\")") from None
    if not 0 <= pid < num:
        raise ConfigError(f"SuperNode node config: partition-id={pid} outside 0..num-partitions-1={num - 1}")
    return pid, num


def serves(client_index: int, partition: int, num_partitions: int) -> bool:
    """Client ``i`` is served by the SuperNode of partition ``i mod num-partitions``."""
    return int(client_index) % int(num_partitions) == int(partition)
