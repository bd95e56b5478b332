"""What one ``pfedmoap-bench run`` invocation holds open for its whole life: the tracker and the executor
(docs/benchmark.md §Multi-GPU machines and clusters).

With the Ray executor a file store such as sqlite is served by an MLflow tracking server, since many processes must not
write one sqlite file; a Ray instance started here is shut down at the end.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Any, Iterator, Tuple

from fedml_pfedmoap.errors import UserError

from .executors import SequentialExecutor, check_executor_arguments

HTTP = ("http://", "https://")


def _uri_needs_server(uri: str) -> bool:
    return not uri.startswith(HTTP)


@contextlib.contextmanager
def grid_session(base: Any, args: argparse.Namespace) -> Iterator[Tuple[Any, Any]]:
    """(tracker, executor) for one ``run`` invocation. With ``--executor ray`` and a store that is not an http(s)
    server, runs go through ``--mlflow-server`` (default ``auto`` for a local Ray instance: a server on 127.0.0.1 over
    the configured store, stopped at the end); with ``--address`` an explicit server is required, since a loopback
    server is out of reach of the other nodes."""
    from fedml_pfedmoap.tracking import _uri_is_explicit, resolve_tracking_uri, tracker_from_config

    from .mlflow_server import served_tracker

    check_executor_arguments(args)
    uri = resolve_tracking_uri(base.tracking_args.mlflow_tracking_uri, _uri_is_explicit(args.set))
    server = getattr(args, "mlflow_server", None)
    if args.executor == "ray" and uri and _uri_needs_server(uri) and server is None:
        if args.address:  # checked before the tracker exists: a refused command creates no store
            raise UserError(f"--executor ray --address: tracking URI {uri} is a file store that the "
                            f"cluster's processes must not write at once; pass --mlflow-server http://HOST:PORT "
                            f"(a server every node reaches), or turn tracking off with "
                            f"--set tracking_args.mlflow_tracking_uri=null")
        server = "auto"
    tracker = tracker_from_config(base, args.set)
    with contextlib.ExitStack() as stack:
        if server is not None:  # served through a tracking server: a given URI, or one started here (auto)
            tracker = stack.enter_context(served_tracker(server, tracker))
        if args.executor == "ray":
            from .ray_executor import ray_executor

            executor = stack.enter_context(ray_executor(base, args))
        else:
            executor = SequentialExecutor()
        yield tracker, executor
