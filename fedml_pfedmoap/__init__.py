"""fedml_pfedmoap: personalized federated prompt learning for CLIP (pFedMoAP, Luo et al., ICLR 2025) and baselines."""
__version__ = "0.1.0"


def list_algorithms() -> list[str]:
    """Names of the registered algorithms."""
    from .algorithms import list_algorithms as _list

    return _list()


def get_algorithm(name: str) -> type:
    from .algorithms import get_algorithm as _get

    return _get(name)
