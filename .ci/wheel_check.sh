#!/usr/bin/env bash
# Wheel check: the built wheel alone must provide every module of fedml_pfedmoap and benchmark_suite.
#
# Builds the wheel (no dependencies, no build isolation: offline), installs it without -e into a fresh virtual
# environment whose only other content is a path entry to the project venv's site-packages for the dependencies
# (that venv's .pth files, the editable finder of this package among them, are not processed), then, from a folder
# outside the repository: `pfedmoap-bench --help`, `python -m fedml_pfedmoap --help`, one small quickstart cell, and an
# import of every module pkgutil.walk_packages finds, each of which must come from the fresh environment.
# Usage: .ci/wheel_check.sh [python of the project venv]   (default: .venv/bin/python)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "wheel check: FAILED: $*" >&2; exit 1; }

echo "== wheel check: build"
# From a copy of the files git would commit (tracked + untracked, not ignored): an in-tree build would leave build/ and
# *.egg-info in the checkout, and a stale build/lib could put deleted modules into the wheel.
mkdir -p "$WORK/src"
git -C "$REPO" ls-files -z -co --exclude-standard \
  | (cd "$REPO" && xargs -0 tar -cf - --ignore-failed-read 2>/dev/null) | tar -xf - -C "$WORK/src"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log" >&2; fail "pip wheel"; }
WHEEL="$(ls "$WORK"/dist/fedml_pfedmoap-*.whl)"
DEPS="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

echo "== wheel check: fresh venv + $(basename "$WHEEL")"
"$PY" -m venv --without-pip "$WORK/venv"
FRESH="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$DEPS" >"$FRESH/project-deps.pth"  # a plain path line: the deps, without processing their .pth files
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-deps --no-index "$WHEEL" >"$WORK/install.log" 2>&1 \
  || { tail -20 "$WORK/install.log" >&2; fail "pip install"; }

mkdir -p "$WORK/outside" && cd "$WORK/outside"
export PATH="$WORK/venv/bin:$PATH" PYTHONPATH="" PYTHONNOUSERSITE=1
echo "== wheel check: pfedmoap-bench --help"
pfedmoap-bench --help >/dev/null || fail "pfedmoap-bench --help"
python -m fedml_pfedmoap --help >/dev/null || fail "python -m fedml_pfedmoap --help"

echo "== wheel check: every module imports from the wheel"
python - "$FRESH" <<'PYEOF' || fail "module imports"
import importlib, pkgutil, sys
fresh = sys.argv[1]
names = []
for top in ("fedml_pfedmoap", "benchmark_suite"):
    pkg = importlib.import_module(top)
    names += [top] + [m.name for m in pkgutil.walk_packages(pkg.__path__, top + ".")]
for name in names:
    mod = importlib.import_module(name)
    where = getattr(mod, "__file__", None) or ""
    if not where.startswith(fresh):
        sys.exit(f"{name} imported from {where!r}, not from the wheel in {fresh}")
from fedml_pfedmoap.data.base import DATASETS, build_dataset
build_dataset("digits")  # registers the embedded and on-disk datasets
missing = {"digits", "caltech101", "cifar10", "domainnet", "office_caltech10"} - set(DATASETS.names())
if missing:
    sys.exit(f"datasets not registered from the wheel: {sorted(missing)}")
for sub in ("fedml_pfedmoap.data", "fedml_pfedmoap.data.loaders"):
    if sub not in names:
        sys.exit(f"{sub} is not a package of the wheel")
print(f"{len(names)} modules imported from the wheel")
PYEOF

echo "== wheel check: one quickstart cell"
pfedmoap-bench run --config "$REPO/configs/quickstart.yaml" --no-progress \
  --only algorithm=promptfl --only split=pathological \
  --set train_args.comm_round=1 --set train_args.epochs=1 --set train_args.client_num_in_total=2 \
  --set train_args.client_num_per_round=2 --set device_args.num_threads=1 \
  --set common_args.output_dir="$WORK/outside/results" --set common_args.cache_dir="$WORK/outside/cache" \
  --set tracking_args.mlflow_tracking_uri="sqlite:///$WORK/outside/mlflow.db" >"$WORK/run.log" 2>&1 \
  || { tail -30 "$WORK/run.log" >&2; fail "quickstart cell"; }
grep -q "^ran 1 cell(s)" "$WORK/run.log" \
  || { tail -30 "$WORK/run.log" >&2; fail "quickstart cell: expected 'ran 1 cell(s)'"; }
echo "== wheel check: passed"
