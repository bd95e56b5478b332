"""Keep FedML 0.9.6 offline and inside a directory the config controls (docs/fedml.md §Stack notes).

* ``isolate_home(dir)``: FedML writes ``~/.fedml/...`` (env file, device id, traces) and ``./logs``; pointing ``HOME`` at
  ``<dir>/home`` keeps those files out of the user's home. The user's caches stay reachable (``XDG_CACHE_HOME``,
  ``HF_HOME``, ``TORCH_HOME`` are pinned to their old locations first), so cached checkpoints still load offline.
* ``neutralize_fedml()``: replaces ``fedml.core.mlops.fetch_config`` (the ops-server config request that ``fedml.init``
  makes in every training type, retried with no timeout) by a local no-op, and makes the cloud config fetchers fail fast.
* ``offline_flags(ns)``: FedML's own tracking, MLOps and wandb are forced off; ``fedml.init`` is called with
  ``check_env=False`` by the entry point.
* ``install_network_audit(path)`` (engine-neutral, in ``fedml_pfedmoap/netaudit.py``; re-exported here): an audit hook
  that records and refuses every outbound attempt to a non-loopback address. Enabled by the entry point when the
  environment variable ``FEDML_PFEDMOAP_NETWORK_AUDIT`` names a file. It sees Python-level sockets only (not gRPC's or
  MPI's C cores, which this package points at the configured addresses).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..netaudit import AUDIT_ENV, install_network_audit, is_loopback, maybe_install_audit_from_env

__all__ = ["AUDIT_ENV", "install_network_audit", "is_loopback", "maybe_install_audit_from_env", "isolate_home",
           "neutralize_fedml", "offline_flags"]

logger = logging.getLogger(__name__)



def isolate_home(fedml_dir: str | os.PathLike) -> Path:
    """Point ``HOME`` at ``<fedml_dir>/home`` (FedML's ``~/.fedml``) and keep the user's caches where they were."""
    old_home = Path(os.path.expanduser("~"))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or old_home / ".cache")
    os.environ.setdefault("XDG_CACHE_HOME", str(cache))
    os.environ.setdefault("HF_HOME", str(cache / "huggingface"))
    os.environ.setdefault("TORCH_HOME", str(cache / "torch"))
    os.environ.setdefault("MPLCONFIGDIR", str(old_home / ".config" / "matplotlib"))
    home = Path(fedml_dir).resolve() / "home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(home)
    return home


def _no_fetch_config(args: Any, version: str = "release") -> bool:
    """Stand-in for ``fedml.core.mlops.fetch_config``: sets the attributes FedML reads later, contacts nobody."""
    for key, value in (("current_running_dir", os.path.join(os.path.expanduser("~"), ".fedml")), ("version", version),
                       ("config_version", version), ("cloud_region", ""), ("device_id", "0"), ("using_mlops", False)):
        setattr(args, key, value)
    if not getattr(args, "log_file_dir", None):
        args.log_file_dir = os.path.join(os.path.expanduser("~"), ".fedml", "logs")
    return False


def _refuse_cloud(*_args: Any, **_kwargs: Any):
    raise ConnectionError("fedml_pfedmoap: FedML cloud services are disabled (offline plugin; see guard.py)")


def neutralize_fedml() -> None:
    """Replace FedML's phone-home calls; call after ``import fedml`` and before ``fedml.init``."""
    import fedml.core.mlops as mlops
    from fedml.core.mlops.mlops_configs import MLOpsConfigs

    mlops.fetch_config = _no_fetch_config
    for name in ("fetch_all_configs", "fetch_web3_configs", "fetch_thetastore_configs"):
        if hasattr(MLOpsConfigs, name):
            setattr(MLOpsConfigs, name, staticmethod(_refuse_cloud))
    os.environ.setdefault("FEDML_ENV_VERSION", "release")


def offline_flags(ns: Any) -> Any:
    """Force FedML's network-backed tracking off on a FedML args namespace."""
    for key in ("enable_tracking", "using_mlops", "enable_wandb"):
        setattr(ns, key, False)
    return ns
