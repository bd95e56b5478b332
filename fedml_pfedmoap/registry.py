"""A tiny name -> object registry (the pattern of timm's ``register_model``), used for algorithms and datasets."""
from __future__ import annotations

import logging
from typing import Callable, Dict, Generic, List, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")
logger = logging.getLogger(__name__)


class Registry(Generic[T]):
    """Maps lower-case names to registered objects; unknown names fail with the list of valid choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``. Re-registering a name warns and overwrites."""

        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._entries and self._entries[key] is not obj:
                logger.warning("%s %r registered twice; the later definition wins", self.kind, key)
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}")
        return self._entries[key]

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._entries

    def names(self) -> List[str]:
        return sorted(self._entries)
