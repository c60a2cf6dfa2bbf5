"""Fast end-to-end checks, with real parts, of commands whose other tests are all in the slow tier.

`make test` leaves out the slow tests (tests/conftest.py's SLOW); these keep every command covered there.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from wbc_batch.cli import main
from wbc_batch.model import artifact_digest, load_artifact, read_metadata, shipped_model_dir


@pytest.fixture()
def unseen_lab(samples_dir: Path, tmp_path: Path) -> Path:
    """The bundled samples re-encoded (JPEG quality 85): the same cells as new files the shipped model's split.csv
    does not list, as a lab's verified cells would be."""
    root = tmp_path / "lab"
    for src in sorted(samples_dir.glob("*/*.jpg")):
        dest = root / src.parent.name / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(dest), cv2.imread(str(src)), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return root


def test_cli_calibrate_writes_a_new_version_of_the_shipped_model_from_cells_it_never_trained_on(
        unseen_lab: Path, samples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = read_metadata(str(shipped_model_dir()))
    out = tmp_path / "recal"
    assert main(["calibrate", "shipped", str(unseen_lab), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"model {shipped.version}+recal written to {out}" in printed and "on 64 cells" in printed
    artifact = load_artifact(str(out))  # verifies the new artifact's files against its model.json
    meta = artifact.meta
    assert meta.parent_digest == artifact_digest() and meta.version == f"{shipped.version}+recal"
    assert meta.class_names == shipped.class_names and meta.temperature != shipped.temperature
    assert "(64 cells)" in meta.changelog[-1]
    # the bundled files themselves are in the shipped model's split: nothing unseen to calibrate on
    assert main(["calibrate", "shipped", str(samples_dir), str(tmp_path / "again")]) == 2
    assert "none it has not trained on" in capsys.readouterr().err
