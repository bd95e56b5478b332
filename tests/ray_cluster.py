"""A real Ray cluster on loopback for the executor tests, and the processes around it.

Each node is ``ray start --block`` in a session of its own with a short temp dir of its own (Ray's unix socket paths
are limited in length) and free ports, so the tests never touch another Ray cluster on the machine: stopping a node
is SIGTERM to its ``ray start`` (which stops the node's processes), then SIGKILL to whatever is left in its session.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List

from fedml_helpers import free_ports

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def child_env(**extra: str) -> dict:
    """This checkout importable, one thread, no usage statistics, no inherited tracking URI."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def session_pids(sid: int) -> List[int]:
    """The live processes of session ``sid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    out.append(int(d.name))
    return out


def stop_session(proc: "subprocess.Popen", sig: int = signal.SIGTERM, grace: float = 30.0) -> List[int]:
    """Signal the session leader ``proc``, wait for its session to empty, SIGKILL what is left; returns the pids
    that had to be killed (empty when the process stopped its own children)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (proc.poll() is None or session_pids(proc.pid)):
        time.sleep(0.2)
    left = session_pids(proc.pid)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return left


def _wait_for(path: Path, text: str, proc: "subprocess.Popen", timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"{path.name}: no {text!r} within {timeout:.0f} s: {log[-2000:]}")


@contextlib.contextmanager
def ray_node(root: Path, name: str, args: List[str]) -> Iterator["subprocess.Popen"]:
    """One ``ray start --block`` node with 1 CPU; stopped (session emptied) on exit."""
    ports = free_ports(6)
    cmd = [RAY, "start", "--block", "--num-cpus", "1", "--temp-dir", str(root / name), *args,
           "--dashboard-agent-listen-port", str(ports[0]), "--dashboard-agent-grpc-port", str(ports[1]),
           "--metrics-export-port", str(ports[2]), "--runtime-env-agent-port", str(ports[3])]
    log = root / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=root,
                                start_new_session=True)
    try:
        _wait_for(log, "Ray runtime started", proc, timeout=120)
        yield proc
    finally:
        left = stop_session(proc)
        assert not session_pids(proc.pid), f"ray node {name}: processes left after SIGKILL"
        if left:
            print(f"ray node {name}: {len(left)} process(es) needed SIGKILL", file=sys.stderr)


@contextlib.contextmanager
def loopback_cluster() -> Iterator[str]:
    """A head node and a second (worker) node, 1 CPU each; yields the head's address."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: unix socket paths live under it
    port, client, dash = free_ports(3)
    address = f"127.0.0.1:{port}"
    try:
        with ray_node(root, "h", ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                                  "--include-dashboard=false", "--dashboard-port", str(dash),
                                  "--ray-client-server-port", str(client)]):
            with ray_node(root, "w", ["--address", address]):
                yield address
    finally:
        shutil.rmtree(root, ignore_errors=True)
