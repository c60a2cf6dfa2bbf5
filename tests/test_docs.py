"""The docs hold together: every file, function, link and option they cite exists, and the README stays short.

The README is the front page (what it is, set-up, one example per command, where results land, how to read
them); the reference is in docs/ (docs/README.md lists it): every command's options in docs/COMMANDS.md.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from wbc_batch.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
COMMANDS = REPO / "docs" / "COMMANDS.md"
DOCS_INDEX = REPO / "docs" / "README.md"
README_MAX_LINES = 200
# Reference docs; CHANGELOG.md is history and may name what no longer exists.
DOCS = sorted([README, REPO / "MODEL_CARD.md", REPO / "infra" / "README.md", *(REPO / "docs").glob("*.md")])
# Every Markdown file whose links are checked: the reference docs and the top-level ones.
LINKED_DOCS = sorted({*DOCS, *REPO.glob("*.md")})
PATH_RE = re.compile(r"`((?:wbc_batch|tests|tools|bench|jobs|infra)/[\w./-]*[\w/])`")
# `module.name` or `wbc_batch.module.name`, the module being one of wbc_batch's
NAME_RE = re.compile(r"`(?:wbc_batch\.)?([a-z_]+)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?(?:\([^`]*\))?`")
FILE_SUFFIXES = {"json", "keras", "csv", "py", "md", "txt", "html", "jpg", "jpeg", "png", "parquet", "yaml", "yml",
                 "lst", "tif", "tiff", "bmp", "toml", "sh"}
# run-manifest fields written like module.name (`model.digest` is the manifest's, not wbc_batch.model's)
MANIFEST_FIELDS = {("model", "digest"), ("model", "review_threshold"), ("model", "sha256"), ("model", "version")}
MODULES = {p.stem for p in (REPO / "wbc_batch").glob("*.py")} | {
    p.name for p in (REPO / "wbc_batch").iterdir() if (p / "__init__.py").is_file()}


def _cited(pattern: re.Pattern[str]) -> list[tuple[str, tuple[str, ...]]]:
    return sorted({(doc.relative_to(REPO).as_posix(), m.groups()) for doc in DOCS for m in pattern.finditer(doc.read_text())})


@pytest.mark.parametrize(("doc", "groups"), _cited(PATH_RE), ids=lambda v: v if isinstance(v, str) else v[0])
def test_cited_paths_exist(doc: str, groups: tuple[str, ...]) -> None:
    assert (REPO / groups[0]).exists(), f"{doc} cites {groups[0]}, which does not exist"


def _names() -> list[tuple[str, tuple[str, ...]]]:
    return [(doc, g) for doc, g in _cited(NAME_RE) if g[0] in MODULES and g[1] not in FILE_SUFFIXES and g[:2] not in MANIFEST_FIELDS]


@pytest.mark.parametrize(("doc", "groups"), _names(), ids=lambda v: v if isinstance(v, str) else ".".join(filter(None, v)))
def test_cited_functions_exist(doc: str, groups: tuple[str, ...]) -> None:
    module, name, attr = groups
    obj = getattr(importlib.import_module(f"wbc_batch.{module}"), name, None)
    if obj is None or (attr is not None and not hasattr(obj, attr)):
        # a submodule of a package (wbc_batch.review.counts), also where the package re-exports a function
        # of the same name (training.augment.AUGMENT: the module, not the function training.augment)
        try:
            obj = importlib.import_module(f"wbc_batch.{module}.{name}")
        except ModuleNotFoundError:
            pass
    assert obj is not None, f"{doc} cites {module}.{name}, which does not exist"
    if attr is not None:
        assert hasattr(obj, attr), f"{doc} cites {module}.{name}.{attr}, which does not exist"


def test_the_checks_see_citations() -> None:
    assert len(_cited(PATH_RE)) > 10 and len(_names()) > 5


# --- links ------------------------------------------------------------------

FENCE_RE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN_RE = re.compile(r"(`+).+?\1", re.S)
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING_RE = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks (a link in code is an example, not a link)."""
    return FENCE_RE.sub("", text)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its text (links as their text, code as written), lower case, punctuation
    other than '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for m in HEADING_RE.finditer(_prose(doc.read_text())):
        base = _anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        anchors.add(base if n == 0 else f"{base}-{n}")
    return anchors


def _links() -> list[tuple[str, str]]:
    out = set()
    for doc in LINKED_DOCS:
        text = CODE_SPAN_RE.sub("", _prose(doc.read_text()))
        for m in LINK_RE.finditer(text):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", m.group(1)):  # http:, https:, mailto: are not local files
                out.add((doc.relative_to(REPO).as_posix(), m.group(1)))
    return sorted(out)


@pytest.mark.parametrize(("doc", "target"), _links(), ids=lambda v: v)
def test_local_links_resolve(doc: str, target: str) -> None:
    """A link to a local file names one that exists (relative to the doc), and its #anchor names a heading."""
    path, _, anchor = target.partition("#")
    dest = (REPO / doc).parent / path if path else REPO / doc
    assert dest.exists(), f"{doc} links to {target}, but {dest.relative_to(REPO)} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{doc} links to {target}: {dest.name} has no heading with that anchor"


def test_the_link_check_sees_links() -> None:
    docs = {doc for doc, _ in _links()}
    assert {"README.md", "docs/README.md", "docs/COMMANDS.md", "MODEL_CARD.md"} <= docs
    assert any("#" in target for _, target in _links())


def test_anchor_follows_github() -> None:
    assert _anchor("Faithfulness (`wbc_batch/faithfulness.py`, per run on a sample)") == (
        "faithfulness-wbc_batchfaithfulnesspy-per-run-on-a-sample")
    assert _anchor("Out-of-distribution detection (full method and figures: [docs/OOD.md](docs/OOD.md))") == (
        "out-of-distribution-detection-full-method-and-figures-docsoodmd")


# --- the layout: a short README, an index, the reference in docs/ -------------


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference text into docs/ (docs/README.md)"


def test_readme_quick_start_shows_set_up_and_every_test_tier() -> None:
    text = README.read_text()
    quick = text[text.index("## Quick start"):]
    quick = quick[:quick.index("\n## ", 1)]
    for target in ("demo", "test", "test-all"):
        assert re.search(rf"^make {re.escape(target)}\s+#", quick, re.M), f"README's Quick start lacks `make {target}`"


def test_docs_index_lists_every_doc() -> None:
    index = DOCS_INDEX.read_text()
    listed = {(DOCS_INDEX.parent / target.partition("#")[0]).resolve() for doc, target in _links()
              if doc == "docs/README.md"}
    docs = {*(REPO / "docs").glob("*.md"), REPO / "MODEL_CARD.md", REPO / "BENCHMARKS.md", REPO / "CHANGELOG.md",
            REPO / "infra" / "README.md"} - {DOCS_INDEX}
    missing = sorted(p.relative_to(REPO).as_posix() for p in docs if p.resolve() not in listed)
    assert not missing, f"docs/README.md does not list {missing}"
    assert "README.md" in index


def test_readme_links_the_reference_docs() -> None:
    linked = {target.partition("#")[0] for doc, target in _links() if doc == "README.md"}
    for target in ("docs/README.md", "docs/COMMANDS.md", "docs/OPERATIONS.md", "docs/SECURITY.md", "MODEL_CARD.md",
                   "docs/TRAINING_RUNS.md", "docs/OTHER_LABS.md"):
        assert target in linked, f"README.md does not link {target}"


# --- every command: one example in the README, every option in docs/COMMANDS.md --


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _sections(doc: Path) -> dict[str, str]:
    """The text of each '## ' section of a doc, by its heading."""
    parts = re.split(r"^## +(.+?)\s*$", doc.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("command", sorted(_commands()))
def test_readme_has_one_example_per_command(command: str) -> None:
    code = "\n".join(m.group(0) for m in FENCE_RE.finditer(README.read_text()))
    assert re.search(rf"wbc-batch {re.escape(command)} \S", code), f"README.md has no example of `wbc-batch {command}`"


@pytest.mark.parametrize("command", sorted(_commands()))
def test_commands_doc_documents_every_option(command: str) -> None:
    sections = _sections(COMMANDS)
    assert command in sections, f"docs/COMMANDS.md has no '## {command}' section"
    options = sorted({o for a in _commands()[command]._actions for o in a.option_strings
                      if o.startswith("--") and o != "--help"})
    missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", sections[command])]
    assert not missing, f"docs/COMMANDS.md, '## {command}', does not document {missing} (see wbc-batch {command} --help)"
    assert re.search(rf"wbc-batch {re.escape(command)} \S", sections[command]), f"'## {command}' has no example"


def test_commands_doc_documents_the_global_options_and_exit_codes() -> None:
    text = COMMANDS.read_text()
    assert "`-v`/`--verbose`" in text
    from wbc_batch import errors

    codes = {getattr(errors, name) for name in errors.__all__ if name.startswith("EXIT_")}
    table = _sections(COMMANDS)["Exit codes"]
    missing = sorted(c for c in codes if not re.search(rf"^\| {c} \|", table, re.M))
    assert not missing, f"docs/COMMANDS.md, '## Exit codes', lacks {missing}"
