"""Verdicts in and labels out: ``wbc-batch import-verdicts`` and ``wbc-batch export-labels``.

Import turns another system's verdicts into the same records the app
writes (one new file, all or nothing). Export copies every verified cell,
byte for byte, into a class-folder layout that ``wbc-batch train`` reads,
which closes the loop from review to retraining.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from wbc_batch import query, storage
from wbc_batch.imaging import IMAGE_EXTENSIONS
from wbc_batch.review.counts import attach_verdicts
from wbc_batch.review.records import (
    AMEND,
    CONFIRM,
    RECLASSIFY,
    VerdictStore,
    make_record,
    read_verdicts,
    signoffs,
    validate_reviewer,
)

__all__ = ["ExportSummary", "export_labels", "import_verdicts"]

_CLASS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_LISTED = 5


def _read_table(path: str) -> pd.DataFrame:
    """A CSV or Parquet file of verdicts as strings."""
    data = storage.read_bytes(path)
    if path.lower().endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pandas().astype("string")
    if path.lower().endswith(".csv"):
        return pd.read_csv(io.StringIO(data.decode("utf-8-sig")), dtype="string", keep_default_na=False)
    raise ValueError(f"expected a .csv or .parquet file of verdicts, got {path}")


def _listing(items: list[str]) -> str:
    return ", ".join(items[:MAX_LISTED]) + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _match_rows(table: pd.DataFrame, rows: pd.DataFrame) -> list[tuple[Mapping[str, Any], str, str | None]]:
    """(prediction row, verified class, reason) per entry; every entry must name a committed, classified cell.

    Raises:
        ValueError: columns missing, unknown cells or classes (the whole file is refused).
    """
    key = "image_uri" if "image_uri" in table.columns else "image_sha256" if "image_sha256" in table.columns else None
    if key is None or "verified_class" not in table.columns:
        raise ValueError(f"expected columns image_uri (or image_sha256) and verified_class, got {', '.join(table.columns)}")
    ok = rows[rows["status"] == "ok"]
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for r in ok.to_dict("records"):
        by_key.setdefault(str(r[key]), []).append(r)
    classes = {c[2:] for c in rows.columns if c.startswith("p_")}
    unknown: list[str] = []
    bad_class: list[str] = []
    out: list[tuple[Mapping[str, Any], str, str | None]] = []
    for entry in table.to_dict("records"):
        ident, cls = str(entry.get(key) or "").strip(), str(entry.get("verified_class") or "").strip()
        if ident not in by_key:
            unknown.append(ident or "(empty)")
            continue
        if cls not in classes:
            bad_class.append(cls or "(empty)")
            continue
        reason = str(entry.get("reason") or "").strip() or None
        out.extend((row, cls, reason) for row in by_key[ident])
    if unknown:
        raise ValueError(f"{len(unknown)} {key} value(s) name no classified cell of the committed results: {_listing(unknown)}")
    if bad_class:
        raise ValueError(f"unknown verified_class {_listing(sorted(set(bad_class)))}; expected one of {', '.join(sorted(classes))}")
    return out


def import_verdicts(output: str, file: str, reviewer: str) -> int:
    """Record the verdicts of a CSV or Parquet file as ``reviewer``'s, the same records the app writes.

    ``FILE`` has ``image_uri`` (or ``image_sha256``) and ``verified_class``,
    optionally ``reason``. A cell of a signed-off sample is recorded as an
    amendment (reason: the file's, else ``imported from <file name>``).

    Returns:
        The number of records written.

    Raises:
        ValueError: a cell or class the results do not know (nothing is written).
    """
    reviewer = validate_reviewer(reviewer)
    name = PurePosixPath(str(file).replace("\\", "/")).name
    rows = query.load_results(output)
    matched = _match_rows(_read_table(file), rows)
    signed = set(signoffs(read_verdicts(output))["sample_id"])
    records = []
    for row, cls, reason in matched:
        sample = str(row["sample_id"] or "")
        if sample in signed:
            action, reason = AMEND, reason or f"imported from {name}"
        else:
            action = CONFIRM if cls == row["predicted_class"] else RECLASSIFY
        records.append(make_record(action=action, reviewer=reviewer, sample_id=sample, row=row, verified_class=cls,
                                   reason=reason, source=f"import:{name}"))
    VerdictStore(output).append(records)
    return len(records)


@dataclass
class ExportSummary:
    """What export-labels did."""

    written: int = 0
    unchanged: int = 0
    changed_since_review: int = 0
    missing: int = 0
    moved: int = 0

    def line(self, dest: str) -> str:
        """One line for the console."""
        return (f"{self.written + self.unchanged} verified cells in {dest} ({self.written} written, {self.unchanged} "
                f"already there, {self.moved} moved to a new class); skipped: {self.changed_since_review} changed "
                f"since review, {self.missing} not found")


def _label_name(uri: str, sha256: str) -> str:
    """``<sha256><ext>``: names never come from input paths, and the same cell always gets the same name."""
    ext = PurePosixPath(uri).suffix.lower()
    return f"{sha256}{ext if ext in IMAGE_EXTENSIONS else '.img'}"


def _existing(dest: str) -> dict[str, list[str]]:
    """Files already under DEST by file name, to find copies left in an old class folder."""
    try:
        files = storage.list_files(dest)
    except FileNotFoundError:
        return {}
    out: dict[str, list[str]] = {}
    for f in files:
        out.setdefault(f.rsplit("/", 1)[-1], []).append(f)
    return out


def export_labels(output: str, dest: str, *, signed_only: bool = False) -> ExportSummary:
    """Copy every verified cell, byte for byte, to ``DEST/<verified_class>/<sha256><ext>``.

    The bytes are checked against the content hash the verdict was given for,
    so an image replaced since its review is skipped, not mislabelled. A copy
    of the same cell under another class folder (the verdict changed since
    an earlier export) is removed. ``DEST/labels.csv`` lists what was
    exported, with the original URI and the reviewer.

    Args:
        output: results location (local or ``s3://``).
        dest: local folder or ``s3://`` prefix.
        signed_only: only cells of signed-off samples.
    """
    rows = attach_verdicts(query.load_results(output), output)
    cells = rows[(rows["status"] == "ok") & rows["verified_class"].notna()]
    if signed_only:
        cells = cells[cells["signed_off_by"].notna()]
    cells = cells.drop_duplicates("image_sha256")
    existing = _existing(dest)
    summary, listing = ExportSummary(), []
    for r in cells.to_dict("records"):
        cls = str(r["verified_class"])
        if not _CLASS_RE.match(cls):
            raise ValueError(f"verified class {cls!r} cannot be a folder name")
        name = _label_name(str(r["image_uri"]), str(r["image_sha256"]))
        target = storage.join(dest, cls, name)
        try:
            data = storage.read_bytes(str(r["image_uri"]))
        except FileNotFoundError:
            summary.missing += 1
            continue
        if hashlib.sha256(data).hexdigest() != r["image_sha256"]:
            summary.changed_since_review += 1
            continue
        stale = [f for f in existing.get(name, []) if f.rsplit("/", 2)[-2] != cls]
        for f in stale:
            storage.delete(f)
        summary.moved += bool(stale)
        if any(f.rsplit("/", 2)[-2] == cls for f in existing.get(name, [])) and storage.read_bytes(target) == data:
            summary.unchanged += 1
        else:
            storage.write_bytes(target, data)
            summary.written += 1
        listing.append({"file": f"{cls}/{name}", "verified_class": cls, "image_uri": r["image_uri"],
                        "image_sha256": r["image_sha256"], "verified_by": r["verified_by"],
                        "verified_at": pd.Timestamp(r["verified_at"]).isoformat(), "signed_off_by": r["signed_off_by"] if pd.notna(r["signed_off_by"]) else ""})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["file", "verified_class", "image_uri", "image_sha256", "verified_by",
                                             "verified_at", "signed_off_by"])
    writer.writeheader()
    writer.writerows(listing)
    storage.write_bytes(storage.join(dest, "labels.csv"), buf.getvalue().encode())
    return summary
