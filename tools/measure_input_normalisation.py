"""Measure whether normalising a new lab's input geometry or colour helps a model without labels.

Each variant rewrites every image of DATA (a class-folder layout) into
WORK/<variant>/<class>/ and runs :func:`wbc_batch.training.evaluation.evaluate`
on it; the variants are what "normalise scale from the segmentation" and
"per-image colour normalisation" would do at inference:

- ``as-is``: the images unchanged.
- ``centre``: a window of the image's short side centred on the segmented
  cell (:func:`wbc_batch.localisation.cell_mask`), edges replicated.
- ``zoom-<z>``: the same window shrunk by ``z`` (the cell grows ``z`` times),
  around the cell when ``centre`` is in the name, else around the image centre.
- ``reinhard``: each image's CIELAB mean and standard deviation moved to the
  mean of those of REFERENCE's images (Reinhard et al., 2001).

Usage::

    python tools/measure_input_normalisation.py ../shared/data/chula ../shared/data/pbc WORK [--model MODEL]

Writes WORK/<variant>.json (the ``evaluate`` figures) and WORK/summary.json,
and prints one line per variant, after the segmented cells' offset from the
window centre and diameter in both labs (``--geometry-only`` stops there). Results are in MODEL_CARD.md, "Other labs".
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from wbc_batch import imaging
from wbc_batch.colour import lab_statistics, transfer_colour
from wbc_batch.localisation import cell_mask
from wbc_batch.training.evaluation import evaluate

Centre = tuple[float, float] | None  # the segmented cell's centroid (x, y); None: no cell found
Variant = Callable[[np.ndarray, Centre], np.ndarray]
REFERENCE_SAMPLE = 300
GEOMETRY_PER_CLASS = 40  # reference cells per class for the size comparison


def square_window(rgb: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """A side x side window centred at (cx, cy); beyond the image the edge pixels repeat."""
    pad = int(side)
    big = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    x0, y0 = int(round(cx - side / 2)) + pad, int(round(cy - side / 2)) + pad
    return big[y0:y0 + int(side), x0:x0 + int(side)]


def segmented(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The decoded image and its cell mask (:func:`wbc_batch.localisation.cell_mask`)."""
    rgb = imaging.decode_image(path.read_bytes())
    return rgb, cell_mask(rgb)


def centroid(mask: np.ndarray) -> Centre:
    """The mask's centre of mass (x, y), or None for an empty mask."""
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def geometric(centre_on_cell: bool, zoom: float) -> Variant:
    """Crop around the cell (or the image centre) so that the cell appears ``zoom`` times larger."""
    def apply(rgb: np.ndarray, centre: Centre) -> np.ndarray:
        h, w = rgb.shape[:2]
        cx, cy = centre if centre_on_cell and centre is not None else (w / 2, h / 2)
        return square_window(rgb, cx, cy, min(h, w) / zoom)
    return apply


def reinhard(reference: list[Path]) -> Variant:
    """Colour transfer to the reference lab's average CIELAB statistics."""
    stats = [lab_statistics(imaging.decode_image(p.read_bytes())) for p in reference]
    mu = np.mean([m for m, _ in stats], axis=0)
    sd = np.mean([s for _, s in stats], axis=0)

    def apply(rgb: np.ndarray, centre: Centre) -> np.ndarray:
        return transfer_colour(rgb, mu, sd)
    return apply


def cell_geometry(masks: list[np.ndarray]) -> dict[str, float]:
    """Median offset of the segmented cell from the window centre (share of the side), its 90th
    percentile, and the median equivalent diameter in pixels of the original image."""
    offsets, diameters = [], []
    for mask in masks:
        centre = centroid(mask)
        if centre is None:
            continue
        h, w = mask.shape
        offsets.append(float(np.hypot(centre[0] / w - 0.5, centre[1] / h - 0.5)))
        diameters.append(float(2 * np.sqrt(mask.sum() / np.pi)))
    return {"segmented": len(offsets) / max(len(masks), 1), "offset_median": float(np.median(offsets)),
            "offset_p90": float(np.percentile(offsets, 90)), "diameter_median_px": float(np.median(diameters))}


def per_class_sample(images: list[Path], classes: set[str], per_class: int, seed: int = 0) -> list[Path]:
    """Up to ``per_class`` images of each class folder named in ``classes`` (any case), fixed seed."""
    rng, by_class = random.Random(seed), dict[str, list[Path]]()
    for path in images:
        if path.parent.name.lower() in classes:
            by_class.setdefault(path.parent.name, []).append(path)
    return [p for paths in by_class.values() for p in rng.sample(paths, min(per_class, len(paths)))]


def class_images(data: Path) -> list[Path]:
    """Every image of a class-folder layout, sorted."""
    return sorted(p for p in data.glob("*/*") if imaging.is_image_name(p.name))


def write_variants(images: list[Path], data: Path, work: Path, variants: dict[str, Variant]) -> list[np.ndarray]:
    """Rewrite each image through every variant as JPEG q95 under WORK/<variant>/<class>/.

    Each image is decoded and segmented once for all variants; its mask is returned for the geometry.
    """
    masks = []
    for path in images:
        rgb, mask = segmented(path)
        masks.append(mask)
        centre = centroid(mask)
        for name, variant in variants.items():
            target = work / name / path.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(imaging.encode_jpeg(np.ascontiguousarray(variant(rgb, centre)), quality=95))
    return masks


def variants(reference: list[Path]) -> dict[str, Variant]:
    """The variants measured, by name."""
    return {
        "as-is": lambda rgb, centre: rgb,
        "centre": geometric(True, 1.0),
        "zoom-1.14": geometric(False, 1.14),
        "centre-zoom-1.14": geometric(True, 1.14),
        "centre-zoom-1.3": geometric(True, 1.3),
        "centre-zoom-1.6": geometric(True, 1.6),
        "reinhard": reinhard(reference),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="the new lab's class folders")
    p.add_argument("reference", type=Path, help="the training lab's class folders (colour reference)")
    p.add_argument("work", type=Path, help="folder for the rewritten images and the figures")
    p.add_argument("--model", default=None, help="artifact to measure (default: the shipped model)")
    p.add_argument("--geometry-only", action="store_true", help="print where and how large the cells are, and stop")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    reference_images, images = class_images(args.reference), class_images(args.data)
    shared = {p.parent.name.lower() for p in images}  # compare the classes both labs have: size differs by class
    chosen = variants(random.Random(0).sample(reference_images, REFERENCE_SAMPLE)) if not args.geometry_only else {}
    geometry = {
        "data": cell_geometry(write_variants(images, args.data, args.work, chosen)),
        "reference": cell_geometry([segmented(p)[1] for p in
                                    per_class_sample(reference_images, shared, GEOMETRY_PER_CLASS)]),
    }
    summary: dict[str, dict[str, float]] = {}
    for lab, g in geometry.items():
        summary[f"geometry_{lab}"] = g
        print(f"{lab:9s} cells: segmented {g['segmented']:.1%}, offset from centre median {g['offset_median']:.1%} "
              f"(p90 {g['offset_p90']:.1%}), diameter median {g['diameter_median_px']:.1f} px", flush=True)
    for name in chosen:
        result = evaluate(args.model, str(args.work / name), out_json=str(args.work / f"{name}.json"), split="all")
        m = result["metrics"]
        summary[name] = {"balanced_accuracy": m["balanced_accuracy"], "ci95": m["balanced_accuracy_ci95"],
                         "ood_flagged": m["ood_flagged"]["share"]}
        lo, hi = m["balanced_accuracy_ci95"]
        print(f"{name:18s} balanced accuracy {m['balanced_accuracy']:.1%} ({lo:.1%}-{hi:.1%}), "
              f"flagged {m['ood_flagged']['share']:.1%}", flush=True)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
