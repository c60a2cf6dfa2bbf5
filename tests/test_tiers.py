"""The two test tiers: `make test` (no slow test) and `make test-all` (every test), from one SLOW list.

Each tier's pytest command is read from the Makefile's recipe and collected in a subprocess
(``--collect-only``), so a change to either recipe, to SLOW or to the hook that applies it is checked:
``make test`` selects exactly the tests SLOW does not name, ``make test-all`` every collected test, and
every SLOW entry still names a test (a stale entry fails).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SLOW, is_slow, slow_keys

REPO = Path(__file__).resolve().parent.parent


def _recipe_pytest_args(target: str) -> list[str]:
    """The arguments after ``-m pytest`` in the Makefile recipe of ``target``."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text, flags=re.MULTILINE)
    assert match, f"no {target} target in the Makefile"
    [line] = [ln.strip() for ln in match.group(1).splitlines() if " -m pytest " in ln]
    return shlex.split(line.split(" -m pytest ", 1)[1])


def _collect(targets: list[str]) -> dict[str, tuple[list[str], int, int]]:
    """For each Makefile target: the node ids its pytest command selects, how many it collected, how many it
    deselected (the collections run side by side)."""
    # one -q whatever the recipe's verbosity: node ids, one a line, then the "N/M tests collected" summary
    procs = {t: subprocess.Popen([sys.executable, "-m", "pytest", *(a for a in _recipe_pytest_args(t) if a != "-q"),
                                  "-q", "--collect-only", "-p", "no:cacheprovider"], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for t in targets}
    out = {}
    for target, proc in procs.items():
        text, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, text[-3000:]
        ids = [ln for ln in text.splitlines() if "::" in ln and not ln.startswith(" ")]
        summary = re.search(r"^(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?", text, flags=re.MULTILINE)
        assert summary, text[-3000:]
        selected, total, deselected = summary.group(1), summary.group(2) or summary.group(1), summary.group(3) or "0"
        assert int(selected) == len(ids), text[-3000:]
        out[target] = (ids, int(total), int(deselected))
    return out


@pytest.fixture(scope="module")
def tiers() -> dict[str, tuple[list[str], int, int]]:
    return _collect(["test", "test-all"])


def test_make_test_leaves_out_every_slow_test_and_nothing_else(tiers: dict[str, tuple[list[str], int, int]]) -> None:
    fast, total, deselected = tiers["test"]
    every, _, _ = tiers["test-all"]
    assert fast and not [t for t in fast if is_slow(t)]
    assert sorted(fast) == sorted(t for t in every if not is_slow(t))
    assert deselected == sum(is_slow(t) for t in every) and len(fast) + deselected == total


def test_make_test_all_selects_every_test(tiers: dict[str, tuple[list[str], int, int]]) -> None:
    every, total, deselected = tiers["test-all"]
    assert deselected == 0 and len(every) == total == tiers["test"][1]
    assert any(is_slow(t) for t in every)


def test_every_slow_entry_names_a_collected_test(tiers: dict[str, tuple[list[str], int, int]]) -> None:
    keys = {k for t in tiers["test-all"][0] for k in slow_keys(t)}
    assert sorted(SLOW - keys) == [], "stale entries in tests/conftest.py's SLOW"


def test_slow_is_the_only_definition_of_slow() -> None:
    """No test file marks a test slow itself: the SLOW list is the one place to read and change."""
    marked = [p.name for p in sorted((REPO / "tests").glob("test_*.py"))
              if p.name != Path(__file__).name and re.search(r"mark\s*\.\s*slow\b", p.read_text())]
    assert marked == []
