"""Round timeouts for cross-silo processes: nobody waits forever for a dead peer (docs/fedml.md §Stack notes).

FedML 0.9.6 has no timeouts: if a client dies the server waits forever, and if the server dies the clients do. Every
process of this plugin runs a ``RoundWatchdog``: it knows which ranks it is waiting for (the server: every worker; a
worker: the server, rank 0, at all times except while it trains) and since when. A message from a rank clears it (a
worker's wait restarts instead); when the wait exceeds the limit
(``comm_args.round_timeout_s``; the first wait, covering imports and feature encoding on every peer,
``comm_args.startup_timeout_s`` when set) the watchdog prints which rank(s) are missing and ends the process with exit
status ``EXIT_TIMEOUT`` (``os._exit``: FedML's gRPC/MPI threads would otherwise keep it alive).

``install_comm_hooks`` wraps ``FedMLCommManager.receive_message`` (to hear peers) and ``send_message`` (a send to a dead
peer raises ``PeerUnreachable`` naming its rank) in this process only.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable, Iterable, Optional, Set

logger = logging.getLogger(__name__)
EXIT_TIMEOUT = 3
EXIT_FAILURE = 1


class PeerUnreachable(ConnectionError):
    """A message could not be delivered to a rank (the process is gone or its address is wrong)."""


class RoundWatchdog:
    """Waits on a set of ranks with a deadline; on expiry reports them and calls ``on_expire`` (default: exit)."""

    def __init__(self, rank: int, round_timeout_s: float, startup_timeout_s: Optional[float] = None,
                 on_expire: Optional[Callable[[str], None]] = None, poll_s: float = 0.2, sticky: bool = False) -> None:
        self.rank = int(rank)
        self.sticky = sticky  # workers: a message restarts the clock but the wait goes on until ``pause()``
        self.round_timeout_s = float(round_timeout_s)
        self.startup_timeout_s = float(startup_timeout_s or round_timeout_s)
        self.on_expire = on_expire or _exit_with
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._pending: Set[int] = set()
        self._what = ""
        self._since = time.monotonic()
        self._limit = self.startup_timeout_s
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="fedml-pfedmoap-watchdog", daemon=True)

    def start(self) -> "RoundWatchdog":
        self._thread.start()
        return self

    def wait_for(self, ranks: Iterable[int], what: str, startup: bool = False) -> None:
        """Start waiting for a message from each of ``ranks`` (``what`` names the phase in the error message)."""
        with self._lock:
            self._pending = {int(r) for r in ranks}
            self._what = what
            self._since = time.monotonic()
            self._limit = self.startup_timeout_s if startup else self.round_timeout_s

    def heard(self, rank: int) -> None:
        with self._lock:
            if self.sticky:
                if int(rank) in self._pending:
                    self._since = time.monotonic()
            else:
                self._pending.discard(int(rank))

    def pause(self) -> None:
        """Stop waiting (a worker while it trains; nothing is expected from the server then)."""
        with self._lock:
            self._pending = set()

    def pending(self) -> Set[int]:
        with self._lock:
            return set(self._pending)

    def describe(self) -> str:
        with self._lock:
            if not self._pending:
                return f"rank {self.rank}: not waiting for anyone"
            waited = time.monotonic() - self._since
            return (f"rank {self.rank}: {self._what}: no message from rank(s) {sorted(self._pending)} "
                    f"after {waited:.1f} s (limit {self._limit:g} s)")

    def stop(self) -> None:
        self._stopped = True

    def _loop(self) -> None:
        while not self._stopped:
            time.sleep(self.poll_s)
            with self._lock:
                expired = bool(self._pending) and time.monotonic() - self._since > self._limit
            if expired and not self._stopped:
                self._stopped = True
                self.on_expire(self.describe())


def _exit_with(message: str) -> None:
    print(f"fedml_pfedmoap: round timeout: {message}; exiting", file=sys.stderr, flush=True)
    logger.error("round timeout: %s", message)
    os._exit(EXIT_TIMEOUT)


_HOOKED: dict = {}


def install_comm_hooks(watchdog: RoundWatchdog) -> None:
    """Route every received message's sender to ``watchdog.heard``; name the rank when a send fails."""
    from fedml.core.distributed.fedml_comm_manager import FedMLCommManager

    _HOOKED["watchdog"] = watchdog
    if _HOOKED.get("installed"):
        return
    receive, send = FedMLCommManager.receive_message, FedMLCommManager.send_message

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
            raise PeerUnreachable(f"rank {self.rank} could not send to rank {message.get_receiver_id()}: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err

    FedMLCommManager.receive_message = receive_message
    FedMLCommManager.send_message = send_message
    _HOOKED["installed"] = True
