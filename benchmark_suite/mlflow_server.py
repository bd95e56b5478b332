"""``--mlflow-server {auto,URI}``: a grid's runs through an MLflow tracking server instead of straight into sqlite.

A sqlite file must not be written by many processes at once; a tracking server is its one writer. ``auto`` starts
``mlflow server`` on 127.0.0.1 (a free port, one worker) over the grid's own sqlite store, with artifacts in the
``mlruns`` folder beside it (where a direct sqlite client puts them too), waits until it answers, and stops it when
the command ends, also on an error or Ctrl-C. An ``http(s)://`` URI names a running server (checked before the grid
starts). See docs/benchmark.md §Sharing one tracking store.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Iterator, Optional

from fedml_pfedmoap.errors import UserError
from fedml_pfedmoap.netaudit import free_loopback_port
from fedml_pfedmoap.tracking import QUIET_MLFLOW_ENV, MlflowLogger, TrackingLogger, sqlite_artifact_root

AUTO = "auto"
START_TIMEOUT_S = 180.0  # an MLflow 3 server needs ~10-20 s to import on a busy 2-core machine


class TrackingServerError(UserError, RuntimeError):
    """The tracking server could not be started or reached; the message names the store or URI."""


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow-server", default=None, metavar="auto|URI",
                        help="log through an MLflow tracking server: 'auto' starts one on 127.0.0.1 over the grid's "
                             "sqlite store for this command, an http(s):// URI uses a running one")


def _answers(uri: str, timeout: float = 5.0) -> Optional[str]:
    """None when ``<uri>/health`` answers 200, else the reason."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except OSError as err:
        return str(getattr(err, "reason", None) or err)



def _tail(log: IO[bytes], lines: int = 8) -> str:
    log.seek(0)
    text = log.read().decode(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (gunicorn or uvicorn workers included), SIGKILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def tracking_server(spec: Optional[str], sqlite_uri: str, timeout: float = START_TIMEOUT_S) -> Iterator[str]:
    """The tracking URI to log to: ``sqlite_uri`` itself for ``spec`` None; a given ``http(s)://`` URI once it
    answers; for ``auto`` the URI of a server started over ``sqlite_uri`` and stopped at exit."""
    if spec is None:
        yield sqlite_uri
        return
    if spec.startswith(("http://", "https://")):
        reason = _answers(spec)
        if reason is not None:
            raise TrackingServerError(f"--mlflow-server {spec}: no MLflow server answers there ({reason})")
        yield spec
        return
    if spec != AUTO:
        raise TrackingServerError(f"--mlflow-server: expected 'auto' or an http(s):// URI, got {spec!r}")
    root = sqlite_artifact_root(sqlite_uri)
    if root is None:
        raise TrackingServerError(f"--mlflow-server auto: serves the grid's sqlite store, but the tracking URI is "
                                  f"{sqlite_uri!r} (set tracking_args.mlflow_tracking_uri to sqlite:///FILE)")
    db = Path(sqlite_uri[len("sqlite:///"):]).resolve()
    port = free_loopback_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
           "--default-artifact-root", root.as_uri(), "--artifacts-destination", root.as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**QUIET_MLFLOW_ENV, **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}}
    uri = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=db.parent, start_new_session=True)  # own group: a terminal Ctrl-C reaches us
        try:
            deadline = time.monotonic() + timeout
            while _answers(uri, timeout=1.0) is not None:
                if proc.poll() is not None:
                    raise TrackingServerError(f"--mlflow-server auto: the MLflow server over {db} exited with "
                                              f"{proc.returncode}: {_tail(log)}")
                if time.monotonic() > deadline:
                    raise TrackingServerError(f"--mlflow-server auto: the MLflow server over {db} did not answer "
                                              f"within {timeout:.0f} s: {_tail(log)}")
                time.sleep(0.25)
            yield uri
        finally:
            _stop(proc)


@contextlib.contextmanager
def served_tracker(spec: Optional[str], tracker: TrackingLogger) -> Iterator[TrackingLogger]:
    """``tracker`` itself without ``spec``; else an MLflow logger for the same experiment through the server of
    ``spec`` (``auto``: over ``tracker``'s sqlite store, whose artifact folder it keeps)."""
    if spec is None:
        yield tracker
        return
    if not tracker.enabled or tracker.uri is None:
        raise TrackingServerError("--mlflow-server: tracking is off (tracking_args.mlflow_tracking_uri is null)")
    with tracking_server(spec, tracker.uri) as uri:
        yield MlflowLogger(uri, tracker.experiment, store_uri=tracker.uri if spec == AUTO else None)
