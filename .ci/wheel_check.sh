#!/usr/bin/env bash
# Wheel check: the built wheel alone must provide every module of fedml_pfedmoap and benchmark_suite.
#
# Builds the wheel (no dependencies, no build isolation: offline), installs it without -e into a fresh virtual
# environment whose only other content is a path entry to the project venv's site-packages for the dependencies
# (that venv's .pth files, the editable finder of this package among them, are not processed), then, from a folder
# outside the repository: `pfedmoap-bench --help`, `python -m fedml_pfedmoap --help`, one small quickstart cell, and an
# import of every module found in the installed wheel, each of which must come from the fresh environment. An engine
# subpackage whose engine is not installed in that venv (e.g. the FedML plugin in .venv-flower) is listed by name and
# its files must be in the wheel, but it is not imported.
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
python - "$FRESH" "$WORK/src" <<'PYEOF' || fail "module imports"
import importlib, importlib.util, os, pkgutil, sys
fresh = sys.argv[1]
ENGINES = {"fedml_pfedmoap.fedml_plugin": "fedml", "fedml_pfedmoap.flower": "flwr", "benchmark_suite.ray_executor": "ray"}  # subpackage -> its engine

def walk(folder, prefix):  # every module in the installed tree, found on disk, nothing imported
    found = [prefix]
    for info in pkgutil.iter_modules([folder], prefix + "."):
        sub = os.path.join(folder, info.name.rsplit(".", 1)[1])
        found += walk(sub, info.name) if info.ispkg else [info.name]
    return found

names, source = [], []
for top in ("fedml_pfedmoap", "benchmark_suite"):
    names += walk(os.path.join(fresh, top), top)
    source += walk(os.path.join(sys.argv[2], top), top)
if sorted(set(source) - set(names)):
    sys.exit(f"modules of the source tree missing from the wheel: {sorted(set(source) - set(names))}")
absent = {pkg for pkg, engine in ENGINES.items() if importlib.util.find_spec(engine) is None}
skipped = [n for n in names if any(n == p or n.startswith(p + ".") for p in absent)]
if skipped:
    print(f"present, not imported (their engine is not installed here): {', '.join(skipped)}")
for name in names:
    if name in skipped:
        continue
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
print(f"{len(names) - len(skipped)} modules imported from the wheel, {len(skipped)} engine modules present but not imported")
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
