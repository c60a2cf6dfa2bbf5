"""Every file and function the reference docs cite exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Reference docs; CHANGELOG.md is history and may name what no longer exists.
DOCS = sorted([REPO / "README.md", REPO / "MODEL_CARD.md", REPO / "infra" / "README.md", *(REPO / "docs").glob("*.md")])
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
