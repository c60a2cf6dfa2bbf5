"""The model registry: promote a candidate only when it beats the current model on held-out images."""

from __future__ import annotations

from typing import Any

from wbc_batch import storage
from wbc_batch.model import META_FILE, MODEL_FILE, SPLIT_FILE
from wbc_batch.training.evaluation import evaluate


def _copy_artifact(src: str, dst: str) -> None:
    """Copy an artifact folder; model.json last so a reader never pairs it with a half-copied model."""
    for name in (MODEL_FILE, SPLIT_FILE, META_FILE):
        try:
            data = storage.read_bytes(storage.join(src, name))
        except FileNotFoundError:
            if name == SPLIT_FILE:
                storage.delete(storage.join(dst, name))
                continue
            raise
        storage.write_bytes(storage.join(dst, name), data)


def _score(report: dict[str, Any]) -> tuple[float, float, float]:
    """Ranking key: macro-F1, then accuracy, then lower NLL."""
    return (round(report["macro_f1"], 6), round(report["accuracy"], 6), -round(report["nll_calibrated"], 6))


def publish(candidate_uri: str, location: str, data_uri: str, split: str = "test") -> dict[str, Any]:
    """Make a candidate the current model at LOCATION only if it beats the current one.

    Both models are evaluated on the *candidate's* held-out split (by content
    hash), on the same images. Layout::

        LOCATION/current/             the model to use
        LOCATION/versions/<version>/  every model ever published, the previous one included

    Returns:
        ``{"promoted", "reason", "current", "candidate" {version, score}, "previous" {version, score} | None}``.
    """
    from wbc_batch.model import read_metadata

    cand_meta = read_metadata(candidate_uri)
    current = storage.join(location, "current")
    cand_eval = evaluate(candidate_uri, data_uri, split=split)
    cand_info = {"version": cand_meta.version, "score": _score(cand_eval["metrics"]), "split": cand_eval["split"]}
    previous: dict[str, Any] | None = None
    if storage.exists(storage.join(current, META_FILE)):
        cur_meta = read_metadata(current)
        if cur_meta.class_names != cand_meta.class_names:
            return {
                "promoted": False,
                "reason": f"class lists differ (current {cur_meta.class_names}, candidate {cand_meta.class_names}); "
                "publish to a new location",
                "current": current, "candidate": cand_info, "previous": None,
            }
        cur_eval = evaluate(current, data_uri, split=split, split_source=candidate_uri)
        previous = {"version": cur_meta.version, "score": _score(cur_eval["metrics"])}
        if not cand_info["score"] > previous["score"]:
            return {
                "promoted": False,
                "reason": f"candidate (macro-F1, accuracy, -NLL) {cand_info['score']} "
                f"does not beat current {previous['score']}",
                "current": current, "candidate": cand_info, "previous": previous,
            }
        _copy_artifact(current, storage.join(location, "versions", cur_meta.version))
    _copy_artifact(candidate_uri, storage.join(location, "versions", cand_meta.version))
    _copy_artifact(candidate_uri, current)
    return {
        "promoted": True,
        "reason": "no current model" if previous is None else "candidate beats current",
        "current": current, "candidate": cand_info, "previous": previous,
    }
