"""Verdicts applied to prediction rows: the verified class per cell, sign-off per sample, model-vs-reviewer agreement.

Kept apart from the SQL of :mod:`wbc_batch.query` so that the differential,
the report, the app and export-labels all apply verdicts by one rule:
a verdict counts for a row with the same ``image_uri`` *and*
``image_sha256`` (:func:`wbc_batch.review.records.current_verdicts`).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import pyarrow as pa

from wbc_batch.review.records import current_verdicts, read_verdicts, signoffs

__all__ = ["AGREEMENT_COLUMNS", "VERDICT_COLUMNS", "agreement_from_frame", "attach_verdicts"]

VERDICT_COLUMNS = ("verified_class", "verified_by", "verified_at", "signed_off_by", "signed_off_at")


def attach_verdicts(frame: pd.DataFrame, verdicts: str | pa.Table) -> pd.DataFrame:
    """Prediction rows with the verdict columns added (null where nobody has reviewed).

    Args:
        frame: prediction rows (any view); needs image_uri, image_sha256, sample_id.
        verdicts: OUTPUT location, or the verdict records already read.

    Returns:
        A copy of ``frame`` plus ``VERDICT_COLUMNS``; row order is kept.
    """
    table = read_verdicts(verdicts) if isinstance(verdicts, str) else verdicts
    out = frame.drop(columns=[c for c in VERDICT_COLUMNS if c in frame.columns])
    cells = current_verdicts(table)[["image_uri", "image_sha256", "verified_class", "verified_by", "verified_at"]]
    signed = signoffs(table)
    out = out.merge(cells, on=["image_uri", "image_sha256"], how="left", validate="many_to_one")
    out = out.merge(signed, on="sample_id", how="left", validate="many_to_one")
    out.index = frame.index
    return out


AGREEMENT_COLUMNS = ["run_id", "run_date", "model_version", "predicted_class", "verified", "agreed",
                     "agreement_pct", "sensitivity_pct"]


def agreement_from_frame(rows: pd.DataFrame, class_names: Iterable[str]) -> pd.DataFrame:
    """Model against reviewer, per run and predicted class: a confusion row plus agreement figures.

    Args:
        rows: every committed ``ok`` row (``predictions_raw``) with :func:`attach_verdicts` applied,
            so a re-run under a new model is compared with the same verdicts.
        class_names: the classes in model order (confusion columns ``as_<class>``).

    Returns:
        One row per run and predicted class, and an ``(all)`` row per run:
        ``verified`` cells with a verdict, ``agreed`` of them, ``agreement_pct``
        (of cells the model put in the class, the share the reviewer kept
        there: the acceptance rate analyser studies report),
        ``sensitivity_pct`` (of cells the reviewer put in the class, the
        share the model had found), then ``as_<class>`` counts of the
        reviewer's classes. Runs without verdicts are left out.
    """
    classes = list(class_names)
    seen = rows[rows["verified_class"].notna() & rows["predicted_class"].notna()] if len(rows) else rows
    extra = sorted(set(seen["verified_class"]) - set(classes)) if len(seen) else []
    columns = AGREEMENT_COLUMNS + [f"as_{c}" for c in classes + extra]
    out: list[dict] = []
    for run_id, run in (seen.groupby("run_id", sort=False) if len(seen) else []):
        first = run.iloc[0]
        base = {"run_id": run_id, "run_date": first.get("run_date"), "model_version": first.get("model_version")}
        for cls in classes + extra + ["(all)"]:
            mine = run if cls == "(all)" else run[run["predicted_class"] == cls]
            truth = run if cls == "(all)" else run[run["verified_class"] == cls]
            if not len(mine) and not len(truth):
                continue
            agreed = int((mine["predicted_class"] == mine["verified_class"]).sum())
            found = int((truth["predicted_class"] == truth["verified_class"]).sum())
            counts = mine["verified_class"].value_counts()
            out.append({**base, "predicted_class": cls, "verified": len(mine), "agreed": agreed,
                        "agreement_pct": 100.0 * agreed / len(mine) if len(mine) else None,
                        "sensitivity_pct": 100.0 * found / len(truth) if len(truth) else None,
                        **{f"as_{c}": int(counts.get(c, 0)) for c in classes + extra}})
    frame = pd.DataFrame(out, columns=columns)
    for col in ("agreement_pct", "sensitivity_pct"):
        frame[col] = frame[col].astype("float64")
    if len(frame):
        frame = frame.sort_values(["run_date", "run_id"], kind="stable", na_position="first").reset_index(drop=True)
    return frame
