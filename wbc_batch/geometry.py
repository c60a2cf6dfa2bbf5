"""The field of view the network sees: a cell that fills the image is shown at the size it was trained on.

Why: every path resizes the whole image to the model's S x S input, so the
size of the cell *in the input* depends on how the analyser cropped it.
PBC's CellaVision tiles show a white cell at 0.26-0.53 of the tile's side
(the equivalent diameter of the segmented cell, 1st to 99.5th percentile of
the validation split's white cells; median 0.387). A lab that exports tight
crops (a 120 x 120 box around the cell) shows the same cell at 0.6-1.0 of the
side, 2-2.5 times larger, and the shipped model, which has never seen a cell
that large, called 43% of such crops of PBC test cells right (lymphocytes 0%),
against 99.6% for the tiles themselves. Padding the crop back out to the
size the network knows restored 98.8% (MODEL_CARD.md, "Other labs").

So every path that makes a model input (:func:`model_input`: classify,
training, adaptation, evaluate, the explanation tools) segments the cell on
the plain resize, and when the cell takes more than
:data:`MAX_CELL_FRACTION` of the side, zooms the image *out* (pads it with
its own border colour) until the cell takes :data:`TARGET_CELL_FRACTION`.
An image whose cell lies in PBC's range is left exactly as it was.

Only zooming out is done per image. A cell that looks small could be a small
lymphocyte, a platelet (PBC's platelets take 0.16-0.45 of the side) or a
white cell photographed in a wider field; one image cannot tell which.

A lab's labelled cells can tell: ``adapt`` measures the new lab's cells
against the replayed ones class by class (:func:`relative_cell_size`), and
when they differ by more than :data:`FIELD_SCALE_TOLERANCE` the adapted
model carries a *field scale* (:func:`field_scale_for`) that every path
applies to every image before the rule above (:func:`rescale_field`): a
wide field is cropped around its cell, a closer one padded, so that the
lab's cells reach the network at the size it learnt them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wbc_batch.imaging import resize_for_model

MAX_CELL_FRACTION = 0.56
"""Above the largest PBC white cell (99.5th percentile 0.529 of the tile's side on the validation split)."""

TARGET_CELL_FRACTION = 0.387
"""The median PBC white cell (equivalent diameter over the tile's side, validation split)."""

FIELD_SCALE_TOLERANCE = 0.25
"""A lab whose cells are within 25% of the reference's size keeps its images as they are.

Chosen on Chula: ten cells per class from two sets of its slides measured
0.83x and 0.94x PBC's (so a ten-cell estimate moves by about 0.1 within one
lab), and the fold rescaled by 1.21x fell from 61.0% to 52.9% after
adapting. A difference that small is left to the fine-tuning; a field a
third wider (0.61x) gains 10 points from the rescaling (docs/OTHER_LABS.md).
"""


@dataclass(frozen=True)
class ModelInput:
    """One image as the network sees it, with the segmented cell and the zoom that was applied.

    Attributes:
        image: (S, S, 3) uint8.
        cell_mask: (S, S) bool, the segmented cell on ``image`` (all False when none was found).
        zoom: 1.0 when the image was only resized; below 1 when it was zoomed out (0.5: the cell shown at half size).
    """

    image: np.ndarray
    cell_mask: np.ndarray
    zoom: float


def cell_fraction(mask: np.ndarray) -> float | None:
    """Equivalent diameter of the segmented cell over the mask's shorter side; None without a cell."""
    area = float(np.count_nonzero(mask))
    if area == 0:
        return None
    return float(2.0 * np.sqrt(area / np.pi) / min(mask.shape[:2]))


def border_colour(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the image's outermost pixels: the background the padding continues."""
    edge = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.median(edge, axis=0).astype(np.uint8)


def zoom_out(rgb: np.ndarray, zoom: float) -> np.ndarray:
    """The image centred on a larger canvas of its border colour, so that it fills ``zoom`` of each side.

    Why a flat colour and not a mirror: mirrored borders put half-cells
    beside the cell, which the network reads as evidence (a mirrored tight
    crop of PBC cells scored 80% against 98.8% with a flat border).
    """
    if not 0.0 < zoom <= 1.0:
        raise ValueError(f"zoom must lie in (0, 1], got {zoom}")
    h, w = rgb.shape[:2]
    big_h, big_w = max(h, int(round(h / zoom))), max(w, int(round(w / zoom)))
    canvas = np.empty((big_h, big_w, 3), dtype=np.uint8)
    canvas[:] = border_colour(rgb)
    top, left = (big_h - h) // 2, (big_w - w) // 2
    canvas[top : top + h, left : left + w] = rgb
    return canvas


def zoom_for(fraction: float | None) -> float:
    """The zoom that shows a cell of this fraction at :data:`TARGET_CELL_FRACTION`; 1.0 when it is in range."""
    if fraction is None or fraction <= MAX_CELL_FRACTION:
        return 1.0
    return TARGET_CELL_FRACTION / fraction


def touches_border(mask: np.ndarray) -> bool:
    """Whether the segmented cell reaches the image's edge (a crop that cut through it)."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def field_scale_for(ratio: float | None) -> float:
    """The magnification that shows a lab's cells, ``ratio`` times the reference's size, at the reference's size.

    1.0 when the ratio is unknown or within :data:`FIELD_SCALE_TOLERANCE`.
    """
    if ratio is None or not ratio > 0 or abs(ratio - 1.0) <= FIELD_SCALE_TOLERANCE:
        return 1.0
    return round(1.0 / ratio, 3)


def cell_centre(rgb: np.ndarray, image_size: int, scale: float = 1.0) -> tuple[float, float]:
    """(row, col) of the segmented cell's centroid in ``rgb``'s pixels; the image centre without a cell.

    Why at S x ``scale`` px with a model input's kernels: after magnifying by
    ``scale`` the field's cells will be S-px-input sized, so that is the
    resolution at which the segmentation's size rules (tuned on tiles) fit them.
    """
    from wbc_batch.localisation import TILE_SIDE, cell_mask

    h, w = rgb.shape[:2]
    side = max(image_size, int(round(image_size * scale)))
    mask = cell_mask(resize_for_model(rgb, side), image_size / TILE_SIDE)
    if not mask.any():
        return (h - 1) / 2.0, (w - 1) / 2.0
    rows, cols = np.nonzero(mask)
    return (rows.mean() + 0.5) * h / side - 0.5, (cols.mean() + 0.5) * w / side - 0.5


def rescale_field(rgb: np.ndarray, scale: float, image_size: int = 128) -> np.ndarray:
    """The image magnified ``scale`` times: a crop around its cell above 1, padded with its border below 1.

    Why around the cell and not the image centre: a wider field need not
    centre its cell, and a centred crop of 1/scale of the side would cut an
    off-centre cell. The crop keeps the image's aspect and stays inside it
    (shifted, not padded, near an edge), so no invented pixels enter.
    ``image_size`` is the side at which the cell is found.
    """
    if scale == 1.0:
        return rgb
    if not scale > 0:
        raise ValueError(f"field scale must be positive, got {scale}")
    if scale < 1.0:
        return zoom_out(rgb, scale)
    h, w = rgb.shape[:2]
    ch, cw = max(1, int(round(h / scale))), max(1, int(round(w / scale)))
    cy, cx = cell_centre(rgb, image_size, scale)
    top = int(np.clip(round(cy - ch / 2.0), 0, h - ch))
    left = int(np.clip(round(cx - cw / 2.0), 0, w - cw))
    return rgb[top : top + ch, left : left + cw]


def model_input(rgb: np.ndarray, image_size: int, field_scale: float = 1.0) -> ModelInput:
    """The network's input for an RGB image of any size, with its cell mask (see the module docstring).

    Why a second look, only for a cell that touched the edge: a cell cut by
    the crop is segmented smaller than it is, so after the first zoom it can
    still be too large, and the zoomed view, which shows all of it, sets a
    second zoom. A whole cell is measured right the first time; re-measuring
    it on a padded view only adds the segmentation's noise (on PBC it zoomed
    one monocyte to 0.38 instead of 0.64).

    ``field_scale`` is the model's (:func:`rescale_field`), applied first.
    """
    from wbc_batch.localisation import model_input_mask

    rgb = rescale_field(rgb, field_scale, image_size)

    def seen_at(zoom: float) -> ModelInput:
        image = resize_for_model(rgb if zoom == 1.0 else zoom_out(rgb, zoom), image_size)
        return ModelInput(image, model_input_mask(image), zoom)

    seen = seen_at(1.0)
    zoom = zoom_for(cell_fraction(seen.cell_mask))
    if zoom == 1.0:
        return seen
    cut = touches_border(seen.cell_mask)
    seen = seen_at(zoom)
    if cut:
        again = zoom_for(cell_fraction(seen.cell_mask))
        if again != 1.0:
            seen = seen_at(zoom * again)
    return seen


def relative_cell_size(new_fractions: np.ndarray, new_labels: np.ndarray, ref_fractions: np.ndarray,
                       ref_labels: np.ndarray, min_cells: int = 3) -> tuple[float | None, dict[int, float]]:
    """How much larger a new lab's cells look than the reference's: the median over classes of the median ratio.

    Why per class: a lab's class mix is its own, and lymphocytes are a
    third smaller than monocytes, so pooled medians would read the mix as a
    scale. Classes with fewer than ``min_cells`` segmented cells on either
    side are left out; None when no class is left.

    Returns:
        The ratio (None without a class to compare) and each compared class's ratio.
    """
    per_class: dict[int, float] = {}
    for label in sorted(set(int(v) for v in new_labels)):
        a = new_fractions[(new_labels == label) & np.isfinite(new_fractions)]
        b = ref_fractions[(ref_labels == label) & np.isfinite(ref_fractions)]
        if len(a) >= min_cells and len(b) >= min_cells:
            per_class[label] = float(np.median(a) / np.median(b))
    if not per_class:
        return None, per_class
    return float(np.median(list(per_class.values()))), per_class


def view_at(rgb: np.ndarray, zoom: float, field_scale: float = 1.0, image_size: int = 128) -> np.ndarray:
    """The full-size image as the network saw it (the model's field scale, then zoomed out by ``zoom``), for overlays."""
    rgb = rescale_field(rgb, field_scale, image_size)
    return rgb if zoom >= 1.0 else zoom_out(rgb, zoom)


def model_inputs(images: list[np.ndarray], image_size: int,
                 field_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) float32 batch of :func:`model_input` images (0..255, as the network takes them) and (N,) zooms."""
    batch = np.empty((len(images), image_size, image_size, 3), dtype=np.float32)
    zooms = np.ones(len(images), dtype=np.float32)
    for i, rgb in enumerate(images):
        seen = model_input(rgb, image_size, field_scale)
        batch[i], zooms[i] = seen.image, seen.zoom
    return batch, zooms
