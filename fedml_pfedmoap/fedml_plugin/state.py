"""The per-client state store of the multi-process engines, now engine-neutral in ``federated/state.py``."""
from ..federated.state import ClientStateStore

__all__ = ["ClientStateStore"]
