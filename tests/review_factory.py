"""Committed results over real bundled JPEGs with Grad-CAM-like overlays, for the review and report tests.

Rows come from :mod:`tests.results_factory` (the exact Parquet schema a
classify run writes), images from ``samples/pbc``: the tests need no model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tests.results_factory import cell, make_table, write_run
from wbc_batch import storage

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "pbc"
# (sample, source folder, predicted class, confidence): the model's calls, some wrong, some unsure.
LAYOUT: list[tuple[str, str, str, float]] = [
    *[("slide-A", "neutrophil", "neutrophil", c) for c in (0.98, 0.97, 0.95, 0.62)],
    *[("slide-A", "lymphocyte", "lymphocyte", c) for c in (0.99, 0.96)],
    ("slide-A", "monocyte", "lymphocyte", 0.55),  # a monocyte the model called a lymphocyte, flagged
    ("slide-A", "monocyte", "monocyte", 0.93),
    ("slide-A", "eosinophil", "eosinophil", 0.97),
    ("slide-A", "basophil", "basophil", 0.71),
    ("slide-A", "platelet", "non_wbc", 0.99),
    *[("slide-B", "neutrophil", "neutrophil", c) for c in (0.99, 0.98)],
    *[("slide-B", "lymphocyte", "lymphocyte", c) for c in (0.97, 0.58)],
    ("slide-B", "ig", "ig", 0.91),
]


def heatmap_overlay(rgb: np.ndarray) -> bytes:
    """A Grad-CAM-like overlay: a JET blob on the centre of the cell."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    cam = np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2))
    colour = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.imencode(".jpg", cv2.addWeighted(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 0.55, colour, 0.45, 0))[1].tobytes()


def build(base: str, output: str, run_id: str = "run-1") -> list[dict[str, Any]]:
    """Write the images under ``base`` and one committed run under ``output``; returns the row specs."""
    used: dict[str, int] = {}
    specs = []
    for sample, folder, predicted, conf in LAYOUT:
        src = sorted((SAMPLES / folder).iterdir())[used.get(folder, 0)]
        used[folder] = used.get(folder, 0) + 1
        data = src.read_bytes()
        uri = storage.join(base, sample, src.name)
        storage.write_bytes(uri, data)
        sha = hashlib.sha256(data).hexdigest()
        heat = storage.join(output, "heatmaps", sha[:2], f"{sha}-1.0.0.jpg")
        storage.write_bytes(heat, heatmap_overlay(cv2.cvtColor(cv2.imread(str(src)), cv2.COLOR_BGR2RGB)))
        specs.append(cell(uri, sample, predicted, confidence=conf, image_sha256=sha, heatmap_uri=heat,
                          out_of_distribution=(conf == 0.58)))
    specs.append(cell(storage.join(base, "slide-A", "broken.jpg"), "slide-A", None))
    write_run(output, run_id, make_table(specs, run_id))
    return specs
