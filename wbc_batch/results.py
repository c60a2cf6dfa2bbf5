"""Writing results: the Parquet schema, part files and run manifests.

Commit protocol (see docs/DESIGN.md): part files are named
``part-<run_id>-<nnnnn>.parquet`` so a re-run of the same run id rewrites the
same names; the run manifest ``runs/<run_id>.json`` with ``status:
succeeded`` is written last and is the only thing that makes a run's rows
count. A run killed at any point therefore leaves nothing that queries see.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wbc_batch import storage

PREDICTIONS_DIR = "predictions"
HEATMAPS_DIR = "heatmaps"
RUNS_DIR = "runs"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_run_id(run_id: str) -> str:
    """Run ids become file names: letters, digits, '.', '_' and '-' only."""
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' (max 128)")
    return run_id


def prediction_schema(class_names: list[str]) -> pa.Schema:
    """The Arrow schema of a prediction row for a model with these classes."""
    fields = [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string()),
        pa.field("sample_id", pa.string()),
        pa.field("predicted_class", pa.string()),
        pa.field("confidence", pa.float32()),
        *[pa.field(f"p_{c}", pa.float32()) for c in class_names],
        pa.field("needs_review", pa.bool_(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("heatmap_uri", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        # digest over every file of the artifact (model.artifact_digest); absent from Parquet written before it
        pa.field("model_digest", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("cam_in_cell", pa.float32()),
        pa.field("cam_peak_in_cell", pa.bool_()),
        pa.field("cell_area_share", pa.float32()),
        pa.field("explanation_suspect", pa.bool_()),
        pa.field("ood_score", pa.float32()),
        pa.field("out_of_distribution", pa.bool_()),
        # what the input listing said of the image (storage.list_entries): nightly's change detection
        # compares them and reads only what changed; null when unknown and in Parquet written before them
        *SOURCE_FIELDS,
    ]
    return pa.schema(fields)


SOURCE_FIELDS = (
    pa.field("source_size", pa.int64()),
    pa.field("source_etag", pa.string()),
    pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
)
SOURCE_COLUMNS = tuple(f.name for f in SOURCE_FIELDS)


def attach_source(table: pa.Table, listing: pa.Table, position: dict[str, int]) -> pa.Table:
    """Fill a batch's ``source_*`` columns from the input listing.

    Args:
        table: rows of the prediction schema.
        listing: :func:`wbc_batch.storage.list_entries` of the run's input.
        position: image URI -> row of ``listing`` (URIs not in it get nulls).
    """
    idx = pa.array([position.get(u) for u in table.column("image_uri").to_pylist()], type=pa.int64())
    for name in SOURCE_COLUMNS:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), listing.column(name).take(idx).cast(table.schema.field(i).type))
    return table


def _column(values: Any, typ: pa.DataType, valid: np.ndarray | None) -> pa.Array:
    arr = np.asarray(values)
    if pa.types.is_string(typ):
        keep = valid if valid is not None else np.ones(len(arr), dtype=bool)
        # The pipeline marks "no value" with "" (stable column types across blocks).
        items = [str(v) if (ok and v is not None and v == v and str(v) != "") else None for v, ok in zip(arr.tolist(), keep)]
        return pa.array(items, type=typ)
    mask = None if valid is None else ~valid
    if pa.types.is_floating(typ):
        data = arr.astype(np.float32)
        nan = np.isnan(data)
        mask = nan if mask is None else (mask | nan)
        return pa.array(data, type=typ, mask=mask)
    if pa.types.is_timestamp(typ):
        return pa.array(arr.astype("datetime64[us]"), type=pa.timestamp("us")).cast(typ)
    return pa.array(arr, type=typ, mask=mask)


def batch_to_table(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Turn a numpy batch from the pipeline into a table of exactly this schema.

    Values of rows where ``status != "ok"`` become null for the columns that
    only make sense for a classified image.
    """
    n = len(batch["image_uri"])
    ok = np.asarray(batch["status"]) == "ok"
    ok_only = {"predicted_class", "confidence", "cam_in_cell", "cam_peak_in_cell", "cell_area_share",
               "explanation_suspect", "ood_score", "out_of_distribution"}
    arrays = []
    for f in schema:
        if f.name not in batch:
            arrays.append(pa.nulls(n, type=f.type))
            continue
        valid = ok if (f.name in ok_only or f.name.startswith("p_")) else None
        arrays.append(_column(batch[f.name], f.type, valid))
    return pa.Table.from_arrays(arrays, schema=schema)


def part_file_uri(output: str, run_date: str, run_id: str, seq: int) -> str:
    """Where part ``seq`` of a run goes."""
    return storage.join(output, PREDICTIONS_DIR, f"run_date={run_date}", f"part-{run_id}-{seq:05d}.parquet")


def heatmap_uri(output: str, image_sha256: str, model_version: str) -> str:
    """Heatmaps are named from content hash and model version, never from the input path."""
    return storage.join(output, HEATMAPS_DIR, image_sha256[:2], f"{image_sha256}-{model_version}.jpg")


def manifest_uri(output: str, run_id: str) -> str:
    """The run manifest (commit marker) of a run."""
    return storage.join(output, RUNS_DIR, f"{run_id}.json")


_PART_RE = re.compile(r"^part-(?P<run_id>.+)-(?P<seq>\d{5})\.parquet$")


def part_run_id(file_name: str) -> str | None:
    """The run id a part file belongs to (``part-<run_id>-<nnnnn>.parquet``), or None."""
    match = _PART_RE.match(file_name)
    return match.group("run_id") if match else None


def discard_previous_attempt(output: str, run_id: str) -> int:
    """Remove the manifest and part files of an earlier attempt with this run id.

    The manifest goes first, so the old rows stop counting before any file is
    removed. Returns the number of part files removed.
    """
    storage.delete(manifest_uri(output, run_id))
    prefix = storage.join(output, PREDICTIONS_DIR)
    try:
        files = storage.list_files(prefix)
    except FileNotFoundError:
        return 0
    stale = [f for f in files if part_run_id(f.rsplit("/", 1)[-1]) == run_id]
    for f in stale:
        storage.delete(f)
    return len(stale)


@dataclass
class RunCounts:
    """Counters accumulated while the rows stream past."""

    total: int = 0
    ok: int = 0
    error: int = 0
    needs_review: int = 0
    out_of_distribution: int = 0
    explanation_suspect: int = 0
    per_class: Counter = field(default_factory=Counter)
    errors_by_kind: Counter = field(default_factory=Counter)
    per_sample: dict[str, list[int]] = field(default_factory=dict)

    def add(self, table: pa.Table) -> None:
        """Count one batch of rows."""
        cols = table.to_pydict()
        for i in range(table.num_rows):
            self.total += 1
            sample = cols["sample_id"][i] or ""
            entry = self.per_sample.setdefault(sample, [0, 0])
            if cols["status"][i] != "ok":
                self.error += 1
                self.errors_by_kind[cols["error_kind"][i] or "unknown"] += 1
                continue
            self.ok += 1
            entry[0] += 1
            self.per_class[cols["predicted_class"][i]] += 1
            self.needs_review += bool(cols["needs_review"][i])
            self.explanation_suspect += bool(cols["explanation_suspect"][i])
            if cols["out_of_distribution"][i]:
                self.out_of_distribution += 1
                entry[1] += 1

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {
            "total": self.total,
            "ok": self.ok,
            "error": self.error,
            "needs_review": self.needs_review,
            "out_of_distribution": self.out_of_distribution,
            "explanation_suspect": self.explanation_suspect,
            "per_class": dict(sorted(self.per_class.items())),
            "errors_by_kind": dict(self.errors_by_kind),
            "samples": len(self.per_sample),
            # which samples the run touched: a report reads the parts of an earlier run only when it shares one
            "sample_ids": sorted(self.per_sample),
        }


class PartWriter:
    """Streams tables into a run's part files of bounded size (no small-file explosion)."""

    def __init__(self, output: str, run_date: str, run_id: str, schema: pa.Schema, rows_per_file: int = 100_000) -> None:
        self.output, self.run_date, self.run_id, self.schema = output, run_date, run_id, schema
        self.rows_per_file = rows_per_file
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.files: list[str] = []

    def add(self, table: pa.Table) -> None:
        """Buffer rows and flush a part file when it is full."""
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next part file."""
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        uri = part_file_uri(self.output, self.run_date, self.run_id, len(self.files))
        storage.write_bytes(uri, buf.getvalue())
        self.files.append(uri)
        self._pending, self._pending_rows = [], 0

    def close(self) -> list[str]:
        """Flush what is left; returns every part file written."""
        self.flush()
        return self.files


def write_manifest(output: str, manifest: dict[str, Any]) -> str:
    """Write the run manifest: the commit marker, so always the last write of a run."""
    uri = manifest_uri(output, manifest["run_id"])
    storage.write_bytes(uri, json.dumps(manifest, indent=2, default=str).encode())
    return uri
