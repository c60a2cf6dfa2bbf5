"""Does the heatmap fall on the white cell? Segmentation by stain colour.

The segmentation only *measures*: the heatmap is never masked or reshaped by
it. A Wright-Giemsa stained leukocyte is bluer than everything around it:
the nucleus is deep purple, the cytoplasm pale blue-violet or lilac, while
red cells are pink and the background cream. On the channel ``B - G``
(blurred) the image therefore has four levels: background < red cells <
cytoplasm < nucleus. Why each step:

1. **Scale per image** between the median (red cells and background, which
   cover most of a CellaVision tile) and the 99.5th percentile (the nucleus),
   so stain strength and white balance (pale-cream or lilac backgrounds)
   drop out.
2. **Seed = nucleus**: Otsu on that scale separates the nucleus; keep the
   nucleus-level component *nearest the centre* (CellaVision centres the
   cell; a platelet or a neighbour's fragment off-centre is ignored).
3. **Grow to the cytoplasm**: pale neutrophil cytoplasm shows on that
   scale only as scattered granules, so the scale is blurred again
   (``DENSITY_SIGMA``) into a granule *density*; a low threshold on it (a
   fraction of the nucleus level) keeps cytoplasm but not red cells. Only
   the part touching the seed counts, within a reach proportional to the
   nucleus size, opened to cut thin bridges to touching red cells, holes
   filled (pale granules, vacuoles).
4. **Check the shape**: a white cell is a compact, near-elliptic blob, so
   the first threshold in ``GROW_FRACTIONS`` (lowest first, to keep pale
   cytoplasm) whose mask is convex (solidity >= ``MIN_SOLIDITY``) *and*
   close to its fitted ellipse (IoU >= ``MIN_ELLIPSE_IOU``) is taken; a mask
   that leaked into a red cell has a bulge and a higher threshold is tried.

Checked by eye on overlays of the bundled samples of every class (platelet
and erythroblast images included); measured figures are in
``docs/EXPLANATIONS.md``. Known weak spots: very pale neutrophil cytoplasm
can be missed (mask = nucleus plus a rim) and a red cell pressed flat
against a monocyte can be included.
"""

from __future__ import annotations

import cv2
import numpy as np

from wbc_batch.explain import upsample_cam

GROW_FRACTIONS: tuple[float, ...] = (0.06, 0.08, 0.10, 0.13, 0.16, 0.20, 0.25, 0.30)
MIN_SOLIDITY = 0.90
MIN_ELLIPSE_IOU = 0.90
DENSITY_SIGMA = 4.0  # pixels of the original image: spreads granules into a density
STAIN_SIGMA = 2.0  # pixels: smooths B - G before the nucleus threshold
MIN_RADIUS = 8.0  # pixels: the reach of a tiny nucleus
TILE_SIDE = 360  # shorter side of a CellaVision DM96 tile, the size the constants here are tuned at
REACH = 1.2  # cytoplasm reaches at most this many nucleus radii beyond the nucleus
MIN_CONTRAST = 10.0  # B-G levels between red cells and nucleus; below: no stained cell


def _ellipse(size: int, pixel_scale: float = 1.0) -> np.ndarray:
    """An elliptic kernel of ``size`` pixels of a full CellaVision tile, scaled (odd, at least 1)."""
    side = max(1, 2 * int(round((size * pixel_scale - 1) / 2)) + 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every hole of a binary mask by drawing its outer contours filled."""
    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(m)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def _touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The connected components of ``mask`` that overlap ``seed``."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8))
    keep = np.zeros(n, dtype=bool)  # a lookup table over the labels: cheaper than np.isin per pixel
    keep[labels[seed]] = True
    keep[0] = False
    return keep[labels]


def _stain_scale(rgb: np.ndarray, pixel_scale: float = 1.0) -> np.ndarray | None:
    """Blurred ``B - G`` scaled to 0 (median: red cells, background) .. 255 (nucleus); None if unstained."""
    img = rgb.astype(np.float32)
    blueness = cv2.GaussianBlur(img[..., 2] - img[..., 1], (0, 0), STAIN_SIGMA * pixel_scale)
    low = float(np.median(blueness))
    high = float(np.percentile(blueness, 99.5))
    if high - low < MIN_CONTRAST:
        return None
    return np.clip((blueness - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)


def _nucleus_seed(scaled: np.ndarray, pixel_scale: float = 1.0) -> np.ndarray | None:
    """The nucleus-level component nearest the image centre, or None."""
    h, w = scaled.shape
    _, binary = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, _ellipse(5, pixel_scale))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(xx - w / 2, yy - h / 2)
    best, best_dist = 0, np.inf
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < 0.002 * h * w:  # dust, granules, a neighbour's edge
            continue
        d = float(dist[labels == i].min())
        if d < best_dist:
            best, best_dist = i, d
    return labels == best if best else None


def _density(scaled: np.ndarray, pixel_scale: float = 1.0) -> np.ndarray:
    """The granule density: the stain scale blurred by ``DENSITY_SIGMA``."""
    return cv2.GaussianBlur(scaled.astype(np.float32), (0, 0), DENSITY_SIGMA * pixel_scale)


def _reach(seed: np.ndarray, pixel_scale: float = 1.0) -> np.ndarray:
    """(H, W) uint8: 1 within ``REACH`` nucleus radii of the seed (a dilation by a disk).

    Identical to ``cv2.dilate(seed, _ellipse(2 * radius + 1))``, computed
    another way because OpenCV dilates with a non-rectangular kernel at a
    cost per pixel *and* per kernel pixel (a 140 px kernel made this the
    largest single cost of classify). Each kernel row ``dy`` is a centred run
    of half-width ``hw[dy]``, so a pixel is set when, in the row ``dy`` away,
    the nearest seed pixel is at most ``hw[dy]`` columns away: one
    horizontal distance per pixel, then one comparison per kernel row, on
    the seed's bounding box grown by the radius (nothing farther can be set).
    """
    radius = int(max(MIN_RADIUS * pixel_scale, REACH * np.sqrt(seed.sum() / np.pi)))
    kernel = _ellipse(2 * radius + 1)
    half_widths = (kernel.sum(axis=1).astype(np.int64) - 1) // 2
    h, w = seed.shape
    ys, xs = np.nonzero(seed)
    y0, y1 = max(int(ys.min()) - radius, 0), min(int(ys.max()) + radius + 1, h)
    x0, x1 = max(int(xs.min()) - radius, 0), min(int(xs.max()) + radius + 1, w)
    box = seed[y0:y1, x0:x1].astype(bool)
    bh, bw = box.shape
    cols = np.arange(bw, dtype=np.int32)
    far = np.int32(4 * (bw + 1))
    left = np.maximum.accumulate(np.where(box, cols, -far), axis=1)
    right = np.minimum.accumulate(np.where(box, cols, 2 * far)[:, ::-1], axis=1)[:, ::-1]
    dist = np.minimum(cols - left, right - cols)  # columns to the nearest seed pixel in the same row
    grown = np.zeros((bh, bw), bool)
    for dy in range(-radius, radius + 1):
        a, b = max(0, -dy), min(bh, bh - dy)  # output rows whose row dy away lies inside the box
        if a < b:
            grown[a:b] |= dist[a + dy:b + dy] <= half_widths[dy + radius]
    out = np.zeros((h, w), np.uint8)
    out[y0:y1, x0:x1] = grown
    return out


def _grow(scaled: np.ndarray, seed: np.ndarray, fraction: float, density: np.ndarray | None = None,
          reach: np.ndarray | None = None, pixel_scale: float = 1.0) -> np.ndarray:
    """Nucleus plus the cytoplasm above ``fraction`` of the nucleus level, touching it and near it.

    ``density`` and ``reach`` do not depend on ``fraction``; :func:`cell_mask`
    computes them once for all the fractions it tries.
    """
    density = _density(scaled, pixel_scale) if density is None else density
    loose: np.ndarray = (density > fraction * 255).astype(np.uint8)
    loose = cv2.morphologyEx(loose, cv2.MORPH_OPEN, _ellipse(9, pixel_scale))
    loose = cv2.morphologyEx(loose, cv2.MORPH_CLOSE, _ellipse(7, pixel_scale))
    loose = _fill_holes(loose | seed.astype(np.uint8))
    cell = _touching(loose, seed).astype(np.uint8)
    cell &= _reach(seed, pixel_scale) if reach is None else reach
    cell = cv2.morphologyEx(cell, cv2.MORPH_OPEN, _ellipse(13, pixel_scale)) | seed.astype(np.uint8)
    return _fill_holes(_touching(cell, seed)).astype(bool)


def _solidity(mask: np.ndarray) -> float:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0.0
    hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
    return float(mask.sum()) / max(hull, 1.0)


def _ellipse_iou(mask: np.ndarray) -> float:
    """Intersection over union of the mask with the ellipse fitted to its largest outline."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    outline = max(contours, key=cv2.contourArea)
    if len(outline) < 5:
        return 0.0
    ellipse = np.zeros(mask.shape, np.uint8)
    cv2.ellipse(ellipse, cv2.fitEllipse(outline), 1, -1)
    fitted = ellipse.astype(bool)
    return float((fitted & mask).sum()) / max(float((fitted | mask).sum()), 1.0)


def cell_mask(rgb: np.ndarray, pixel_scale: float = 1.0) -> np.ndarray:
    """Segment the central white cell (nucleus and cytoplasm).

    Args:
        rgb: (H, W, 3) uint8, the original image (not the model input).
        pixel_scale: pixels of ``rgb`` per pixel of a full-size CellaVision
            tile; the blurs and kernels, tuned at full size, scale with it
            (S / ``TILE_SIDE`` for a model input, see :func:`model_input_mask`).

    Returns:
        (H, W) bool, True on the cell; all False when no stained cell is found.

    Raises:
        ValueError: not an (H, W, 3) image.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB, got {rgb.shape}")
    empty = np.zeros(rgb.shape[:2], dtype=bool)
    scaled = _stain_scale(rgb, pixel_scale)
    if scaled is None:
        return empty
    seed = _nucleus_seed(scaled, pixel_scale)
    if seed is None:
        return empty
    cell = seed
    density, reach = _density(scaled, pixel_scale), _reach(seed, pixel_scale)
    for fraction in GROW_FRACTIONS:
        cell = _grow(scaled, seed, fraction, density, reach, pixel_scale)
        if _solidity(cell) >= MIN_SOLIDITY and _ellipse_iou(cell) >= MIN_ELLIPSE_IOU:
            break
    return cell


def localisation_metrics(rgb: np.ndarray, cam: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float | bool]:
    """How much of a heatmap lies on the cell of an image (segmented here unless ``mask`` is given).

    Args:
        rgb: (H, W, 3) uint8 image.
        cam: (h, w) non-negative Grad-CAM map at any resolution.
        mask: optional precomputed :func:`cell_mask`, (H, W) bool.

    Returns:
        See :func:`cam_on_mask`.
    """
    h, w = rgb.shape[:2]
    if mask is None:
        mask = cell_mask(rgb)
    if mask.shape != (h, w):
        raise ValueError(f"expected mask of shape {(h, w)}, got {mask.shape}")
    return cam_on_mask(cam, mask)


def cam_on_mask(cam: np.ndarray, mask: np.ndarray) -> dict[str, float | bool]:
    """How much of a heatmap lies on a cell mask.

    Args:
        cam: (h, w) non-negative map at any resolution; upsampled (bicubic,
            as drawn) to the mask, never masked.
        mask: (H, W) bool cell mask of the image the map explains.

    Returns:
        ``cam_in_cell`` (share of the map's mass on the cell, 0..1),
        ``cam_peak_in_cell`` (bool) and ``cell_area_share`` (the cell's share
        of the image: what a map that ignores the cell would score). A flat
        (all-zero) map scores 0.0 and False.
    """
    h, w = mask.shape
    up = upsample_cam(cam, w, h)
    total = float(up.sum())
    area = float(mask.mean())
    if total <= 0.0:
        return {"cam_in_cell": 0.0, "cam_peak_in_cell": False, "cell_area_share": area}
    peak = np.unravel_index(int(np.argmax(up)), up.shape)
    return {
        "cam_in_cell": float(up[mask].sum() / total),
        "cam_peak_in_cell": bool(mask[peak]),
        "cell_area_share": area,
    }


def model_input_mask(image: np.ndarray) -> np.ndarray:
    """:func:`cell_mask` of a model input (the whole tile resized to S x S), kernels scaled by S / ``TILE_SIDE``.

    Why: classify needs the cell twice per row, for the OOD size feature and
    for where the heatmap falls, and the model input is the image Grad-CAM
    explains. Segmenting it once, in the read tasks, costs about 2.5 ms at
    128 px against 3.2 + 5.4 ms for the two segmentations it replaces, and
    gives the same figures as segmenting the full tile within 0.0025 of
    ``cam_in_cell`` on average (``docs/EXPLANATIONS.md``).

    Args:
        image: (S, S, 3) uint8 model input.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected (S, S, 3) RGB, got {image.shape}")
    return cell_mask(image, min(image.shape[:2]) / TILE_SIDE)
