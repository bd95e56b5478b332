"""flower/codec.py: the round trip of protocol dicts through Flower records is exact; what cannot travel is named."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.flower


def test_round_trip_is_exact_for_every_kind_of_leaf():
    from fedml_pfedmoap.flower.codec import decode, encode

    g = torch.Generator().manual_seed(0)
    obj = {"client_index": 2, "round": 1, "run_tag": "t-1", "selected": True, "eval": None, "eval_round": None,
           "train": {"experts": torch.randn(3, 4, 8, generator=g), "expert_ids": [0, 2], "ids64": torch.arange(5),
                     "half": torch.randn(2, 2, generator=g).half(), "scalar": torch.tensor(0.1),
                     "gate": {"w": torch.randn(4, 4, generator=g)}, "t": (1, 2.5), "np": np.arange(3.0)},
           "metrics": {"train_loss": 0.1 + 0.2, "nan": float("nan"), "inf": -math.inf}, "by_int": {3: "x", 1: [1]}}
    back = decode(encode(obj))
    assert back["train"]["expert_ids"] == [0, 2] and back["train"]["t"] == (1, 2.5)
    assert back["by_int"] == {3: "x", 1: [1]} and back["metrics"]["train_loss"] == 0.1 + 0.2
    assert math.isnan(back["metrics"]["nan"]) and back["metrics"]["inf"] == -math.inf
    for key in ("experts", "ids64", "half", "scalar"):
        a, b = obj["train"][key], back["train"][key]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
    assert torch.equal(obj["train"]["gate"]["w"], back["train"]["gate"]["w"])
    assert np.array_equal(back["train"]["np"], obj["train"]["np"])
    assert {k: v for k, v in back.items() if k not in ("train", "metrics", "by_int")} == \
        {k: v for k, v in obj.items() if k not in ("train", "metrics", "by_int")}


def test_what_cannot_travel_is_named():
    from fedml_pfedmoap.flower.codec import CodecError, encode

    with pytest.raises(CodecError, match=r"\$\.train\.p: bfloat16"):
        encode({"train": {"p": torch.zeros(2, dtype=torch.bfloat16)}})
    with pytest.raises(CodecError, match=r"\$\.x: set cannot travel"):
        encode({"x": {1, 2}})
