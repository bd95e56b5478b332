"""Stand-in for the ``fastapi-cli==0.0.1`` placeholder that ``fedml==0.9.6`` pins.

The published 0.0.1 only reports its own version; its metadata, however, requires ``importlib_metadata<2``,
which no MLflow release can live with.  This package behaves the same and leaves ``importlib_metadata`` unpinned.
"""
from importlib_metadata import PackageNotFoundError, version

try:
    __version__ = version("fastapi-cli")
except PackageNotFoundError:  # pragma: no cover - only when run from a source tree
    __version__ = "0.0.1"
