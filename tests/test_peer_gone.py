"""The peer-gone contract of the cross-silo plugin (docs/fedml.md "Timeouts"), one path at a time, in process.

Every way a process learns that a peer is gone (its wait timed out, a send failed, the MPI receive thread failed, the
server's port never opened) must end with one line in one format naming the lost rank(s) and the reason, and exit
status 3 (under MPI through ``MPI_Abort``). ``fedml_helpers.PEER_GONE`` is written from the documented format,
independently of the code that prints it; the multi-process tests in test_cross_silo.py use it too.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedml_helpers import free_ports, grpc_csv, peer_gone_lines

pytestmark = pytest.mark.fedml

class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Stop(Exception):
    """Raised by the fake terminators so that nothing calls ``os._exit`` inside pytest."""


def test_report_prints_one_documented_line_and_exits_3(capsys):
    from fedml_pfedmoap.fedml_plugin.watchdog import report_peer_gone

    codes = []

    def terminate(code):
        codes.append(code)
        raise Stop

    with pytest.raises(Stop):
        report_peer_gone(1, {0}, "send failed: _InactiveRpcError: <_InactiveRpcError of RPC ...>", terminate)
    err = capsys.readouterr().err
    assert codes == [3]
    assert err.count("\n") == 1 and err.endswith("; exiting\n")
    assert peer_gone_lines(err.replace("; exiting", "")) == [
        (1, [0], "send failed", "_InactiveRpcError: <_InactiveRpcError of RPC ...>")]
    with pytest.raises(ValueError, match="reason must start with"):
        report_peer_gone(1, [0], "something else", terminate)


def test_timeout_names_only_the_silent_ranks():
    from fedml_pfedmoap.fedml_plugin.watchdog import RoundWatchdog, peer_gone_line

    clock, gone = FakeClock(), []
    wd = RoundWatchdog(0, round_timeout_s=10, on_gone=lambda m, r: gone.append((m, r)), clock=clock)
    wd.wait_for([1, 2, 3], "round 4: waiting for uploads")
    wd.heard(1)
    wd.heard(3)
    clock.t += 10.0
    assert not wd.check() and gone == []  # at the limit, not over it
    clock.t += 0.5
    assert wd.check()
    assert gone == [([2], "timed out: round 4: waiting for uploads: no message after 10.5 s (limit 10 s)")]
    assert peer_gone_lines(peer_gone_line(0, *gone[0])) == [
        (0, [2], "timed out", "round 4: waiting for uploads: no message after 10.5 s (limit 10 s)")]
    wd.gone([1], "send failed: late")  # the same loss noticed again is not reported twice
    assert len(gone) == 1


def test_worker_wait_restarts_on_messages_and_pauses_while_training():
    from fedml_pfedmoap.fedml_plugin.watchdog import RoundWatchdog

    clock, gone = FakeClock(), []
    wd = RoundWatchdog(2, round_timeout_s=4, startup_timeout_s=30, on_gone=lambda m, r: gone.append((m, r)),
                       sticky=True, peers=[0], clock=clock)
    wd.wait_for([0], "waiting for the server's first message", startup=True)
    clock.t += 29
    assert not wd.check()  # the start-up limit applies to the first wait
    wd.wait_for([0], "waiting for the server")
    for _ in range(5):  # messages from the server keep a worker alive ...
        clock.t += 3
        wd.heard(0)
        assert not wd.check()
    assert wd.pending() == {0}
    wd.pause()  # ... and so does training
    clock.t += 100
    assert not wd.check() and gone == [] and wd.expected() == [0]
    wd.wait_for([0], "round 7: waiting for the server after the upload of client 1")
    clock.t += 4.25
    assert wd.check() and gone == [([0], "timed out: round 7: waiting for the server after the upload of client 1: "
                                         "no message after 4.2 s (limit 4 s)")]


@pytest.fixture
def hooks(monkeypatch):
    """``install_comm_hooks`` on FedML's classes, undone after the test."""
    from fedml.core.distributed.communication.mpi.mpi_receive_thread import MPIReceiveThread
    from fedml.core.distributed.fedml_comm_manager import FedMLCommManager

    from fedml_pfedmoap.fedml_plugin import watchdog

    for cls, name in ((FedMLCommManager, "send_message"), (FedMLCommManager, "receive_message"),
                      (MPIReceiveThread, "run")):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    monkeypatch.setattr(watchdog, "_HOOKED", {})
    return watchdog


def test_failed_send_names_the_receiver(hooks):
    from fedml.core.distributed.communication.message import Message
    from fedml.core.distributed.fedml_comm_manager import FedMLCommManager

    class RpcFailure(Exception):
        pass

    class DeadChannel:
        def send_message(self, msg):
            raise RpcFailure("<_InactiveRpcError of RPC that terminated with:\n\tstatus = StatusCode.UNAVAILABLE")

    gone = []
    wd = hooks.RoundWatchdog(1, 10, on_gone=lambda m, r: gone.append((m, r)), peers=[0])
    hooks.install_comm_hooks(wd)
    manager = SimpleNamespace(rank=1, com_manager=DeadChannel())  # only the send path of a manager is exercised
    with pytest.raises(hooks.PeerUnreachable) as info:  # raised: FedML handles failed sends while peers start up
        FedMLCommManager.send_message(manager, Message("upload", 1, 0))
    assert gone == []
    assert peer_gone_lines(str(info.value)) == [
        (1, [0], "send failed", "RpcFailure: <_InactiveRpcError of RPC that terminated with:")]


def test_failed_mpi_receive_blames_the_awaited_ranks(hooks):
    from fedml.core.distributed.communication.mpi.mpi_receive_thread import MPIReceiveThread

    class BrokenComm:
        def Iprobe(self):  # noqa: N802 - mpi4py's name
            raise RuntimeError("MPI_ERR_PROC_FAILED: process 2 failed")

    gone = []
    wd = hooks.RoundWatchdog(0, 10, on_gone=lambda m, r: gone.append((m, r)), peers=[1, 2, 3])
    hooks.install_comm_hooks(wd)
    wd.wait_for([2, 3], "round 1: waiting for uploads")
    thread = MPIReceiveThread(BrokenComm(), 0, 4, "ServerReceiveThread", None)
    with pytest.raises(Exception, match="MPI failed"):
        thread.run()  # in this thread: FedML's receive loop raises after printing the MPI error
    assert gone == [([2, 3], "receive failed: Exception: MPI failed!")]


def test_mpi_runs_end_through_abort_with_status_3():
    from fedml_pfedmoap.fedml_plugin.watchdog import _mpi_world, end_process

    class World:
        def __init__(self) -> None:
            self.codes = []

        def Abort(self, code):  # noqa: N802 - mpi4py's name
            self.codes.append(code)
            raise Stop

    world = World()
    with pytest.raises(Stop):
        end_process(3, comm=world)
    assert world.codes == [3]
    assert _mpi_world() is None  # a single process (no mpiexec) is never aborted, it exits


def test_unreachable_server_port_names_rank_0(tmp_path):
    from fedml_pfedmoap.fedml_plugin.cross_silo import wait_for_server
    from fedml_pfedmoap.fedml_plugin.watchdog import PeerUnreachable

    csv = grpc_csv(tmp_path, free_ports(2))  # nobody listens on rank 0's port
    with pytest.raises(PeerUnreachable) as info:
        wait_for_server(str(csv), timeout_s=0.3, rank=1, poll_s=0.05)
    [(rank, missing, kind, detail)] = peer_gone_lines(str(info.value))
    assert (rank, missing, kind) == (1, [0], "unreachable") and "within 0.3 s" in detail
