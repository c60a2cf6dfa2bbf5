"""Colour transfer between images (wbc_batch.colour), on the bundled sample cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wbc_batch import imaging
from wbc_batch.colour import in_the_colours_of, lab_statistics, transfer_colour


@pytest.fixture(scope="module")
def cells(samples_dir: Path) -> np.ndarray:
    paths = sorted(samples_dir.rglob("*.jpg"))[:6]
    return np.stack([imaging.resize_for_model(imaging.decode_image(p.read_bytes()), 128) for p in paths])


def _washed_out(rgb: np.ndarray, contrast: float, cast: tuple[int, int, int]) -> np.ndarray:
    """Another lab's look: a third of the contrast and a colour cast."""
    x = rgb.astype(np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - mean) * contrast + mean + np.asarray(cast, np.float32), 0, 255).astype(np.uint8)


def test_transfer_moves_an_images_cielab_statistics_to_the_target(cells: np.ndarray) -> None:
    target_mean, target_std = lab_statistics(_washed_out(cells[1], 0.33, (10, -15, 5)))
    moved = transfer_colour(cells[0], target_mean, target_std)
    mean, std = lab_statistics(moved)
    assert np.allclose(mean, target_mean, atol=1.5), (mean, target_mean)
    assert np.allclose(std, target_std, rtol=0.1, atol=0.5), (std, target_std)
    assert moved.dtype == np.uint8 and moved.shape == cells[0].shape


def test_each_image_takes_the_colours_of_one_reference_drawn_by_seed(cells: np.ndarray) -> None:
    references = np.stack([_washed_out(cells[0], 0.33, (0, 0, 0)), _washed_out(cells[1], 0.33, (30, -20, 0))])
    out = in_the_colours_of(cells, references, seed=7)
    assert out.shape == cells.shape
    own_l = [lab_statistics(im)[1][0] for im in cells]
    ref_l = [lab_statistics(im)[1][0] for im in references]
    for im, before in zip(out, own_l):
        after = lab_statistics(im)[1][0]
        assert after < 0.6 * before  # the washed-out look, whatever the cell
        assert min(abs(after - r) for r in ref_l) < 1.5
    assert np.array_equal(out, in_the_colours_of(cells, references, seed=7))  # the same run, the same pixels
    with pytest.raises(ValueError, match="no reference"):
        in_the_colours_of(cells, references[:0], seed=7)
