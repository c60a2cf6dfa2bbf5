"""Training data: list class folders, read, hash, decode and split through Ray Data.

Why Ray Data: the same job scales from a laptop folder to an S3 prefix on a
cluster. The split is decided by content hash (:mod:`wbc_batch.splits`) and
written with the model (``split.csv``), so a fine-tuned model never trains on
its parent's held-out images.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from typing import Any

import numpy as np

from wbc_batch import imaging, splits, storage
from wbc_batch.architecture import cam_grid_size
from wbc_batch.geometry import cell_fraction, model_input
from wbc_batch.model import SPLIT_FILE
from wbc_batch.training.config import TrainConfig, TrainingError
from wbc_batch.training.labs import Lab, class_masks, group_of, lab_class_weights, lab_counts, split_by_lab
from wbc_batch.training.labs import fingerprint as data_fingerprint

log = logging.getLogger("wbc_batch.training")


def list_labelled_files(data_uri: str, label_map: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Image files of a class-folder layout (``DATA/<class>/<file>``) with their labels.

    Files whose name is not an image are skipped with a warning; files that
    merely *look* like images are caught later, when decoding.

    Returns:
        Rows ``{"uri", "rel", "folder", "label"}`` sorted by URI.
    """
    root = str(data_uri).rstrip("/")
    rows: list[dict[str, str]] = []
    for uri in storage.list_files(root):
        rel = uri[len(root) :].lstrip("/")
        parts = rel.split("/")
        if len(parts) < 2:
            log.warning("skipping %s: not inside a class folder", uri)
            continue
        if not imaging.is_image_name(parts[-1]):
            log.warning("skipping %s: not an image file name", uri)
            continue
        folder = parts[0]
        rows.append({"uri": uri, "rel": rel, "folder": folder, "label": splits.label_for_folder(folder, label_map)})
    if not rows:
        raise TrainingError(f"no images in class folders under {data_uri}")
    return rows


def cell_grid(cell_mask: np.ndarray, grid: int) -> np.ndarray:
    """The segmented cell's share of each cell of a ``grid`` x ``grid`` partition of a model input's mask.

    The on-cell loss compares a class-activation map of that grid with it;
    the mask is classify's (:func:`~wbc_batch.geometry.model_input`).
    """
    import cv2

    return cv2.resize(cell_mask.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA)


def decode_batch(batch: dict[str, np.ndarray], image_size: int, grid: int = 0,
                 field_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: read, hash, decode and resize each file.

    Files that are not decodable images keep their row with ``ok=False`` and
    the reason in ``error``, so the driver can warn about each one.

    Args:
        batch: columns ``uri``, ``rel``, ``label`` (object arrays); any other
            column (a sample weight, say) passes through.
        image_size: model input side S.

        grid: with ``grid > 0`` also ``cell_grid`` (B, grid, grid) float32,
            the cell masks the on-cell loss needs.
        field_scale: the magnification every image gets first
            (:func:`~wbc_batch.geometry.rescale_field`; ``adapt`` sets it for
            a lab whose cells are another size).

    Returns:
        The input columns plus ``sha256``, ``ok``, ``error``, ``image``
        (B, S, S, 3) uint8 (zeros on failed rows) and ``cell_fraction`` (B,)
        float32, the cell's size in the image as the network sees it (NaN
        where no cell was segmented; ``adapt`` compares labs by it).
    """
    n = len(batch["uri"])
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    cells = np.zeros((n, grid, grid), dtype=np.float32)
    fraction = np.full(n, np.nan, dtype=np.float32)
    sha = np.empty(n, dtype=object)
    ok = np.zeros(n, dtype=bool)
    error = np.empty(n, dtype=object)
    for i, uri in enumerate(batch["uri"]):
        data = storage.read_bytes(str(uri))
        sha[i] = splits.sha256_hex(data)
        error[i] = ""
        try:
            seen = model_input(imaging.decode_image(data), image_size, field_scale)  # classify's input, zoom included
            images[i] = seen.image
            fraction[i] = cell_fraction(seen.cell_mask) or np.nan
            if grid:
                cells[i] = cell_grid(seen.cell_mask, grid)
            ok[i] = True
        except imaging.ImageDecodeError as exc:
            error[i] = str(exc)
    out = {**batch, "sha256": sha, "ok": ok, "error": error, "image": images, "cell_fraction": fraction}
    if grid:
        out["cell_grid"] = cells
    return out


def _failed_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    bad = ~batch["ok"].astype(bool)
    return {"uri": batch["uri"][bad], "error": batch["error"][bad]}


def _index_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    good = batch["ok"].astype(bool)
    return {k: batch[k][good] for k in ("uri", "rel", "label", "sha256", "lab")}


def _label_and_split(
    batch: dict[str, np.ndarray], split_of: dict[str, str], class_index: dict[str, int], lab_index: dict[str, int]
) -> dict[str, np.ndarray]:
    good = batch["ok"].astype(bool)
    out = {
        "image": batch["image"][good],
        "label_index": np.array([class_index[str(c)] for c in batch["label"][good]], dtype=np.int64),
        "lab_index": np.array([lab_index[str(lab)] for lab in batch["lab"][good]], dtype=np.int64),
        "split": np.array([split_of[str(s)] for s in batch["sha256"][good]], dtype=object),
    }
    if "cell_grid" in batch:
        out["cell_grid"] = batch["cell_grid"][good]
    return out


def only_split(batch: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    keep = batch["split"] == split
    return {k: batch[k][keep] for k in ("image", "label_index", "lab_index", "cell_grid") if k in batch}


def list_lab_files(labs: list[Lab], label_map: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Every lab's labelled files (:func:`list_labelled_files`), each row with its ``lab`` and split ``group``."""
    rows = []
    for lab in labs:
        for row in list_labelled_files(lab.uri, label_map):
            rows.append({**row, "lab": lab.name, "group": group_of(row["rel"].rsplit("/", 1)[-1], lab.split_rule)})
    return rows


def split_csv_text(items: list[splits.LabelledImage], split_of: dict[str, str]) -> str:
    """The ``split.csv`` written with the model: sha256,label,split,uri,lab,group.

    ``uri`` is relative to the lab's root, ``lab`` names the lab (model.json's
    ``training_data.labs`` gives its root and rule) and ``group`` is what the
    lab's split kept together (the file name, a slide or a cell's group).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sha256", "label", "split", "uri", "lab", "group"])
    for it in sorted(items, key=lambda i: (i.lab, i.uri)):
        writer.writerow([it.sha256, it.label, split_of[it.sha256], it.uri, it.lab, it.group])
    return buf.getvalue()


def _split_reader(artifact_uri: str) -> csv.DictReader[str] | None:
    """A reader over an artifact's ``split.csv``; None when it has none."""
    try:
        raw = storage.read_bytes(storage.join(artifact_uri, SPLIT_FILE))
    except FileNotFoundError:
        return None
    return csv.DictReader(io.StringIO(raw.decode("utf-8")))


def read_split_csv(artifact_uri: str, key: str = "sha256") -> dict[str, str] | None:
    """``key`` -> split from an artifact's ``split.csv``; None when it has none.

    ``key`` is ``sha256`` (content hash) or ``uri`` (path relative to DATA:
    choosing replay images by path reads no image bytes).
    """
    reader = _split_reader(artifact_uri)
    if reader is None:
        return None
    if reader.fieldnames is None or not {key, "split"} <= set(reader.fieldnames):
        raise ValueError(f"{SPLIT_FILE} of {artifact_uri} lacks {key}/split columns")
    return {row[key]: row["split"] for row in reader}


def read_split_rows(artifact_uri: str) -> list[dict[str, str]] | None:
    """Every row of an artifact's ``split.csv`` (columns as written: sha256, label, split, uri and, for a
    model of several labs, lab and group); None when it has none."""
    reader = _split_reader(artifact_uri)
    return None if reader is None else list(reader)


def keep_earlier_split(split_of: dict[str, str], earlier: dict[str, str] | None) -> dict[str, str]:
    """The content-hash split, except that images an earlier model held out stay held out.

    Why: a model fine-tuned from another must never train on that model's
    validation or test images, even when the dataset has grown and the
    hash-ordered cut of a class has moved.
    """
    if not earlier:
        return dict(split_of)
    return {sha: (earlier[sha] if earlier.get(sha) in ("val", "test") else split) for sha, split in split_of.items()}


def prepare_data(config: TrainConfig, earlier_split: dict[str, str] | None = None) -> dict[str, Any]:
    """List, read, hash, decode and split DATA through Ray Data."""
    import ray

    rows = list_lab_files(config.labs, config.label_map)
    group_of_uri = {r["uri"]: r["group"] for r in rows}
    grid = cam_grid_size(config.image_size) if config.on_cell_weight > 0 else 0
    ds = ray.data.from_items(rows).map_batches(
        decode_batch,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"image_size": config.image_size, "grid": grid},
        batch_size=config.decode_batch_size,
        batch_format="numpy",
    )
    ds = ds.materialize()
    for bad in ds.map_batches(_failed_rows, batch_format="numpy").take_all():
        log.warning("skipping %s: %s", bad["uri"], bad["error"])
    index = ds.map_batches(_index_rows, batch_format="numpy").take_all()
    items = [
        splits.LabelledImage(str(r["rel"]), str(r["sha256"]), str(r["label"]), str(r["rel"]).split("/")[0],
                             str(r["lab"]), group_of_uri[str(r["uri"])])
        for r in index
    ]
    where = ", ".join(lab.uri for lab in config.labs)
    if not items:
        raise TrainingError(f"no decodable images under {where}")
    classes = sorted({it.label for it in items})
    if len(classes) < 2:
        raise TrainingError(f"expected at least 2 classes under {where}, got {classes}")
    split_of = keep_earlier_split(split_by_lab(items, config.labs), earlier_split)
    class_index = {c: i for i, c in enumerate(classes)}
    lab_index = {lab.name: i for i, lab in enumerate(config.labs)}
    labelled = ds.map_batches(
        _label_and_split, fn_kwargs={"split_of": split_of, "class_index": class_index, "lab_index": lab_index},
        batch_format="numpy",
    ).materialize()
    counts = Counter(split_of[it.sha256] for it in items)
    train_labels = Counter(it.label for it in items if split_of[it.sha256] == "train")
    for name in ("train", "val"):
        if counts.get(name, 0) == 0:
            raise TrainingError(f"the {name} split is empty: {len(items)} images are too few to train")
    for lab in config.labs:
        if not any(it.lab == lab.name and split_of[it.sha256] == "train" for it in items):
            raise TrainingError(f"lab {lab.name!r} ({lab.uri}) has no training image: it is too small to split")
    return {
        "items": items,
        "classes": classes,
        "split_of": split_of,
        "labelled": labelled,
        "split_counts": {s: counts.get(s, 0) for s in splits.SPLITS},
        "train_label_counts": {c: train_labels.get(c, 0) for c in classes},
        "fingerprint": data_fingerprint(items),
        "labs": [lab_counts(items, split_of, lab) for lab in config.labs],
        "lab_class_mask": class_masks(items, config.labs, classes),
        "lab_class_weights": lab_class_weights(items, split_of, config.labs, classes, config.class_weight_factors),
    }


def split_arrays(labelled: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and class indices of one split (:func:`split_columns`)."""
    columns = split_columns(labelled, split)
    return columns["image"], columns["label_index"]


def split_columns(labelled: Any, split: str) -> dict[str, np.ndarray]:
    """``image``, ``label_index`` and ``lab_index`` of one split's images, read in one pass (rows aligned)."""
    ds = labelled.map_batches(only_split, fn_kwargs={"split": split}, batch_format="numpy")
    parts: dict[str, list[np.ndarray]] = {"image": [], "label_index": [], "lab_index": []}
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        for key, values in parts.items():
            values.append(batch[key])
    if not parts["image"]:
        return {"image": np.zeros((0, 1, 1, 3), np.uint8), "label_index": np.zeros(0, np.int64),
                "lab_index": np.zeros(0, np.int64)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def dataset_arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Images and class indices of a (split) dataset as two arrays."""
    xs, ys = [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        xs.append(batch["image"])
        ys.append(batch["label_index"])
    if not xs:
        return np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def read_and_hash(uri: str) -> tuple[str, bytes]:
    data = storage.read_bytes(uri)
    return splits.sha256_hex(data), data


def _decoded_columns(batch: dict[str, np.ndarray], class_index: dict[str, int]) -> dict[str, np.ndarray]:
    good = batch["ok"].astype(bool)
    return {
        "image": batch["image"][good],
        "label_index": np.array([class_index[str(c)] for c in batch["label"][good]], dtype=np.int64),
        "label": batch["label"][good],
        "uri": batch["uri"][good],
        "sha256": batch["sha256"][good],
        "cell_fraction": batch["cell_fraction"][good],
    }


def read_labelled(rows: list[dict[str, str]], image_size: int, class_index: dict[str, int],
                  decode_batch_size: int = 32, field_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Read, hash and decode labelled files through Ray Data into arrays.

    Files that are not images are skipped with a warning naming each.

    Returns:
        ``image`` (N, S, S, 3) uint8, ``label_index`` (N,) int64, ``cell_fraction``
        (N,) float32 (:func:`decode_batch`), and ``label``, ``uri``, ``sha256`` (N,)
        object arrays (one row per decodable file, in no set order).
    """
    import ray

    if not rows:
        return {"image": np.zeros((0, image_size, image_size, 3), np.uint8), "label_index": np.zeros(0, np.int64),
                "cell_fraction": np.zeros(0, np.float32), "label": np.zeros(0, object), "uri": np.zeros(0, object),
                "sha256": np.zeros(0, object)}
    keep = [{k: r[k] for k in ("uri", "rel", "label")} for r in rows]
    ds = ray.data.from_items(keep).map_batches(
        decode_batch,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"image_size": image_size, "field_scale": field_scale}, batch_size=decode_batch_size,
        batch_format="numpy",
    ).materialize()
    for bad in ds.map_batches(_failed_rows, batch_format="numpy").take_all():
        log.warning("skipping %s: %s", bad["uri"], bad["error"])
    parts: dict[str, list[np.ndarray]] = {}
    columns = ds.map_batches(_decoded_columns, fn_kwargs={"class_index": class_index}, batch_format="numpy")
    for batch in columns.iter_batches(batch_size=512, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if "image" not in out:
        return read_labelled([], image_size, class_index)
    return out
