"""``pfedmoap-bench``: the benchmark command line. Each subcommand lives in its own module, imported lazily.

Subcommands: ``run`` (grid runs, MLflow, resume), ``leaderboard`` (from MLflow), ``partition`` (write and show a
partition), ``pretrain-mini`` (build the embedded mini CLIP), ``perf`` (naive vs optimized speed table),
``perf-executor`` (Ray vs sequential executor).
Each module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import List, Optional, Tuple

SUBCOMMANDS = {
    "run": ("benchmark_suite.runner", "run a benchmark grid (datasets × splits × algorithms × seeds)"),
    "leaderboard": ("benchmark_suite.leaderboard", "write LEADERBOARD.md, summary.csv and plots from MLflow"),
    "partition": ("benchmark_suite.partition_cmd", "write a partition file and show its client × class histogram"),
    "pretrain-mini": ("benchmark_suite.pretrain_mini", "build (or load) the offline mini CLIP checkpoint"),
    "perf": ("benchmark_suite.perf", "naive vs optimized per-round timings, memory and TFLOP/s"),
    "perf-executor": ("benchmark_suite.perf_executor", "Ray executor overhead per cell, grid time vs sequential"),
}


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # random-init test models are expected: drop open_clip's notice
        if not any(isinstance(f, _DropRandomInitNotice) for f in handler.filters):
            handler.addFilter(_DropRandomInitNotice())
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="pfedmoap-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # only the chosen subcommand's module is imported (fast --help, lazy heavy imports)
            importlib.import_module(module).add_arguments(p)
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(importlib.import_module(SUBCOMMANDS[args.command][0]).main(args) or 0)
    except BaseException as err:  # noqa: B036  (only user errors and Ctrl-C are reported; the rest re-raised)
        code, message = _report(err)
        if code is None:
            raise
        print(f"pfedmoap-bench {args.command}: {message}", file=sys.stderr)
        return code


INTERRUPTED = 130  # 128 + SIGINT, the shell's status for a Ctrl-C
GENERIC_INTERRUPT = "interrupted; run the same command again to resume"


def _report(err: BaseException) -> Tuple[Optional[int], str]:
    """(exit status, message) for bad input (2) and Ctrl-C (130), without a traceback; (None, "") for a bug."""
    from fedml_pfedmoap.errors import UserError

    interrupted = getattr(sys.modules.get("benchmark_suite.runner"), "Interrupted", None)
    if isinstance(interrupted, type) and isinstance(err, interrupted):  # the runner's own message says how to resume
        return INTERRUPTED, str(err) or GENERIC_INTERRUPT
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED, GENERIC_INTERRUPT
    if isinstance(err, (UserError, KeyError, ValueError, FileNotFoundError)):
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return 2, f"error: {msg}"
    return None, ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
