"""The docs are self-contained: no tracked file cites the internal specification files, and every reference-defect
code ``D<n>`` cited in the package is defined in the defect tables of docs/algorithms.md or docs/data.md."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC_NAMES = re.compile(r"\b(?:NEW_)?(?:PFEDMOAP|BASELINES|DATA|FEDML_AND_STACK)\.md\b")
DEFECT = re.compile(r"\bD(\d{1,2})\b")
TABLE_ROW = re.compile(r"^\|\s*D(\d{1,2})\s*\|", re.MULTILINE)  # first cell of a defect-table row
HEADING = re.compile(r"^#+ .*\((D\d{1,2})[–-](D\d{1,2})\)", re.MULTILINE)  # e.g. "## Data defects (D9–D13)"


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [ROOT / p for p in out.splitlines()]
    return [p for p in paths if p.is_file() and p.suffix not in (".png", ".safetensors", ".gz", ".pkl")]


def defined_defects() -> set[int]:
    codes: set[int] = set()
    for name in ("algorithms.md", "data.md"):
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        codes |= {int(n) for n in TABLE_ROW.findall(text)}
        for lo, hi in HEADING.findall(text):
            codes |= set(range(int(lo[1:]), int(hi[1:]) + 1))
    return codes


def test_no_tracked_file_cites_the_internal_spec_files() -> None:
    hits = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                 for m in SPEC_NAMES.finditer(text)]
    assert not hits, "internal spec files cited (point to docs/*.md instead):\n" + "\n".join(hits)


def test_every_defect_code_cited_in_the_package_is_defined_in_the_docs() -> None:
    defined = defined_defects()
    assert set(range(1, 15)) <= defined, f"docs/algorithms.md must define D1-D14; defines {sorted(defined)}"
    cited = {}
    for pkg in ("fedml_pfedmoap", "benchmark_suite"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for m in DEFECT.finditer(path.read_text(encoding="utf-8")):
                cited.setdefault(int(m.group(1)), str(path.relative_to(ROOT)))
    missing = {f"D{n}": where for n, where in sorted(cited.items()) if n not in defined}
    assert not missing, f"defect codes cited in the package but not defined in docs/algorithms.md: {missing}"


def test_defect_pattern_reads_table_rows_only() -> None:
    """The table parser itself: a row's first cell counts, a mention in prose or another cell does not."""
    text = "| ID | x |\n|---|---|\n| D3 | a |\n| D12 | b, see D99 |\nSee D42 in prose.\n"
    assert sorted(int(n) for n in TABLE_ROW.findall(text)) == [3, 12]
