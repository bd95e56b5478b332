"""Per-client state on disk, keyed by client index, for the multi-process engines (FedML cross-silo, Flower).

With partial participation one worker (FedML rank, Flower SuperNode) serves different clients over the rounds, and a
client can move between worker processes, so the client half's state (local prompt, pFedMoAP's private gate θ_i, flags)
cannot live in the worker. ``ClientStateStore`` keeps one ``client_<index>.pt`` per client under ``<state_dir>/<run
tag>``: loaded at the start of ``train()``, saved at its end; plain tensors and data only (``torch.save``), read back
with ``torch.load(weights_only=True)``. Writes are atomic (temporary file + rename). The run tag (chosen by the server
and carried in every payload) keeps a rerun from reading a previous run's states. On several machines, either share
``state_dir`` (a network file system) or keep the client-to-worker mapping fixed (full participation).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..checkpoint import CheckpointError, from_plain, to_plain
from ..fileio import atomic_path

_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ClientStateStore:
    """``load(i)`` / ``save(i, state)`` for client index ``i`` of one run; ``init_fn(i)`` builds a first state."""

    def __init__(self, root: str | os.PathLike, run_tag: str, init_fn: Callable[[int], Dict[str, Any]],
                 device: Optional[torch.device] = None) -> None:
        if not _TAG.match(str(run_tag)):
            raise ValueError(f"state run tag {run_tag!r}: expected 1-64 characters of [A-Za-z0-9_.-]")
        self.dir = Path(root) / str(run_tag)
        self.init_fn = init_fn
        self.device = device

    def path(self, client_index: int) -> Path:
        return self.dir / f"client_{int(client_index):05d}.pt"

    def load(self, client_index: int) -> Dict[str, Any]:
        """The saved state of ``client_index``, or ``init_fn(client_index)`` at its first participation."""
        p = self.path(client_index)
        if not p.exists():
            return self.init_fn(int(client_index))
        try:
            raw = torch.load(p, map_location=self.device or "cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
            raise CheckpointError(f"client state {p}: unreadable with weights_only=True ({err})") from None
        if not isinstance(raw, dict) or raw.get("client_index") != int(client_index) or "state" not in raw:
            raise CheckpointError(f"client state {p}: not a state of client {client_index}")
        return from_plain(raw["state"])

    def save(self, client_index: int, state: Dict[str, Any]) -> Path:
        """Atomically write ``state`` (tensors and plain data; anything else raises ``CheckpointError``)."""
        blob = {"client_index": int(client_index), "state": to_plain(state, f"client state {client_index}")}
        with atomic_path(self.path(client_index)) as tmp:
            torch.save(blob, tmp)
        return self.path(client_index)
