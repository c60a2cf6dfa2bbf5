"""Known prediction rows written in the docs/DESIGN.md layout, for query and report tests.

Rows are built with the exact Parquet schema a classify run writes, so the
tests read the same files production does; nothing is mocked. ``read_rows``
reads back what a run wrote (ours or a real classify's) with pyarrow alone.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from wbc_batch import storage

CLASSES = ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil", "non_wbc"]
T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)


def row_schema(classes: list[str]) -> pa.Schema:
    """The prediction row schema of docs/DESIGN.md (run_date is the partition, not a column)."""
    return pa.schema([
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string()),
        pa.field("sample_id", pa.string()),
        pa.field("predicted_class", pa.string()),
        pa.field("confidence", pa.float32()),
        *[pa.field(f"p_{c}", pa.float32()) for c in classes],
        pa.field("needs_review", pa.bool_(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("heatmap_uri", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("model_digest", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("cam_in_cell", pa.float32()),
        pa.field("cam_peak_in_cell", pa.bool_()),
        pa.field("cell_area_share", pa.float32()),
        pa.field("input_zoom", pa.float32()),
        pa.field("explanation_suspect", pa.bool_()),
        pa.field("ood_score", pa.float32()),
        pa.field("out_of_distribution", pa.bool_()),
        pa.field("source_size", pa.int64()),
        pa.field("source_etag", pa.string()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
    ])


def cell(uri: str, sample: str, cls: str | None, confidence: float = 0.97, **extra: Any) -> dict[str, Any]:
    """One image's row values; ``cls=None`` makes an error row."""
    return {"image_uri": uri, "sample_id": sample, "predicted_class": cls, "confidence": confidence, **extra}


def cells(sample: str, counts: dict[str, int], prefix: str = "/in", **extra: Any) -> list[dict[str, Any]]:
    """``counts[cls]`` images of each class in one sample, with distinct URIs."""
    out = []
    for cls, n in counts.items():
        for i in range(n):
            out.append(cell(f"{prefix}/{sample}/{cls}-{i:03d}.jpg", sample, cls, **extra))
    return out


def make_table(specs: list[dict[str, Any]], run_id: str, *, classes: list[str] = CLASSES,
               model_version: str = "1.0.0", processed_at: datetime = T0, review_threshold: float = 0.9) -> pa.Table:
    """Rows of one run with the exact schema; probabilities put ``confidence`` on the predicted class."""
    schema = row_schema(classes)
    rows = []
    for i, s in enumerate(specs):
        cls = s.get("predicted_class")
        ok = cls is not None
        conf = float(s.get("confidence", 0.97)) if ok else None
        ood = bool(s.get("out_of_distribution", False)) if ok else None
        probs = {f"p_{c}": None for c in classes}
        if ok:
            rest = (1 - conf) / (len(classes) - 1)
            probs = {f"p_{c}": (conf if c == cls else rest) for c in classes}
        sha = s.get("image_sha256", hashlib.sha256(s["image_uri"].encode()).hexdigest()) if ok else None
        rows.append({
            "image_uri": s["image_uri"],
            "image_sha256": sha,
            "sample_id": s["sample_id"],
            "predicted_class": cls,
            "confidence": conf,
            **probs,
            "needs_review": bool(s.get("needs_review", ok and (conf < review_threshold or ood))),
            "status": "ok" if ok else "error",
            "error": None if ok else s.get("error", "cannot decode image"),
            "error_kind": None if ok else s.get("error_kind", "permanent"),
            "heatmap_uri": s.get("heatmap_uri"),
            "model_version": model_version,
            "model_sha256": "ab" * 32,
            "model_digest": s.get("model_digest", "cd" * 32),
            "run_id": run_id,
            "processed_at": processed_at + timedelta(seconds=i),
            "image_width": 360 if ok else None,
            "image_height": 363 if ok else None,
            "cam_in_cell": 0.8 if ok else None,
            "cam_peak_in_cell": True if ok else None,
            "cell_area_share": 0.3 if ok else None,
            "explanation_suspect": False if ok else None,
            "ood_score": (5.0 if ood else 1.0) if ok else None,
            "out_of_distribution": ood,
            "source_size": s.get("source_size"),
            "source_etag": s.get("source_etag"),
            "source_mtime": s.get("source_mtime"),
        })
    return pa.Table.from_pylist(rows, schema=schema)


def write_run(output: str, run_id: str, table: pa.Table, *, status: str | None = "succeeded",
              run_date: str = "2026-11-25", parts: int = 1, domain_shift: Any = None,
              finished_at: datetime | None = None, model_version: str = "1.0.0") -> list[str]:
    """Write a run's part files and, unless ``status`` is None, its manifest (last, as classify does)."""
    files = []
    step = max(1, -(-table.num_rows // parts))
    for seq in range(parts):
        buf = io.BytesIO()
        pq.write_table(table.slice(seq * step, step), buf)
        uri = storage.join(output, "predictions", f"run_date={run_date}", f"part-{run_id}-{seq:05d}.parquet")
        storage.write_bytes(uri, buf.getvalue())
        files.append(uri)
    if status is None:
        return files
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    finished = finished_at or (T0 + timedelta(minutes=5))
    manifest = {
        "run_id": run_id,
        "status": status,
        "input": "/in",
        "output": output,
        "model": {"uri": "builtin", "version": model_version, "sha256": "ab" * 32,
                  "class_names": [c[2:] for c in table.column_names if c.startswith("p_")]},
        "started_at": (finished - timedelta(minutes=5)).isoformat(),
        "finished_at": finished.isoformat(),
        "counts": {"total": len(rows), "ok": len(ok), "error": len(rows) - len(ok),
                   "needs_review": sum(r["needs_review"] for r in ok),
                   "out_of_distribution": sum(bool(r["out_of_distribution"]) for r in ok),
                   "per_class": {}, "sample_ids": sorted({r["sample_id"] or "" for r in rows})},
        "timings": {"seconds": 12.5, "images_per_second": len(rows) / 12.5},
        "parquet_files": files,
        "options": {},
        "domain_shift": domain_shift if domain_shift is not None else {"detected": False},
    }
    storage.write_bytes(storage.join(output, "runs", f"{run_id}.json"), json.dumps(manifest).encode())
    return files


def read_rows(output: str) -> Any:
    """All rows under OUTPUT/predictions as a pandas frame (pyarrow, local or S3), run_date from the partition."""
    fs, path = storage.arrow_filesystem(storage.join(output, "predictions"))
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas()
