"""The message protocol of the multi-process engines (FedML cross-silo, Flower), without any engine in it.

``RoundDriver`` is the server half: it drives an ``Algorithm``'s server calls over the shared ``RoundSchedule`` and turns
each round's uploads into the next round's per-client downloads; ``serve_client`` is the client half (one download in,
one upload out, the client's state loaded from and saved to a ``ClientStateStore`` by client index). An engine only
moves the dicts: FedML as its model parameters (``fedml_plugin/cross_silo.py``), Flower as message records
(``flower/codec.py``).

Round r = 0..T (T = ``rounds``; round T carries evaluations only):

* download, per client: ``{client_index, round, run_tag, selected, train, eval, eval_round, done}``; ``train`` is
  ``client_payload(i)`` of round r (None in round T); ``eval`` is ``eval_payload(i)`` taken right after round r-1's
  aggregation (None when round r-1 is not an evaluation round or ``dp.report_eval`` is false).
* upload: ``{client_index, round, rank, upload, eval}``; ``upload`` is ``local_train``'s dict, ``eval`` the metrics of
  round r-1 (evaluated before local training), ``rank`` the engine's name for the worker that served the client.
* the server logs round r's metrics (training from round r's uploads, evaluation from round r+1's) through a
  ``RoundLogger`` and appends them to a JSONL file, with per-client payload digests and serving workers.

Metrics cover the participants of round r+1 evaluated after round r (all clients under full participation, where they
equal the simulator's): a multi-process engine cannot evaluate clients that take no part in a round.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..algorithms.protocol import Algorithm
from ..checkpoint import digest
from ..privacy import reports_evaluation, run_accounting
from .metrics import client_summary, dropout_metrics, validation_summary
from .round_log import RoundLogger
from .schedule import RoundSchedule, upload_summary
from .simulator import ClientData
from .state import ClientStateStore

logger = logging.getLogger(__name__)
Download = Dict[str, Any]


class ProtocolError(RuntimeError):
    """A download or upload that does not follow the protocol in the module docstring."""


def check_label_shift(cfg: Any, engine: str) -> None:
    """Base-to-novel scoring (Base / Novel / HM) runs in the simulator only; reject it before any peer waits."""
    from ..errors import ConfigError

    if cfg.data_args.protocol != "label_shift":
        raise ConfigError(f"data_args.protocol: {cfg.data_args.protocol!r} is supported by the simulator only "
                          f"(training_type: simulation or pfedmoap-bench); the {engine} engine runs label_shift")


def content_digest(payload: Optional[Dict[str, Any]]) -> Optional[str]:
    """Digest of a payload's content (its client index left out, so equal content gives equal digests)."""
    if payload is None:
        return None
    return digest({k: v for k, v in payload.items() if k != "client_index"})[:16]


class RoundDriver:
    """The server half of the protocol: ``first()`` gives round 0's downloads, ``step(uploads)`` the next round's."""

    def __init__(self, algo: Algorithm, num_clients: int, per_round: int, rounds: int, seed: int, eval_every: int,
                 round_logger: RoundLogger, jsonl: Path, run_tag: str, dropout: float = 0.0,
                 engine: str = "cross-silo") -> None:
        self.algo, self.n, self.rounds, self.run_tag = algo, int(num_clients), int(rounds), run_tag
        self.schedule = RoundSchedule(self.n, self.rounds, per_round / num_clients, int(seed), eval_every,
                                      float(dropout))
        self.log = round_logger
        self.out = Path(jsonl)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("")
        self.round = 0  # the round whose uploads are awaited
        self.selection: List[int] = self.schedule.participants(0, algo)
        if algo.sequential:
            raise ValueError(f"algorithm_args.{algo.name}.pool_snapshot: 'live' needs the in-process simulator (each "
                             "download depends on earlier uploads of the same round); expected round_start")
        if len(self.selection) != len(self.schedule.sampled(0)):
            raise ValueError(f"algorithm_args.{algo.name}.round0_all_clients: supported by the simulator engine only "
                             f"(the {engine} engine trains client_num_per_round = {per_round} clients per round); "
                             "expected false")
        self.pending: Dict[int, Dict[str, Any]] = {}  # training round -> metrics awaiting its evaluation
        self.private_rounds: List[Dict[str, Any]] = []  # rounds with private uploads (their DP accounting)
        self.sent: Dict[int, Dict[int, Optional[str]]] = {}  # round -> client -> train-payload digest
        self.train_payloads: List[Any] = []  # the awaited round's train downloads (its bytes_down)
        self.t0 = time.perf_counter()
        self.finished = False

    def first(self) -> Dict[int, Download]:
        """Round 0's downloads (an entry for every client)."""
        self.algo.begin_round(0, self.selection)
        return self.downloads(0, self.selection, evals={})

    def step(self, uploads: List[Any]) -> Dict[int, Download]:
        """Log piggybacked evaluations, aggregate the awaited round, and build the next round's downloads (after the
        evaluation-only round T: ``done`` downloads, ``finished`` set and the round logger closed)."""
        r = self.round
        uploads = self.check_uploads(uploads, r)
        evals = [u for u in uploads if u.get("eval") is not None]
        if evals:
            self._finish_round(r - 1, evals)
        if r >= self.rounds:  # the extra round: evaluations only
            self.finished = True
            self.log.close()
            return {i: {"client_index": i, "round": r + 1, "run_tag": self.run_tag, "done": True, "selected": False,
                        "train": None, "eval": None, "eval_round": None} for i in range(self.n)}
        delivered = set(self.schedule.delivered(r, self.selection))  # a dropped client trained; its upload is lost
        train_ups = sorted((u["upload"] for u in uploads if int(u["client_index"]) in delivered),
                           key=lambda u: int(u["client_index"]))
        self.pending[r] = self._train_metrics(r, train_ups, {int(u["client_index"]): u.get("rank") for u in uploads})
        if self.schedule.dropout > 0:
            self.pending[r].update(dropout_metrics([i for i in self.selection if i not in delivered]))
        if train_ups:  # every upload lost: the server state stays as it was
            self.algo.aggregate(train_ups)
        nxt = self.schedule.participants(r + 1, self.algo)
        # dp.report_eval off: clients keep the evaluation of their private models (docs/privacy.md), none is asked
        is_eval = reports_evaluation(self.algo.hp) and self.schedule.evaluates(r)
        eval_payloads = {i: self.algo.eval_payload(i) for i in nxt} if is_eval else {}
        if not is_eval:
            self._finish_round(r, [])
        if r + 1 < self.rounds:
            self.algo.begin_round(r + 1, nxt)
        self.round, self.selection = r + 1, nxt
        return self.downloads(r + 1, nxt, eval_payloads)

    def fail(self) -> None:
        """End the run's log with status FAILED (a worker is gone); later calls do nothing."""
        self.log.close(status="FAILED")

    # ---- internals -----------------------------------------------------------------------------------------------
    def downloads(self, r: int, selected: Sequence[int], evals: Dict[int, Dict[str, Any]]) -> Dict[int, Download]:
        out: Dict[int, Download] = {}
        self.sent[r] = {}
        for i in range(self.n):
            chosen = i in selected
            train = self.algo.client_payload(i) if chosen and r < self.rounds else None
            out[i] = {"client_index": i, "round": r, "run_tag": self.run_tag, "selected": chosen, "done": False,
                      "train": train, "eval": evals.get(i), "eval_round": r - 1 if i in evals else None}
            if chosen:
                self.sent[r][i] = content_digest(train)
        self.train_payloads = [out[i]["train"] for i in selected] if r < self.rounds else []
        return out

    def check_uploads(self, uploads: List[Any], r: int) -> List[Dict[str, Any]]:
        for u in uploads:
            if not isinstance(u, dict) or "client_index" not in u or u.get("round") != r:
                raise ProtocolError(f"round {r}: malformed upload {str(u)[:200]!r} (expected the client index and "
                                    f"round {r}; see federated/rounds.py)")
        got = sorted(int(u["client_index"]) for u in uploads)
        if got != sorted(self.selection):
            raise ProtocolError(f"round {r}: uploads from clients {got}, expected the selected {sorted(self.selection)}")
        return uploads

    def _train_metrics(self, r: int, train_ups: List[Dict[str, Any]], ranks: Dict[int, Any]) -> Dict[str, Any]:
        m: Dict[str, Any] = {"round": r, **upload_summary(self.train_payloads, train_ups, len(self.selection),
                                                           self.private_rounds)}
        if "dp_busiest_releases" in m:
            self.private_rounds.append(m)
        m["clients"] = {i: {"digest": self.sent.get(r, {}).get(i), "rank": ranks.get(i)}
                        for i in (int(u["client_index"]) for u in train_ups)}
        return m

    def _finish_round(self, r: int, evals: List[Dict[str, Any]]) -> None:
        """Round r's metrics (training from round r's uploads, evaluation from round r+1's) -> logger + JSONL."""
        m = self.pending.pop(r, {"round": r})
        served = {int(u["client_index"]): int(u.get("rank", -1)) for u in evals}
        if evals:
            rows = sorted((int(u["client_index"]), u["eval"]) for u in evals)
            bad = [i for i, e in rows if int(e.get("round", -2)) != r]
            if bad:
                raise ProtocolError(f"round {r + 1}: clients {bad} evaluated another round than {r}")
            accs, ns = [e["correct"] / max(1, e["total"]) for _, e in rows], [int(e["total"]) for _, e in rows]
            m.update(client_summary(accs, ns))
            m.update(validation_summary([e["val_correct"] / e["val_total"] for _, e in rows if e.get("val_total")]))
            m["test_loss"] = float(np.average([e["loss"] for _, e in rows], weights=np.maximum(ns, 1)))
            m["evaluated"] = len(rows)
            m["eval_clients"] = {i: {"acc": a, "rank": served[i]} for (i, _), a in zip(rows, accs)}
        if r == self.rounds - 1:
            m.update(run_accounting(self.private_rounds))
        m["elapsed_s"] = time.perf_counter() - self.t0
        self.log.log_round({k: v for k, v in m.items() if not isinstance(v, dict)}, step=r)
        with open(self.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(m, default=str) + "\n")
        if "acc_mean" in m:
            logger.info("round %d: acc_mean %.4f over %d clients", r, m["acc_mean"], m["evaluated"])


def serve_client(algo: Algorithm, clients: Sequence[ClientData], state_root: Path, download: Download, rank: int,
                 worker: str) -> Dict[str, Any]:
    """The client half for one download: evaluate the previous round (if asked), train this round (if asked), persist
    the client's state by index, and return the upload. ``worker`` names the serving worker in errors."""
    cid, r = int(download["client_index"]), int(download["round"])
    if not download.get("selected", False):
        raise ProtocolError(f"{worker}: sent client {cid} for round {r}, which the server did not select")
    if not 0 <= cid < len(clients):
        raise ProtocolError(f"{worker}: client index {cid} outside 0..{len(clients) - 1}")
    store = ClientStateStore(state_root, download["run_tag"], algo.init_client_state, algo.rt.device)
    state = store.load(cid)
    ev = None
    if download.get("eval") is not None:
        res = algo.evaluate(download["eval"], state, clients[cid].test)
        ev = {"round": int(download["eval_round"]), "correct": int(res.correct), "total": int(res.total),
              "loss": float(res.loss)}
        val = clients[cid].val
        if val is not None and len(val) > 0:  # data_args.val_fraction > 0: the model-selection score
            vres = algo.evaluate(download["eval"], state, val)
            ev.update(val_correct=int(vres.correct), val_total=int(vres.total))
    up = None
    if download.get("train") is not None:
        up = algo.local_train(download["train"], state, clients[cid].train)
    store.save(cid, state)
    return {"client_index": cid, "round": r, "rank": int(rank), "upload": up, "eval": ev}
