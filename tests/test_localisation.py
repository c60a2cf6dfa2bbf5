"""Cell segmentation on the bundled PBC samples and the localisation metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wbc_batch import imaging
from wbc_batch.localisation import cell_mask, localisation_metrics

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "pbc"
WBC_FOLDERS = ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil"]


def _rgb(path: Path) -> np.ndarray:
    return imaging.decode_image(path.read_bytes())


def _centroid_offset(mask: np.ndarray) -> float:
    """Distance of the mask's centroid from the image centre, as a share of the side."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return float(np.hypot(ys.mean() - h / 2, xs.mean() - w / 2) / min(h, w))


def _solidity(mask: np.ndarray) -> float:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return float(mask.sum() / cv2.contourArea(cv2.convexHull(np.concatenate(contours))))


@pytest.mark.parametrize("folder", WBC_FOLDERS)
def test_white_cell_masks_cover_a_sane_centred_blob(folder: str) -> None:
    areas = []
    for path in sorted((SAMPLES / folder).glob("*.jpg")):
        rgb = _rgb(path)
        mask = cell_mask(rgb)
        assert mask.shape == rgb.shape[:2] and mask.dtype == bool
        areas.append(mask.mean())
        assert 0.03 <= mask.mean() <= 0.30, f"{path.name}: cell share {mask.mean():.3f}"
        assert _centroid_offset(mask) < 0.15, f"{path.name}: mask off-centre"
        assert _solidity(mask) > 0.8, f"{path.name}: mask not a compact blob"
    assert 0.06 <= float(np.median(areas)) <= 0.22


def test_mask_includes_cytoplasm_not_only_nucleus() -> None:
    """On a neutrophil the cell is clearly larger than its (deep purple) nucleus."""
    rgb = _rgb(SAMPLES / "neutrophil" / "BNE_129177.jpg")
    mask = cell_mask(rgb)
    img = rgb.astype(np.float32)
    nucleus = (img[..., 2] - img[..., 1]) > 80  # the deep purple lobes only
    assert mask[nucleus].mean() > 0.95, "the nucleus must be inside the cell"
    assert mask.sum() > 1.6 * nucleus.sum()


@pytest.mark.parametrize("folder", ["platelet", "erythroblast"])
def test_non_wbc_masks_stay_small_and_centred(folder: str) -> None:
    """Platelet images must not grow into the surrounding red cells."""
    for path in sorted((SAMPLES / folder).glob("*.jpg")):
        mask = cell_mask(_rgb(path))
        assert 0.0 < mask.mean() <= 0.15, f"{path.name}: share {mask.mean():.3f}"
        assert _centroid_offset(mask) < 0.3  # one bundled platelet itself lies off-centre


def test_unstained_image_gives_empty_mask() -> None:
    assert not cell_mask(np.full((100, 100, 3), 230, np.uint8)).any()


def test_mask_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="expected \\(H, W, 3\\)"):
        cell_mask(np.zeros((10, 10), np.uint8))


def test_metrics_on_maps_inside_outside_and_flat() -> None:
    rgb = _rgb(SAMPLES / "lymphocyte" / "LY_149883.jpg")
    mask = cell_mask(rgb)
    h, w = mask.shape
    inside = np.zeros((16, 16), np.float32)
    inside[7:9, 7:9] = 1.0  # the centre, where the cell is
    corner = np.zeros((16, 16), np.float32)
    corner[0, 0] = 1.0
    m_in = localisation_metrics(rgb, inside, mask)
    m_out = localisation_metrics(rgb, corner, mask)
    m_flat = localisation_metrics(rgb, np.zeros((16, 16), np.float32), mask)
    assert m_in["cam_peak_in_cell"] and m_in["cam_in_cell"] > 0.9
    assert not m_out["cam_peak_in_cell"] and m_out["cam_in_cell"] < 0.05
    assert m_flat == {"cam_in_cell": 0.0, "cam_peak_in_cell": False, "cell_area_share": pytest.approx(mask.mean())}
    uniform = localisation_metrics(rgb, np.ones((16, 16), np.float32), mask)
    assert uniform["cam_in_cell"] == pytest.approx(uniform["cell_area_share"], abs=1e-3)
    assert m_in == localisation_metrics(rgb, inside)  # mask computed when not given
    with pytest.raises(ValueError, match="mask of shape"):
        localisation_metrics(rgb, inside, mask[: h - 1])


def test_segmenting_the_model_input_agrees_with_the_full_size_tile(samples_dir: Path) -> None:
    """classify segments the 128 px model input once per row; its figures must match the full-size ones."""
    from wbc_batch.imaging import resize_for_model
    from wbc_batch.localisation import cam_on_mask, model_input_mask

    rng = np.random.default_rng(0)
    diffs, peaks_agree, area_ratio = [], [], []
    for path in sorted(samples_dir.glob("*/*.jpg")):
        rgb = _rgb(path)
        mask = model_input_mask(resize_for_model(rgb, 128))
        assert mask.shape == (128, 128) and mask.dtype == bool
        cam = rng.random((16, 16)).astype(np.float32) + np.pad(np.ones((6, 6), np.float32), 5) * 4
        full = localisation_metrics(rgb, cam, cell_mask(rgb))
        small = cam_on_mask(cam, mask)
        diffs.append(abs(small["cam_in_cell"] - full["cam_in_cell"]))
        peaks_agree.append(small["cam_peak_in_cell"] == full["cam_peak_in_cell"])
        area_ratio.append(small["cell_area_share"] / max(full["cell_area_share"], 1e-6))
    assert float(np.median(diffs)) < 0.01 and float(np.mean(diffs)) < 0.03
    assert float(np.mean(peaks_agree)) >= 0.95
    assert 0.9 < float(np.median(area_ratio)) < 1.1


def test_tiny_model_inputs_are_segmented_with_kernels_of_at_least_a_pixel(samples_dir: Path) -> None:
    from wbc_batch.imaging import resize_for_model
    from wbc_batch.localisation import model_input_mask

    rgb = _rgb(sorted(samples_dir.glob("lymphocyte/*.jpg"))[0])
    mask = model_input_mask(resize_for_model(rgb, 32))
    assert mask.shape == (32, 32) and 0.0 < mask.mean() < 0.6
    with pytest.raises(ValueError, match="expected"):
        model_input_mask(np.zeros((32, 32), np.uint8))
