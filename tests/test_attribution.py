"""Attribution methods (tf-explain's and our Grad-CAM) and the ``wbc-batch explain`` command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from wbc_batch import imaging
from wbc_batch.attribution import METHODS, Explainer, display_map
from wbc_batch.cli import main
from wbc_batch.geometry import model_inputs

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "pbc"
MONO = SAMPLES / "monocyte" / "MO_163770.jpg"
EOSI = SAMPLES / "eosinophil" / "EO_23194.jpg"


@pytest.fixture(scope="module")
def explainer(shipped) -> Explainer:
    return Explainer(shipped.model, shipped.meta.gradcam_layer, occlusion_patch=16)  # 64 passes per image, not 256


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """Two cells with different predicted classes (monocyte, eosinophil)."""
    return model_inputs([imaging.decode_image(p.read_bytes()) for p in (MONO, EOSI)], 128)[0]


@pytest.fixture(scope="module")
def attributions(explainer: Explainer, batch: np.ndarray) -> dict:
    """Each method's maps for the batch, computed once per module (occlusion is 256 passes per image)."""
    cache: dict = {}

    def get(method: str):
        if method not in cache:
            cache[method] = explainer(batch, method)
        return cache[method]

    return get


def _centre_vs_border(m: np.ndarray) -> tuple[float, float]:
    s = m.shape[0]
    centre = np.zeros(m.shape, bool)
    centre[s // 4: 3 * s // 4, s // 4: 3 * s // 4] = True
    return float(m[centre].mean()), float(m[~centre].mean())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_maps_on_the_cell(attributions, shipped, method: str) -> None:
    attr = attributions(method)
    names = shipped.meta.class_names
    assert [names[t] for t in attr.targets] == ["monocyte", "eosinophil"]
    side = 16 if method == "gradcam" else 128
    assert attr.maps.shape == (2, side, side) and attr.maps.dtype == np.float32
    assert np.all(np.isfinite(attr.maps))
    for m in attr.maps:
        drawn = display_map(m)
        assert drawn.min() >= 0 and drawn.max() > 0
        centre, border = _centre_vs_border(drawn)
        assert centre > border, f"{method}: map not on the centred cell"


def test_mixed_targets_equal_single_image_maps(explainer: Explainer, batch: np.ndarray) -> None:
    """Grouping by class inside a batch gives each image the map it gets alone."""
    both = explainer(batch, "vanilla_gradients", np.array([4, 1], np.int32)).maps
    alone = explainer(batch[1:], "vanilla_gradients", np.array([1], np.int32)).maps
    np.testing.assert_allclose(both[1], alone[0], rtol=1e-4, atol=1e-6 * alone.max())


def test_vanilla_gradients_are_the_logit_gradient(explainer: Explainer, shipped, batch: np.ndarray) -> None:
    import tensorflow as tf

    x = tf.constant(batch[:1])
    with tf.GradientTape() as tape:
        tape.watch(x)
        logit = shipped.model(x, training=False)[0, 4]
    expected = np.abs(tape.gradient(logit, x).numpy()).sum(-1)
    got = explainer(batch[:1], "vanilla_gradients", np.array([4], np.int32)).maps
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_occlusion_is_a_logit_drop(attributions) -> None:
    attr = attributions("occlusion")
    for i in range(2):
        m = attr.maps[i]
        assert m.max() > 0.5, "grey patches on the cell must lower its logit"
        assert m.min() < 0.1  # most patches, on plain background, barely matter


def test_explainer_guards(explainer: Explainer, batch: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        explainer(batch, "lime")
    with pytest.raises(ValueError, match="expected images"):
        explainer(batch[:, :64], "gradcam")
    with pytest.raises(ValueError, match="out of range"):
        explainer(batch, "gradcam", np.array([0, 9], np.int32))


def test_cli_explain_writes_overlay_and_map_named_by_hash(tmp_path: Path, capsys) -> None:
    out = tmp_path / "expl"
    code = main(["explain", str(MONO), str(EOSI), "--method", "gradcam", "--out", str(out)])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["predicted_class"] for r in rows] == ["monocyte", "eosinophil"]
    for row, src in zip(rows, (MONO, EOSI)):
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        assert row["sha256"] == sha
        assert Path(row["overlay"]).name == f"{sha}-gradcam-{row['explained_class']}.jpg"
        overlay = imaging.decode_image(Path(row["overlay"]).read_bytes())
        assert overlay.shape == imaging.decode_image(src.read_bytes()).shape
        raw = np.load(row["map"])
        assert raw.shape == (16, 16) and raw.max() > 0
        assert 0.5 < row["probability"] <= 1.0


def test_cli_explain_given_class(tmp_path: Path, capsys) -> None:
    assert main(["explain", str(MONO), "--class", "lymphocyte", "--out", str(tmp_path)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["explained_class"] == "lymphocyte" and row["predicted_class"] == "monocyte"
    assert row["map"].endswith("-gradcam-lymphocyte.npy")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--class", "platelet"], "unknown class 'platelet'"),
        (["--method", "lime"], None),  # argparse refuses it
    ],
)
def test_cli_explain_bad_options(tmp_path: Path, capsys, args: list[str], expected: str | None) -> None:
    if expected is None:
        with pytest.raises(SystemExit) as exc:
            main(["explain", str(MONO), "--out", str(tmp_path), *args])
        assert exc.value.code == 2
        return
    assert main(["explain", str(MONO), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err and "Traceback" not in err


def test_cli_explain_bad_and_missing_images(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    assert main(["explain", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jpg" in err and "not an image" in err and err.count("\n") == 0
    assert main(["explain", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.s3
def test_cli_explain_reads_and_writes_s3(s3_bucket: str, s3_client, capsys) -> None:
    s3 = s3_client
    s3.put_object(Bucket=s3_bucket, Key="cells/mono.jpg", Body=MONO.read_bytes())
    out = f"s3://{s3_bucket}/explanations"
    assert main(["explain", f"s3://{s3_bucket}/cells/mono.jpg", "--method", "vanilla_gradients", "--out", out]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["overlay"].startswith(out)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="explanations/")["Contents"]}
    assert keys == {row["overlay"][len(f"s3://{s3_bucket}/"):], row["map"][len(f"s3://{s3_bucket}/"):]}
