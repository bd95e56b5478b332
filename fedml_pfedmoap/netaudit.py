"""An audit hook that keeps a process off the network outside loopback (docs/fedml.md, docs/flower.md).

``install_network_audit(path)`` adds a ``sys.addaudithook`` hook that records every ``socket.connect`` /
``socket.getaddrinfo`` / ``socket.sendto`` / ``socket.gethostbyname`` to a non-loopback address in ``path`` (JSON lines)
and refuses it (``ENETUNREACH``), i.e. the process sees an unreachable network. Every engine's entry point installs it
when the environment variable ``FEDML_PFEDMOAP_NETWORK_AUDIT`` names a file (``maybe_install_audit_from_env``). It sees
Python-level sockets only, not those opened inside C extensions (gRPC's core, MPI). Imports no engine.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Optional

AUDIT_ENV = "FEDML_PFEDMOAP_NETWORK_AUDIT"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the servers the launchers start on loopback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(host: Any) -> bool:
    """True for loopback/unspecified addresses and local names (``None`` host = local bind)."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    h = str(host).strip("[]").lower()
    if h in _LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(h.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _host_of(event: str, args: tuple) -> Optional[Any]:
    if event == "socket.getaddrinfo":
        return args[0] if args else None
    if event in ("socket.connect", "socket.sendto"):
        addr = args[1] if len(args) > 1 else None
        if isinstance(addr, tuple) and addr:
            return addr[0]
        return None  # AF_UNIX paths and the like are local
    if event == "socket.gethostbyname":
        return args[0] if args else None
    return None


_AUDIT_LOCK = threading.Lock()
_AUDIT_INSTALLED: Optional[str] = None


def install_network_audit(path: str | os.PathLike, block: bool = True) -> None:
    """Record (and with ``block`` refuse) every outbound attempt to a non-loopback address; see the module docstring."""
    global _AUDIT_INSTALLED
    if _AUDIT_INSTALLED is not None:
        return
    out = str(Path(path).resolve())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).touch()
    _AUDIT_INSTALLED = out
    watched = {"socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.gethostbyname"}

    def hook(event: str, args: tuple) -> None:
        if event not in watched:
            return
        host = _host_of(event, args)
        if is_loopback(host):
            return
        with _AUDIT_LOCK:
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"event": event, "host": str(host), "pid": os.getpid()}) + "\n")
        if block:
            raise OSError(errno.ENETUNREACH, f"network unreachable (fedml_pfedmoap network audit): {event} {host}")

    sys.addaudithook(hook)


def maybe_install_audit_from_env() -> None:
    path = os.environ.get(AUDIT_ENV)
    if path:
        install_network_audit(path)
