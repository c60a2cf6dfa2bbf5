"""The model artifact: digest over every file, pinning, immutable derived versions."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from wbc_batch.cli import main as cli_main
from wbc_batch.errors import EXIT_MODEL, EXIT_USAGE, ModelError, UsageError
from wbc_batch.model import (
    DIGEST_ENV,
    ModelArtifactError,
    artifact_digest,
    artifact_listing,
    load_artifact,
    normalise_digest,
    pinned_digest,
    read_metadata,
    shipped_model_dir,
    write_derived_artifact,
)


@pytest.fixture()
def artifact(tmp_path: Path) -> Path:
    """A copy of the shipped artifact that a test may change."""
    return Path(shutil.copytree(shipped_model_dir(), tmp_path / "model"))


def test_digest_is_the_sha256_of_a_sha256sum_listing_of_every_file(artifact: Path) -> None:
    names = sorted(p.name for p in artifact.iterdir())
    assert names == ["model.json", "model.keras", "split.csv"]
    listing = "".join(f"{hashlib.sha256((artifact / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    assert artifact_listing({n: hashlib.sha256((artifact / n).read_bytes()).hexdigest() for n in names}) == listing
    digest = artifact_digest(artifact)
    assert digest == hashlib.sha256(listing.encode()).hexdigest() == artifact_digest(None)
    # the command README.md gives for checking it by hand
    if shutil.which("sha256sum"):
        shell = subprocess.run("find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum",
                               shell=True, cwd=artifact, capture_output=True, text=True, check=True).stdout.split()[0]
        assert shell == digest


@pytest.mark.parametrize("change", ["threshold", "extra_file", "rename", "nested_file"])
def test_any_change_to_any_file_changes_the_digest(artifact: Path, change: str) -> None:
    before = artifact_digest(artifact)
    if change == "threshold":  # the weights' sha256 still matches, so only the digest tells
        meta = json.loads((artifact / "model.json").read_text())
        meta["review_threshold"] = 0.5
        (artifact / "model.json").write_text(json.dumps(meta, indent=2))
        assert load_artifact(artifact).meta.review_threshold == 0.5
    elif change == "extra_file":
        (artifact / "notes.txt").write_text("x")
    elif change == "rename":
        (artifact / "split.csv").rename(artifact / "split-old.csv")
    else:
        (artifact / "sub").mkdir()
        (artifact / "sub" / "a.bin").write_bytes(b"\0")
    assert artifact_digest(artifact) != before


def test_pinned_digest_accepts_the_artifact_and_refuses_any_other(artifact: Path) -> None:
    digest = artifact_digest(artifact)
    loaded = load_artifact(artifact, expected_digest=digest.upper())
    assert loaded.digest == digest and set(loaded.files) == {"model.json", "model.keras", "split.csv"}
    meta = json.loads((artifact / "model.json").read_text())
    meta["temperature"] = 2.0
    (artifact / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelArtifactError, match=f"not the pinned {digest}") as info:
        load_artifact(artifact, expected_digest=digest)
    assert isinstance(info.value, ModelError) and info.value.exit_code == EXIT_MODEL


def test_digest_format_and_environment_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    d = "ab" * 32
    assert normalise_digest(f" sha256:{d.upper()} ") == d
    for bad in ("abc", "g" * 64, d + "0"):
        with pytest.raises(UsageError, match="64 hex digits"):
            normalise_digest(bad)
    monkeypatch.delenv(DIGEST_ENV, raising=False)
    assert pinned_digest(None) is None
    monkeypatch.setenv(DIGEST_ENV, d)
    assert pinned_digest(None) == d and pinned_digest("cd" * 32) == "cd" * 32  # the option wins


@pytest.mark.parametrize("how", ["option", "environment"])
def test_classify_refuses_another_artifact_with_exit_4(artifact: Path, tmp_path: Path, how: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    other = "0" * 64
    args = ["classify", str(tmp_path), str(tmp_path / "out"), "--model", str(artifact)]
    if how == "option":
        args += ["--model-digest", other]
    else:
        monkeypatch.setenv(DIGEST_ENV, other)
    assert cli_main(args) == EXIT_MODEL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wbc-batch classify: model error: ")
    assert artifact_digest(artifact) in err[0] and f"not the pinned {other}" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_nightly_refuses_a_malformed_digest_as_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["nightly", str(tmp_path), str(tmp_path / "out"), "--model-digest", "abc"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model-digest expects the 64 hex digits" in err[0]


def test_derived_artifact_is_a_new_version_that_names_its_parent(artifact: Path, tmp_path: Path) -> None:
    parent_digest = artifact_digest(artifact)
    parent_json = (artifact / "model.json").read_bytes()
    out = tmp_path / "model-1.1.1"
    meta, digest = write_derived_artifact(artifact, str(out), {"review_threshold": 0.97}, version="1.1.1",
                                          note="review threshold re-chosen on validation")
    assert artifact_digest(artifact) == parent_digest and (artifact / "model.json").read_bytes() == parent_json
    assert digest == artifact_digest(out) != parent_digest
    again = read_metadata(str(out))
    assert again.version == meta.version == "1.1.1" and again.review_threshold == 0.97
    assert again.parent_digest == parent_digest and again.parent_version == read_metadata(str(artifact)).version
    assert again.changelog[-1].startswith("1.1.1: review threshold re-chosen on validation (derived from")
    assert (out / "model.keras").read_bytes() == (artifact / "model.keras").read_bytes()
    assert (out / "split.csv").read_bytes() == (artifact / "split.csv").read_bytes()
    assert load_artifact(out, expected_digest=digest).meta.model_sha256 == again.model_sha256


def test_derived_artifact_refusals(artifact: Path, tmp_path: Path) -> None:
    version = read_metadata(str(artifact)).version
    with pytest.raises(ModelArtifactError, match="needs a new version"):
        write_derived_artifact(artifact, str(tmp_path / "a"), {"temperature": 1.0}, version=version, note="x")
    with pytest.raises(ModelArtifactError, match="may not set model_sha256"):
        write_derived_artifact(artifact, str(tmp_path / "a"), {"model_sha256": "0" * 64}, version="9", note="x")
    with pytest.raises(ModelArtifactError, match="already holds"):  # never in place, never over another artifact
        write_derived_artifact(artifact, str(artifact), {"temperature": 1.0}, version="9", note="x")
    (artifact / "model.keras").write_bytes(b"not the weights")
    with pytest.raises(ModelArtifactError, match="does not match model.json"):
        write_derived_artifact(artifact, str(tmp_path / "b"), {"temperature": 1.0}, version="9", note="x")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rows_written_before_the_digest_column_still_read(tmp_path: Path) -> None:
    from tests.results_factory import cells, make_table, write_run
    from wbc_batch import query, results

    assert "model_digest" in results.prediction_schema(["a", "b"]).names
    out = str(tmp_path / "out")
    old = make_table(cells("S", {"neutrophil": 2}), "old")
    write_run(out, "old", old.drop_columns(["model_digest"]))
    write_run(out, "new", make_table(cells("T", {"lymphocyte": 1}), "new", model_version="1.1.0"))
    rows = query.load_results(out)
    assert rows.set_index("sample_id").model_digest.isna().to_dict() == {"S": True, "T": False}
