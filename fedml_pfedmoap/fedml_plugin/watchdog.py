"""Peer loss in cross-silo runs: nobody waits forever for a dead peer, and every way of noticing ends the same way
(docs/fedml.md §Stack notes).

FedML 0.9.6 has no timeouts: if a client dies the server waits forever, and if the server dies the clients do. Every
process of this plugin runs a ``RoundWatchdog``: it knows which ranks it is waiting for (the server: every worker; a
worker: the server, rank 0, at all times except while it trains) and since when. A message from a rank clears it (a
worker's wait restarts instead); the limit is ``comm_args.round_timeout_s`` (the first wait, covering imports and
feature encoding on every peer, ``comm_args.startup_timeout_s`` when set).

A process learns that a peer is gone in one of four ways, and all of them end it with one stderr line and exit status
``EXIT_PEER_GONE`` (3); see ``peer_gone_line`` and docs/fedml.md:

* ``timed out``: the watchdog's wait expired;
* ``send failed``: FedML's ``send_message`` raised (gRPC: the peer's port is closed; MPI: the send failed) and FedML
  did not handle it (it does at start-up, while peers may still be starting);
* ``receive failed``: FedML's MPI receive thread raised;
* ``unreachable``: a worker never reached the server's port at start-up.

Under MPI the process then calls ``MPI_Abort`` so that the runtime ends the other ranks at once; otherwise it ends with
``os._exit`` (FedML's gRPC/MPI threads would keep it alive). ``install_comm_hooks`` wraps ``FedMLCommManager``'s
``receive_message`` (to hear peers) and ``send_message``, and the MPI receive thread, in this process only.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, List, NoReturn, Optional, Set

logger = logging.getLogger(__name__)
EXIT_PEER_GONE = 3
EXIT_FAILURE = 1
REASONS = ("timed out", "send failed", "receive failed", "unreachable")


def peer_gone_line(rank: int, missing: Iterable[int], reason: str) -> str:
    """The one line every peer-loss path prints: ``fedml_pfedmoap: rank R: peer(s) gone: rank(s) [..]: <reason>``."""
    if not reason.startswith(REASONS):
        raise ValueError(f"peer-gone reason must start with one of {REASONS}, got {reason!r}")
    return f"fedml_pfedmoap: rank {int(rank)}: peer(s) gone: rank(s) {sorted({int(m) for m in missing})}: {reason}"


class PeerUnreachable(ConnectionError):
    """Rank ``rank`` lost ``missing``; ``str()`` is the ``peer_gone_line`` (raised where FedML may still handle it)."""

    def __init__(self, rank: int, missing: Iterable[int], reason: str) -> None:
        self.rank, self.missing, self.reason = int(rank), sorted({int(m) for m in missing}), reason
        super().__init__(peer_gone_line(self.rank, self.missing, reason))


def _mpi_world() -> Optional[Any]:
    """``MPI.COMM_WORLD`` when this process runs under an initialised MPI job of several ranks, else None."""
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
            return mpi.COMM_WORLD
    except Exception:  # noqa: BLE001 - a broken MPI state must not hide the message already printed
        return None
    return None


def end_process(code: int, comm: Optional[Any] = None) -> NoReturn:
    """End this process now: ``MPI_Abort`` the job under MPI (the runtime ends the other ranks), else ``os._exit``."""
    comm = comm if comm is not None else _mpi_world()
    if comm is not None:
        comm.Abort(code)
    os._exit(code)


def report_peer_gone(rank: int, missing: Iterable[int], reason: str,
                     terminate: Callable[[int], Any] = end_process) -> None:
    """Print the peer-gone line to stderr, log it, and ``terminate(EXIT_PEER_GONE)``."""
    line = peer_gone_line(rank, missing, reason)
    print(f"{line}; exiting", file=sys.stderr, flush=True)
    logger.error("%s", line)
    terminate(EXIT_PEER_GONE)


class RoundWatchdog:
    """Waits on a set of ranks with a deadline; ``gone`` reports lost ranks once through ``on_gone``.

    ``on_gone(missing, reason)`` defaults to ``report_peer_gone`` for this rank (print, then end the process);
    ``clock`` and ``check()`` let tests drive time without sleeping.
    """

    def __init__(self, rank: int, round_timeout_s: float, startup_timeout_s: Optional[float] = None,
                 on_gone: Optional[Callable[[List[int], str], None]] = None, poll_s: float = 0.2,
                 sticky: bool = False, peers: Iterable[int] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.rank = int(rank)
        self.sticky = sticky  # workers: a message restarts the clock but the wait goes on until ``pause()``
        self.peers = sorted({int(p) for p in peers})
        self.round_timeout_s = float(round_timeout_s)
        self.startup_timeout_s = float(startup_timeout_s or round_timeout_s)
        self.on_gone = on_gone or (lambda missing, reason: report_peer_gone(self.rank, missing, reason))
        self.poll_s, self.clock = poll_s, clock
        self._lock = threading.Lock()
        self._pending: Set[int] = set()
        self._what = ""
        self._since = clock()
        self._limit = self.startup_timeout_s
        self._stopped = False
        self._reported = False
        self._thread = threading.Thread(target=self._loop, name="fedml-pfedmoap-watchdog", daemon=True)

    def start(self) -> "RoundWatchdog":
        self._thread.start()
        return self

    def wait_for(self, ranks: Iterable[int], what: str, startup: bool = False) -> None:
        """Start waiting for a message from each of ``ranks`` (``what`` names the phase in the message)."""
        with self._lock:
            self._pending = {int(r) for r in ranks}
            self._what = what
            self._since = self.clock()
            self._limit = self.startup_timeout_s if startup else self.round_timeout_s

    def heard(self, rank: int) -> None:
        with self._lock:
            if self.sticky:
                if int(rank) in self._pending:
                    self._since = self.clock()
            else:
                self._pending.discard(int(rank))

    def pause(self) -> None:
        """Stop waiting (a worker while it trains; nothing is expected from the server then)."""
        with self._lock:
            self._pending = set()

    def pending(self) -> Set[int]:
        with self._lock:
            return set(self._pending)

    def expected(self) -> List[int]:
        """The ranks a failure is blamed on: those awaited now, else every peer."""
        return sorted(self.pending() or self.peers)

    def stop(self) -> None:
        self._stopped = True

    def check(self) -> bool:
        """One poll: report the awaited ranks as ``timed out`` when the wait is over its limit; True if it was."""
        with self._lock:
            waited = self.clock() - self._since
            expired = bool(self._pending) and waited > self._limit
            missing, what, limit = sorted(self._pending), self._what, self._limit
        if expired and not self._stopped:
            self._stopped = True
            self.gone(missing, f"timed out: {what}: no message after {waited:.1f} s (limit {limit:g} s)")
        return expired

    def gone(self, missing: Iterable[int], reason: str) -> None:
        """Report lost ranks (the first report only: later ones are the same loss seen again)."""
        with self._lock:
            if self._reported:
                return
            self._reported = True
        self.on_gone(sorted({int(m) for m in missing}), reason)

    def _loop(self) -> None:
        while not self._stopped:
            time.sleep(self.poll_s)
            self.check()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


_HOOKED: dict = {}


def install_comm_hooks(watchdog: RoundWatchdog) -> None:
    """Route received senders to ``watchdog.heard``; failed sends raise ``PeerUnreachable``; a failed MPI receive
    thread reports through ``watchdog.gone`` (nothing else would notice before the timeout)."""
    from fedml.core.distributed.communication.mpi.mpi_receive_thread import MPIReceiveThread
    from fedml.core.distributed.fedml_comm_manager import FedMLCommManager

    _HOOKED["watchdog"] = watchdog
    if _HOOKED.get("installed"):
        return
    receive, send, mpi_run = FedMLCommManager.receive_message, FedMLCommManager.send_message, MPIReceiveThread.run

    def receive_message(self, msg_type, msg_params):  # noqa: ANN001 - FedML's signature
        wd = _HOOKED.get("watchdog")
        sender = msg_params.get_sender_id()
        if wd is not None and sender != msg_params.get_receiver_id():
            wd.heard(int(sender))
        return receive(self, msg_type, msg_params)

    def send_message(self, message):  # noqa: ANN001
        try:
            return send(self, message)
        except Exception as err:  # noqa: BLE001 - gRPC/MPI errors have no common base class
            # Raised, not reported here: FedML itself catches failed sends where a peer may simply not be up yet
            # (its start-up status checks); one that reaches the entry point is reported there.
            raise PeerUnreachable(self.rank, [int(message.get_receiver_id())],
                                  f"send failed: {_first_line(err)}") from err

    def mpi_receive_run(self):  # noqa: ANN001
        try:
            return mpi_run(self)
        except Exception as err:  # noqa: BLE001
            wd = _HOOKED.get("watchdog")
            if wd is not None:
                wd.gone(wd.expected(), f"receive failed: {_first_line(err)}")
            raise

    FedMLCommManager.receive_message = receive_message
    FedMLCommManager.send_message = send_message
    MPIReceiveThread.run = mpi_receive_run
    _HOOKED["installed"] = True
