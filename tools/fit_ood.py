"""Fit the out-of-distribution statistics of a model artifact and measure them.

Training (``wbc-batch train``) and ``wbc-batch adapt`` fit the statistics of
the artifacts they write; this tool is for an existing artifact: one whose
statistics are missing or of an older format, or to measure another
``--fpr``. The statistics only need the model's embeddings of its own
train/val split, so no retraining. The Gaussians are fitted on the train
split, the threshold on the val split at ``--fpr``; the test split and
simulated shifts of its original images (``wbc_batch.ood.SHIFTS``) are
scored for the figures in ``docs/OOD.md``.

Artifacts are immutable: the refitted statistics become a new version in a
new folder (``--out``, ``--version``) written by
``wbc_batch.model.write_derived_artifact``, which records the parent's
digest; the parent is left as it was.

Images come from ``--cache`` (an npz with X (N,S,S,3) uint8 model inputs, y,
s = split name, classes; made with the classify preprocessing) when given,
else from ``--data`` (the labelled class folders) and the artifact's
``split.csv``. Shifts are applied to the original test images from
``--data`` when that folder exists, else to the cached model inputs.

Usage: python tools/fit_ood.py [--model DIR] (--out NEW_DIR [--version V] | --dry-run) [--cache X.npz]
                               [--data DIR] [--fpr 0.03] [--report OUT.json] [--work-cache /tmp/ood-work.npz]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wbc_batch.geometry import model_input  # noqa: E402
from wbc_batch.imaging import decode_image  # noqa: E402
from wbc_batch.model import (  # noqa: E402
    SPLIT_FILE,
    ModelMetadata,
    load_artifact,
    shipped_model_dir,
    write_derived_artifact,
)
from wbc_batch.ood import (  # noqa: E402
    DEFAULT_FPR,
    QUALITY_FEATURES,
    SHIFTS,
    OodScorer,
    fit_ood,
    quality_features,
    simulate_shift,
)
from wbc_batch.training import predict_embeddings  # noqa: E402

DEFAULT_DATA = "/work/shared/data/pbc"


class WorkCache:
    """Embeddings and quality features per named input set, saved between runs.

    Embedding 10k images takes minutes on a shared CPU; re-running the tool
    (another --fpr, a fix to the report) should not pay that again. Entries
    are keyed by the model's sha256 and the feature list, so a cache made for
    another model or feature set is ignored.
    """

    def __init__(self, path: str | None, model_sha256: str) -> None:
        self.path = path
        self.tag = f"{model_sha256[:16]}|{','.join(QUALITY_FEATURES)}"
        self.data: dict[str, np.ndarray] = {}
        if path and os.path.isfile(path):
            with np.load(path, allow_pickle=False) as d:
                if str(d["tag"]) == self.tag:
                    self.data = {k: d[k] for k in d.files if k != "tag"}

    def get(self, name: str, model: Any, embedding_layer: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, quality features) of ``images``, computed once per name."""
        if f"{name}/emb" in self.data and len(self.data[f"{name}/emb"]) == len(images):
            return self.data[f"{name}/emb"], self.data[f"{name}/feat"]
        emb, feat = predict_embeddings(model, embedding_layer, images, 256), quality_features(images)
        self.data[f"{name}/emb"], self.data[f"{name}/feat"] = emb, feat
        if self.path:
            np.savez(self.path, tag=np.array(self.tag), **self.data)
        return emb, feat


def read_split(model_dir: Path) -> list[dict[str, str]]:
    """Rows of the artifact's split.csv (sha256, label, split, uri relative to the data folder)."""
    path = model_dir / SPLIT_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass --cache or use an artifact with {SPLIT_FILE}")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_labelled(
    args: argparse.Namespace, meta: ModelMetadata, model_dir: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs, class indices and split names of every labelled image."""
    if args.cache:
        d = np.load(args.cache, allow_pickle=False)
        if list(d["classes"]) != list(meta.class_names):
            raise SystemExit(f"error: cache classes {list(d['classes'])} differ from the model's {meta.class_names}")
        return d["X"], d["y"].astype(np.int64), d["s"].astype(str)
    rows = read_split(model_dir)
    index = {c: i for i, c in enumerate(meta.class_names)}
    images = np.empty((len(rows), meta.image_size, meta.image_size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        with open(os.path.join(args.data, row["uri"]), "rb") as fh:
            images[i] = model_input(decode_image(fh.read()), meta.image_size).image
    labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    return images, labels, np.array([r["split"] for r in rows])


def shift_originals(
    args: argparse.Namespace, model_dir: Path, fallback: np.ndarray
) -> tuple[list[np.ndarray], str, str]:
    """Full-resolution test images for the shifts, or the model inputs when the folder is absent.

    Returns:
        The images, a description for the report and a cache key for the source.
    """
    if args.data and os.path.isdir(args.data) and (model_dir / SPLIT_FILE).is_file():
        rows = [r for r in read_split(model_dir) if r["split"] == "test"]
        out = []
        for r in rows:
            with open(os.path.join(args.data, r["uri"]), "rb") as fh:
                out.append(decode_image(fh.read()))
        return out, f"original test images from {args.data}", "original"
    return list(fallback), "cached model inputs of the test split (originals not available)", "input"


def write_ood(parent: Path, out: str, stats: dict[str, Any], version: str) -> tuple[ModelMetadata, str]:
    """Write ``parent`` with these OOD statistics as a new artifact version at ``out``.

    Returns:
        The new metadata and the new artifact's digest.

    Raises:
        ModelArtifactError: ``out`` holds files, ``version`` is the parent's,
            or the statistics are not what the loader accepts.
    """
    ev = stats.get("evaluation", {})
    figures = f"; test flagged {ev['test_flagged']:.1%}" if "test_flagged" in ev else ""
    note = (f"OOD statistics refitted with tools/fit_ood.py (format {stats.get('format')}, "
            f"threshold at {stats.get('fpr_target', DEFAULT_FPR):.1%} val FPR{figures})")
    return write_derived_artifact(parent, out, {"ood": stats}, version=version, note=note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shipped_model_dir()), help="artifact folder to refit (local; left unchanged)")
    ap.add_argument("--out", default=None, help="new folder for the derived artifact (required unless --dry-run)")
    ap.add_argument("--version", default=None, help="version of the derived artifact (default: <parent version>+ood)")
    ap.add_argument(
        "--cache", default=None, help="npz of decoded model inputs (X, y, s, classes); default: decode --data"
    )
    ap.add_argument("--data", default=DEFAULT_DATA, help="labelled class folders that split.csv's uris are relative to")
    ap.add_argument("--fpr", type=float, default=DEFAULT_FPR, help="share of validation images to flag")
    ap.add_argument("--dry-run", action="store_true", help="measure only; write no artifact")
    ap.add_argument("--report", default=None, help="also write the evaluation figures to this JSON file")
    ap.add_argument("--work-cache", default=None, help="npz to keep embeddings and features in between runs")
    args = ap.parse_args()
    if not args.dry_run and not args.out:
        ap.error("--out is required (artifacts are immutable: refitted statistics make a new version), or --dry-run")

    model_dir = Path(args.model)
    art = load_artifact(model_dir)
    meta = art.meta
    t0 = time.time()
    cache = WorkCache(args.work_cache, meta.model_sha256)
    images, labels, split = load_labelled(args, meta, model_dir)
    source = "labelled/cache" if args.cache else "labelled/data"  # the two may order images differently
    emb, feats = cache.get(source, art.model, meta.embedding_layer, images)
    print(f"embedded and measured {len(images)} images in {time.time() - t0:.0f} s", file=sys.stderr)
    tr, va, te = split == "train", split == "val", split == "test"
    stats = fit_ood(
        emb[tr],
        labels[tr],
        None,
        emb[va],
        None,
        fpr=args.fpr,
        num_classes=len(meta.class_names),
        features_train=feats[tr],
        features_val=feats[va],
    )
    scorer = OodScorer(stats)

    def flagged(e: np.ndarray, f: np.ndarray) -> np.ndarray:
        return scorer.score_features(e, f)[1]

    test_flags = flagged(emb[te], feats[te])
    per_class = {c: round(float(test_flags[labels[te] == i].mean()), 4) for i, c in enumerate(meta.class_names)}
    originals, source, key = shift_originals(args, model_dir, images[te])
    shifts: dict[str, float] = {}
    for kind in SHIFTS:
        shifted = np.stack([model_input(simulate_shift(o, kind), meta.image_size).image for o in originals])
        emb_s, feat_s = cache.get(f"shift/{key}/{kind}", art.model, meta.embedding_layer, shifted)
        shifts[kind] = round(float(flagged(emb_s, feat_s).mean()), 4)
        print(f"{kind}: {shifts[kind]:.1%} flagged", file=sys.stderr)
    stats["evaluation"] = {
        "val_flagged": round(stats["val_flagged_share"], 4),
        "test_flagged": round(float(test_flags.mean()), 4),
        "test_flagged_per_class": per_class,
        "n_test": int(te.sum()),
        "shifted_test_flagged": shifts,
        "shift_source": source,
    }
    print(json.dumps(stats["evaluation"], indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(stats["evaluation"], indent=2))
    if not args.dry_run:
        new_meta, digest = write_ood(model_dir, args.out, stats, args.version or f"{meta.version}+ood")
        print(f"wrote {args.out}: version {new_meta.version}, artifact digest {digest}", file=sys.stderr)


if __name__ == "__main__":
    main()
