"""The in-process federated loop every algorithm runs through (docs/architecture.md §Engines).

One frozen backbone is shared; per-client state dicts are kept by client index across rounds; every round the server
half of the algorithm produces a payload per selected client (payloads may differ), the client half trains and
uploads, the server aggregates, and every client is evaluated on its own test split. The loop never looks at the
algorithm's name. Who takes part, which rounds are evaluated and the round's upload summary come from the shared
``schedule.RoundSchedule`` (the FedML cross-silo engine uses the same one).
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..algorithms.protocol import Algorithm
from ..privacy import run_accounting
from .base2novel_eval import Base2NovelEval, score_base2novel
from .features import FeatureSet
from .metrics import client_summary, dropout_metrics, run_summary, selection_summary, validation_summary
from .schedule import RoundSchedule, upload_summary

logger = logging.getLogger(__name__)


@dataclass
class ClientData:
    train: FeatureSet
    test: FeatureSet
    val: Optional[FeatureSet] = None  # held out of the training items (data_args.val_fraction > 0), for selection


@dataclass
class RunResult:
    """Per-round metrics (dicts with ``round``), per-client accuracies per evaluated round, and the run summary."""

    rounds: List[Dict[str, float]] = field(default_factory=list)
    client_acc: List[List[float]] = field(default_factory=list)
    summary: Dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        s = ", ".join(f"{k}={v:.4f}" for k, v in self.summary.items())
        return f"RunResult({len(self.rounds)} rounds; {s})"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Simulator:
    """Drives an ``Algorithm`` over ``clients`` for ``rounds`` rounds; ``on_round(metrics, sim)`` is called after each.

    ``FedMLRunner(..., algorithm_flow=Simulator(...))`` calls ``run()``, so FedML's entry point reuses this loop.
    """

    def __init__(self, algorithm: Algorithm, clients: Sequence[ClientData], rounds: int, frac: float = 1.0,
                 seed: int = 0, eval_every: int = 1, on_round: Optional[Callable[[Dict[str, Any], "Simulator"], None]] = None,
                 progress: bool = True, dropout: float = 0.0, base2novel: Optional[Base2NovelEval] = None) -> None:
        self.algo = algorithm
        self.base2novel = base2novel  # data_args.protocol base2novel: Base / Novel / HM beside Local
        self.clients = list(clients)
        self.rounds = int(rounds)
        self.seed = int(seed)
        self.schedule = RoundSchedule(len(self.clients), self.rounds, float(frac), self.seed, eval_every,
                                      float(dropout))
        self.on_round = on_round
        self.progress = progress
        self.states: Dict[int, Dict[str, Any]] = {}
        self.result = RunResult()
        self.next_round = 0
        self.algo.init_server()

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def state(self, cid: int) -> Dict[str, Any]:
        if cid not in self.states:
            self.states[cid] = self.algo.init_client_state(cid)
        return self.states[cid]

    def validated(self) -> List[int]:
        """The clients with a non-empty validation split (none unless ``data_args.val_fraction`` > 0)."""
        return [c for c, d in enumerate(self.clients) if d.val is not None and len(d.val) > 0]

    def run_round(self, t: int) -> Dict[str, Any]:
        t0 = time.perf_counter()
        selected = self.schedule.participants(t, self.algo)
        self.algo.begin_round(t, selected)
        delivered = set(self.schedule.delivered(t, selected))  # dropped clients still train; their upload is lost
        if self.algo.sequential:  # e.g. pFedMoAP's live pool (D2 parity): download i sees uploads 0..i-1
            payloads, uploads = [], []
            for cid in selected:
                payloads.append(self.algo.client_payload(cid))
                uploads += self.algo.local_train_many(payloads[-1:], [self.state(cid)], [self.clients[cid].train])
                if cid in delivered:
                    self.algo.observe_upload(uploads[-1])
        else:  # the server state is fixed until aggregate: all downloads first, then (possibly lockstep) training
            payloads = [self.algo.client_payload(cid) for cid in selected]
            uploads = self.algo.local_train_many(payloads, [self.state(cid) for cid in selected],
                                                 [self.clients[cid].train for cid in selected])
        uploads = [u for u in uploads if int(u["client_index"]) in delivered]
        summary = upload_summary(payloads, uploads, len(selected), self.result.rounds)
        if uploads:  # every upload lost: the server state stays as it was
            self.algo.aggregate(uploads)
        # a round without reported training losses (zero-shot, DP) keeps the column as NaN in the simulator's tables
        metrics: Dict[str, Any] = {"round": t, **summary, "train_loss": summary.get("train_loss", float("nan")),
                                   "time_train_s": time.perf_counter() - t0,
                                   **(dropout_metrics([c for c in selected if c not in delivered])
                                      if self.schedule.dropout > 0 else {})}
        if self.schedule.evaluates(t):
            t1 = time.perf_counter()
            accs, ns, losses = [], [], []
            payloads = {cid: self.algo.eval_payload(cid) for cid in range(self.num_clients)}
            self.algo.before_eval(payloads, {cid: self.state(cid) for cid in payloads})  # batching hook (opt-in)
            for cid in range(self.num_clients):
                res = self.algo.evaluate(payloads[cid], self.state(cid), self.clients[cid].test)
                accs.append(res.acc)
                ns.append(res.total)
                losses.append(res.loss)
            metrics.update(client_summary(accs, ns))
            metrics.update(validation_summary([self.algo.evaluate(payloads[c], self.state(c), self.clients[c].val).acc
                                               for c in self.validated()]))
            if self.base2novel is not None:
                metrics.update(score_base2novel(self.algo, payloads, {c: self.state(c) for c in payloads}, accs,
                                                self.base2novel))
            metrics["test_loss"] = float(np.average(losses, weights=np.maximum(ns, 1)))
            metrics["time_eval_s"] = time.perf_counter() - t1
            self.result.client_acc.append(accs)
        metrics["round_time_s"] = time.perf_counter() - t0
        metrics["peak_rss_mb"] = peak_rss_mb()
        if torch.cuda.is_available():
            metrics["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.result.rounds.append(metrics)
        return metrics

    def run(self) -> RunResult:
        from tqdm.auto import tqdm

        bar = tqdm(range(self.next_round, self.rounds), desc=self.algo.name, disable=not self.progress, leave=False)
        for t in bar:
            m = self.run_round(t)
            self.next_round = t + 1
            if "acc_mean" in m:
                bar.set_postfix(acc=f"{m['acc_mean']:.3f}", loss=f"{m['train_loss']:.3f}")
            if self.on_round is not None:
                self.on_round(m, self)
        self.result.summary = {**run_summary([r["acc_mean"] for r in self.result.rounds if "acc_mean" in r]),
                               **selection_summary(self.result.rounds), **run_accounting(self.result.rounds)}
        return self.result
