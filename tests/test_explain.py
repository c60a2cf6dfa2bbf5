"""Grad-CAM: the batched implementation against tf-explain's per-image maps, and known-evidence checks.

tf-explain's ``GradCAM.explain`` takes one class for a whole batch and returns
a drawn grid, so the oracle is its two static methods, which return the raw
per-image maps: ``get_gradients_and_filters`` (here with
``use_guided_grads=False``) and ``generate_ponderated_output``. tf-explain
differentiates ``model.output``, which for the shipped model *is* the logits;
its maps are not ReLU'd, so the ReLU is applied on its side before comparing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wbc_batch import imaging
from wbc_batch.explain import GradCam, normalise_cams, overlay_heatmap, upsample_cam
from wbc_batch.geometry import model_inputs
from wbc_batch.localisation import cell_mask, localisation_metrics

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "pbc"
# One image per folder first, so any prefix of the batch mixes predicted classes.
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")  # tf-explain's [model.inputs]

FOLDERS = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def _sample_paths(n: int) -> list[Path]:
    per_folder = [sorted((SAMPLES / f).glob("*.jpg")) for f in FOLDERS]
    ordered = [paths[i] for i in range(8) for paths in per_folder]
    return ordered[:n]


def _load(paths: list[Path]) -> tuple[list[np.ndarray], np.ndarray]:
    rgbs = [imaging.decode_image(p.read_bytes()) for p in paths]
    return rgbs, model_inputs(rgbs, 128)[0]


@pytest.fixture(scope="module")
def gradcam(shipped) -> GradCam:
    return GradCam(shipped.model, shipped.meta.gradcam_layer, shipped.meta.embedding_layer)


def _tf_explain_maps(model, images: np.ndarray, layer: str, targets: np.ndarray) -> np.ndarray:
    """tf-explain's raw Grad-CAM per image, for each image's own target (grouped by class)."""
    from tf_explain.core.grad_cam import GradCAM

    out = np.zeros((len(images), *model.get_layer(layer).output.shape[1:3]), dtype=np.float32)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        outputs, grads = GradCAM.get_gradients_and_filters(model, images[idx], layer, int(c), False)
        maps = GradCAM.generate_ponderated_output(outputs, grads)
        out[idx] = np.maximum(np.stack([m.numpy() for m in maps]), 0.0)
    return out


@pytest.mark.parametrize("batch_size", [1, 5, 16])
@pytest.mark.parametrize("explicit", [False, True], ids=["predicted", "explicit"])
def test_gradcam_matches_tf_explain_per_image(shipped, gradcam: GradCam, batch_size: int, explicit: bool) -> None:
    _, images = _load(_sample_paths(batch_size))
    k = len(shipped.meta.class_names)
    classes = (np.arange(batch_size) * 3 % k).astype(np.int32) if explicit else None
    if explicit and batch_size > 1:
        classes[-1] = -1  # "predicted" mixed with explicit targets in one batch
    cb = gradcam(images, classes)
    logits = np.asarray(shipped.model(images, training=False))
    np.testing.assert_allclose(cb.logits, logits, rtol=1e-4, atol=1e-4)
    predicted = logits.argmax(axis=1)
    expected_targets = predicted if classes is None else np.where(classes >= 0, classes, predicted)
    np.testing.assert_array_equal(cb.targets, expected_targets)
    if batch_size >= 5:
        assert len(np.unique(cb.targets)) >= 3, "the batch must mix targets to test per-image classes"
    oracle = _tf_explain_maps(shipped.model, images, shipped.meta.gradcam_layer, cb.targets)
    assert cb.cams.shape == oracle.shape == (batch_size, 16, 16)
    assert oracle.max() > 0.05, "a degenerate oracle would make agreement trivial"
    scale = oracle.max(axis=(1, 2), keepdims=True) + 1e-12
    np.testing.assert_allclose(cb.cams / scale, oracle / scale, atol=1e-5, rtol=0)


def test_gradcam_differs_between_classes(gradcam: GradCam) -> None:
    """Explaining another class gives another map: the target really reaches the backward pass."""
    _, images = _load(_sample_paths(1))
    a = gradcam(images, np.array([0], np.int32)).cams
    b = gradcam(images, np.array([4], np.int32)).cams
    assert np.abs(normalise_cams(a) - normalise_cams(b)).max() > 0.2


def _two_channel_model():
    """A tiny Functional model whose class evidence is known by construction.

    ``cam_features`` (16x16x2): channel 0 is the ReLU'd local mean of the red
    channel, channel 1 of the blue channel. Logit 0 is the mean of channel 0
    (redness), logit 1 of channel 1 (blueness). So the Grad-CAM of class 0
    is the red channel's map and of class 1 the blue one's.
    """
    import keras

    inp = keras.Input((32, 32, 3), name="image")
    conv = keras.layers.Conv2D(2, 2, strides=2, use_bias=False, name="conv")
    feats = keras.layers.Activation("relu", name="cam_features")(conv(inp))
    pooled = keras.layers.GlobalAveragePooling2D(name="embedding")(feats)
    dense = keras.layers.Dense(2, use_bias=False, name="logits")
    model = keras.Model(inp, dense(pooled))
    kernel = np.zeros((2, 2, 3, 2), np.float32)
    kernel[:, :, 0, 0] = 0.25
    kernel[:, :, 2, 1] = 0.25
    conv.set_weights([kernel])
    dense.set_weights([np.eye(2, dtype=np.float32)])
    return model


@pytest.mark.parametrize("target", [0, 1])
def test_gradcam_falls_on_known_evidence(target: int) -> None:
    images = np.zeros((2, 32, 32, 3), np.float32)
    images[:, 2:10, 4:12, 0] = 200.0  # red patch top-left
    images[:, 20:30, 18:28, 2] = 150.0  # blue patch bottom-right
    images[1] = images[1, ::-1, ::-1]  # second image: patches mirrored
    cam = GradCam(_two_channel_model(), "cam_features", "embedding")
    cb = cam(images, np.full(2, target, np.int32))
    for i in range(2):
        patch = images[i, ..., 0 if target == 0 else 2] > 0
        patch16 = patch.reshape(16, 2, 16, 2).any(axis=(1, 3))
        m = cb.cams[i]
        assert m[patch16].sum() / m.sum() > 0.99
        assert patch16[np.unravel_index(m.argmax(), m.shape)]


def test_gradcam_on_real_cell_pasted_at_known_place(gradcam: GradCam, shipped) -> None:
    """A real cell cut out by its mask and pasted on plain background: the map follows it."""
    rgb = imaging.decode_image((SAMPLES / "monocyte" / "MO_163770.jpg").read_bytes())
    mask = cell_mask(rgb)
    ys, xs = np.nonzero(mask)
    crop, crop_mask = rgb[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    background = np.median(rgb[~mask], axis=0).astype(np.uint8)
    monocyte = shipped.meta.class_names.index("monocyte")
    canvases, boxes = [], []
    for top, left in [(15, 15), (360 - crop.shape[0] - 15, 360 - crop.shape[1] - 15)]:
        canvas = np.empty((360, 360, 3), np.uint8)
        canvas[:] = background
        canvas[top:top + crop.shape[0], left:left + crop.shape[1]][crop_mask] = crop[crop_mask]
        box = np.zeros((360, 360), bool)
        box[top:top + crop.shape[0], left:left + crop.shape[1]] = True
        canvases.append(canvas)
        boxes.append(box)
    cb = gradcam(np.stack([imaging.resize_for_model(c, 128) for c in canvases]).astype(np.float32),
                 np.full(2, monocyte, np.int32))
    for cam, box, canvas in zip(cb.cams, boxes, canvases):
        metrics = localisation_metrics(canvas, cam, mask=box)
        assert metrics["cam_peak_in_cell"]
        assert metrics["cam_in_cell"] > 3 * metrics["cell_area_share"]


def test_flat_map_normalises_to_zeros_not_nan() -> None:
    cam = GradCam(_two_channel_model(), "cam_features")
    cb = cam(np.zeros((2, 32, 32, 3), np.float32))  # no evidence anywhere: features are all zero
    assert np.all(cb.cams == 0)
    norm = normalise_cams(cb.cams)
    assert np.all(np.isfinite(norm)) and np.all(norm == 0)
    assert cb.embeddings.shape == (2, 0)
    overlay = overlay_heatmap(np.full((40, 40, 3), 200, np.uint8), cb.cams[0])
    assert overlay.shape == (40, 40, 3) and overlay.dtype == np.uint8


def test_normalised_maps_peak_at_one(gradcam: GradCam) -> None:
    _, images = _load(_sample_paths(4))
    norm = normalise_cams(gradcam(images).cams)
    np.testing.assert_allclose(norm.max(axis=(1, 2)), 1.0, atol=1e-5)
    assert norm.min() >= 0.0
    up = upsample_cam(norm[0], 360, 363)
    assert up.shape == (363, 360) and up.min() >= 0.0


def test_uint8_input_gives_same_maps(gradcam: GradCam) -> None:
    _, images = _load(_sample_paths(3))
    a = gradcam(images).cams
    b = gradcam(images.astype(np.uint8)).cams
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("images", "classes", "message"),
    [
        (np.zeros((2, 64, 64, 3), np.float32), None, "expected images"),
        (np.zeros((128, 128, 3), np.float32), None, "expected images"),
        (np.zeros((2, 128, 128, 1), np.float32), None, "expected images"),
        (np.zeros((2, 128, 128, 3), np.float32), np.array([0]), "expected classes"),
        (np.zeros((2, 128, 128, 3), np.float32), np.array([0, 7]), "out of range"),
        (np.zeros((2, 128, 128, 3), np.float32), np.array([0, -2]), "out of range"),
    ],
)
def test_gradcam_input_guards(gradcam: GradCam, images: np.ndarray, classes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gradcam(images, classes)


def test_unknown_layer_is_refused(shipped) -> None:
    with pytest.raises(ValueError, match="no layer 'nope'"):
        GradCam(shipped.model, "nope")
