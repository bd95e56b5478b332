"""Clean ``fedml launch`` packages: stage only what a job needs, outside the checkout (docs/fedml.md "fedml launch").

FedML 0.9.6 packages a job's whole ``workspace`` folder, filtered by its ``.gitignore`` read line by line as
``shutil.ignore_patterns`` (so ``.venv/`` never matches a folder, and tracked folders such as ``results/`` cannot be
left out), and writes its generated entry scripts and ``launch_config/`` into the workspace, removing only some of
them. Pointed at a checkout, it packages the virtual environment and caches and leaves files behind. So the job files
in ``configs/launch/`` are not given to FedML directly:

* ``stage JOB.yaml -o DIR``: copies what a job needs (``STAGED``, without caches and bytecode) to ``DIR/workspace`` and
  writes ``DIR/<job>.yaml``, the job file pointing at it, for ``fedml launch DIR/<job>.yaml``;
* ``build JOB.yaml -d DIR``: stages into a temporary folder and runs FedML's ``federate build`` there, writing
  ``client-package.zip`` and ``server-package.zip`` to ``DIR`` (what ``fedml federate build JOB.yaml -d DIR`` does,
  without touching the checkout).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import yaml

STAGED = ("setup.py", "README.md", "fedml_pfedmoap", "benchmark_suite", "third_party", "configs")
SKIPPED = ("__pycache__", "*.pyc", "*.egg-info", ".*")
PACKAGES = ("client-package.zip", "server-package.zip")


class LaunchError(RuntimeError):
    """A job file or a build that cannot be used; the message names the file."""


def _skip(_dir: str, names: List[str]) -> List[str]:
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in SKIPPED)]


def stage(job_yaml: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy the job's workspace subset to ``out_dir/workspace``; return the job file written next to it."""
    job = Path(job_yaml).resolve()
    try:
        spec = yaml.safe_load(job.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise LaunchError(f"{job_yaml}: cannot read the job file ({err})") from None
    if not isinstance(spec, dict) or not spec.get("workspace") or not spec.get("job"):
        raise LaunchError(f"{job_yaml}: expected a FedML job file with 'workspace' and 'job'")
    source = (job.parent / str(spec["workspace"])).resolve()
    if not (source / "setup.py").is_file():
        raise LaunchError(f"{job_yaml}: workspace {spec['workspace']!r} resolves to {source}, which has no setup.py; "
                          "expected the repository root")
    out = Path(out_dir).resolve()
    workspace = out / "workspace"
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    for name in STAGED:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, workspace / name, ignore=_skip)
        elif src.is_file():
            shutil.copy2(src, workspace / name)
    staged = out / job.name
    staged.write_text(yaml.safe_dump({**spec, "workspace": "workspace"}, sort_keys=False), encoding="utf-8")
    return staged


def build(job_yaml: str | os.PathLike, dest: str | os.PathLike) -> List[Path]:
    """``fedml federate build`` of a staged copy of the job; returns the two package paths in ``dest``."""
    dest_dir = Path(dest).resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        (dest_dir / name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedml-pfedmoap-launch-") as tmp:
        staged = stage(job_yaml, tmp)
        home = os.environ.get("HOME")
        os.environ["HOME"] = str(Path(tmp) / "home")  # FedML's scratch folders (~/.fedml/...) stay in tmp
        try:
            from fedml.api import federate_build

            federate_build(str(staged), str(dest_dir))
        finally:
            if home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = home
    missing = [n for n in PACKAGES if not (dest_dir / n).is_file()]
    if missing:
        raise LaunchError(f"{job_yaml}: FedML's federate build wrote no {', '.join(missing)} to {dest_dir}")
    return [dest_dir / n for n in PACKAGES]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedml_pfedmoap.fedml_plugin.launch",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build client/server packages of a job file (offline)")
    b.add_argument("job", help="a job file of configs/launch/")
    b.add_argument("-d", "--dest", default="build/launch", help="folder for the packages (default build/launch)")
    s = sub.add_parser("stage", help="stage a clean workspace and job file for `fedml launch`")
    s.add_argument("job", help="a job file of configs/launch/")
    s.add_argument("-o", "--out", required=True, help="folder for the staged workspace and job file")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            for path in build(args.job, args.dest):
                print(f"{path} ({path.stat().st_size / 1e6:.2f} MB)")
        else:
            print(f"staged: fedml launch {stage(args.job, args.out)}")
    except LaunchError as err:
        print(f"fedml_pfedmoap launch: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
