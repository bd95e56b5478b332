"""Process helpers for the FedML plugin tests: configs in a temp dir, hard timeouts, process-group cleanup."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")
# The documented peer-gone line (docs/fedml.md "Timeouts"), written here independently of the code that prints it.
PEER_GONE = re.compile(r"^fedml_pfedmoap: rank (\d+): peer\(s\) gone: rank\(s\) \[(\d+(?:, \d+)*)\]: "
                       r"(timed out|send failed|receive failed|unreachable): (\S.*)$", re.M)


def peer_gone_lines(text: str) -> List[Tuple[int, List[int], str, str]]:
    """``[(rank, [missing...], reason kind, detail)]`` for every peer-gone line in ``text``."""
    return [(int(m[1]), [int(x) for x in m[2].split(", ")], m[3], m[4]) for m in PEER_GONE.finditer(text)]


def write_config(tmp: Path, base: str, overrides: Dict[str, Dict], name: str = "cfg.yaml") -> Path:
    """``configs/fedml/<base>`` with section-wise overrides, outputs/caches/MLflow pointed into ``tmp``."""
    raw = yaml.safe_load((ROOT / "configs" / "fedml" / base).read_text())
    raw["common_args"].update(output_dir=str(tmp / "out"), cache_dir=str(tmp / "cache"))
    raw["tracking_args"]["mlflow_tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    raw["device_args"].update(device="cpu", num_threads=1)
    raw["train_args"].update(epochs=1, batch_size=16)
    for sec, body in overrides.items():
        raw.setdefault(sec, {}).update(body)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def free_ports(n: int) -> List[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def grpc_csv(tmp: Path, ports: List[int]) -> Path:
    path = tmp / "grpc_ipconfig.csv"
    rows = ["eid,rank,grpc_server_ip,grpc_server_port"] + [f"{r},{r},127.0.0.1,{p}" for r, p in enumerate(ports)]
    path.write_text("\n".join(rows) + "\n")
    return path


def child_env(tmp: Path, tag: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(HOME=str(tmp / "home"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               FEDML_PFEDMOAP_NETWORK_AUDIT=str(tmp / f"audit_{tag}.jsonl"), no_proxy="*")
    (tmp / "home").mkdir(exist_ok=True)
    return env


class Procs:
    """Started processes (own session each); ``close()`` kills every group that is still alive."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.items: Dict[str, subprocess.Popen] = {}

    def start(self, tag: str, cmd: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        out = open(self.tmp / f"{tag}.log", "w")
        p = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(self.tmp, tag), stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.items[tag] = p
        return p

    def log(self, tag: str) -> str:
        return (self.tmp / f"{tag}.log").read_text(errors="replace")

    def wait_all(self, timeout: float) -> Dict[str, Optional[int]]:
        deadline = time.monotonic() + timeout
        for p in self.items.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {k: p.poll() for k, p in self.items.items()}

    def close(self) -> None:
        for p in self.items.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)


def run_grpc_job(tmp: Path, cfg: Path, ranks: int, timeout: float = 500) -> Dict[str, Optional[int]]:
    """Start ranks 0..ranks-1 of a gRPC cross-silo job at once (workers wait for the server's port themselves),
    wait for all of them, kill whatever is left; returns each rank's exit status (None: still running at the end)."""
    procs = Procs(tmp)
    try:
        for rank in range(ranks):
            procs.start(f"rank{rank}", [PY, "-m", "fedml_pfedmoap", "--cf", str(cfg), "--rank", str(rank),
                                        "--role", "server" if rank == 0 else "client"])
        rc = procs.wait_all(timeout)
    finally:
        procs.close()
    assert rc == {f"rank{r}": 0 for r in range(ranks)}, {k: procs.log(k)[-2000:] for k in rc}
    return rc


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before opening port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"port {port} not open after {timeout} s")


def mlflow_metric(tmp: Path, key: str) -> Dict[int, float]:
    """``step -> value`` of one metric of the only run that logged it in ``<tmp>/mlflow.db``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    runs = [r for r in runs if key in r.data.metrics]  # (a benchmark's parent run holds no round metrics)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}
