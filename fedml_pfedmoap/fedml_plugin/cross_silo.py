"""FedML cross-silo adapters around the framework-free algorithm protocol (docs/fedml.md §Stack notes).

``PersonalizedServerAggregator`` drives the server half (``init_server``/``begin_round``/``client_payload``/
``aggregate``/``eval_payload``) and ``PersonalizedClientTrainer`` the client half (``init_client_state``/``local_train``/
``evaluate``) of any registered algorithm: the same calls, in the same order, as the in-process ``Simulator``.

Protocol (one FedML round r = 0..T; FedML runs ``comm_round = T + 1``):

* download, per client (a plain ``dict`` keyed by client index with an entry for every client, so FedML sends each worker
  its own): ``{client_index, round, run_tag, selected, train, eval, eval_round, done}``; ``train`` is
  ``client_payload(i)`` of round r (None in the extra round T); ``eval`` is ``eval_payload(i)`` taken right after round
  r-1's aggregation (None when round r-1 is not an evaluation round).
* upload: ``{client_index, round, rank, upload, eval}``; ``upload`` is ``local_train``'s dict, ``eval`` the metrics of
  round r-1 computed inside ``train()`` before local training (FedML's ``test_on_clients`` would lag a round). With
  ``dp.report_eval: false`` the server asks for no evaluation (the results of private models stay with the clients;
  docs/privacy.md).
* participants, evaluation rounds and the round's upload summary come from ``federated.schedule.RoundSchedule``,
  the simulator's schedule (``sample_clients(N, K/N, seed, r)``; docs/architecture.md §Round schedule): FedML's own
  ``data_silo_selection`` (seeded with the round index before it is incremented, so round 0's sample repeats) is
  replaced in the server process for this aggregator.
* per-client state is loaded from and saved to a ``ClientStateStore`` by client index, so any worker may serve any
  client; the server logs each round's metrics (mean over the clients it evaluated) to MLflow and
  ``<output_dir>/<run_name>/cross_silo_rounds.jsonl`` (with per-client payload digests and serving ranks).

Metrics therefore cover the participants of round r+1 evaluated after round r (all clients under full participation,
where they equal the simulator's); cross-silo cannot evaluate clients that take no part in a round.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from fedml.core import ClientTrainer, ServerAggregator

from ..algorithms.protocol import Algorithm
from ..checkpoint import digest
from ..federated.metrics import client_summary, dropout_metrics, validation_summary
from ..federated.schedule import RoundSchedule, upload_summary
from ..federated.simulator import ClientData
from ..privacy import reports_evaluation, run_accounting
from .metrics_log import RoundLogger
from .state import ClientStateStore
from .watchdog import PeerUnreachable, RoundWatchdog

logger = logging.getLogger(__name__)


class ProtocolError(RuntimeError):
    """A download or upload that does not follow the protocol in the module docstring."""


def _content_digest(payload: Optional[Dict[str, Any]]) -> Optional[str]:
    """Digest of a payload's content (its client index left out, so equal content gives equal digests)."""
    if payload is None:
        return None
    return digest({k: v for k, v in payload.items() if k != "client_index"})[:16]


class PersonalizedServerAggregator(ServerAggregator):
    """The server half of an ``Algorithm`` behind FedML's ``ServerAggregator``; see the module docstring."""

    def __init__(self, model: Any, args: Any, algo: Algorithm, num_clients: int, per_round: int, rounds: int,
                 seed: int, eval_every: int, round_logger: RoundLogger, out_dir: Path,
                 watchdog: Optional[RoundWatchdog] = None, run_tag: Optional[str] = None, dropout: float = 0.0) -> None:
        super().__init__(model, args)
        self.algo, self.n, self.rounds, self.seed = algo, int(num_clients), int(rounds), int(seed)
        self.schedule = RoundSchedule(self.n, self.rounds, per_round / num_clients, self.seed, eval_every,
                                      float(dropout))
        self.log, self.watchdog = round_logger, watchdog
        self.workers = list(range(1, int(per_round) + 1))
        self.run_tag = run_tag or f"{getattr(args, 'run_id', '0')}-{uuid.uuid4().hex[:12]}"
        self.out = Path(out_dir) / "cross_silo_rounds.jsonl"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("")
        self.round = 0  # the FedML round whose uploads are awaited
        self.selection: List[int] = self.schedule.participants(0, algo)
        if algo.sequential:
            raise ValueError(f"algorithm_args.{algo.name}.pool_snapshot: 'live' needs the in-process simulator (each "
                             "download depends on earlier uploads of the same round); expected round_start")
        if len(self.selection) != len(self.schedule.sampled(0)):
            raise ValueError(f"algorithm_args.{algo.name}.round0_all_clients: supported by the simulator engine only "
                             f"(cross-silo runs client_num_per_round = {per_round} workers per round); expected false")
        self.pending: Dict[int, Dict[str, Any]] = {}  # training round -> metrics awaiting its evaluation
        self.private_rounds: List[Dict[str, Any]] = []  # rounds with private uploads (their DP accounting)
        self.sent: Dict[int, Dict[int, Optional[str]]] = {}  # round -> client -> train-payload digest
        self.train_payloads: List[Any] = []  # the awaited round's train downloads (its bytes_down)
        self.t0 = time.perf_counter()
        self.finished = False

    # ---- FedML hooks ---------------------------------------------------------------------------------------------
    def get_model_params(self) -> Dict[int, Dict[str, Any]]:
        """Round 0's downloads (FedML calls this once, when every worker is online)."""
        self.algo.begin_round(0, self.selection)
        return self._downloads(0, self.selection, evals={})

    def set_model_params(self, model_parameters: Any) -> None:
        """FedML stores what ``aggregate`` returned; the algorithm keeps its own server state."""

    def test(self, test_data: Any, device: Any, args: Any) -> None:
        """Evaluation happens on the clients (piggybacked on uploads)."""
        return None

    def test_all(self, train_data_local_dict: Any, test_data_local_dict: Any, device: Any, args: Any) -> bool:
        return True

    def aggregate(self, raw_client_model_or_grad_list: List[Tuple[float, Any]]) -> Dict[int, Dict[str, Any]]:
        """Log piggybacked evaluations, aggregate round r, and build round r+1's downloads for every client."""
        r = self.round
        uploads = self._check_uploads([u for _, u in raw_client_model_or_grad_list], r)
        evals = [u for u in uploads if u.get("eval") is not None]
        if evals:
            self._finish_round(r - 1, evals)
        if r >= self.rounds:  # the extra round: evaluations only; tell the workers to stop
            self.finished = True
            self.log.close()
            self._wait("waiting for the workers' finished status")
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
        nxt = self.schedule.participants(r + 1, self.algo)  # participants of FedML round r+1
        # dp.report_eval off: clients keep the evaluation of their private models (docs/privacy.md), none is asked
        is_eval = reports_evaluation(self.algo.hp) and self.schedule.evaluates(r)
        eval_payloads = {i: self.algo.eval_payload(i) for i in nxt} if is_eval else {}
        if not is_eval:
            self._finish_round(r, [])
        if r + 1 < self.rounds:
            self.algo.begin_round(r + 1, nxt)
        self.round, self.selection = r + 1, nxt
        return self._downloads(r + 1, nxt, eval_payloads)

    # ---- internals -----------------------------------------------------------------------------------------------
    def _downloads(self, r: int, selected: Sequence[int], evals: Dict[int, Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
        out: Dict[int, Dict[str, Any]] = {}
        self.sent[r] = {}
        for i in range(self.n):
            chosen = i in selected
            train = self.algo.client_payload(i) if chosen and r < self.rounds else None
            out[i] = {"client_index": i, "round": r, "run_tag": self.run_tag, "selected": chosen, "done": False,
                      "train": train, "eval": evals.get(i), "eval_round": r - 1 if i in evals else None}
            if chosen:
                self.sent[r][i] = _content_digest(train)
        self.train_payloads = [out[i]["train"] for i in selected] if r < self.rounds else []
        self._wait(f"round {r}: waiting for uploads")
        return out

    def _wait(self, what: str) -> None:
        if self.watchdog is not None:
            self.watchdog.wait_for(self.workers, what)

    def _check_uploads(self, uploads: List[Any], r: int) -> List[Dict[str, Any]]:
        for u in uploads:
            if not isinstance(u, dict) or "client_index" not in u or u.get("round") != r:
                raise ProtocolError(f"round {r}: malformed upload {str(u)[:200]!r} (expected the client index and "
                                    f"round {r}; see fedml_plugin/cross_silo.py)")
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
        """Round r's metrics (training from round r's uploads, evaluation from round r+1's) -> MLflow + JSONL."""
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


class PersonalizedClientTrainer(ClientTrainer):
    """The client half of an ``Algorithm`` behind FedML's ``ClientTrainer``; see the module docstring."""

    def __init__(self, model: Any, args: Any, algo: Algorithm, clients: Sequence[ClientData], state_root: Path,
                 rank: int, watchdog: Optional[RoundWatchdog] = None) -> None:
        super().__init__(model, args)
        self.algo, self.clients, self.state_root, self.rank = algo, list(clients), Path(state_root), int(rank)
        self.watchdog = watchdog
        self.download: Optional[Dict[str, Any]] = None
        self.upload: Optional[Dict[str, Any]] = None

    def set_model_params(self, model_parameters: Any) -> None:
        if not isinstance(model_parameters, dict) or "client_index" not in model_parameters:
            raise ProtocolError(f"rank {self.rank}: download is not a per-client payload dict: "
                                f"{str(model_parameters)[:200]!r}")
        self.download = model_parameters
        if self.watchdog is not None and not model_parameters.get("done"):
            self.watchdog.pause()  # training time is bounded by the server's round timeout, not here

    def get_model_params(self) -> Optional[Dict[str, Any]]:
        return self.upload

    def train(self, train_data: Any, device: Any, args: Any) -> None:
        """Evaluate the previous round (if asked), train this round, persist the client's state, build the upload."""
        d = self.download
        if d is None:
            raise ProtocolError(f"rank {self.rank}: train() before any download")
        cid, r = int(d["client_index"]), int(d["round"])
        if not d.get("selected", False):
            raise ProtocolError(f"rank {self.rank}: sent client {cid} for round {r}, which the server did not select")
        if not 0 <= cid < len(self.clients):
            raise ProtocolError(f"rank {self.rank}: client index {cid} outside 0..{len(self.clients) - 1}")
        store = ClientStateStore(self.state_root, d["run_tag"], self.algo.init_client_state, self.algo.rt.device)
        state = store.load(cid)
        ev = None
        if d.get("eval") is not None:
            res = self.algo.evaluate(d["eval"], state, self.clients[cid].test)
            ev = {"round": int(d["eval_round"]), "correct": int(res.correct), "total": int(res.total),
                  "loss": float(res.loss)}
            val = self.clients[cid].val
            if val is not None and len(val) > 0:  # data_args.val_fraction > 0: the model-selection score
                vres = self.algo.evaluate(d["eval"], state, val)
                ev.update(val_correct=int(vres.correct), val_total=int(vres.total))
        up = None
        if d.get("train") is not None:
            up = self.algo.local_train(d["train"], state, self.clients[cid].train)
        store.save(cid, state)
        self.upload = {"client_index": cid, "round": r, "rank": self.rank, "upload": up, "eval": ev}
        if self.watchdog is not None:
            self.watchdog.wait_for([0], f"round {r}: waiting for the server after the upload of client {cid}")

    def test(self, test_data: Any, device: Any, args: Any) -> None:
        """Evaluation runs inside ``train()``."""


def patch_silo_selection() -> None:
    """Make FedML's server pick the participants this package's aggregator scheduled (see the module docstring)."""
    from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

    original = FedMLAggregator.data_silo_selection
    if getattr(original, "_fedml_pfedmoap", False):
        return

    def data_silo_selection(self, round_idx, client_num_in_total, client_num_per_round):  # noqa: ANN001
        agg = getattr(self, "aggregator", None)
        if isinstance(agg, PersonalizedServerAggregator):
            return list(agg.selection)
        return original(self, round_idx, client_num_in_total, client_num_per_round)

    data_silo_selection._fedml_pfedmoap = True  # type: ignore[attr-defined]
    FedMLAggregator.data_silo_selection = data_silo_selection


def fedml_dataset(clients: Sequence[ClientData], num_classes: int) -> list:
    """FedML's 8-item dataset list, keyed by client index (the adapters read the data by index themselves)."""
    train = {i: c.train for i, c in enumerate(clients)}
    test = {i: c.test for i, c in enumerate(clients)}
    counts = {i: len(c.train) for i, c in enumerate(clients)}
    return [sum(counts.values()), sum(len(c.test) for c in clients), None, None, counts, train, test, num_classes]


def wait_for_server(ipconfig_path: str, timeout_s: float, rank: int, poll_s: float = 0.5) -> None:
    """gRPC workers do not retry their first send: wait until the server's port (rank 0 in the CSV) accepts."""
    import csv
    import socket

    with open(ipconfig_path, newline="") as fh:
        row = next((r for r in csv.DictReader(fh) if int(r["rank"]) == 0), None)
    if row is None:
        raise ProtocolError(f"{ipconfig_path}: no row for rank 0 (the server)")
    addr = (row.get("ingress_ip") or row["grpc_server_ip"], int(row["grpc_server_port"]))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(addr, timeout=2.0):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise PeerUnreachable(rank, [0], f"unreachable: the server's port {addr[0]}:{addr[1]} did not accept "
                                               f"connections within {timeout_s:g} s ({err})") from None
            time.sleep(poll_s)


def run_dir(cfg: Any) -> Path:
    return Path(cfg.common_args.output_dir) / cfg.common_args.run_name


def check_protocol_supported(cfg: Any) -> None:
    """Base-to-novel scoring (Base / Novel / HM) runs in the simulator only; reject it before any peer waits."""
    from ..errors import ConfigError

    if cfg.data_args.protocol != "label_shift":
        raise ConfigError(f"data_args.protocol: {cfg.data_args.protocol!r} is supported by the simulator only "
                          "(training_type: simulation or pfedmoap-bench); the cross-silo engine runs label_shift")


def run_cross_silo(pc: Any, args: Any) -> None:
    """One cross-silo process (server: rank 0; worker: rank 1..W) behind ``FedMLRunner``; returns when the run ends."""
    from .watchdog import install_comm_hooks

    cfg = pc.cfg
    check_protocol_supported(cfg)
    rank, workers = int(args.rank), int(args.worker_num)
    startup = cfg.comm_args.startup_timeout_s
    peers = range(1, workers + 1) if rank == 0 else [0]
    watchdog = RoundWatchdog(rank, float(cfg.comm_args.round_timeout_s),
                             float(startup) if startup is not None else None, sticky=rank != 0, peers=peers)
    if rank == 0:
        watchdog.wait_for(peers, "waiting for every worker to come online", startup=True)
    else:
        watchdog.wait_for([0], "waiting for the server's first message", startup=True)
    watchdog.start()  # covers feature encoding too: a peer that never starts is reported, not waited on forever
    install_comm_hooks(watchdog)
    try:
        _run_rank(cfg, args, rank, watchdog)
    except PeerUnreachable as err:  # a failed send FedML did not handle, or a server port that never opened
        watchdog.gone(err.missing, err.reason)  # the one report (the watchdog may be reporting a timeout right now)
        raise
    watchdog.stop()


def _run_rank(cfg: Any, args: Any, rank: int, watchdog: RoundWatchdog) -> None:
    """Build the experiment and run this rank's FedML manager until the run ends."""
    from fedml import FedMLRunner

    from ..experiment import build_experiment

    exp = build_experiment(cfg, progress=False)
    algo, clients = exp.algorithm, exp.simulator.clients
    dataset = fedml_dataset(clients, len(exp.dataset.classnames))
    model, device = algo.rt.backbone, algo.rt.device
    t = cfg.train_args
    if rank == 0:
        patch_silo_selection()
        tags = {"algorithm": exp.algorithm_name, "dataset": cfg.data_args.dataset,
                "fedml_mode": f"cross_silo/{cfg.comm_args.backend}", "run_id": str(args.run_id)}
        round_logger = RoundLogger(cfg, run_name=f"{cfg.common_args.run_name}-{exp.algorithm_name}", tags=tags)
        agg = PersonalizedServerAggregator(model, args, algo, t.client_num_in_total, t.client_num_per_round,
                                           t.comm_round, exp.seed, t.eval_every, round_logger, run_dir(cfg),
                                           watchdog=watchdog, dropout=t.client_dropout)
        FedMLRunner(args, device, dataset, model, server_aggregator=agg).run()
        if not agg.finished:
            raise ProtocolError("the FedML server returned before the last round")
    else:
        if cfg.comm_args.backend == "GRPC":
            wait_for_server(args.grpc_ipconfig_path, watchdog.startup_timeout_s, rank)
        state_root = Path(cfg.comm_args.state_dir) if cfg.comm_args.state_dir else run_dir(cfg) / "client_state"
        trainer = PersonalizedClientTrainer(model, args, algo, clients, state_root, rank, watchdog=watchdog)
        FedMLRunner(args, device, dataset, model, client_trainer=trainer).run()
