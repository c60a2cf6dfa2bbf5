"""The model input's field of view: tight crops are zoomed out to the size the network knows, tiles are untouched."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wbc_batch import geometry
from wbc_batch.imaging import decode_image, resize_for_model
from wbc_batch.localisation import model_input_mask
from wbc_batch.pipeline import BatchClassifier, load_images, render_explanations

WHITE = ("basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil")


def tight_crop(rgb: np.ndarray, side: int = 200, out: int = 120) -> np.ndarray:
    """What an analyser that exports tight crops sends: the central ``side`` px of a tile, saved at ``out`` px."""
    h, w = rgb.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return cv2.resize(rgb[top : top + side, left : left + side], (out, out), interpolation=cv2.INTER_AREA)


def white_cell_tiles(samples_dir: Path) -> list[tuple[str, np.ndarray]]:
    return [(c, decode_image(p.read_bytes())) for c in WHITE for p in sorted((samples_dir / c).iterdir())]


def test_a_tile_is_only_resized(samples_dir: Path) -> None:
    """Every bundled sample (platelets and erythroblasts too) keeps exactly the input it always had."""
    for path in sorted(samples_dir.glob("*/*.jpg")):
        rgb = decode_image(path.read_bytes())
        seen = geometry.model_input(rgb, 128)
        assert seen.zoom == 1.0, path.name
        assert np.array_equal(seen.image, resize_for_model(rgb, 128))
        assert np.array_equal(seen.cell_mask, model_input_mask(seen.image))
        assert geometry.view_at(rgb, seen.zoom) is rgb


def test_a_cell_that_fills_the_image_is_shown_at_the_tiles_size(samples_dir: Path) -> None:
    """Crops of the 48 white-cell samples: the cell takes 0.48-0.82 of the side (1.8x its share of the tile)."""
    fractions, left_alone = [], 0
    for _, rgb in white_cell_tiles(samples_dir):
        crop = tight_crop(rgb)
        before = geometry.cell_fraction(model_input_mask(resize_for_model(crop, 128)))
        seen = geometry.model_input(crop, 128)
        if seen.zoom == 1.0:  # the smallest lymphocytes stay within PBC's range even when cropped
            assert before is None or before <= geometry.MAX_CELL_FRACTION
            left_alone += 1
            continue
        assert before is not None and before > geometry.MAX_CELL_FRACTION
        fractions.append(geometry.cell_fraction(seen.cell_mask))
    assert left_alone <= 8
    # back in PBC's range of white cells (0.26-0.53 of the side) up to the segmentation's noise, around the target
    assert 0.26 <= min(fractions) and max(fractions) <= 0.6
    assert abs(float(np.median(fractions)) - geometry.TARGET_CELL_FRACTION) < 0.05


def test_zoom_out_pads_with_the_border_colour_and_keeps_the_image_in_the_middle() -> None:
    rgb = np.full((40, 60, 3), (200, 180, 170), dtype=np.uint8)
    rgb[10:30, 20:40] = (90, 40, 120)  # the "cell"
    out = geometry.zoom_out(rgb, 0.5)
    assert out.shape == (80, 120, 3)
    assert np.array_equal(out[20:60, 30:90], rgb)
    assert (out[0, 0] == (200, 180, 170)).all() and (out[-1, -1] == (200, 180, 170)).all()
    with pytest.raises(ValueError, match="zoom"):
        geometry.zoom_out(rgb, 1.5)


def test_the_shipped_model_reads_tight_crops_once_they_are_zoomed_out(samples_dir: Path, shipped) -> None:
    """The reason for the module: resized as they come, tight crops of these cells are mostly misread."""
    tiles = white_cell_tiles(samples_dir)
    labels = np.array([shipped.meta.class_names.index(c) for c, _ in tiles])
    crops = [tight_crop(rgb) for _, rgb in tiles]
    plain = np.stack([resize_for_model(c, 128) for c in crops]).astype(np.float32)
    zoomed, zooms = geometry.model_inputs(crops, 128)
    assert np.mean(zooms < 1.0) >= 0.8
    plain_right = float(np.mean(shipped.model.predict_on_batch(plain).argmax(1) == labels))
    zoomed_right = float(np.mean(shipped.model.predict_on_batch(zoomed).argmax(1) == labels))
    print(f"tight crops right: {plain_right:.1%} resized as they come, {zoomed_right:.1%} zoomed out")
    # measured: 40% and 83% (the misses: three small lymphocytes the crop leaves in PBC's range, unzoomed)
    assert plain_right < 0.6, plain_right
    assert zoomed_right >= 0.8, zoomed_right


def test_classify_records_the_zoom_and_draws_the_heatmap_on_what_the_network_saw(
        samples_dir: Path, tmp_path: Path) -> None:
    tile = sorted((samples_dir / "monocyte").iterdir())[0]
    crop_path = tmp_path / "tight.jpg"
    cv2.imwrite(str(crop_path), cv2.cvtColor(tight_crop(decode_image(tile.read_bytes())), cv2.COLOR_RGB2BGR))
    uris = np.array([str(tile), str(crop_path)], dtype=object)
    loaded = load_images({"image_uri": uris, "sample_id": np.array(["s", "s"], dtype=object)}, image_size=128)
    assert loaded["input_zoom"][0] == 1.0 and loaded["input_zoom"][1] < 0.8
    out = BatchClassifier(None, False, None, run_id="t")(loaded)
    assert list(out["predicted_class"]) == ["monocyte", "monocyte"]
    rendered = render_explanations(out, str(tmp_path / "out"), write_heatmaps=True, suspect_below=0.5)
    overlay = cv2.imread(rendered["heatmap_uri"][1])
    side = round(120 / float(loaded["input_zoom"][1]))
    assert abs(overlay.shape[0] - side) <= 1 and abs(overlay.shape[1] - side) <= 1  # the padded view
    assert rendered["input_zoom"][1] == loaded["input_zoom"][1]


def test_relative_cell_size_compares_class_by_class_so_the_class_mix_does_not_read_as_scale() -> None:
    small, large = 0.30, 0.42  # lymphocyte-like and monocyte-like fractions
    ref_f = np.array([small] * 10 + [large] * 10, np.float32)
    ref_y = np.array([0] * 10 + [1] * 10)
    # the same lab, mostly monocytes: pooled medians would say 1.4x, the classes say 1.0
    new_f = np.array([small] * 3 + [large] * 12, np.float32)
    new_y = np.array([0] * 3 + [1] * 12)
    ratio, per_class = geometry.relative_cell_size(new_f, new_y, ref_f, ref_y)
    assert ratio == pytest.approx(1.0) and set(per_class) == {0, 1}
    ratio, _ = geometry.relative_cell_size(new_f * 0.6, new_y, ref_f, ref_y)
    assert ratio == pytest.approx(0.6, rel=1e-5)
    with_gaps = np.where(np.arange(len(new_f)) % 2 == 0, np.nan, new_f).astype(np.float32)  # unsegmented cells
    ratio, per_class = geometry.relative_cell_size(with_gaps, new_y, ref_f, ref_y)
    assert set(per_class) == {1} and ratio == pytest.approx(1.0)  # class 0 keeps 1 segmented cell: left out
    assert geometry.relative_cell_size(new_f[:2], new_y[:2], ref_f, ref_y) == (None, {})



def wide_field(rgb: np.ndarray, top: int, left: int) -> np.ndarray:
    """A field twice as wide as the tile with the tile (and its cell) at (top, left): a lab at half the magnification.

    The rest of the field is the tile's border colour, so only the tile holds a cell.
    """
    h, w = rgb.shape[:2]
    field = np.empty((2 * h, 2 * w, 3), dtype=np.uint8)
    field[:] = geometry.border_colour(rgb)
    field[top : top + h, left : left + w] = rgb
    return field


def test_field_scale_is_left_at_one_within_the_tolerance() -> None:
    assert geometry.field_scale_for(None) == 1.0
    assert geometry.field_scale_for(0.826) == 1.0  # Chula: close enough to PBC's size
    assert geometry.field_scale_for(1.2) == 1.0
    assert geometry.field_scale_for(0.61) == pytest.approx(1.639)  # a field a half wider: magnify
    assert geometry.field_scale_for(1.4) == pytest.approx(0.714)  # closer: pad
    assert geometry.rescale_field(np.zeros((4, 4, 3), np.uint8), 1.0).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="positive"):
        geometry.rescale_field(np.zeros((4, 4, 3), np.uint8), 0.0)


def test_a_wide_field_is_cropped_around_its_cell_even_off_centre(samples_dir: Path) -> None:
    """48 white cells at half size, each in a corner of its field, mostly come back at their tile's size."""
    back_whole, centred_whole = 0, 0
    for _, tile in white_cell_tiles(samples_dir):
        h, w = tile.shape[:2]
        field = wide_field(tile, 0, w)  # top right: a centred crop holds a quarter of the cell
        assert geometry.rescale_field(field, 2.0).shape == (h, w, 3)
        as_tile = geometry.cell_fraction(geometry.model_input(tile, 128).cell_mask)
        assert as_tile
        back = geometry.cell_fraction(geometry.model_input(field, 128, field_scale=2.0).cell_mask)
        back_whole += back is not None and abs(back - as_tile) < 0.1 * as_tile
        centred = resize_for_model(field[h // 2 : h // 2 + h, w // 2 : w // 2 + w], 128)
        seen = geometry.cell_fraction(model_input_mask(centred))
        centred_whole += seen is not None and abs(seen - as_tile) < 0.1 * as_tile
    # measured: 44 of 48 (the misses: a neighbour's fragment nearer the field's centre was segmented instead)
    assert back_whole >= 40, back_whole
    assert centred_whole <= 10, centred_whole


def test_a_closer_field_is_padded_and_the_heatmap_shows_the_rescaled_view(samples_dir: Path, tmp_path: Path) -> None:
    tile = decode_image(sorted((samples_dir / "eosinophil").iterdir())[0].read_bytes())
    padded = geometry.rescale_field(tile, 0.8)
    assert padded.shape[0] == round(tile.shape[0] / 0.8)
    path = tmp_path / "wide.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(wide_field(tile, tile.shape[0] // 2, tile.shape[1] // 2), cv2.COLOR_RGB2BGR))
    batch = {"image_uri": np.array([str(path)], dtype=object), "sample_id": np.array(["s"], dtype=object)}
    plain = load_images(batch, image_size=128)
    scaled = load_images(batch, image_size=128, field_scale=2.0)
    assert geometry.cell_fraction(scaled["cell_mask"][0]) > 1.6 * geometry.cell_fraction(plain["cell_mask"][0])
    out = BatchClassifier(None, False, None, run_id="t")(scaled)
    rendered = render_explanations(out, str(tmp_path / "out"), write_heatmaps=True, suspect_below=0.5,
                                   field_scale=2.0)
    overlay = cv2.imread(rendered["heatmap_uri"][0])
    assert overlay.shape[:2] == tile.shape[:2]  # the crop the network saw, not the whole field
