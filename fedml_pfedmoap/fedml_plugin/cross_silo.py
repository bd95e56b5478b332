"""FedML cross-silo adapters around the framework-free algorithm protocol (docs/fedml.md §Stack notes).

The protocol itself (downloads, uploads, round driving, metrics, the client half) is engine-neutral in
``federated/rounds.py``, shared with the Flower engine; this module moves its dicts through FedML.

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

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fedml.core import ClientTrainer, ServerAggregator

from ..algorithms.protocol import Algorithm
from ..federated.round_log import RoundLogger
from ..federated.rounds import ProtocolError, RoundDriver, check_label_shift, serve_client
from ..federated.simulator import ClientData
from .watchdog import PeerUnreachable, RoundWatchdog

logger = logging.getLogger(__name__)


class PersonalizedServerAggregator(ServerAggregator):
    """The server half of an ``Algorithm`` behind FedML's ``ServerAggregator``: FedML's hooks call the engine-neutral
    ``RoundDriver`` (see the module docstring) and the watchdog waits for the workers after each download."""

    def __init__(self, model: Any, args: Any, algo: Algorithm, num_clients: int, per_round: int, rounds: int,
                 seed: int, eval_every: int, round_logger: RoundLogger, out_dir: Path,
                 watchdog: Optional[RoundWatchdog] = None, run_tag: Optional[str] = None, dropout: float = 0.0) -> None:
        super().__init__(model, args)
        tag = run_tag or f"{getattr(args, 'run_id', '0')}-{uuid.uuid4().hex[:12]}"
        self.driver = RoundDriver(algo, num_clients, per_round, rounds, seed, eval_every, round_logger,
                                  Path(out_dir) / "cross_silo_rounds.jsonl", tag, dropout)
        self.watchdog = watchdog
        self.workers = list(range(1, int(per_round) + 1))

    @property
    def selection(self) -> List[int]:
        """The participants of the round whose uploads are awaited (FedML's silo selection reads it)."""
        return self.driver.selection

    @property
    def finished(self) -> bool:
        return self.driver.finished

    # ---- FedML hooks ---------------------------------------------------------------------------------------------
    def get_model_params(self) -> Dict[int, Dict[str, Any]]:
        """Round 0's downloads (FedML calls this once, when every worker is online)."""
        out = self.driver.first()
        self._wait("round 0: waiting for uploads")
        return out

    def set_model_params(self, model_parameters: Any) -> None:
        """FedML stores what ``aggregate`` returned; the algorithm keeps its own server state."""

    def test(self, test_data: Any, device: Any, args: Any) -> None:
        """Evaluation happens on the clients (piggybacked on uploads)."""
        return None

    def test_all(self, train_data_local_dict: Any, test_data_local_dict: Any, device: Any, args: Any) -> bool:
        return True

    def aggregate(self, raw_client_model_or_grad_list: List[Tuple[float, Any]]) -> Dict[int, Dict[str, Any]]:
        """Log piggybacked evaluations, aggregate round r, and build round r+1's downloads for every client."""
        out = self.driver.step([u for _, u in raw_client_model_or_grad_list])
        self._wait("waiting for the workers' finished status" if self.driver.finished
                   else f"round {self.driver.round}: waiting for uploads")
        return out

    def _wait(self, what: str) -> None:
        if self.watchdog is not None:
            self.watchdog.wait_for(self.workers, what)


class PersonalizedClientTrainer(ClientTrainer):
    """The client half of an ``Algorithm`` behind FedML's ``ClientTrainer`` (``federated.rounds.serve_client``)."""

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
        if self.download is None:
            raise ProtocolError(f"rank {self.rank}: train() before any download")
        self.upload = serve_client(self.algo, self.clients, self.state_root, self.download, self.rank,
                                   f"rank {self.rank}")
        if self.watchdog is not None:
            self.watchdog.wait_for([0], f"round {self.upload['round']}: waiting for the server after the upload of "
                                        f"client {self.upload['client_index']}")

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
    check_label_shift(cfg, "cross-silo")


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
