"""The server-side round logger of the multi-process engines, now engine-neutral in ``federated/round_log.py``."""
from ..federated.round_log import RoundLogger

__all__ = ["RoundLogger"]
