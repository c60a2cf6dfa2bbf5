"""Measure how a model reads its own lab's validation cells in another lab's colours, or at lower contrast.

Why: a lab the model never saw differs in colour, contrast, focus, scale
and cell shapes at once; this separates colour and contrast from the rest.
Each of N validation cells of DATA (the base's split.csv says which) is
read as classify reads it, then shown:

- ``as-is``;
- ``lab-colours``: in the CIELAB mean and spread of a random image of LAB
  (:func:`wbc_batch.colour.in_the_colours_of`, what ``adapt --lab-colours`` trains on);
- ``lab-lightness`` / ``lab-chroma``: only the L, or only the a and b channels moved;
- ``contrast-<c>``: every channel's deviation from the image mean scaled by ``c``.

Usage::

    python tools/measure_colour_sensitivity.py ../shared/data/pbc ../shared/data/chula [--model MODEL] [--n 400]

Prints one accuracy per variant and writes them as JSON with ``--out``.
Results are in docs/OTHER_LABS.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from wbc_batch import splits
from wbc_batch.colour import in_the_colours_of, lab_statistics, transfer_colour
from wbc_batch.model import load_artifact
from wbc_batch.training.data import list_labelled_files, read_labelled, read_split_csv
from wbc_batch.training.evaluation import predict_logits

CONTRASTS = (0.6, 0.45, 0.3)


def channels_moved(images: np.ndarray, references: np.ndarray, channels: list[int], seed: int) -> np.ndarray:
    """Each image with only the given CIELAB channels moved to a random reference's statistics.

    The other channels keep the image's own statistics, which the transfer leaves as they are.
    """
    picks = np.random.default_rng(seed).integers(len(references), size=len(images))
    out = []
    for rgb, k in zip(images, picks):
        (mean, std), (ref_mean, ref_std) = lab_statistics(rgb), lab_statistics(references[k])
        mean[channels], std[channels] = ref_mean[channels], ref_std[channels]
        out.append(transfer_colour(rgb, mean, std))
    return np.stack(out)


def with_contrast(images: np.ndarray, contrast: float) -> np.ndarray:
    """Every channel's deviation from its image mean scaled by ``contrast``."""
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return np.clip(np.rint((x - mean) * contrast + mean), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="the model's own lab: class folders holding its validation images")
    ap.add_argument("lab", type=Path, help="another lab's images (class folders; labels unused)")
    ap.add_argument("--model", default=None, help="artifact (default: the shipped model)")
    ap.add_argument("--n", type=int, default=400, help="validation cells of the white-cell classes (default 400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the accuracies here as JSON")
    args = ap.parse_args(argv)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = load_artifact(args.model)
    classes = list(base.meta.class_names)
    class_index = {c: i for i, c in enumerate(classes)}
    label_map = base.meta.training_data.get("label_map") or dict(splits.DEFAULT_LABEL_MAP)
    side = read_split_csv(str(base.uri), key="uri") or {}
    rows = [r for r in list_labelled_files(str(args.data), label_map)
            if side.get(r["rel"]) == "val" and r["label"] in base.meta.wbc_classes]
    random.Random(args.seed).shuffle(rows)
    size = int(base.meta.image_size)
    cells = read_labelled(rows[: args.n], size, class_index)
    if len(cells["label_index"]) == 0:
        raise SystemExit(f"no validation cells of {args.model or 'the shipped model'} under {args.data}")
    others = read_labelled([r for r in list_labelled_files(str(args.lab), label_map) if r["label"] in class_index],
                           size, class_index)["image"]
    images = cells["image"]
    variants = {
        "as-is": images,
        "lab-colours": in_the_colours_of(images, others, args.seed),
        "lab-lightness": channels_moved(images, others, [0], args.seed),
        "lab-chroma": channels_moved(images, others, [1, 2], args.seed),
        **{f"contrast-{c}": with_contrast(images, c) for c in CONTRASTS},
    }
    result = {"n": int(len(images))}
    for name, batch in variants.items():
        accuracy = float((predict_logits(base.model, batch).argmax(1) == cells["label_index"]).mean())
        result[name] = round(accuracy, 4)
        print(f"{name}: {accuracy:.1%}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
