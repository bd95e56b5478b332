"""Protocol dicts <-> Flower ``RecordDict`` (docs/flower.md §Message encoding); the round trip is exact.

A download or upload of ``federated/rounds.py`` is a tree of dicts, lists, tuples, tensors, numpy arrays and plain
scalars. It travels as two records:

* ``"arrays"`` (``ArrayRecord``): every tensor / array of the tree, one ``Array`` each (numpy ``.npy`` bytes in the
  tensor's own dtype and shape), keyed ``"<n> <path>"`` (``n`` numbers the leaves, ``path`` is for humans);
* ``"tree"`` (``ConfigRecord``): ``{"json": ...}``, the tree as JSON with each tensor replaced by
  ``{"__tensor__": [key, shape]}`` (numpy arrays: ``"__ndarray__"``), tuples by ``{"__tuple__": [...]}`` and dicts whose keys are
  not all strings by ``{"__items__": [[key, value], ...]}``. Python floats survive JSON exactly (shortest repr;
  NaN and infinities included); booleans, ints, strings and None are JSON's own.

Tensors come back on the CPU (``device`` moves them); dtypes numpy cannot hold (bfloat16) are refused by name.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

ARRAYS, TREE = "arrays", "tree"
_TENSOR, _NDARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"


class CodecError(ValueError):
    """A value that cannot travel (the message names its path) or a record that is not ours."""


def encode(obj: Any) -> RecordDict:
    """``obj`` (a protocol dict) as a ``RecordDict`` of an ``ArrayRecord`` and a ``ConfigRecord``."""
    arrays: Dict[str, Array] = {}

    def leaf(value: np.ndarray, path: str) -> list:
        key = f"{len(arrays)} {path}"
        arrays[key] = Array.from_numpy_ndarray(np.ascontiguousarray(value))
        return [key, list(value.shape)]  # Flower's Array does not keep a 0-d shape

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            if o.dtype == torch.bfloat16:
                raise CodecError(f"{path}: bfloat16 tensors cannot travel as numpy arrays; send float32")
            return {_TENSOR: leaf(o.detach().cpu().numpy(), path)}
        if isinstance(o, np.ndarray):
            return {_NDARRAY: leaf(o, path)}
        if isinstance(o, np.generic):
            return o.item()
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o) and not {_TENSOR, _NDARRAY, _TUPLE, _ITEMS} & set(o):
                return {k: walk(v, f"{path}.{k}") for k, v in o.items()}
            return {_ITEMS: [[walk(k, f"{path}[key]"), walk(v, f"{path}.{k}")] for k, v in o.items()]}
        if isinstance(o, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(o)]
        if isinstance(o, tuple):
            return {_TUPLE: [walk(v, f"{path}[{i}]") for i, v in enumerate(o)]}
        raise CodecError(f"{path}: {type(o).__name__} cannot travel over Flower (send tensors and plain data)")

    tree = walk(obj, "$")
    return RecordDict({ARRAYS: ArrayRecord(arrays), TREE: ConfigRecord({"json": json.dumps(tree)})})


def decode(content: RecordDict, device: Optional[torch.device] = None) -> Any:
    """The protocol dict ``encode`` was given (tensors on ``device``, default CPU)."""
    if TREE not in content.config_records or ARRAYS not in content.array_records:
        raise CodecError(f"message records {sorted(content)}: expected {ARRAYS!r} and {TREE!r} (flower/codec.py)")
    arrays = content.array_records[ARRAYS]
    tree = json.loads(str(content.config_records[TREE]["json"]))

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            if set(o) == {_TENSOR}:
                t = torch.from_numpy(_array(arrays, *o[_TENSOR]))
                return t if device is None else t.to(device)
            if set(o) == {_NDARRAY}:
                return _array(arrays, *o[_NDARRAY])
            if set(o) == {_TUPLE}:
                return tuple(walk(v) for v in o[_TUPLE])
            if set(o) == {_ITEMS}:
                return {walk(k): walk(v) for k, v in o[_ITEMS]}
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(tree)



def _array(arrays: ArrayRecord, key: str, shape: list) -> np.ndarray:
    return arrays[key].numpy().reshape(shape).copy()
