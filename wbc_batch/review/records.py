"""Verdict records: the one schema, the append-only store under ``OUTPUT/reviews/``, the current state.

A verdict is never updated in place. Every write (one keystroke in the app,
one imported file) becomes a new Parquet file with a name nobody else can
pick (UTC time plus a random suffix), created with "write only if absent",
so two reviewers writing at the same moment, from one app or from two, both
keep their records, and the prediction results are never touched. The
current state (what a cell is, whether a sample is signed) is derived by
reading every record: the latest cell verdict wins, the first sign-off
stands.

Files: ``OUTPUT/reviews/verdicts-<YYYYMMDDTHHMMSSffffff>Z-<hex12>.parquet``.
"""

from __future__ import annotations

import io
import re
import secrets
import threading
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from wbc_batch import storage

__all__ = [
    "ACTIONS", "CELL_ACTIONS", "REVIEWS_DIR", "VERDICT_SCHEMA", "VerdictStore", "current_verdicts", "make_record",
    "read_verdicts", "signoffs", "validate_reviewer",
]

REVIEWS_DIR = "reviews"
CONFIRM, RECLASSIFY, SIGN_OFF, AMEND = "confirm", "reclassify", "sign-off", "amend"
ACTIONS = (CONFIRM, RECLASSIFY, SIGN_OFF, AMEND)
CELL_ACTIONS = (CONFIRM, RECLASSIFY, AMEND)
MAX_REVIEWER = 80
MAX_REASON = 500
PARALLEL_FROM = 16  # below this many new files, threads (each with a new S3 client) cost more than they save
_FILE_RE = re.compile(r"^verdicts-\d{8}T\d{12}Z-[0-9a-f]{12}\.parquet$")
_REVIEWER_RE = re.compile(r"^[^\x00-\x1f\x7f]+$")

# The one definition of a verdict record; the app, import-verdicts, the counts and export-labels all use it.
VERDICT_SCHEMA = pa.schema([
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("image_sha256", pa.string()),      # null on sign-off records
    pa.field("image_uri", pa.string()),
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string()),            # the run whose prediction the reviewer saw
    pa.field("model_version", pa.string()),
    pa.field("predicted_class", pa.string()),
    pa.field("verified_class", pa.string()),    # null on sign-off records
    pa.field("reviewer", pa.string(), nullable=False),
    pa.field("reviewed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("action", pa.string(), nullable=False),  # confirm | reclassify | sign-off | amend
    pa.field("reason", pa.string()),            # required for amend
    pa.field("source", pa.string(), nullable=False),  # "app" or "import:<file name>"
])


def validate_reviewer(name: Any) -> str:
    """A reviewer's name as it goes into the trail: trimmed, printable, at most 80 characters.

    Raises:
        ValueError: empty, too long or with control characters.
    """
    text = str(name or "").strip()
    if not text:
        raise ValueError("a reviewer name is required")
    if len(text) > MAX_REVIEWER or not _REVIEWER_RE.match(text):
        raise ValueError(f"reviewer name must be printable and at most {MAX_REVIEWER} characters")
    return text


def make_record(*, action: str, reviewer: str, sample_id: str, row: Mapping[str, Any] | None = None,
                verified_class: str | None = None, reason: str | None = None, source: str = "app",
                at: datetime | None = None) -> dict[str, Any]:
    """One verdict record; ``row`` is the committed prediction row the verdict is about (None for sign-off).

    Raises:
        ValueError: unknown action, a cell action without row or class, an amendment without reason.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > MAX_REASON:
        raise ValueError(f"reason is longer than {MAX_REASON} characters")
    if action == AMEND and reason is None:
        raise ValueError("an amendment needs a reason")
    if action != SIGN_OFF and (row is None or not verified_class):
        raise ValueError(f"a {action} record needs the prediction row and a verified class")
    row = row or {}
    return {
        "record_id": uuid.uuid4().hex,
        "image_sha256": row.get("image_sha256"),
        "image_uri": row.get("image_uri"),
        "sample_id": sample_id,
        "run_id": row.get("run_id"),
        "model_version": row.get("model_version"),
        "predicted_class": row.get("predicted_class"),
        "verified_class": verified_class if action != SIGN_OFF else None,
        "reviewer": validate_reviewer(reviewer),
        "reviewed_at": at or datetime.now(timezone.utc),
        "action": action,
        "reason": reason,
        "source": source,
    }


def _new_file_name(now: datetime) -> str:
    return f"verdicts-{now.strftime('%Y%m%dT%H%M%S%f')}Z-{secrets.token_hex(6)}.parquet"


def _empty() -> pa.Table:
    return VERDICT_SCHEMA.empty_table()


class VerdictStore:
    """Append-only verdict files under ``OUTPUT/reviews/``, local or ``s3://``, with an in-memory copy.

    The copy is refreshed by reading only files not seen before, so an app
    that re-reads before every write sees another app's records cheaply.
    Thread-safe: the app's request handlers share one store.
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.prefix = storage.join(output, REVIEWS_DIR)
        self._seen: set[str] = set()
        self._tables: list[pa.Table] = []
        self._lock = threading.Lock()

    def append(self, records: Iterable[Mapping[str, Any]]) -> str | None:
        """Write the records as one new Parquet file; returns its URI (None when there were no records).

        Raises:
            StorageError: the file cannot be written.
        """
        table = pa.Table.from_pylist([dict(r) for r in records], schema=VERDICT_SCHEMA)
        if not table.num_rows:
            return None
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        for _ in range(5):  # a clash of 48 random bits is all but impossible; never overwrite if it happens
            uri = storage.join(self.prefix, _new_file_name(datetime.now(timezone.utc)))
            if storage.write_bytes_if_absent(uri, buf.getvalue()):
                with self._lock:
                    self._seen.add(uri.rsplit("/", 1)[-1])
                    self._tables.append(table)
                return uri
        raise storage.StorageError(f"cannot create a new verdict file under {self.prefix}")

    def refresh(self) -> pa.Table:
        """Read files written since the last call (by anyone) and return every record."""
        try:
            files = storage.list_files(self.prefix)
        except FileNotFoundError:
            files = []
        new = [f for f in files if _FILE_RE.match(f.rsplit("/", 1)[-1]) and f.rsplit("/", 1)[-1] not in self._seen]
        if new:
            tables = _read_files(new)
            with self._lock:
                for uri, table in zip(new, tables):
                    name = uri.rsplit("/", 1)[-1]
                    if table is not None and name not in self._seen:
                        self._seen.add(name)
                        self._tables.append(table)
        return self.table()

    def table(self) -> pa.Table:
        """Every record read or written so far, in no particular order."""
        with self._lock:
            tables = list(self._tables)
        return pa.concat_tables(tables) if tables else _empty()


def _read_files(uris: list[str]) -> list[pa.Table | None]:
    """Read verdict files; a few in this thread (its S3 client is warm), many in parallel to hide latency."""
    if len(uris) <= PARALLEL_FROM:
        return [_read_file(u) for u in uris]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_read_file, uris))


def _read_file(uri: str) -> pa.Table | None:
    """One verdict file, cast to the schema (files written by an older version gain null columns).

    Returns None for a local file still being written (it is created under
    its final name, exclusively, then filled); the next refresh reads it.
    """
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except (pa.ArrowInvalid, FileNotFoundError):
        return None
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in VERDICT_SCHEMA]
    return pa.Table.from_arrays(columns, schema=VERDICT_SCHEMA)


def read_verdicts(output: str) -> pa.Table:
    """Every verdict record under ``OUTPUT/reviews/`` (empty when nobody has reviewed yet)."""
    return VerdictStore(output).refresh()


def _ordered(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    return frame.sort_values(["reviewed_at", "record_id"], kind="stable")


def current_verdicts(table: pa.Table) -> pd.DataFrame:
    """The verdict that stands for each cell: the latest confirm, reclassify or amend per (image_uri, image_sha256).

    The content hash is part of the key so that a verdict never carries over
    to a different image later written under the same URI.

    Returns:
        Columns image_uri, image_sha256, sample_id, verified_class, verified_by, verified_at, action.
    """
    cols = ["image_uri", "image_sha256", "sample_id", "verified_class", "verified_by", "verified_at", "action"]
    frame = _ordered(table)
    frame = frame[frame["action"].isin(CELL_ACTIONS) & frame["image_sha256"].notna()]
    if not len(frame):
        return pd.DataFrame(columns=cols)
    latest = frame.drop_duplicates(["image_uri", "image_sha256"], keep="last")
    latest = latest.rename(columns={"reviewer": "verified_by", "reviewed_at": "verified_at"})
    return latest[cols].reset_index(drop=True)


def signoffs(table: pa.Table) -> pd.DataFrame:
    """Who signed each sample and when: the first sign-off stands (a later one is kept in the trail only).

    Returns:
        Columns sample_id, signed_off_by, signed_off_at.
    """
    frame = _ordered(table)
    frame = frame[frame["action"] == SIGN_OFF].drop_duplicates("sample_id", keep="first")
    frame = frame.rename(columns={"reviewer": "signed_off_by", "reviewed_at": "signed_off_at"})
    return frame[["sample_id", "signed_off_by", "signed_off_at"]].reset_index(drop=True)
