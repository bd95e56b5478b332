"""``python -m fedml_pfedmoap --cf config.yaml``: run a FedML config with this package's algorithms.

The same command serves every FedML mode the config names (docs/fedml.md §Stack notes):

* ``training_type: simulation`` — the in-process loop behind ``FedMLRunner(algorithm_flow=...)``;
* ``training_type: cross_silo``, ``backend: MPI`` — ``mpiexec -n <workers+1> python -m fedml_pfedmoap --cf cfg.yaml``;
* ``training_type: cross_silo``, ``backend: GRPC`` — one process per rank:
  ``python -m fedml_pfedmoap --cf cfg.yaml --rank R --role server|client`` (start the server first).

``--set section.key=value`` overrides config keys. FedML runs offline (see ``fedml_plugin/guard.py``); its files go
under ``tracking_args.log_file_dir`` (default ``<output_dir>/fedml``). Exit status: 0 done, 2 bad config, 1 failure,
3 a peer is gone (one line ``fedml_pfedmoap: rank R: peer(s) gone: rank(s) [..]: <reason>``; see docs/fedml.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedml_pfedmoap", description=__doc__.splitlines()[0])
    p.add_argument("--cf", "--yaml_config_file", dest="cf", required=True, help="FedML YAML config")
    p.add_argument("--rank", type=int, default=0, help="gRPC: this process's rank (0 = server); MPI sets it")
    p.add_argument("--role", choices=["server", "client"], default=None, help="default: server for rank 0")
    p.add_argument("--run_id", default=os.environ.get("FEDML_CURRENT_RUN_ID", "0"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    p.add_argument("--verbose", action="store_true", help="show FedML's own INFO logs")
    args, _unknown = p.parse_known_args(argv)  # FedML launchers add their own flags (--local_rank, ...)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    from .fedml_plugin import guard

    guard.maybe_install_audit_from_env()  # before anything opens a socket
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedml_pfedmoap").setLevel(logging.INFO)
    from .config import ConfigError
    from .fedml_plugin.config import load_plugin_config, to_fedml_namespace

    try:
        pc = load_plugin_config(args.cf, args.set)
    except (ConfigError, ValueError) as err:
        print(f"fedml_pfedmoap: error: {err}", file=sys.stderr)
        return 2
    cfg = pc.cfg
    guard.isolate_home(cfg.tracking_args.log_file_dir or Path(cfg.common_args.output_dir) / "fedml")
    import fedml

    guard.neutralize_fedml()
    ns = to_fedml_namespace(pc, rank=args.rank, role=args.role, run_id=args.run_id, yaml_path=args.cf)
    ns = fedml.init(ns, check_env=False, should_init_logs=False)
    guard.offline_flags(ns)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.common_args.training_type == "simulation":
        from .fedml_plugin.simulation import run_simulation

        result = run_simulation(pc, ns)
        print(f"fedml_pfedmoap: simulation finished: {result}", flush=True)
        return 0
    from .fedml_plugin.cross_silo import run_cross_silo
    from .fedml_plugin.watchdog import EXIT_FAILURE, PeerUnreachable, end_process, report_peer_gone

    try:
        run_cross_silo(pc, ns)
    except PeerUnreachable as err:  # the one peer-gone line (see fedml_plugin/watchdog.py), status 3
        report_peer_gone(err.rank, err.missing, err.reason)
    except BaseException as err:  # noqa: BLE001 - any failure must end the process (peers time out on their own)
        traceback.print_exc()
        print(f"fedml_pfedmoap: rank {ns.rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        end_process(EXIT_FAILURE)
    print(f"fedml_pfedmoap: rank {ns.rank} ({ns.role}) finished", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # FedML's communication threads (gRPC pool, MPI receivers) would otherwise keep the process alive


if __name__ == "__main__":
    sys.exit(main())
