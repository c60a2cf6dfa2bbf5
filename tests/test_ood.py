"""Out-of-distribution scoring: the shipped statistics on real samples and simulated shifts.

The shifts are made here from the bundled PBC samples (drawn from the shipped
model's test split) at their original resolution, then go through the
classify preprocessing, as an image from another microscope would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wbc_batch import imaging
from wbc_batch.explain import GradCam
from wbc_batch.geometry import model_inputs
from wbc_batch.model import ModelMetadata
from wbc_batch.ood import (
    OOD_FORMAT,
    QUALITY_FEATURES,
    SHIFTS,
    OodScorer,
    domain_shift_summary,
    fit_ood,
    quality_features,
    shrunk_covariance,
    simulate_shift,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "pbc"
# Share of the 64 shifted samples that must be flagged: the 95% target
# where the shipped statistics flag 99-100% of the shifted test split, lower
# for the two zooms, of which they flag 89% and 84% (measured on these
# samples: 53/64 and 47/64; docs/OOD.md).
MIN_FLAGGED = {kind: 0.95 for kind in SHIFTS} | {"zoom_in": 0.6, "zoom_out": 0.6}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def originals() -> list[np.ndarray]:
    """The 64 bundled samples, decoded at full resolution."""
    paths = sorted(SAMPLES.glob("*/*.jpg"))
    assert len(paths) == 64
    return [imaging.decode_image(p.read_bytes()) for p in paths]


@pytest.fixture(scope="module")
def shipped(shipped):
    """The shipped artifact (conftest's ``shipped``) with its Grad-CAM, which gives the embeddings."""
    return shipped, GradCam(shipped.model, shipped.meta.gradcam_layer, shipped.meta.embedding_layer)


@pytest.fixture(scope="module")
def clean_scores(shipped, originals) -> tuple[np.ndarray, np.ndarray]:
    """Scores and flags of the untouched samples with the shipped statistics."""
    return _score(shipped, OodScorer.from_metadata(shipped[0].meta), originals)


def _inputs(rgbs: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack([imaging.resize_for_model(r, size) for r in rgbs])


def _score(shipped, scorer: OodScorer, rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    art, cam = shipped
    batch = _inputs(rgbs, art.meta.image_size)
    return scorer.score(cam(batch).embeddings, batch)


def test_shipped_model_carries_statistics(shipped) -> None:
    meta = shipped[0].meta
    assert meta.ood["format"] == OOD_FORMAT
    assert meta.ood["num_classes"] == len(meta.class_names)
    assert meta.ood["embedding_dim"] == 192
    assert meta.ood["evaluation"]["test_flagged"] <= 0.05
    scorer = OodScorer.from_metadata(meta)
    assert scorer is not None and scorer.embedding_dim == 192


def test_bundled_samples_mostly_in_distribution(clean_scores) -> None:
    scores, flags = clean_scores
    assert scores.shape == (64,) and scores.dtype == np.float32
    assert flags.dtype == bool
    assert flags.sum() <= 4, f"{flags.sum()} of 64 untouched samples flagged"


@pytest.mark.parametrize("kind", sorted(SHIFTS))
def test_simulated_shift_flagged(shipped, originals, clean_scores, kind: str) -> None:
    scorer = OodScorer.from_metadata(shipped[0].meta)
    clean, _ = clean_scores
    shifted, flags = _score(shipped, scorer, [simulate_shift(r, kind) for r in originals])
    assert flags.mean() >= MIN_FLAGGED[kind], f"{kind}: only {flags.mean():.0%} flagged"
    assert np.median(shifted) > np.median(clean)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_does_not_depend_on_batch(shipped, originals, batch_size: int) -> None:
    scorer = OodScorer.from_metadata(shipped[0].meta)
    rgbs = originals[::4]
    whole, _ = _score(shipped, scorer, rgbs)
    chunks = [rgbs[i : i + batch_size] for i in range(0, len(rgbs), batch_size)]
    parts = np.concatenate([_score(shipped, scorer, chunk)[0] for chunk in chunks])
    np.testing.assert_allclose(parts, whole, rtol=1e-4, atol=1e-4)


def test_statistics_round_trip_through_model_json(shipped, originals) -> None:
    meta = shipped[0].meta
    again = ModelMetadata.from_dict(json.loads(meta.to_json()))
    assert again.ood == meta.ood
    a, fa = _score(shipped, OodScorer.from_metadata(meta), originals[:16])
    b, fb = _score(shipped, OodScorer.from_metadata(again), originals[:16])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)


def test_model_without_statistics_gives_none() -> None:
    meta = ModelMetadata(version="0.9.0", class_names=["a", "b"], image_size=32, gradcam_layer="cam_features")
    assert meta.ood == {}
    assert OodScorer.from_metadata(meta) is None
    reloaded = ModelMetadata.from_dict(json.loads(meta.to_json()))
    assert OodScorer.from_metadata(reloaded) is None


def test_five_class_model(originals) -> None:
    """A tiny random 5-class model: fit, store in metadata, reload, score."""
    import keras

    from wbc_batch.architecture import build_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier(keras, 5, image_size=32)
    cam = GradCam(model, "cam_features", "embedding")
    images = _inputs(originals, 32)
    labels = np.arange(64) % 5
    emb = cam(images).embeddings
    train, val = np.arange(64) < 40, np.arange(64) >= 40
    stats = fit_ood(emb[train], labels[train], images[train], emb[val], images[val], fpr=0.05)
    assert stats["num_classes"] == 5
    meta = ModelMetadata(
        version="0.0.1",
        class_names=list("abcde"),
        image_size=32,
        gradcam_layer="cam_features",
        non_wbc_classes=[],
        ood=stats,
    )
    scorer = OodScorer.from_metadata(ModelMetadata.from_dict(json.loads(meta.to_json())))
    assert scorer is not None
    scores, flags = scorer.score(emb[val], images[val])
    assert scores.shape == (24,) and flags.shape == (24,)
    assert flags.mean() <= 0.1
    hue = _inputs([simulate_shift(r, "hue_rotation") for r in originals[40:]], 32)
    _, hue_flags = scorer.score(cam(hue).embeddings, hue)
    assert hue_flags.mean() >= 0.8


def test_wrong_embedding_width_refused(shipped, originals) -> None:
    scorer = OodScorer.from_metadata(shipped[0].meta)
    batch = _inputs(originals[:2], 128)
    with pytest.raises(ValueError, match=r"expected embeddings \(B, 192\)"):
        scorer.score(np.zeros((2, 64), np.float32), batch)
    with pytest.raises(ValueError, match="expected 2 images"):
        scorer.score(np.zeros((2, 192), np.float32), batch[:1])


def test_unknown_format_refused() -> None:
    with pytest.raises(ValueError, match="OOD statistics format"):
        OodScorer({"format": "something-else"})


def test_statistics_of_an_older_format_turn_scoring_off_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A model whose statistics an older wbc-batch fitted still classifies; only its OOD score is null."""
    meta = ModelMetadata(version="0.9.0", class_names=["a", "b"], image_size=32, gradcam_layer="cam_features",
                         ood={"format": "wbc-batch-ood/1", "threshold": 1.0})
    with caplog.at_level("WARNING", logger="wbc_batch.ood"):
        assert OodScorer.from_metadata(meta) is None
    assert "refitted" in caplog.text and "wbc-batch-ood/1" in caplog.text


def test_empty_batch(shipped) -> None:
    scorer = OodScorer.from_metadata(shipped[0].meta)
    scores, flags = scorer.score(np.zeros((0, 192), np.float32), np.zeros((0, 128, 128, 3), np.uint8))
    assert scores.shape == (0,) and flags.shape == (0,)


def test_quality_features_react_to_their_shift(originals) -> None:
    clean = quality_features(_inputs(originals[:8], 128))
    blurred = quality_features(_inputs([simulate_shift(r, "blur") for r in originals[:8]], 128))
    zoomed = quality_features(_inputs([simulate_shift(r, "zoom_in") for r in originals[:8]], 128))
    focus, cell = QUALITY_FEATURES.index("log_laplacian_var"), QUALITY_FEATURES.index("log_cell_area_share")
    assert clean.shape == (8, len(QUALITY_FEATURES))
    assert np.all(blurred[:, focus] < clean[:, focus] - 1.0)
    assert np.median(zoomed[:, cell] - clean[:, cell]) > 0.4  # 1.5x magnification: area x2.25


def test_shrunk_covariance_invertible_with_fewer_rows_than_dims() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 50))
    cov, shrink = shrunk_covariance(x - x.mean(axis=0))
    assert 0.0 < shrink <= 1.0
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_simulate_shift_refuses_unknown_kind(originals) -> None:
    with pytest.raises(ValueError, match="unknown shift"):
        simulate_shift(originals[0], "sepia")


class TestDomainShiftSummary:
    def test_clean_run(self) -> None:
        out = domain_shift_summary(100, 3, {"s1": (50, 2), "s2": (50, 1)}, max_share=0.2)
        assert out["detected"] is False
        assert out["ood_share"] == 0.03
        assert not any(s["shifted"] for s in out["samples"].values())
        assert "no sample above the limit" in out["evidence"]

    def test_one_shifted_sample_raises_the_run(self) -> None:
        out = domain_shift_summary(100, 21, {"ok": (80, 1), "other-lab": (20, 20)}, max_share=0.2)
        assert out["detected"] is True
        assert out["samples"]["other-lab"] == {"n": 20, "ood": 20, "share": 1.0, "shifted": True}
        assert out["samples"]["ok"]["shifted"] is False
        assert "other-lab (20/20)" in out["evidence"]

    def test_whole_run_shifted(self) -> None:
        out = domain_shift_summary(40, 39, {"a": (40, 39)}, max_share=0.2)
        assert out["detected"] is True and out["ood_share"] == 0.975

    @pytest.mark.parametrize(("n", "ood", "expected"), [(1, 1, False), (2, 2, True), (10, 2, False), (10, 3, True)])
    def test_small_samples_need_min_ood(self, n: int, ood: int, expected: bool) -> None:
        out = domain_shift_summary(n, ood, {"x": (n, ood)}, max_share=0.2, min_ood=2)
        assert out["samples"]["x"]["shifted"] is expected
        assert out["detected"] is expected

    def test_share_at_limit_is_not_shifted(self) -> None:
        assert domain_shift_summary(10, 2, {"x": (10, 2)}, max_share=0.2)["detected"] is False

    def test_empty_run(self) -> None:
        out = domain_shift_summary(0, 0, {}, max_share=0.2)
        assert out["detected"] is False and out["ood_share"] == 0.0 and out["samples"] == {}

    def test_bad_counts_refused(self) -> None:
        with pytest.raises(ValueError, match="n_ood"):
            domain_shift_summary(5, 6, {}, max_share=0.2)
        with pytest.raises(ValueError, match="max_share"):
            domain_shift_summary(5, 1, {}, max_share=1.5)


def test_fit_tool_writes_a_derived_artifact_and_leaves_the_parent(tmp_path: Path) -> None:
    """tools/fit_ood.py writes refitted statistics as a new version naming its parent; the parent is unchanged."""
    import importlib.util

    from wbc_batch.model import MODEL_FILE, ModelArtifactError, artifact_digest, shipped_model_dir

    tool_path = Path(__file__).resolve().parent.parent / "tools" / "fit_ood.py"
    spec = importlib.util.spec_from_file_location("fit_ood_tool", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    parent = shipped_model_dir()
    parent_digest = artifact_digest(parent)
    before = json.loads((parent / "model.json").read_text())
    stats = {"format": OOD_FORMAT, "fpr_target": 0.03, "marker": 1, "evaluation": {"test_flagged": 0.033}}
    meta, digest = tool.write_ood(parent, str(tmp_path / "refit"), stats, "9.9.9+ood")
    assert artifact_digest(parent) == parent_digest and digest == artifact_digest(tmp_path / "refit")
    after = json.loads((tmp_path / "refit" / "model.json").read_text())
    assert after["ood"] == stats and meta.version == "9.9.9+ood"
    assert after["parent_digest"] == parent_digest and after["parent_version"] == before["version"]
    assert "tools/fit_ood.py" in after["changelog"][-1] and "3.3%" in after["changelog"][-1]
    changed = {"ood", "version", "parent_digest", "parent_version", "created_at", "changelog"}
    assert {k: v for k, v in after.items() if k not in changed} == {k: v for k, v in before.items() if k not in changed}
    assert (tmp_path / "refit" / MODEL_FILE).read_bytes() == (parent / MODEL_FILE).read_bytes()
    with pytest.raises(ModelArtifactError, match="already holds"):
        tool.write_ood(parent, str(tmp_path / "refit"), stats, "9.9.10+ood")


def test_float_batch_from_model_inputs_scores_like_uint8(shipped, originals) -> None:
    """The pipeline may hand over model_inputs' float32 batch instead of uint8."""
    art, cam = shipped
    scorer = OodScorer.from_metadata(art.meta)
    floats = model_inputs(originals[:8], art.meta.image_size)[0]
    emb = cam(floats).embeddings
    a, _ = scorer.score(emb, floats)
    b, _ = scorer.score(emb, floats.astype(np.uint8))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("ood_stats", "flagged", "shifted"), [
    ({}, 1, False),  # an artifact that states no rule: more than 20% and at least 2; 1 of 3 is chance
    ({}, 2, True),
    ({"max_share": 0.3, "min_ood": 1}, 1, True),  # the model's own thresholds
    ({"max_share": 0.5, "min_ood": 1}, 1, False),
])
def test_one_rule_for_an_unreliable_sample_in_manifest_query_and_report(
        tmp_path: Path, ood_stats: dict, flagged: int, shifted: bool) -> None:
    from tests.results_factory import CLASSES, cells, make_table, write_run
    from wbc_batch import query, results
    from wbc_batch.ood import OOD_FORMAT, ShiftRule, sample_shifted
    from wbc_batch.pipeline import _domain_shift
    from wbc_batch.report import render_report

    specs = cells("S", {"neutrophil": 2, "lymphocyte": 1})
    for spec in specs[:flagged]:
        spec["out_of_distribution"] = True
    table = make_table(specs, "r1")
    counts = results.RunCounts()
    counts.add(table)
    meta = ModelMetadata(version="t", class_names=CLASSES, image_size=128, gradcam_layer="cam",
                         ood={"format": OOD_FORMAT, **ood_stats})
    assert sample_shifted(3, flagged, ShiftRule.from_ood_stats(meta.ood)) is shifted

    shift = _domain_shift(meta, counts)  # what classify writes into the run manifest
    assert shift["samples"]["S"]["shifted"] is shifted and shift["detected"] is shifted
    out = str(tmp_path / "out")
    write_run(out, "r1", table, domain_shift=shift)
    for diff in (query.differential(out), query.query_frame(out, canned="differential")):
        assert set(diff.reliable) == {not shifted}
        assert diff.warning.iloc[0].startswith("UNRELIABLE") is shifted
    _, html = render_report(out)
    assert ('id="unreliable"' in html) is shifted and ("NOT REPORTABLE" in html) is shifted
    assert ('id="domain-shift"' in html) is shifted
