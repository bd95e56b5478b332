"""`fedml launch` packages (fedml_plugin/launch.py, docs/fedml.md) built from a checkout as users have it: with a
virtual environment, caches, results and build outputs present. The packages hold only what a job needs, and the
checkout's ``git status`` is the same before and after."""
from __future__ import annotations

import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from fedml_helpers import PY, ROOT, child_env

from fedml_pfedmoap.fedml_plugin.config import load_plugin_config

pytestmark = [pytest.mark.slow, pytest.mark.fedml]
BIG = 8_000_000  # bytes of each stand-in for .venv/.cache/results content; a package holding any of them is too big

BUILD_SCRIPT = r"""
import sys, warnings
warnings.simplefilter("ignore")
from fedml_pfedmoap.fedml_plugin import guard
guard.install_network_audit(sys.argv[1])
from fedml_pfedmoap.fedml_plugin.launch import main
for job in sys.argv[3:]:
    assert main(["build", job, "-d", f"{sys.argv[2]}/{job.split('/')[-1][:-5]}"]) == 0, job
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def used_checkout(tmp: Path) -> Path:
    """A git checkout of the working tree plus what `make` and runs leave in one (all git-ignored)."""
    repo = tmp / "repo"
    for f in git(ROOT, "ls-files", "-z", "-co", "--exclude-standard").split("\0"):
        if f and (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "snapshot")
    payload = random.Random(0).randbytes(BIG)  # incompressible: zipping cannot hide it
    for rel in (".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", ".cache/features/digits.npz",
                "results/quickstart/checkpoints/cell.ckpt", "results/mlflow.db", "build/lib/stale.bin",
                "fedml_pfedmoap/__pycache__/config.cpython-311.pyc"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(payload)
    (repo / "fedml_pfedmoap.egg-info").mkdir()
    (repo / "fedml_pfedmoap.egg-info" / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: fedml_pfedmoap\n")
    return repo


def check_packages(dest: Path, job: str) -> None:
    spec = yaml.safe_load((ROOT / job).read_text())
    cfg = spec["server_job"].split("--cf ")[1].split()[0]
    load_plugin_config(ROOT / cfg)  # the config the job runs is valid
    for kind, entry in (("client", spec["job"]), ("server", spec["server_job"])):
        pkg = dest / f"{kind}-package.zip"
        assert pkg.stat().st_size < 2_000_000, (job, pkg.stat().st_size)
        with zipfile.ZipFile(pkg) as z:
            names = z.namelist()
            root = f"{kind}-package/fedml/"
            for needed in ("setup.py", "fedml_pfedmoap/__main__.py", "fedml_pfedmoap/data/__init__.py",
                           "fedml_pfedmoap/assets/mini-clip.safetensors", "benchmark_suite/cli.py",
                           "third_party/fastapi_cli/pyproject.toml", cfg):
                assert root + needed in names, (job, needed)
            bad = [n for n in names if any(part in n.split("/") for part in
                                           (".venv", ".cache", "results", "build", "__pycache__", "tests", ".git"))
                   or n.endswith((".pyc", "PKG-INFO"))]
            assert bad == [], (job, bad[:10])
            script = "fedml_job_entry_pack.sh" if kind == "client" else "fedml_server_job_entry_pack.sh"
            assert entry.strip() in z.read(root + script).decode()


def test_documented_launch_build_from_a_used_checkout(tmp_path):
    """The command of docs/fedml.md, run in a checkout with .venv, caches and results: small packages, nothing left."""
    repo = used_checkout(tmp_path)
    before = git(repo, "status", "--porcelain", "--ignored")
    cmd = [PY, "-m", "fedml_pfedmoap.fedml_plugin.launch", "build", "configs/launch/quickstart.yaml", "-d",
           "build/launch"]
    assert " ".join(cmd[1:]) in (ROOT / "docs" / "fedml.md").read_text()  # the documented command, literally
    out = subprocess.run(cmd, cwd=repo, env=child_env(tmp_path, "build"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    check_packages(repo / "build" / "launch", "configs/launch/quickstart.yaml")
    after = git(repo, "status", "--porcelain", "--ignored")
    assert set(after.splitlines()) - set(before.splitlines()) <= {"!! build/launch/"}, after
    assert set(before.splitlines()) <= set(after.splitlines()), (before, after)


def test_every_launch_file_builds_offline(tmp_path):
    """Every job file of configs/launch/ builds, with no network attempt, into packages holding the plugin and its
    config; a job file whose workspace is not the repository names the file."""
    repo = used_checkout(tmp_path)
    jobs = sorted(f"configs/launch/{p.name}" for p in (ROOT / "configs" / "launch").glob("*.yaml"))
    assert len(jobs) >= 9
    out = subprocess.run([PY, "-c", BUILD_SCRIPT, str(tmp_path / "audit.jsonl"), str(tmp_path / "pkg"), *jobs],
                         cwd=repo, env=child_env(tmp_path, "build"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (tmp_path / "audit.jsonl").read_text() == ""
    for job in jobs:
        check_packages(tmp_path / "pkg" / Path(job).stem, job)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"workspace": ".", "job": "true"}))
    from fedml_pfedmoap.fedml_plugin.launch import LaunchError, stage

    with pytest.raises(LaunchError, match=r"bad\.yaml: workspace '\.' resolves to .* no setup\.py"):
        stage(bad, tmp_path / "staged")
