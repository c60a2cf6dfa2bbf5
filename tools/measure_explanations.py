"""Measure the shipped model's explanations on its test split: localisation and faithfulness.

Why a script: the figures in docs/EXPLANATIONS.md (and the model card) must be
reproducible from the artifact's own split. Grad-CAM runs on the 128 px model
input exactly as classify does, and the cell is segmented on that input
(``wbc_batch.localisation.model_input_mask``), as the pipeline does per row.

Baselines printed beside the Grad-CAM figures:
- ``cell_area_share``: what a map spread evenly over the image scores;
- a centred Gaussian map (sigma = 1/6 of the side): what "look at the middle"
  scores, since CellaVision centres the cell;
- the cell mask itself averaged down to the map's 16x16 grid ("ideal map"):
  the best ``cam_in_cell`` any map of that resolution can reach once
  upsampled the way the pipeline does (bicubic);
- for faithfulness, random maps (see ``wbc_batch.faithfulness``).

Usage:
    python tools/measure_explanations.py [--model DIR] [--data /work/shared/data/pbc] [--cache /tmp/pbc128.npz]
        [--split test] [--layer NAME] [--faithfulness-n 210] [--out /tmp/explanations.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wbc_batch import imaging  # noqa: E402
from wbc_batch.explain import GradCam  # noqa: E402
from wbc_batch.faithfulness import faithfulness_summary  # noqa: E402
from wbc_batch.geometry import model_inputs  # noqa: E402
from wbc_batch.localisation import cam_on_mask, model_input_mask  # noqa: E402
from wbc_batch.model import SPLIT_FILE, load_artifact, shipped_model_dir  # noqa: E402


def _centre_map(size: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    s = size / 6
    return np.exp(-(((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * s * s))).astype(np.float32)


def _load_inputs(rows: list[dict], data: Path, cache: Path | None, size: int, keep: np.ndarray) -> np.ndarray:
    if cache is not None and cache.is_file():
        return np.load(cache)["X"][keep].astype(np.float32)
    with ThreadPoolExecutor(4) as pool:
        rgbs = list(pool.map(lambda r: imaging.decode_image((data / r["uri"]).read_bytes()), rows))
    return model_inputs(rgbs, size)[0]


def _localise(args: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[dict, dict, dict]:
    model_input, cam, centre = args
    mask = model_input_mask(model_input)  # as classify does
    ideal = cv2.resize(mask.astype(np.float32), cam.shape[::-1], interpolation=cv2.INTER_AREA)
    return cam_on_mask(cam, mask), cam_on_mask(centre, mask), cam_on_mask(ideal, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="artifact folder (default: the shipped model)")
    ap.add_argument("--data", default="/work/shared/data/pbc", help="PBC root holding the split's uris")
    ap.add_argument("--cache", default="/tmp/pbc128.npz", help="decoded 128 px cache in split.csv order (optional)")
    ap.add_argument("--split", default="test", help="which split to measure")
    ap.add_argument("--faithfulness-n", type=int, default=210, help="images for faithfulness (stratified by class); 0 skips it")
    ap.add_argument("--layer", default=None, help="Grad-CAM target layer (default: the artifact's gradcam_layer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    art = load_artifact(args.model)
    meta = art.meta
    with open(Path(args.model or shipped_model_dir()) / SPLIT_FILE, newline="") as fh:
        all_rows = list(csv.DictReader(fh))
    keep = np.array([r["split"] == args.split for r in all_rows])
    rows = [r for r, k in zip(all_rows, keep) if k]
    labels = np.array([meta.class_names.index(r["label"]) for r in rows])
    t0 = time.time()
    X = _load_inputs(rows, Path(args.data), Path(args.cache) if args.cache else None, meta.image_size, keep)
    # The cache must be the classify path's preprocessing: spot-check one image.
    ref = model_inputs([imaging.decode_image((Path(args.data) / rows[0]["uri"]).read_bytes())], meta.image_size)[0]
    assert np.array_equal(ref[0], X[0]), "cache differs from decode_image + model_inputs"

    layer = args.layer or meta.gradcam_layer
    gc = GradCam(art.model, layer, meta.embedding_layer)
    parts = [gc(X[i:i + 64]) for i in range(0, len(X), 64)]
    cams = np.concatenate([p.cams for p in parts])
    targets = np.concatenate([p.targets for p in parts])
    t_cam = time.time() - t0
    centre = _centre_map(cams.shape[1])
    with ThreadPoolExecutor(2) as pool:
        loc = list(pool.map(_localise, [(x.astype(np.uint8), c, centre) for x, c in zip(X, cams)]))
    t_loc = time.time() - t0 - t_cam
    cam_in = np.array([m["cam_in_cell"] for m, _, _ in loc])
    peak_in = np.array([m["cam_peak_in_cell"] for m, _, _ in loc])
    area = np.array([m["cell_area_share"] for m, _, _ in loc])
    centre_in = np.array([c["cam_in_cell"] for _, c, _ in loc])
    centre_peak = np.array([c["cam_peak_in_cell"] for _, c, _ in loc])
    ideal_in = np.array([i["cam_in_cell"] for _, _, i in loc])

    def summary(sel: np.ndarray) -> dict:
        return {
            "n": int(sel.sum()),
            "peak_in_cell": round(float(peak_in[sel].mean()), 4),
            "cam_in_cell_mean": round(float(cam_in[sel].mean()), 4),
            "cam_in_cell_median": round(float(np.median(cam_in[sel])), 4),
            "cell_area_share_mean": round(float(area[sel].mean()), 4),
            "centre_map_cam_in_cell_mean": round(float(centre_in[sel].mean()), 4),
            "centre_map_peak_in_cell": round(float(centre_peak[sel].mean()), 4),
            "ideal_16x16_map_cam_in_cell_mean": round(float(ideal_in[sel].mean()), 4),
            "cam_in_cell_quantiles_10_25_50_75_90": [round(float(q), 3) for q in np.quantile(cam_in[sel], [.1, .25, .5, .75, .9])],
            "cam_in_cell_over_ideal_mean": round(float((cam_in[sel] / np.maximum(ideal_in[sel], 1e-6)).mean()), 4),
            "suspect_share_cam_in_cell_below_0.5": round(float((cam_in[sel] < 0.5).mean()), 4),
            "empty_mask_share": round(float((area[sel] == 0).mean()), 4),
        }

    non_wbc = [meta.class_names.index(c) for c in meta.non_wbc_classes if c in meta.class_names]
    wbc = ~np.isin(labels, non_wbc)
    out: dict = {
        "split": args.split,
        "gradcam_layer": layer,
        "model_version": meta.version,
        "accuracy": round(float((targets == labels).mean()), 4),
        "localisation": {
            "all": summary(np.ones(len(rows), bool)),
            "white_cells": summary(wbc),
            "non_wbc": summary(~wbc),
            "per_class": {c: summary(labels == i) for i, c in enumerate(meta.class_names)},
            "misclassified": summary(targets != labels),
        },
    }
    out["timings_s"] = {"gradcam": round(t_cam, 1), "localisation": round(t_loc, 1)}
    if args.out:  # localisation first: faithfulness is the slow part on CPU
        Path(args.out).write_text(json.dumps(out, indent=2))
    if args.faithfulness_n <= 0:
        print(json.dumps(out, indent=2))
        return
    rng = np.random.default_rng(args.seed)
    per_class = max(1, args.faithfulness_n // len(meta.class_names))
    pick = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == i), min(per_class, int((labels == i).sum())), replace=False)
        for i in range(len(meta.class_names))
    ]))
    t1 = time.time()
    out["faithfulness"] = faithfulness_summary(art.model, X[pick], cams[pick], targets[pick], meta.temperature, args.seed)
    out["timings_s"]["faithfulness"] = round(time.time() - t1, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
