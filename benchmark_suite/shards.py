"""``--shard i/n``: run one of n parts of a grid (SLURM job arrays, several machines); see docs/benchmark.md
§Sharding a grid.

``i`` is 0-based (``0 <= i < n``), as ``$SLURM_ARRAY_TASK_ID`` with ``--array=0-(n-1)``. The partition is computed
over the config's whole grid (before ``--only``) from the cells alone: the distinct cells, ordered by cell hash, go
one by one, longest first (``train_args.comm_round``), to the shard with the fewest rounds so far (the lowest index
on a tie). So every cell lies in exactly one shard, its shard depends neither on the order of the grid nor on
``--only`` (which only narrows a shard), and the shards' rounds differ by at most one cell's rounds. Each shard
writes its partial ``summary.csv`` and ``LEADERBOARD.md`` under ``<output dir>/shards/<i>-of-<n>/``; the cells go to
the shared tracking store, from which ``pfedmoap-bench leaderboard`` merges every shard.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from fedml_pfedmoap.config import Config

from .grid import Cell, GridError, expand_grid, unique_cells

logger = logging.getLogger(__name__)


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only shard I of N (0-based: 0 <= I < N), e.g. --shard $SLURM_ARRAY_TASK_ID/"
                             "$SLURM_ARRAY_TASK_COUNT; `leaderboard` merges the shards")


def parse_shard(spec: str) -> Tuple[int, int]:
    """``"i/n"`` -> (i, n) with ``0 <= i < n``; anything else is a one-line :class:`GridError`."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if m is None or not int(m.group(1)) < int(m.group(2)):
        raise GridError(f"--shard: expected i/n with 0 <= i < n, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def assign(cells: Iterable[Tuple[str, int]], n: int) -> Dict[str, int]:
    """cell hash -> shard (0..n-1) for (hash, rounds) pairs: hash order, longest first, each to the least loaded
    shard (lowest index on a tie)."""
    load = [0] * n
    out: Dict[str, int] = {}
    for h, rounds in sorted(dict(cells).items(), key=lambda hr: (-hr[1], hr[0])):
        k = min(range(n), key=lambda j: (load[j], j))
        out[h] = k
        load[k] += rounds
    return out


def select(base: Config, cells: Sequence[Cell], spec: Optional[str]) -> List[Cell]:
    """The cells of ``cells`` in shard ``spec`` of ``base``'s whole grid (all of them without ``spec``)."""
    if spec is None:
        return list(cells)
    i, n = parse_shard(spec)
    grid = unique_cells(expand_grid(base))
    shard_of = assign(((c.hash, _rounds([c])) for c in grid), n)
    ours = [c for c in grid if shard_of[c.hash] == i]
    logger.info("shard %d/%d: %d of the grid's %d cells, %d of its %d rounds", i, n, len(ours), len(grid),
                _rounds(ours), _rounds(grid))
    return [c for c in cells if shard_of[c.hash] == i]


def _rounds(cells: Iterable[Cell]) -> int:
    return sum(int(c.cfg.train_args.comm_round) for c in cells)


def outputs_dir(out_dir: Path, spec: Optional[str]) -> Path:
    """Where a run writes summary.csv, LEADERBOARD.md and plots: a shard's own folder under ``out_dir/shards``."""
    if spec is None:
        return Path(out_dir)
    i, n = parse_shard(spec)
    return Path(out_dir) / "shards" / f"{i}-of-{n}"
