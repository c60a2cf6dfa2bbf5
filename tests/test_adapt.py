"""Adapting the shipped model to a lab it never saw (real Ray Train, real JPEGs, real artifact)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from wbc_batch import imaging
from wbc_batch.cli import main
from wbc_batch.geometry import cell_fraction, model_inputs
from wbc_batch.localisation import model_input_mask
from wbc_batch.metrics import ALWAYS_REVIEW
from wbc_batch.model import artifact_digest, load_artifact, shipped_model_dir
from wbc_batch.ood import _zoom
from wbc_batch.training import evaluate
from wbc_batch.training.adapt import AdaptConfig, choose_replay, dihedral_views, run_adaptation

LAB_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")  # like a lab without ig or non_wbc


def _other_lab(rgb: np.ndarray) -> np.ndarray:
    """Another stain (red and blue swapped) photographed at half the magnification."""
    return _zoom(np.ascontiguousarray(rgb[..., ::-1]), 0.5)


@pytest.fixture(scope="module")
def synthetic_lab(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five classes of the bundled samples as another lab would show them: 4 cells each to adapt on, 4 to test."""
    root = tmp_path_factory.mktemp("lab")
    for cls in LAB_CLASSES:
        for i, src in enumerate(sorted((samples_dir / cls).iterdir())):
            side = "adapt" if i < 4 else "rest"
            dest = root / side / cls.capitalize()  # folder names in any case
            dest.mkdir(parents=True, exist_ok=True)
            rgb = _other_lab(imaging.decode_image(src.read_bytes()))
            cv2.imwrite(str(dest / src.name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return {"adapt": root / "adapt", "rest": root / "rest"}


@pytest.fixture(scope="module")
def adapted(ray_local: None, synthetic_lab: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("adapted")
    summary = run_adaptation(AdaptConfig(
        data_uri=str(synthetic_lab["adapt"]), model_out=str(out / "model"), epochs=10, batch_size=8,
        storage_path=str(out / "checkpoints"), lab="swapped-stain", version="test-adapted",
    ))
    return summary


def test_adapt_makes_a_new_lab_in_distribution_and_classifies_it(
    adapted: dict, synthetic_lab: dict[str, Path]
) -> None:
    before = evaluate(None, str(synthetic_lab["rest"]))["metrics"]
    after = evaluate(adapted["model_out"], str(synthetic_lab["rest"]))["metrics"]
    assert before["n"] == after["n"] == 20  # never the cells it adapted on
    assert before["ood_flagged"]["share"] >= 0.5  # the base rightly flags the other lab
    assert after["ood_flagged"]["share"] <= 0.2
    # 20 cells, 30 steps: the figure varies with Ray's row order between runs, but always improves
    assert after["balanced_accuracy"] > before["balanced_accuracy"], (before["balanced_accuracy"],
                                                                       after["balanced_accuracy"])
    assert adapted["new_lab_counts"] == {c: 4 for c in LAB_CLASSES}


def test_adapted_artifact_records_its_base_and_the_lab(adapted: dict, synthetic_lab: dict[str, Path]) -> None:
    art = load_artifact(adapted["model_out"])
    meta = art.meta
    shipped = load_artifact(None).meta
    assert meta.version == "test-adapted" and meta.class_names == shipped.class_names
    assert meta.parent_version == shipped.version and meta.parent_digest == artifact_digest(shipped_model_dir())
    info = meta.training["adaptation"]
    assert info["base"]["version"] == shipped.version and info["lab"] == "swapped-stain"
    assert info["data"] == str(synthetic_lab["adapt"]) and info["replay"] is None
    assert info["cell_size"] == {"ratio": None, "per_class": {}}  # no replay to compare with
    assert "swapped-stain" in meta.metrics["labs"] and meta.ood  # OOD statistics refitted
    assert "adapted from" in meta.changelog[-1]
    # ten cells cannot show that a confident call on the new lab is right: every cell goes to review
    assert meta.review_threshold == ALWAYS_REVIEW > 1.0
    rest = evaluate(adapted["model_out"], str(synthetic_lab["rest"]))["metrics"]
    assert rest["review"]["coverage"] == 0.0


def test_cli_calibrate_refits_on_the_labs_own_cells_only(
    adapted: dict, synthetic_lab: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "calibrated"
    assert main(["calibrate", adapted["model_out"], str(synthetic_lab["rest"]), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "on 20 cells" in printed and "every cell still needs review" in printed  # 20 cells show nothing
    meta = load_artifact(str(out)).meta
    assert meta.review_threshold == ALWAYS_REVIEW  # not just above the 20 cells' highest confidence
    assert meta.parent_digest == artifact_digest(adapted["model_out"]) and meta.version == "test-adapted+recal"
    assert meta.temperature != load_artifact(adapted["model_out"]).meta.temperature
    assert "never trained on" in meta.changelog[-1] and "(20 cells)" in meta.changelog[-1]
    # the cells it adapted on are in its split.csv as training images: nothing to calibrate on
    assert main(["calibrate", adapted["model_out"], str(synthetic_lab["adapt"]), str(tmp_path / "again")]) == 2
    assert "none it has not trained on" in capsys.readouterr().err


def test_cli_evaluate_reports_each_lab_with_intervals(
    adapted: dict, synthetic_lab: dict[str, Path], samples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "eval.json"
    assert main(["evaluate", adapted["model_out"], str(synthetic_lab["rest"]), str(samples_dir), "--split", "all",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("95% CI") >= 4 and "out of distribution:" in printed
    results = json.loads(out.read_text())
    assert [r["data"] for r in results] == [str(synthetic_lab["rest"]), str(samples_dir)]
    lab = results[0]["metrics"]
    assert lab["support"]["ig"] == 0 and lab["recall"]["ig"] is None  # a class subset is fine
    low, high = lab["balanced_accuracy_ci95"]
    assert low <= lab["balanced_accuracy"] <= high


def test_replay_takes_only_the_bases_training_images() -> None:
    rows = [{"rel": f"neutrophil/{i}.jpg", "label": "neutrophil", "uri": f"/d/neutrophil/{i}.jpg"} for i in range(6)]
    rows.append({"rel": "monocyte/m.jpg", "label": "monocyte", "uri": "/d/monocyte/m.jpg"})
    base_split = {"neutrophil/0.jpg": "train", "neutrophil/1.jpg": "val", "neutrophil/2.jpg": "test",
                  "neutrophil/3.jpg": "train", "neutrophil/4.jpg": "train", "monocyte/m.jpg": "train"}
    train = choose_replay(rows, base_split, "train", per_class=2, seed=1)
    assert {r["rel"] for r in train} <= {"neutrophil/0.jpg", "neutrophil/3.jpg", "neutrophil/4.jpg", "monocyte/m.jpg"}
    assert sum(r["label"] == "neutrophil" for r in train) == 2 and "monocyte/m.jpg" in {r["rel"] for r in train}
    assert [r["rel"] for r in choose_replay(rows, base_split, "val", 5, 1)] == ["neutrophil/1.jpg"]
    assert choose_replay(rows, base_split, "train", 2, 1) == train  # the same data gives the same pick


def test_adapt_measures_a_lab_at_half_the_magnification_as_half_the_size(samples_dir: Path, tmp_path: Path) -> None:
    """Cell sizes measured on real decodes: the half-size lab reads as about 0.5, class by class."""
    from wbc_batch.training.adapt import lab_scale
    from wbc_batch.training.data import decode_batch

    classes = ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil", "non_wbc"]
    paths = [p for c in LAB_CLASSES for p in sorted((samples_dir / c).iterdir())]
    for p in paths:
        rgb = _zoom(imaging.decode_image(p.read_bytes()), 0.5)
        cv2.imwrite(str(tmp_path / p.name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])

    def decoded(uris: list[str]) -> dict[str, np.ndarray]:
        labels = np.array([p.parent.name for p in paths], dtype=object)
        out = decode_batch({"uri": np.array(uris, dtype=object), "label": labels}, image_size=128)
        return {**out, "label_index": np.array([classes.index(c) for c in labels])}

    replay = decoded([str(p) for p in paths])
    new = decoded([str(tmp_path / p.name) for p in paths])
    scale = lab_scale(new, replay, classes)
    assert 0.4 <= scale["ratio"] <= 0.6, scale
    assert set(scale["per_class"]) == set(LAB_CLASSES)
    assert lab_scale(replay, replay, classes)["ratio"] == 1.0  # the same lab


def test_replay_distillation_marks_the_replayed_rows_only(ray_local: None) -> None:
    from wbc_batch.training.adapt import _mixed_dataset

    new = {"image": np.zeros((2, 4, 4, 3), np.uint8), "label_index": np.array([0, 1])}
    replay = {"image": np.ones((3, 4, 4, 3), np.uint8), "label_index": np.array([0, 1, 1])}
    teacher = np.arange(9, dtype=np.float32).reshape(3, 3)
    rows = _mixed_dataset(new, replay, repeats=2, replay_teacher=teacher).take_all()
    replayed = [r for r in rows if r["image"].max() == 1]
    assert len(rows) == 7 and len(replayed) == 3
    assert all(r["distill_mask"] == 1.0 for r in replayed)
    assert all(r["distill_mask"] == 0.0 for r in rows if r["image"].max() == 0)
    assert sorted(tuple(r["teacher_logits"]) for r in replayed) == sorted(tuple(t) for t in teacher)
    assert "teacher_logits" not in _mixed_dataset(new, replay, repeats=2).take(1)[0]
    with pytest.raises(ValueError, match="needs --replay"):
        AdaptConfig(data_uri="d", model_out="m", replay_distill=0.5)


def test_keep_scale_is_another_run_and_the_base_scale_is_replaced() -> None:
    from wbc_batch.training.adapt import _run_name, with_field_scale

    config = AdaptConfig(data_uri="d", model_out="m")
    assert _run_name(config, "f" * 64, "b") != _run_name(AdaptConfig("d", "m", rescale=False), "f" * 64, "b")
    base = {"resize": "whole image", "field_scale": 1.5, "field": "the base's lab"}
    assert with_field_scale(base, 1.0, 0.95) == {"resize": "whole image"}  # a lab at the first lab's scale
    scaled = with_field_scale(base, 1.639, 0.61)
    assert scaled["field_scale"] == 1.639 and "0.61x" in scaled["field"] and scaled["resize"] == "whole image"


def test_adapt_with_replay_records_distillation_and_shows_a_half_size_lab_at_the_bases_scale(
    ray_local: None, synthetic_lab: dict[str, Path], samples_dir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(shipped_model_dir(), base)
    # the bundled samples are the shipped model's test images; this copy calls them its training and
    # validation images, so that --replay has cells to replay
    rels = sorted(str(p.relative_to(samples_dir)) for p in samples_dir.rglob("*.jpg"))
    lines = [f"{'0' * 64},{rel.split('/')[0]},{'val' if i % 4 == 0 else 'train'},{rel}" for i, rel in enumerate(rels)]
    (base / "split.csv").write_text("sha256,label,split,uri\n" + "\n".join(lines) + "\n")
    summary = run_adaptation(AdaptConfig(
        data_uri=str(synthetic_lab["adapt"]), model_out=str(tmp_path / "model"), base=str(base),
        replay=[str(samples_dir)], replay_per_class=4, replay_distill=0.5, epochs=1, batch_size=8,
        storage_path=str(tmp_path / "checkpoints"), version="test-lwf",
    ))
    assert sum(summary["replay_counts"].values()) > 0
    assert np.isfinite(summary["final_epoch"]["distill"]) and summary["final_epoch"]["distill"] >= 0
    meta = load_artifact(summary["model_out"]).meta
    info = meta.training["adaptation"]
    assert info["replay_distill"] == {"weight": 0.5, "temperature": 4.0}
    # the synthetic lab is photographed at half the magnification: the adapted model magnifies every image
    assert 0.4 <= info["cell_size"]["ratio"] <= 0.6 and info["field_scale"] == summary["field_scale"]
    assert meta.field_scale == info["field_scale"] == pytest.approx(1 / info["cell_size"]["ratio"], abs=0.01)
    assert "magnified" in meta.preprocessing["field"]
    adapted_inputs, _ = model_inputs([imaging.decode_image(p.read_bytes())
                                      for p in sorted(synthetic_lab["rest"].rglob("*.jpg"))], 128, meta.field_scale)
    plain_inputs, _ = model_inputs([imaging.decode_image(p.read_bytes())
                                    for p in sorted(synthetic_lab["rest"].rglob("*.jpg"))], 128)

    def median_cell(batch: np.ndarray) -> float:
        return float(np.nanmedian([cell_fraction(model_input_mask(im.astype(np.uint8))) or np.nan for im in batch]))

    assert median_cell(adapted_inputs) > 1.5 * median_cell(plain_inputs)  # the lab's cells at the base's size
    rest = evaluate(summary["model_out"], str(synthetic_lab["rest"]))["metrics"]
    assert rest["n"] == 20


def test_dihedral_views_are_the_eight_rotations_and_flips() -> None:
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)
    views = dihedral_views(image)
    assert views.shape == (8, 2, 2, 3)
    assert len({v.tobytes() for v in views}) == 8


def test_adapt_refuses_class_folders_the_model_does_not_know(ray_local: None, tmp_path: Path, samples_dir: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "lab"
    (data / "smudge").mkdir(parents=True)
    src = next((samples_dir / "lymphocyte").iterdir())
    (data / "smudge" / src.name).write_bytes(src.read_bytes())
    assert main(["adapt", str(data), str(tmp_path / "out")]) != 0
    assert "smudge" in capsys.readouterr().err


def test_lab_colours_add_the_replay_recoloured_as_a_third_balanced_group(ray_local: None) -> None:
    from wbc_batch.training.adapt import _mixed_dataset, replay_in_lab_colours

    rng = np.random.default_rng(0)
    new = {"image": np.full((2, 8, 8, 3), (90, 60, 120), np.uint8), "label_index": np.array([0, 1])}
    replay = {"image": rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), "label_index": np.array([0, 1, 1, 1])}
    recoloured = replay_in_lab_colours(new, replay, 3, seed=1)
    assert len(recoloured["label_index"]) == 3 and set(recoloured["label_index"]) <= {0, 1}
    assert recoloured["image"].std() < replay["image"].std()  # the flat new lab's look
    rows = _mixed_dataset(new, replay, repeats=2, recoloured=recoloured).take_all()
    assert len(rows) == 4 + 2 * 2 + 3
    assert sum(r["sample_weight"] for r in rows) == pytest.approx(len(rows))
    # inside the recoloured group each class weighs the same, however many cells it has
    labels = list(recoloured["label_index"])
    mass = {c: sum(r["sample_weight"] for r in rows if r["label_index"] == c
                   and any(np.array_equal(r["image"], im) for im in recoloured["image"])) for c in set(labels)}
    assert len(set(round(m, 6) for m in mass.values())) == 1, mass


def test_lab_colours_split_the_new_labs_share_and_keep_the_first_labs() -> None:
    from wbc_batch.training.adapt import _run_name, lab_look_counts

    assert lab_look_counts(50, 900, 0.5, lab_colours=False) == (18, 0)  # 900 new-lab images against 900
    repeats, recoloured = lab_look_counts(50, 900, 0.5, lab_colours=True)
    assert (repeats, recoloured) == (9, 450)  # 450 new-lab images, 450 recoloured, the 900 replayed kept
    assert lab_look_counts(50, 0, 0.5, lab_colours=True) == (1, 0)  # nothing to recolour without replay
    config = AdaptConfig(data_uri="d", model_out="m", replay=["r"], lab_colours=True)
    assert _run_name(config, "f" * 64, "b") != _run_name(AdaptConfig("d", "m", replay=["r"]), "f" * 64, "b")
    with pytest.raises(ValueError, match="needs --replay"):
        AdaptConfig(data_uri="d", model_out="m", lab_colours=True)
    with pytest.raises(ValueError, match="do not combine"):
        AdaptConfig(data_uri="d", model_out="m", replay=["r"], lab_colours=True, replay_distill=0.5)


def test_cli_lab_colours_without_replay_is_refused_before_any_work(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["adapt", str(tmp_path / "lab"), str(tmp_path / "out"), "--lab-colours"]) != 0
    assert "--lab-colours recolours the replayed cells: it needs --replay" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
