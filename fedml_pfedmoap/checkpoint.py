"""Atomic round-boundary checkpoints of a simulated run, for resuming a benchmark cell (docs/fedml.md §Stack notes).

A checkpoint holds the server state (``algorithm.server_state()``), every client's persistent state
(``Simulator.states``), the RNG states (torch, numpy, Python), the next round index, the accumulated ``RunResult``
and the MLflow run id: tensors and plain data only, so it loads with ``torch.load(weights_only=True)``. A content
digest over all of it detects corruption that still unpickles. Writes go to a temporary file that is fsynced and then
renamed over the current one; the previous checkpoint is kept as ``<name>.prev.pt``. A corrupt or truncated current
checkpoint falls back to the previous one, then to a fresh start, each time with a warning.
"""
from __future__ import annotations

import hashlib
import logging
import random
import struct
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .errors import CheckpointError
from .federated.simulator import RunResult, Simulator
from .fileio import atomic_path

logger = logging.getLogger(__name__)
FORMAT = 1
_NDARRAY = "__ndarray__"


def to_plain(obj: Any, where: str = "state") -> Any:
    """Tensors, numbers, strings, None, lists/tuples and str/int-keyed dicts; numpy arrays become tagged tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj)).clone()}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"{where}: dict key {k!r} is not a str or int (checkpoints hold plain data)")
        return {k: to_plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise CheckpointError(f"{where}: {type(obj).__name__} is not checkpointable (store tensors and plain data)")


def from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_NDARRAY}:
            return obj[_NDARRAY].numpy()
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


def digest(obj: Any) -> str:
    """sha256 over a canonical walk of the plain structure (types, keys, tensor dtype/shape/bytes)."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k in sorted(o, key=lambda x: (type(x).__name__, str(x))):
                h.update(f"K{type(k).__name__}:{k}".encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"{'L' if isinstance(o, list) else 'U'}{len(o)}".encode())
            for v in o:
                walk(v)
        elif isinstance(o, float):
            h.update(b"F" + struct.pack("<d", o))
        else:
            h.update(f"{type(o).__name__}:{o!r}".encode())

    walk(obj)
    return h.hexdigest()


def rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                        "pos": int(pos), "has_gauss": int(has_gauss),
                                                        "cached": float(cached)},
            "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def snapshot(sim: Simulator, cell_hash: str, run_id: Optional[str] = None, finished: bool = False) -> Dict[str, Any]:
    """The plain-data state of ``sim`` at its current round boundary (a finished cell keeps only its result)."""
    res = sim.result
    body: Dict[str, Any] = {
        "format": FORMAT, "cell_hash": cell_hash, "next_round": int(sim.next_round), "finished": bool(finished),
        "mlflow_run_id": run_id,
        "result": {"rounds": to_plain(res.rounds, "result.rounds"), "client_acc": to_plain(res.client_acc),
                   "summary": to_plain(res.summary)},
    }
    if not finished:
        body["server"] = to_plain(sim.algo.server_state(), "server_state")
        body["clients"] = {int(cid): to_plain(st, f"client[{cid}]") for cid, st in sim.states.items()}
        body["rng"] = rng_state()
    return body


def restore(sim: Simulator, ckpt: Dict[str, Any]) -> None:
    """Put ``sim`` back at the checkpoint's round boundary (server, clients, RNGs, result so far)."""
    sim.algo.load_server_state(from_plain(ckpt["server"]))
    sim.states = {int(cid): from_plain(st) for cid, st in ckpt["clients"].items()}
    sim.next_round = int(ckpt["next_round"])
    sim.result = result_from(ckpt)
    set_rng_state(ckpt["rng"])


def result_from(ckpt: Dict[str, Any]) -> RunResult:
    r = ckpt["result"]
    return RunResult(rounds=[dict(x) for x in r["rounds"]], client_acc=[list(x) for x in r["client_acc"]],
                     summary=dict(r["summary"]))


class CheckpointStore:
    """``<dir>/<name>.pt`` (current) and ``<name>.prev.pt`` (previous), written atomically."""

    def __init__(self, directory: str | Path, name: str) -> None:
        self.dir = Path(directory)
        self.path = self.dir / f"{name}.pt"
        self.prev = self.dir / f"{name}.prev.pt"

    def save(self, body: Dict[str, Any]) -> Path:
        payload = dict(body, digest=digest(body))
        with atomic_path(self.path, fsync=True, keep_previous=self.prev) as tmp:
            torch.save(payload, tmp)
        return self.path

    @staticmethod
    def read(path: Path, cell_hash: Optional[str] = None) -> Dict[str, Any]:
        """Load and verify one file; raises ``CheckpointError`` saying why it is unusable."""
        try:
            body = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, bad pickle, ...: all mean "unusable"
            raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:120]})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT or "digest" not in body:
            raise CheckpointError(f"{path}: not a fedml_pfedmoap checkpoint of format {FORMAT}")
        stored = body.pop("digest")
        if digest(body) != stored:
            raise CheckpointError(f"{path}: content digest mismatch (corrupt)")
        if cell_hash is not None and body.get("cell_hash") != cell_hash:
            raise CheckpointError(f"{path}: belongs to cell {body.get('cell_hash')}, not {cell_hash}")
        return body

    def load(self, cell_hash: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The newest valid checkpoint (current, else previous), or None; every unusable file is warned about."""
        bad = []
        for p in (self.path, self.prev):
            if not p.exists():
                continue
            try:
                body = self.read(p, cell_hash)
            except CheckpointError as err:
                bad.append(str(err))
                continue
            if bad:
                _warn(f"checkpoint {bad[0]}; resuming from the previous checkpoint {p.name}")
            return body
        if bad:
            _warn(f"checkpoint {'; '.join(bad)}; no valid checkpoint left, restarting the cell from round 0")
        return None

    def clear(self) -> None:
        for p in (self.path, self.prev):
            p.unlink(missing_ok=True)


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    logger.warning(msg)
