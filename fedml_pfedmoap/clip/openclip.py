"""The one entry to the open_clip library (docs/architecture.md): imported quietly, with the package's model configs.

``get_open_clip()`` returns the ``open_clip`` module after registering ``CONFIG_DIR`` (``fedml_pfedmoap/model_configs``:
``tiny-clip``, ``mini-clip``) once per process; ``quiet_init()`` silences the "No pretrained weights loaded" warning of
``create_model`` when the caller fills the weights itself. ``backbone``, ``compact``, ``weights`` and ``prompt`` all
reach open_clip through this module, which imports nothing else of the package.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered_config_dirs: set[Path] = set()


def get_open_clip() -> ModuleType:
    """The ``open_clip`` module (import warnings suppressed), with ``CONFIG_DIR``'s model configs registered."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import open_clip
    if CONFIG_DIR not in _registered_config_dirs:
        open_clip.add_model_config(CONFIG_DIR)
        _registered_config_dirs.add(CONFIG_DIR)
    return open_clip


@contextlib.contextmanager
def quiet_init() -> Iterator[None]:
    """open_clip warns "No pretrained weights loaded" when building a model whose weights the caller then loads."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
