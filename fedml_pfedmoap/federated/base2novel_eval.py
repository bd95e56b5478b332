"""Base-to-novel scoring of every client's model (docs/algorithms.md §Base-to-novel, convention ``label_id``).

Local is the engine's usual per-client evaluation (own base classes, logits over all base classes). Here every
client's model is also scored on the full base test set (over the run's base class list) and, inside
``Algorithm.over_classes(novel_text)``, on the full novel test set over the novel class names only. Each accuracy is
the unweighted mean over clients; ``acc_hm`` is the 3-way harmonic mean of the three means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np

from ..algorithms.protocol import Algorithm
from ..clip.prompt import TextEncoder
from ..data.base2novel import hm_local_base_novel
from .features import FeatureSet


@dataclass
class Base2NovelEval:
    """The shared test sets of one base-to-novel run: labels already remapped to each half's local indices."""

    base_test: FeatureSet
    novel_test: FeatureSet
    novel_text: TextEncoder


def _scores(algo: Algorithm, payloads: Dict[int, Any], states: Dict[int, Any], data: FeatureSet) -> List[float]:
    algo.before_eval(payloads, states)
    return [algo.evaluate(payloads[cid], states[cid], data).acc for cid in sorted(payloads)]


def score_base2novel(algo: Algorithm, payloads: Dict[int, Any], states: Dict[int, Any], local_accs: Sequence[float],
                     ev: Base2NovelEval) -> Dict[str, float]:
    """``acc_local`` / ``acc_base`` / ``acc_novel`` (means over clients) and ``acc_hm`` of one evaluation round."""
    base = _scores(algo, payloads, states, ev.base_test)
    with algo.over_classes(ev.novel_text):
        novel = _scores(algo, payloads, states, ev.novel_test)
    algo.before_eval(payloads, states)  # the batching hook's encodings over the run's class list again
    out = {"acc_local": float(np.mean(local_accs)), "acc_base": float(np.mean(base)), "acc_novel": float(np.mean(novel))}
    out["acc_hm"] = hm_local_base_novel(out["acc_local"], out["acc_base"], out["acc_novel"])
    return out
