"""Fast end-to-end checks, with real parts, of commands whose other tests are all in the slow tier.

`make test` leaves out the slow tests (tests/conftest.py's SLOW); these keep every command covered there.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from wbc_batch.cli import main
from wbc_batch.model import SPLIT_FILE, artifact_digest, load_artifact, read_metadata, shipped_model_dir
from wbc_batch.splits import sha256_hex


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


def test_cli_train_one_small_epoch_on_ray_train_writes_a_verified_artifact(
        ray_local: None, samples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train` end to end at its smallest: one worker, one epoch of the bundled samples at 16 px."""
    out = tmp_path / "model"
    assert main(["train", str(samples_dir), str(out), "--workers", "1", "--epochs", "1", "--image-size", "16",
                 "--batch-size", "16", "--storage-path", str(tmp_path / "checkpoints"), "--version", "0.0.1-fast"]) == 0
    printed = capsys.readouterr().out
    assert f"model 0.0.1-fast written to {out}" in printed and "test accuracy" in printed
    artifact = load_artifact(str(out))  # verifies the files against model.json
    meta = artifact.meta
    shipped = read_metadata(str(shipped_model_dir()))
    assert meta.version == "0.0.1-fast" and meta.image_size == 16 and meta.class_names == shipped.class_names
    rows = list(csv.DictReader(io.StringIO((out / SPLIT_FILE).read_text())))
    assert sorted(r["uri"] for r in rows) == sorted(p.relative_to(samples_dir).as_posix() for p in samples_dir.glob("*/*.jpg"))
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    logits = artifact.model.predict(np.zeros((2, 16, 16, 3), np.float32), verbose=0)
    assert logits.shape == (2, len(meta.class_names)) and np.isfinite(logits).all()


def test_cli_adapt_one_epoch_to_a_recoloured_lab_writes_a_child_of_the_shipped_model(
        ray_local: None, samples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`adapt` end to end at its smallest: the shipped model, one epoch on 2 recoloured cells of 5 classes."""
    lab = tmp_path / "lab"
    for cls in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"):
        (lab / cls).mkdir(parents=True)
        for src in sorted((samples_dir / cls).iterdir())[:2]:
            bgr = cv2.imread(str(src))
            assert cv2.imwrite(str(lab / cls / src.name), np.ascontiguousarray(bgr[..., ::-1]))  # another stain
    out = tmp_path / "adapted"
    assert main(["adapt", str(lab), str(out), "--epochs", "1", "--batch-size", "8", "--lab", "swapped",
                 "--version", "0.0.1-adapted", "--storage-path", str(tmp_path / "checkpoints")]) == 0
    meta = load_artifact(str(out)).meta  # verifies the files against model.json
    assert meta.version == "0.0.1-adapted" and meta.parent_digest == artifact_digest()
    assert meta.class_names == read_metadata(str(shipped_model_dir())).class_names
    rows = list(csv.DictReader(io.StringIO((out / SPLIT_FILE).read_text())))
    assert {sha256_hex(p.read_bytes()) for p in lab.glob("*/*.jpg")} <= {r["sha256"] for r in rows}  # beside the base's
    assert "swapped" in json.dumps(meta.training)
