"""Does the heatmap fall on the white cell? Segmentation by stain colour.

The segmentation only *measures*: the heatmap is never masked or reshaped by
it. A Wright-Giemsa stained leukocyte (nucleus deep purple, cytoplasm pale
blue-violet) is more saturated and more blue than the pink red cells and the
pale background around it; we threshold a "blueness" channel with Otsu,
keep the connected component nearest the centre (CellaVision centres the
cell), and fill its holes.
"""

from __future__ import annotations

import cv2
import numpy as np

from wbc_batch.explain import upsample_cam


def cell_mask(rgb: np.ndarray) -> np.ndarray:
    """Segment the central white cell.

    Args:
        rgb: (H, W, 3) uint8.

    Returns:
        (H, W) bool, True on the cell (nucleus and cytoplasm).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB, got {rgb.shape}")
    img = rgb.astype(np.float32)
    # Stained leukocytes: blue exceeds green strongly; red cells are red > blue.
    blueness = img[..., 2] - img[..., 1]
    blueness = cv2.GaussianBlur(blueness, (0, 0), 2.0)
    norm = cv2.normalize(blueness, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, binary = cv2.threshold(norm, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel, iterations=2)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary)
    if n <= 1:
        return np.zeros(rgb.shape[:2], dtype=bool)
    h, w = rgb.shape[:2]
    centre = np.array([w / 2, h / 2])
    best, best_score = 0, np.inf
    min_area = 0.005 * h * w
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < min_area:
            continue
        inside = labels[h // 2, w // 2] == i
        dist = 0.0 if inside else float(np.linalg.norm(centroids[i] - centre))
        score = dist - 1e-6 * stats[i, cv2.CC_STAT_AREA]
        if score < best_score:
            best, best_score = i, score
    if best == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    mask = (labels == best).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def localisation_metrics(rgb: np.ndarray, cam: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float | bool]:
    """How much of a heatmap lies on the cell.

    Args:
        rgb: (H, W, 3) uint8 original image.
        cam: (h, w) non-negative Grad-CAM map at any resolution.
        mask: optional precomputed :func:`cell_mask`.

    Returns:
        ``cam_in_cell`` (share of the map's mass on the cell, 0..1),
        ``cam_peak_in_cell`` (bool) and ``cell_area_share`` (the cell's share
        of the image: what a map that ignores the cell would score).
    """
    h, w = rgb.shape[:2]
    if mask is None:
        mask = cell_mask(rgb)
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
