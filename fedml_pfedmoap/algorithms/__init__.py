"""Algorithm registry: one module per method, registered by name on import."""
import importlib

from .base import ALGORITHMS, Algorithm, PromptAlgorithm, Runtime, register_algorithm

_MODULES = ["zeroshot", "local", "promptfl", "fedprox", "pfedmoap", "fedotp", "fedpgp", "promptfolio", "fedtpg", "fedpha",
            "dpfpl"]
for _m in _MODULES:
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as _err:  # modules still being written are simply absent
        if _err.name != f"{__name__}.{_m}":
            raise


def list_algorithms() -> list[str]:
    return ALGORITHMS.names()


def get_algorithm(name: str) -> type:
    return ALGORITHMS.get(name)


__all__ = ["ALGORITHMS", "Algorithm", "PromptAlgorithm", "Runtime", "register_algorithm", "list_algorithms",
           "get_algorithm"]
