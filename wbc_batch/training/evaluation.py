"""Calibration, OOD statistics and evaluation of an artifact on labelled class folders."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from wbc_batch import imaging, metrics, splits, storage
from wbc_batch.geometry import model_inputs
from wbc_batch.model import SPLIT_FILE
from wbc_batch.training.augment import dihedral_views
from wbc_batch.training.config import MATURE_CLASSES, TrainingError
from wbc_batch.training.data import list_labelled_files, read_and_hash, read_split_csv

log = logging.getLogger("wbc_batch.training")


def predict_logits(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for uint8 or float images, in batches (float32 0..255 in, as classify does)."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(np.asarray(model.predict_on_batch(images[i : i + batch_size].astype(np.float32))))
    return np.concatenate(out) if out else np.zeros((0, int(model.output_shape[-1])), np.float32)


def dihedral_mean_logits(model: Any, batch: np.ndarray, identity_logits: np.ndarray | None = None) -> np.ndarray:
    """Logits averaged over the 8 rotations and flips of each image of an (N, S, S, 3) batch.

    Why logits and not probabilities: the mean of logits keeps the
    temperature calibration meaningful (one temperature scales the mean).

    Args:
        identity_logits: the batch's own logits when the caller has them
            already; then only the 7 other views run through the network.
    """
    views = dihedral_views(batch).astype(np.float32)  # view-major: the first N are the images as they are
    if identity_logits is None:
        out = np.asarray(model.predict_on_batch(views), np.float32)
    else:
        others = np.asarray(model.predict_on_batch(views[len(batch):]), np.float32)
        out = np.concatenate([np.asarray(identity_logits, np.float32), others])
    return out.reshape(8, len(batch), -1).mean(axis=0)


def predict_embeddings(model: Any, embedding_layer: str, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pooled embeddings (the tensor classify's OOD score reads), in batches, without Grad-CAM's backward pass."""
    import keras

    sub = keras.Model(model.inputs, model.get_layer(embedding_layer).output)
    out = [np.asarray(sub.predict_on_batch(images[i : i + batch_size].astype(np.float32)))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, int(sub.output_shape[-1])), np.float32)


def fit_ood_statistics(model: Any, embedding_layer: str, x_train: np.ndarray, y_train: np.ndarray,
                       x_val: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The OOD statistics classify needs, fitted on train and thresholded on val.

    Why here: the score compares a new image with what *this* network saw,
    so each trained artifact carries its own statistics (``model.json["ood"]``);
    an empty dict (OOD off, with a warning) when the splits are too small.
    """
    from wbc_batch.ood import fit_ood

    if len(x_train) < 2 or len(x_val) < 2:
        log.warning("OOD statistics not fitted: %d train and %d val images", len(x_train), len(x_val))
        return {}
    return fit_ood(
        predict_embeddings(model, embedding_layer, x_train), y_train, x_train,
        predict_embeddings(model, embedding_layer, x_val), x_val, num_classes=num_classes,
    )


def calibration_from_val(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Temperature (NLL on val) and the review threshold on val.

    The threshold is the lowest whose accepted validation cells reach 99.5%
    accuracy with 95% one-sided confidence (Clopper-Pearson), so that it
    still holds on cells the model has not seen.

    Returns:
        ``{"temperature", "review_threshold", "val_coverage", "val_n"}``.
    """
    if len(labels) == 0:
        raise TrainingError("cannot calibrate on an empty validation split")
    temperature = metrics.fit_temperature(logits, labels)
    probs = metrics.softmax(logits, temperature)
    threshold, coverage = metrics.review_threshold_with_margin(probs.max(axis=1), probs.argmax(axis=1) == labels)
    return {
        "temperature": temperature,
        "review_threshold": threshold,
        "val_coverage": coverage,
        "val_n": int(len(labels)),
    }


UNSEEN = "unseen"
"""The ``split`` of images the model's split.csv does not list: a lab's own cells it never trained or tuned on."""


def _in_split(recorded: str | None, split: str) -> bool:
    """An image the split.csv does not list was never trained on: it counts as ``test`` (a lab never seen).

    ``unseen`` keeps only such images, for calibrating on a lab's verified cells.
    """
    if split == UNSEEN:
        return recorded is None
    return recorded == split or (recorded is None and split == "test")


def collect_logits(
    artifact: Any,
    data_uri: str,
    split: str | None = "test",
    split_of: dict[str, str] | None = None,
    batch_size: int = 64,
    tta: bool = False,
) -> dict[str, Any]:
    """Run a loaded artifact over the labelled images of one split.

    Args:
        artifact: a :class:`wbc_batch.model.ModelArtifact`.
        data_uri: class-folder layout, local or ``s3://``.
        split: which split to keep; None for every image.
        split_of: sha256 -> split; None to use every image.
        tta: average the logits over the 8 rotations and flips of each image
            (a cell has no up); the OOD flag still reads the image as given.

    Returns:
        ``{"logits" (N, C), "labels" (N,), "uris", "skipped" [{uri, reason}],
        "ood_flagged" (N,) bool or None when the model has no OOD statistics}``.
    """
    meta = artifact.meta
    label_map = meta.training_data.get("label_map") or splits.DEFAULT_LABEL_MAP
    names = list(meta.class_names)
    chosen, skipped = _images_of_split(list_labelled_files(data_uri, label_map), names, split, split_of)

    import keras

    from wbc_batch.ood import OodScorer

    logits: list[np.ndarray] = []
    labels: list[int] = []
    uris: list[str] = []
    flagged: list[np.ndarray] = []
    both = keras.Model(artifact.model.inputs,
                       [artifact.model.output, artifact.model.get_layer(meta.embedding_layer).output])
    scorer = OodScorer.from_metadata(meta)
    for keep, batch in _decoded_batches(chosen, meta.image_size, batch_size, skipped, meta.field_scale):
        out, emb = both.predict_on_batch(batch)
        if tta:
            out = dihedral_mean_logits(artifact.model, batch, identity_logits=out)
        logits.append(np.asarray(out))
        if scorer is not None:
            flagged.append(scorer.score(np.asarray(emb, np.float32), batch)[1])
        labels.extend(e[1] for e in keep)
        uris.extend(e[0] for e in keep)
    return {
        "logits": np.concatenate(logits) if logits else np.zeros((0, len(names)), np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
        "uris": uris,
        "skipped": skipped,
        "ood_flagged": np.concatenate(flagged) if flagged else None,
    }


def _images_of_split(rows: list[dict[str, Any]], names: list[str], split: str | None,
                     split_of: dict[str, str] | None) -> tuple[list[tuple[str, int, bytes]], list[dict[str, str]]]:
    """(uri, class index, bytes) of the split's images, and the ones skipped for a class the model lacks.

    Every file is read and hashed (8 reads at a time): the split is decided by
    content hash, so a renamed file keeps its split.
    """
    skipped: list[dict[str, str]] = []
    chosen: list[tuple[str, int, bytes]] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for row, (sha, data) in zip(rows, pool.map(lambda r: read_and_hash(r["uri"]), rows)):
            if split is not None and split_of is not None and not _in_split(split_of.get(sha), split):
                continue
            if row["label"] not in names:
                reason = f"class {row['label']!r} is not one of the model's classes"
                skipped.append({"uri": row["uri"], "reason": reason})
                continue
            chosen.append((row["uri"], names.index(row["label"]), data))
    return chosen, skipped


def _decode_or_reason(entry: tuple[str, int, bytes]) -> np.ndarray | str:
    """The decoded RGB image, or why it cannot be decoded."""
    try:
        return imaging.decode_image(entry[2])
    except imaging.ImageDecodeError as exc:
        return str(exc)


def _decoded_batches(chosen: list[tuple[str, int, bytes]], size: int, batch_size: int, skipped: list[dict[str, str]],
                     field_scale: float = 1.0) -> Iterator[tuple[list[tuple[str, int, bytes]], np.ndarray]]:
    """Model-input batches of ``chosen`` (decoded 4 at a time); undecodable images go to ``skipped``."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(chosen), batch_size):
            part = chosen[start : start + batch_size]
            images, keep = [], []
            for entry, rgb in zip(part, pool.map(_decode_or_reason, part)):
                if isinstance(rgb, str):
                    log.warning("skipping %s: %s", entry[0], rgb)
                    skipped.append({"uri": entry[0], "reason": rgb})
                    continue
                images.append(rgb)
                keep.append(entry)
            if images:
                yield keep, model_inputs(images, size, field_scale)[0]


def evaluate(
    model_uri: str | None,
    data_uri: str,
    out_json: str | None = None,
    split: str = "test",
    split_source: str | None = None,
    allow_untrusted: bool = False,
    tta: bool = False,
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate an artifact on labelled images; the figures of ``wbc-batch evaluate``.

    The images of ``split`` are picked by content hash from the ``split.csv``
    of ``split_source`` (default: the model itself), so the test images are
    the ones the model never trained on; an image the split.csv does not list
    (another lab's, say) was never trained on and counts as ``test``. Without
    a split.csv every image is used (``split`` is then reported as ``"all"``).

    Args:
        model_uri: artifact folder or ``s3://`` URI; None for the shipped model.
        data_uri: class-folder layout, local or ``s3://``.
        out_json: where to write the JSON (local path or ``s3://``), optional.
        split: ``train``, ``val``, ``test`` or ``all``.
        split_source: artifact whose split.csv decides the split.
        tta: average logits over the 8 dihedral views (see :func:`collect_logits`).
        classes: the lab's declared class set: the model chooses among these
            (:func:`wbc_batch.metrics.declared_class_logits`); None: every class.

    Returns:
        ``{"model", "data", "split", "n_images", "skipped", "metrics"}`` with
        ``metrics`` as in :func:`wbc_batch.metrics.classification_report`
        plus ``wbc`` (white-cell classes) and ``mature5`` subsets.
    """
    from wbc_batch.model import load_artifact

    if split not in (*splits.SPLITS, "all"):
        raise ValueError(f"expected split to be one of train, val, test, all; got {split!r}")
    artifact = load_artifact(model_uri, allow_untrusted=allow_untrusted)
    split_of = None if split == "all" else read_split_csv(split_source or artifact.uri)
    used_split = split if split_of is not None else "all"
    if split != "all" and split_of is None:
        log.warning("model %s has no %s: evaluating on every image", artifact.uri, SPLIT_FILE)
    got = collect_logits(artifact, data_uri, used_split if split_of is not None else None, split_of, tta=tta)
    if len(got["labels"]) == 0:
        raise ValueError(f"no labelled images of split {used_split!r} under {data_uri} for this model")
    meta = artifact.meta
    got["logits"] = metrics.declared_class_logits(got["logits"], meta.class_names, classes)
    report = metrics.classification_report(
        got["logits"], got["labels"], meta.class_names, meta.temperature, meta.review_threshold,
        subsets={"wbc": meta.wbc_classes, "mature5": list(MATURE_CLASSES)},
    )
    report = metrics.with_intervals(report, got["labels"], got["logits"].argmax(axis=1))
    natural = metrics.natural_mix_report(got["logits"], got["labels"], meta.class_names, meta.temperature,
                                         meta.review_threshold, white_cells=meta.wbc_classes)
    if natural:
        report["natural_mix"] = natural
    if got["ood_flagged"] is not None:
        n_flagged = int(got["ood_flagged"].sum())
        report["ood_flagged"] = {"share": n_flagged / len(got["labels"]), "n": n_flagged,
                                 "ci95": list(metrics.wilson_interval(n_flagged, len(got["labels"])))}
    result = {
        "model": {"uri": artifact.uri, "version": meta.version, "sha256": meta.model_sha256, "digest": artifact.digest},
        "data": str(data_uri),
        "split": used_split,
        "n_images": int(len(got["labels"])),
        "tta": tta,
        "declared_classes": sorted(classes) if classes else None,
        "skipped": got["skipped"],
        "metrics": report,
    }
    if out_json:
        storage.write_bytes(str(out_json), json.dumps(result, indent=2, allow_nan=False).encode())
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A few readable lines of an evaluation result."""
    m = result["metrics"]
    def ci(key: str) -> str:
        low_high = m.get(f"{key}_ci95")
        return f" (95% CI {low_high[0]:.1%}-{low_high[1]:.1%})" if low_high else ""

    lines = [
        f"model {result['model']['version']} on {result['n_images']} images "
        f"({result['split']} split of {result['data']})",
        f"accuracy {m['accuracy']:.2%}{ci('accuracy')}  balanced {m['balanced_accuracy']:.2%}"
        f"{ci('balanced_accuracy')}  macro-F1 {m['macro_f1']:.2%}",
        f"ECE raw {m['ece_raw']:.2%} calibrated {m['ece_calibrated']:.2%} (T={m['temperature']:.3f})",
    ]
    if "natural_mix" in m:
        nm = m["natural_mix"]
        worst = min((f, c) for c, f in nm["f1"].items() if f is not None and c != "non_wbc")
        above = nm["review"]["accuracy_above"]
        lines.append(f"in PBC's natural class mix: white-cell accuracy {nm['wbc_accuracy']:.2%}, lowest white-cell "
                     f"F1 {worst[1]} {worst[0]:.2%}, non_wbc recall {nm.get('non_wbc_recall') or 0:.2%}, "
                     f"ECE {nm['ece_calibrated']:.2%}, {nm['review']['coverage']:.1%} auto-accepted at "
                     + ("n/a" if above is None else f"{above:.2%}"))
    if "ood_flagged" in m:
        f = m["ood_flagged"]
        lines.append(f"out of distribution: {f['n']} of {m['n']} flagged ({f['share']:.1%}, "
                     f"95% CI {f['ci95'][0]:.1%}-{f['ci95'][1]:.1%})")
    if "review" in m:
        r = m["review"]
        acc = "n/a" if r["accuracy_above"] is None else f"{r['accuracy_above']:.2%}"
        lines.append(f"review threshold {r['threshold']:.3f}: {r['coverage']:.1%} of cells above it, accuracy {acc}")
    for key, label in (("wbc", "white-cell classes"), ("mature5", "5 mature classes")):
        if key in m:
            sub = m[key]
            lines.append(f"{label} ({sub['n']} images): accuracy {sub['accuracy']:.2%}  macro-F1 {sub['macro_f1']:.2%}")
    lines.append("recall: " + ", ".join(f"{c} {r:.1%}" for c, r in m["recall"].items() if r is not None))
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} files (see JSON)")
    return "\n".join(lines)


def calibrate(model_uri: str | None, data_uri: str, out_uri: str | None = None,
              version: str | None = None, split: str = "val", allow_untrusted: bool = False) -> dict[str, Any]:
    """Refit temperature and review threshold of an artifact on labelled images it never trained on.

    ``split="val"``: the artifact's own validation split (picked by content
    hash from its split.csv), for recalibrating on the data it was made
    from. ``split="unseen"``: only images its split.csv does not list, such
    as a lab's cells verified in ``wbc-batch review`` after ``adapt``. The
    threshold is the lowest whose accepted cells reach 99.5% accuracy with
    95% confidence; on too few cells none does, and every cell keeps
    needing review.

    Artifacts are immutable: with ``out_uri`` the refitted values go into a
    *new* artifact version there (:func:`wbc_batch.model.write_derived_artifact`),
    which records its parent's digest; the parent is never changed.

    Returns:
        :func:`calibration_from_val` output plus ``val_nll_raw`` and
        ``val_nll_calibrated`` (and ``written`` {uri, version, digest} with ``out_uri``).

    Raises:
        TrainingError: no labelled image of DATA lies in ``split``.
    """
    from wbc_batch.model import load_artifact, write_derived_artifact

    artifact = load_artifact(model_uri, allow_untrusted=allow_untrusted)
    split_of = read_split_csv(artifact.uri)
    if split_of is None and split != UNSEEN:
        raise ValueError(f"model {artifact.uri} has no {SPLIT_FILE}: cannot tell its validation images")
    got = collect_logits(artifact, data_uri, split, split_of or {})
    if len(got["labels"]) == 0:
        raise TrainingError(f"no labelled image of {data_uri} lies in the model's {split!r} images "
                            f"({'none it has not trained on' if split == UNSEEN else 'its validation split'})")
    result: dict[str, Any] = calibration_from_val(got["logits"], got["labels"])
    result["val_nll_raw"] = metrics.nll(got["logits"], got["labels"], 1.0)
    result["val_nll_calibrated"] = metrics.nll(got["logits"], got["labels"], result["temperature"])
    if out_uri:
        new_version = version or f"{artifact.meta.version}+recal"
        where = "the validation split" if split == "val" else "the images it never trained on"
        _, digest = write_derived_artifact(
            artifact.uri, out_uri, {"temperature": result["temperature"], "review_threshold": result["review_threshold"]},
            version=new_version, allow_untrusted=allow_untrusted,
            note=f"temperature and review threshold refitted on {where} of {data_uri} ({result['val_n']} cells)",
        )
        result["written"] = {"uri": out_uri, "version": new_version, "digest": digest}
    return result
