"""Run the Flower app on this machine: ``python -m fedml_pfedmoap.flower {simulation,deployment} --config X.yaml``.

Both modes start a private ``flower-superlink`` on 127.0.0.1 (insecure, a free port, runtime dependency installation
off), write a SuperLink connection into a private Flower home (``FLWR_HOME``: ``<output_dir>/<run_name>/flwr_home``)
and call ``flwr run <app> fedml-pfedmoap --stream`` with the YAML as the app's run config:

* ``simulation``: the SuperLink runs with ``--simulation`` (Flower's simulation runtime, Ray backend) and
  ``--federation-config num-supernodes=N`` (N = ``--supernodes``, default ``client_num_in_total``);
* ``deployment``: N real ``flower-supernode`` processes, SuperNode k with ``--node-config "partition-id=k
  num-partitions=N"`` and its own free ClientAppIo port.

Every process gets ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and ``MLFLOW_DISABLE_TELEMETRY=true``
(no outbound connection: Flower's telemetry and update check, MLflow 3's telemetry) and this checkout on
``PYTHONPATH``. Everything started here is stopped at the end (process groups). Exit status: 0 finished,
3 a SuperNode gone (the one line is printed), 1 any other failure.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..config import load_config
from ..netaudit import free_loopback_port

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "fedml-pfedmoap"



def flower_env(flwr_home: Path, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of every Flower process started here (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


class Cluster:
    """A private SuperLink (and SuperNodes) on loopback; ``close()`` kills every process group started here."""

    def __init__(self, workdir: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.dir = Path(workdir).resolve()
        self.home = self.dir / "flwr_home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home, env)
        self.procs: Dict[str, subprocess.Popen] = {}
        self.port: Optional[int] = None

    def start(self, name: str, cmd: List[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def superlink(self, simulation: bool, timeout_s: float = 60.0) -> int:
        self.port = free_loopback_port()
        cmd = ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
               "--port", str(self.port)] + (["--simulation"] if simulation else [])
        proc = self.start("superlink", cmd)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"flower-superlink did not open port {self.port}: "
                                       f"{self.log('superlink')[-2000:]}") from None
                time.sleep(0.3)
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                               f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        return self.port

    def supernode(self, partition: int, partitions: int) -> subprocess.Popen:
        return self.start(f"supernode{partition}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_loopback_port()),
            "--node-config", f"partition-id={partition} num-partitions={partitions}"])

    def flwr_run(self, app: Path, config: Path, overrides: str = "",
                 supernodes: Optional[int] = None) -> subprocess.Popen:
        """``flwr run`` of ``app`` with the YAML as run config (a TOML file, so overrides may hold spaces)."""
        run_cfg = self.dir / "run_config.toml"
        run_cfg.write_text(f"config = {json.dumps(str(Path(config).resolve()))}\noverrides = {json.dumps(overrides)}\n")
        cmd = ["flwr", "run", str(Path(app).resolve()), CONNECTION, "--stream", "--run-config", str(run_cfg)]
        if supernodes is not None:
            cmd += ["--federation-config", f"num-supernodes={int(supernodes)}"]
        return self.start("flwr_run", cmd)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait(timeout=10)


def read_status(run_dir: Path) -> Dict[str, str]:
    path = Path(run_dir) / "flower_status.json"
    if not path.is_file():
        return {"status": "UNKNOWN", "error": f"fedml_pfedmoap flower: the ServerApp wrote no {path}"}
    return json.loads(path.read_text())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedml_pfedmoap.flower", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("simulation", "deployment"))
    p.add_argument("--config", required=True, help="the suite's YAML (e.g. configs/flower/flower.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value (repeatable)")
    p.add_argument("--app", default=str(PACKAGE_ROOT / "configs" / "flower"), help="the Flower app folder")
    p.add_argument("--supernodes", type=int, default=None, help="SuperNodes (default: client_num_in_total)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before everything is stopped")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.common_args.output_dir) / cfg.common_args.run_name
    n = args.supernodes or cfg.train_args.client_num_in_total
    cluster = Cluster(run_dir / "flower_processes")
    try:
        cluster.superlink(simulation=args.mode == "simulation")
        if args.mode == "deployment":
            for k in range(n):
                cluster.supernode(k, n)
        import shlex

        run = cluster.flwr_run(Path(args.app), Path(args.config), " ".join(shlex.quote(o) for o in args.overrides),
                               n if args.mode == "simulation" else None)
        run.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"fedml_pfedmoap flower: not finished within --timeout {args.timeout:g} s; stopped", file=sys.stderr)
        return 1
    finally:
        cluster.close()
    status = read_status(run_dir)
    if status["status"] == "FINISHED":
        print(f"fedml_pfedmoap flower: finished; rounds in {run_dir / 'flower_rounds.jsonl'}")
        return 0
    print(status["error"], file=sys.stderr)
    return 3 if "SuperNode(s) gone" in status["error"] else 1
