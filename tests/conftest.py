"""Shared fixtures: one thread, deterministic seeds, the tiny random-init CLIP, and a temp cache dir.

Extra markers (pytest.ini): a test marked ``fedml``, ``flower``, ``ray`` or ``pretrain`` fails, never skips, in an
environment without that extra; ``make test`` routes each marker to the environment that has it (docs/install.md).
"""
import importlib.util
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from fedml_pfedmoap.privacy.accounting import release_absl_stderr  # noqa: E402

release_absl_stderr()  # test modules import dp_accounting (and so absl) while pytest's capture owns sys.stderr

EXTRA_MODULES = {"fedml": "fedml", "flower": "flwr", "ray": "ray", "pretrain": "mnist"}  # marker -> module needed


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test of an extra in an environment without that extra is a failure naming the extra, not a skip."""
    for marker, module in EXTRA_MODULES.items():
        if item.get_closest_marker(marker) and importlib.util.find_spec(module) is None:
            pytest.fail(f"marked {marker!r} but {module!r} is not installed in {sys.prefix}: install the "
                        f"[{marker}] extra or deselect with -m 'not {marker}'", pytrace=False)


@pytest.fixture(scope="session")
def tiny_backbone():
    from fedml_pfedmoap.clip import load_clip

    torch.manual_seed(0)
    return load_clip("tiny-clip")


@pytest.fixture(scope="session")
def digits():
    from fedml_pfedmoap.data.base import build_dataset

    return build_dataset("digits")


@pytest.fixture
def quick_cfg(tmp_path):
    """The quickstart config, small and pointed at a temp cache, tracking off."""
    from fedml_pfedmoap.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml")
    return load_config(root, [f"common_args.cache_dir={tmp_path / 'cache'}", "tracking_args.mlflow_tracking_uri=null",
                              "train_args.comm_round=2", "train_args.epochs=1", "device_args.num_threads=1"])
