"""Algorithm registry: one module per method, registered by name on import (docs/architecture.md §Adding an algorithm).

The protocol engines call is ``protocol.Algorithm``; ``register_algorithm("x")`` registers a class as ``x``.
"""
from . import (dpfpl, fedmgp, fedotp, fedpgp, fedpha, fedprox, fedtpg, local, pfedmma, pfedmoap,  # noqa: F401
               promptfl, promptfolio, zeroshot)
from .promptfl import PromptAlgorithm
from .protocol import ALGORITHMS, Algorithm, Runtime, register_algorithm


def list_algorithms() -> list[str]:
    return ALGORITHMS.names()


def get_algorithm(name: str) -> type:
    return ALGORITHMS.get(name)


__all__ = ["ALGORITHMS", "Algorithm", "PromptAlgorithm", "Runtime", "register_algorithm", "list_algorithms",
           "get_algorithm"]
