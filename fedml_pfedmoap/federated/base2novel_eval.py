"""Base-to-novel scoring (docs/algorithms.md §Base-to-novel).

Convention ``label_id``: every client's model is scored (below). Convention ``flip``: only the client-agnostic model is
scored (``score_global``), on the base and the novel test set, with the 2-way HM.

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
from ..data.base2novel import hm_base_novel, hm_local_base_novel
from .features import FeatureSet


@dataclass
class Base2NovelEval:
    """The shared test sets of one base-to-novel run: labels already remapped to each half's local indices."""

    base_test: FeatureSet
    novel_test: FeatureSet
    novel_text: TextEncoder
    convention: str = "label_id"


def _scores(algo: Algorithm, payloads: Dict[int, Any], states: Dict[int, Any], data: FeatureSet) -> List[float]:
    algo.before_eval(payloads, states)
    return [algo.evaluate(payloads[cid], states[cid], data).acc for cid in sorted(payloads)]


def score_base2novel(algo: Algorithm, payloads: Dict[int, Any], states: Dict[int, Any], local_accs: Sequence[float],
                     ev: Base2NovelEval) -> Dict[str, float]:
    """``acc_local`` / ``acc_base`` / ``acc_novel`` (means over clients) and ``acc_hm`` of one evaluation round."""
    if ev.convention == "flip":
        return score_global(algo, ev)
    base = _scores(algo, payloads, states, ev.base_test)
    with algo.over_classes(ev.novel_text):
        novel = _scores(algo, payloads, states, ev.novel_test)
    algo.before_eval(payloads, states)  # the batching hook's encodings over the run's class list again
    out = {"acc_local": float(np.mean(local_accs)), "acc_base": float(np.mean(base)), "acc_novel": float(np.mean(novel))}
    out["acc_hm"] = hm_local_base_novel(out["acc_local"], out["acc_base"], out["acc_novel"])
    return out


def score_global(algo: Algorithm, ev: Base2NovelEval) -> Dict[str, float]:
    """``flip``: the client-agnostic model, i.e. what a client that never trained is scored with (``eval_payload(0)``
    with ``init_client_state(0)``: the server's global part and the shared init of any private part), on the base and
    the novel test set; ``acc_hm`` = 2-way harmonic mean."""
    payloads, states = {0: algo.eval_payload(0)}, {0: algo.init_client_state(0)}
    base = _scores(algo, payloads, states, ev.base_test)[0]
    with algo.over_classes(ev.novel_text):
        novel = _scores(algo, payloads, states, ev.novel_test)[0]
    return {"acc_base": float(base), "acc_novel": float(novel), "acc_hm": hm_base_novel(base, novel)}
