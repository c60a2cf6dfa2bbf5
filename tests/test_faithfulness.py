"""Deletion/insertion AUC and pixel retention on the shipped model, against random maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wbc_batch import imaging
from wbc_batch.explain import GradCam
from wbc_batch.faithfulness import (
    RETENTION_PERCENTS,
    deletion_insertion,
    faithfulness_records,
    faithfulness_summary,
    pixel_ranks,
    summarise_faithfulness,
)
from wbc_batch.geometry import model_inputs

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "pbc"
PICKS = ["basophil/BA_55185", "eosinophil/EO_23194", "lymphocyte/LY_149883", "monocyte/MO_163770",
         "neutrophil/BNE_129177", "ig/MY_41429"]


@pytest.fixture(scope="module")
def explained():
    """Shipped model, six sample inputs, their Grad-CAM maps and targets."""
    from wbc_batch.model import load_artifact

    art = load_artifact()
    images = model_inputs([imaging.decode_image((SAMPLES / f"{p}.jpg").read_bytes()) for p in PICKS], 128)[0]
    cb = GradCam(art.model, art.meta.gradcam_layer)(images)
    return art, images, cb


def test_summary_beats_random_and_is_json(explained) -> None:
    art, images, cb = explained
    summary = faithfulness_summary(art.model, images, cb.cams, cb.targets, art.meta.temperature, seed=0, steps=8)
    text = json.dumps(summary)  # must go into the run manifest as is
    assert json.loads(text) == summary
    assert summary["n_images"] == len(images)
    assert len(summary["fractions"]) == 9
    d, i = summary["deletion_auc"], summary["insertion_auc"]
    assert 0.0 <= d["gradcam"] <= 1.0 and 0.0 <= d["random"] <= 1.0
    assert d["gradcam"] < d["random"] - 0.1, d
    assert i["gradcam"] > i["random"], i
    assert d["gradcam_beats_random_share"] >= 0.5
    ret = summary["retention"]
    assert ret["keep_percent"] == list(RETENTION_PERCENTS)
    # Keeping the top quarter of Grad-CAM pixels preserves the decision better than a random quarter.
    q = ret["keep_percent"].index(25)
    assert ret["gradcam"]["probability"][q] > ret["random"]["probability"][q]
    for name in ("gradcam", "random"):
        curve = summary["deletion_curve"][name]
        assert len(curve) == 9 and all(0.0 <= v <= 1.0 for v in curve)


def test_an_image_record_does_not_depend_on_its_batch_and_records_join_into_the_summary(explained) -> None:
    """Classify measures its sample a few images per actor batch; the driver joins the records."""
    art, images, cb = explained
    t = art.meta.temperature
    together = faithfulness_records(art.model, images[:3], cb.cams[:3], cb.targets[:3], t, [0, 1, 2], steps=4)
    alone = faithfulness_records(art.model, images[2:3], cb.cams[2:3], cb.targets[2:3], t, [2], steps=4)
    assert json.loads(json.dumps(together)) == together  # they travel as JSON in the result batches
    for key in ("deletion_auc", "insertion_auc"):
        for name in ("gradcam", "random"):
            assert together[2][key][name] == pytest.approx(alone[0][key][name], abs=1e-5)
    assert together[2]["retention"]["random"]["kept"] == alone[0]["retention"]["random"]["kept"]
    joined = summarise_faithfulness(together[:2] + alone, t, 0, 4)
    whole = faithfulness_summary(art.model, images[:3], cb.cams[:3], cb.targets[:3], t, seed=0, steps=4)
    assert joined["n_images"] == 3
    assert joined["deletion_auc"] == pytest.approx(whole["deletion_auc"], abs=1e-4)
    for column in ("accuracy", "probability"):
        assert joined["retention"]["gradcam"][column] == pytest.approx(whole["retention"]["gradcam"][column], abs=1e-4)
    with pytest.raises(ValueError, match="one seed per image"):
        faithfulness_records(art.model, images[:2], cb.cams[:2], cb.targets[:2], t, [0])


def test_curve_endpoints_are_the_full_and_the_baseline_image(explained) -> None:
    """At 0 % nothing is removed (the model's own probability); at 100 % every map gives the same image."""
    art, images, cb = explained
    t = art.meta.temperature
    real = deletion_insertion(art.model, images, cb.cams, cb.targets, t, steps=4)
    rand = deletion_insertion(art.model, images, np.random.default_rng(3).random(cb.cams.shape), cb.targets, t, steps=4)
    z = cb.logits / t
    p = np.exp(z - z.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True))[np.arange(len(images)), cb.targets]
    np.testing.assert_allclose(real["deletion"][:, 0], p, atol=1e-4)
    np.testing.assert_allclose(real["insertion"][:, -1], p, atol=1e-4)
    np.testing.assert_allclose(real["deletion"][:, -1], rand["deletion"][:, -1], atol=1e-5)
    np.testing.assert_allclose(real["insertion"][:, 0], rand["insertion"][:, 0], atol=1e-5)
    assert real["deletion_auc"].shape == (len(images),)


def test_pixel_ranks_follow_the_map() -> None:
    cam = np.zeros((1, 4, 4), np.float32)
    cam[0, 0, 0] = 1.0  # top-left block is the most salient
    ranks = pixel_ranks(cam, 8, np.random.default_rng(0))
    assert ranks.shape == (1, 8, 8)
    assert sorted(ranks.ravel().tolist()) == list(range(64))
    assert ranks[0, 0, 0] == 0 and ranks[0, 7, 7] > 32
    again = pixel_ranks(cam, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(ranks, again)  # ties broken reproducibly


@pytest.mark.parametrize(
    ("images", "cams", "targets", "temperature", "message"),
    [
        (np.zeros((2, 8, 8, 3)), np.zeros((3, 4, 4)), np.zeros(2, int), 1.0, "expected cams"),
        (np.zeros((2, 8, 8, 3)), np.zeros((2, 4, 4)), np.zeros(3, int), 1.0, "expected targets"),
        (np.zeros((2, 8, 8)), np.zeros((2, 4, 4)), np.zeros(2, int), 1.0, "expected images"),
        (np.zeros((0, 8, 8, 3)), np.zeros((0, 4, 4)), np.zeros(0, int), 1.0, "at least one"),
        (np.zeros((2, 8, 8, 3)), np.zeros((2, 4, 4)), np.zeros(2, int), 0.0, "positive temperature"),
    ],
)
def test_summary_input_guards(images, cams, targets, temperature, message) -> None:
    with pytest.raises(ValueError, match=message):
        faithfulness_summary(None, images, cams, targets, temperature)
