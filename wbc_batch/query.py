"""Read-only DuckDB over committed results, and the canned queries a lab needs.

The Parquet files are read with pyarrow (local or S3 through
:func:`wbc_batch.storage.arrow_filesystem`) and handed to an in-memory DuckDB
as tables, because DuckDB's own S3 support (the httpfs extension) cannot be
downloaded where this runs. After the data is loaded the connection loses
all file-system access and its configuration is locked, so a user's SQL can
read the results and nothing else.

Views on every connection:

``predictions_raw``
    every row of every committed run (a run counts only when
    ``runs/<run_id>.json`` says ``status: succeeded``, see docs/DESIGN.md).
``predictions``
    one row per image: the latest row per ``image_uri``, where a row with
    ``status = 'ok'`` always beats an error row. The key is the URI and not
    the content hash because error rows of unreadable images carry no hash,
    and a successful retry must replace the earlier error; a file replaced at
    the same URI is superseded by its newest classification. Re-runs,
    retries and new model versions therefore never double count; an image
    that never succeeded stays visible as its latest error row.
``runs``
    one row per run manifest (any status), newest last.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from statistics import NormalDist
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wbc_batch import storage
from wbc_batch.errors import CorruptResultsError, InvalidInputError
from wbc_batch.ood import DEFAULT_MAX_SHARE, ShiftRule, sample_shifted

__all__ = [
    "BASE_COLUMNS", "CANNED", "DEFAULT_REFERENCE_RANGES", "QueryError", "Results", "check_read_only", "committed_run_ids",
    "connect", "differential", "differential_from_frame", "domain_shift_detected", "format_frame", "load_results",
    "query_frame", "read_manifests", "read_results", "run_query", "wilson_interval",
]

PREDICTIONS_DIR = "predictions"
RUNS_DIR = "runs"
DEFAULT_NON_WBC: tuple[str, ...] = ("non_wbc",)
# Adult reference ranges in percent of white cells: (low, high); None = no bound.
DEFAULT_REFERENCE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "neutrophil": (40.0, 60.0),
    "lymphocyte": (20.0, 40.0),
    "monocyte": (2.0, 8.0),
    "eosinophil": (1.0, 4.0),
    "basophil": (0.5, 1.0),
    "ig": (None, 0.9),
}
DEFAULT_MIN_CELLS = 100
DEFAULT_OOD_SHARE_LIMIT = DEFAULT_MAX_SHARE  # for models and manifests that state no rule (ood.ShiftRule)
FORMATS = ("table", "csv", "json")
CANNED = ("differential", "review-queue", "runs", "drift", "agreement")
READ_ONLY_TYPES = ("SELECT", "EXPLAIN")

_PART_RE = re.compile(r"^part-(?P<run_id>.+)-(?P<seq>\d+)\.parquet$")
_RUN_DATE_RE = re.compile(r"(?:^|/)run_date=(\d{4}-\d{2}-\d{2})(?:/|$)")

# Columns every row has (docs/DESIGN.md), besides the per-class p_<class> columns.
BASE_COLUMNS: dict[str, pa.DataType] = {
    "image_uri": pa.string(),
    "image_sha256": pa.string(),
    "sample_id": pa.string(),
    "predicted_class": pa.string(),
    "confidence": pa.float32(),
    "needs_review": pa.bool_(),
    "status": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
    "heatmap_uri": pa.string(),
    "model_version": pa.string(),
    "model_sha256": pa.string(),
    "model_digest": pa.string(),  # null in Parquet written before the artifact digest
    "run_id": pa.string(),
    "processed_at": pa.timestamp("us", tz="UTC"),
    "image_width": pa.int32(),
    "image_height": pa.int32(),
    "cam_in_cell": pa.float32(),
    "cam_peak_in_cell": pa.bool_(),
    "cell_area_share": pa.float32(),
    "explanation_suspect": pa.bool_(),
    "ood_score": pa.float32(),
    "out_of_distribution": pa.bool_(),
    "source_size": pa.int64(),
    "source_etag": pa.string(),
    "source_mtime": pa.timestamp("us", tz="UTC"),
    "run_date": pa.date32(),
}


class QueryError(InvalidInputError):
    """A query that is refused (writes, several statements) or cannot run (a ValueError; exit 2)."""


# --- loading ----------------------------------------------------------------


@dataclass
class Results:
    """Committed rows and run manifests of one OUTPUT, as Arrow tables."""

    rows: pa.Table
    runs: pa.Table
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        """Classes seen in the data, from the ``p_<class>`` columns, in model order."""
        return [c[2:] for c in self.rows.column_names if c.startswith("p_")]


def _fs_error(output: str, exc: Exception) -> storage.StorageError:
    return storage.StorageError(f"cannot read results under {output}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _list(fs: Any, path: str, output: str) -> list[str]:
    """Files under ``path`` (recursive, sorted); empty when the folder is absent."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise _fs_error(output, exc) from None
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def read_manifests(output: str) -> dict[str, dict[str, Any]]:
    """Every run manifest under ``OUTPUT/runs``, keyed by run id.

    A manifest that is not valid JSON is skipped: the manifest is the commit
    marker and is written atomically, so an unreadable one is not a commit.
    """
    fs, root = storage.arrow_filesystem(output)
    out: dict[str, dict[str, Any]] = {}
    for path in _list(fs, f"{root}/{RUNS_DIR}", output):
        if not path.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(path) as fh:
                manifest = json.loads(fh.read())
        except OSError as exc:
            raise _fs_error(output, exc) from None
        except ValueError:
            continue
        if isinstance(manifest, dict):
            run_id = str(manifest.get("run_id") or path.rsplit("/", 1)[-1][: -len(".json")])
            manifest["_manifest_path"] = path
            out[run_id] = manifest
    return out


def committed_run_ids(manifests: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Run ids whose manifest says ``status: succeeded`` (the commit rule)."""
    return {rid for rid, m in manifests.items() if m.get("status") == "succeeded"}


def run_shift_rules(manifests: Mapping[str, Mapping[str, Any]]) -> dict[str, ShiftRule]:
    """The unreliable-sample rule (:class:`wbc_batch.ood.ShiftRule`) each committed run applied, by run id."""
    return {rid: ShiftRule.from_manifest(manifests[rid]) for rid in committed_run_ids(manifests)}


def _sample_rule(ok_rows: pd.DataFrame, shift_rules: Mapping[str, ShiftRule] | None,
                 ood_share_limit: float | None) -> ShiftRule:
    """The rule of the runs a sample's rows come from (the strictest when several), ``ood_share_limit`` overriding."""
    runs = set(ok_rows["run_id"].dropna()) if shift_rules and "run_id" in ok_rows.columns else set()
    rule = ShiftRule.strictest(shift_rules[r] for r in runs if r in shift_rules) if shift_rules else ShiftRule()
    return rule if ood_share_limit is None else ShiftRule(max_share=ood_share_limit, min_ood=rule.min_ood)


def _committed_files(manifest: Mapping[str, Any]) -> set[str] | None:
    """Part-file names a committed manifest lists, or None when it lists none."""
    files = manifest.get("parquet_files")
    if not isinstance(files, list):
        return None
    return {str(f).rstrip("/").rsplit("/", 1)[-1] for f in files}


def _normalise(table: pa.Table, run_date: str | None) -> pa.Table:
    """Give a part file the full row schema: add missing columns as nulls, fix types."""
    if "run_date" in table.column_names:
        table = table.drop_columns(["run_date"])
    date = datetime.strptime(run_date, "%Y-%m-%d").date() if run_date else None
    table = table.append_column("run_date", pa.array([date] * table.num_rows, type=pa.date32()))
    for name, typ in BASE_COLUMNS.items():
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, type=typ))
        elif table.schema.field(name).type != typ:
            table = table.set_column(table.column_names.index(name), name, table.column(name).cast(typ))
    for i, name in enumerate(table.column_names):
        if name.startswith("p_") and table.schema.field(name).type != pa.float32():
            table = table.set_column(i, name, table.column(name).cast(pa.float32()))
    return table


def _empty_rows() -> pa.Table:
    return pa.schema([pa.field(k, v) for k, v in BASE_COLUMNS.items()]).empty_table()


def _order_columns(table: pa.Table) -> pa.Table:
    """Base columns in DESIGN order with the p_<class> columns after ``confidence``."""
    p_cols = [c for c in table.column_names if c.startswith("p_")]
    base = list(BASE_COLUMNS)
    at = base.index("confidence") + 1
    extra = [c for c in table.column_names if c not in BASE_COLUMNS and c not in p_cols]
    return table.select(base[:at] + p_cols + base[at:] + extra)


def parse_time(value: Any) -> datetime | None:
    """A manifest's ISO time as an aware datetime (naive means UTC); None when absent or malformed."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _runs_table(manifests: Mapping[str, Mapping[str, Any]]) -> pa.Table:
    """One row per manifest with the fields people filter and sort on."""
    rows: list[dict[str, Any]] = []
    for rid, m in manifests.items():
        model = m.get("model") if isinstance(m.get("model"), dict) else {}
        counts = m.get("counts") if isinstance(m.get("counts"), dict) else {}
        timings = m.get("timings") if isinstance(m.get("timings"), dict) else {}
        shift = domain_shift_detected(m)
        rows.append({
            "run_id": rid,
            "status": m.get("status"),
            "started_at": parse_time(m.get("started_at")),
            "finished_at": parse_time(m.get("finished_at")),
            "model_version": model.get("version"),
            "model_sha256": model.get("sha256"),
            "input": m.get("input"),
            "output": m.get("output"),
            "total": counts.get("total"),
            "ok": counts.get("ok"),
            "error": counts.get("error"),
            "needs_review": counts.get("needs_review"),
            "out_of_distribution": counts.get("out_of_distribution"),
            "seconds": timings.get("seconds"),
            "images_per_second": timings.get("images_per_second"),
            "domain_shift": shift,
            "manifest": json.dumps({k: v for k, v in m.items() if not k.startswith("_")}, default=str),
        })
    schema = pa.schema([
        ("run_id", pa.string()), ("status", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
        ("model_version", pa.string()), ("model_sha256", pa.string()), ("input", pa.string()), ("output", pa.string()),
        ("total", pa.int64()), ("ok", pa.int64()), ("error", pa.int64()), ("needs_review", pa.int64()),
        ("out_of_distribution", pa.int64()), ("seconds", pa.float64()), ("images_per_second", pa.float64()),
        ("domain_shift", pa.bool_()), ("manifest", pa.string()),
    ])
    for r in rows:
        for k in ("total", "ok", "error", "needs_review", "out_of_distribution"):
            r[k] = int(r[k]) if isinstance(r[k], (int, float)) and not isinstance(r[k], bool) else None
        for k in ("seconds", "images_per_second"):
            r[k] = float(r[k]) if isinstance(r[k], (int, float)) and not isinstance(r[k], bool) else None
    return pa.Table.from_pylist(rows, schema=schema)


def domain_shift_detected(manifest: Mapping[str, Any]) -> bool:
    """True when a manifest reports a domain shift (``true`` or ``{"detected": true}``)."""
    shift = manifest.get("domain_shift")
    if isinstance(shift, Mapping):
        return bool(shift.get("detected"))
    return bool(shift)


def read_results(output: str, *, committed_only: bool = True, run_ids: Collection[str] | None = None) -> Results:
    """Read the rows under ``OUTPUT/predictions`` and the manifests under ``OUTPUT/runs``.

    Args:
        output: local folder or ``s3://bucket/prefix`` given to ``classify``.
        committed_only: keep only rows of runs whose manifest says succeeded
            (the commit rule); False reads every part file, for debugging.
        run_ids: if given, keep only rows of these runs (after the commit rule).

    Raises:
        FileNotFoundError: OUTPUT has neither ``runs/`` nor ``predictions/``.
        StorageError: the storage cannot be read.
    """
    if not output:
        raise ValueError("expected an OUTPUT folder or s3:// URI, got an empty string")
    fs, root = storage.arrow_filesystem(output)
    manifests = read_manifests(output)
    files = [f for f in _list(fs, f"{root}/{PREDICTIONS_DIR}", output) if f.endswith(".parquet")]
    if not manifests and not files:
        raise FileNotFoundError(f"no results under {output} (expected {output}/runs/<run_id>.json and {output}/predictions/)")
    committed = committed_run_ids(manifests)
    keep_runs: set[str] | None = committed if committed_only else None
    if run_ids is not None:
        keep_runs = set(run_ids) if keep_runs is None else keep_runs & set(run_ids)
    wanted: list[tuple[str, str | None]] = []
    for path in files:
        name = path.rsplit("/", 1)[-1]
        match = _PART_RE.match(name)
        file_run = match.group("run_id") if match else None
        if keep_runs is not None:
            # Skipping files of uncommitted runs up front also skips half-written ones.
            if file_run is not None and file_run not in keep_runs:
                continue
            listed = _committed_files(manifests.get(file_run, {})) if file_run else None
            if listed is not None and name not in listed:
                continue  # a stale part of an earlier attempt of this run id
        wanted.append((path, file_run))

    def read(item: tuple[str, str | None]) -> pa.Table | None:
        path, file_run = item
        try:  # the bytes first, so that a storage failure (exit 3) is never taken for a damaged file
            with fs.open_input_file(path) as fh:
                data = fh.read()
        except OSError as exc:
            if keep_runs is None and file_run not in committed:
                return None
            raise _fs_error(output, exc) from None
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowException) as exc:
            if keep_runs is None and file_run not in committed:
                return None  # an uncommitted run's file may be incomplete; it never counts anyway
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise CorruptResultsError(
                f"part file {path} of committed run {file_run} cannot be decoded ({reason}); re-run that run id "
                f"(classify --run-id {file_run}) or delete its manifest runs/{file_run}.json to uncommit it"
            ) from None
        date = _RUN_DATE_RE.search(path)
        return _normalise(table, date.group(1) if date else None)

    # Object stores answer one request at a time slowly; a few in flight hide the latency.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(wanted)))) as pool:
        tables = [t for t in pool.map(read, wanted) if t is not None]
    rows = pa.concat_tables(tables, promote_options="permissive") if tables else _empty_rows()
    if keep_runs is not None and rows.num_rows:
        rows = rows.filter(pc.is_in(rows.column("run_id"), value_set=pa.array(sorted(keep_runs), type=pa.string())))
    return Results(rows=_order_columns(rows), runs=_runs_table(manifests), manifests=manifests)


# --- DuckDB -----------------------------------------------------------------


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


LATEST_PER_IMAGE_SQL = """
SELECT * FROM predictions_raw
QUALIFY row_number() OVER (
    PARTITION BY image_uri
    ORDER BY (status = 'ok') DESC, processed_at DESC NULLS LAST, run_id DESC
) = 1
"""


def connect(output: str | Results, *, committed_only: bool = True, run_ids: Collection[str] | None = None) -> Any:
    """An in-memory DuckDB connection with the result views, unable to touch any file.

    Args:
        output: OUTPUT location, or :class:`Results` already read.
        committed_only, run_ids: see :func:`read_results`.

    Returns:
        A ``duckdb.DuckDBPyConnection`` with ``predictions``, ``predictions_raw``
        and ``runs``; external access is disabled and the configuration locked.
    """
    import duckdb

    results = output if isinstance(output, Results) else read_results(output, committed_only=committed_only, run_ids=run_ids)
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("_rows_arrow", results.rows)
        con.register("_runs_arrow", results.runs)
        con.execute("CREATE TABLE predictions_raw_data AS SELECT * FROM _rows_arrow")
        con.execute("CREATE TABLE runs_data AS SELECT * FROM _runs_arrow")
        con.unregister("_rows_arrow")
        con.unregister("_runs_arrow")
        con.execute("CREATE VIEW predictions_raw AS SELECT * FROM predictions_raw_data")
        con.execute("CREATE VIEW runs AS SELECT * FROM runs_data ORDER BY started_at NULLS FIRST, run_id")
        con.execute(f"CREATE VIEW predictions AS {LATEST_PER_IMAGE_SQL}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def load_results(output: str, *, committed_only: bool = True, latest_only: bool = True,
                 run_ids: Collection[str] | None = None) -> pd.DataFrame:
    """Prediction rows as a DataFrame.

    Args:
        output: local folder or ``s3://bucket/prefix``.
        committed_only: apply the commit rule (rows of runs without a
            succeeded manifest never count).
        latest_only: one row per image (the ``predictions`` view); False
            gives every row (``predictions_raw``).
        run_ids: restrict to rows of these runs before picking the latest.
    """
    con = connect(output, committed_only=committed_only, run_ids=run_ids)
    try:
        view = "predictions" if latest_only else "predictions_raw"
        return con.execute(f"SELECT * FROM {view} ORDER BY sample_id NULLS LAST, image_uri, processed_at").fetch_df()
    finally:
        con.close()


def check_read_only(sql: str) -> str:
    """Refuse anything but one SELECT/WITH/SHOW/DESCRIBE/SUMMARIZE/EXPLAIN statement.

    DuckDB's own parser decides the statement type, so comments, odd casing
    or a second statement after ``;`` cannot sneak a write past the check.
    ``EXPLAIN [ANALYZE]`` runs what it explains, so the explained statement
    must itself be a SELECT.

    Returns:
        The statement as DuckDB split it.

    Raises:
        QueryError: not exactly one read-only statement.
    """
    import duckdb

    if not sql or not sql.strip():
        raise QueryError("expected one SQL statement, got an empty string")
    parser = duckdb.connect(":memory:")
    try:
        try:
            statements = parser.extract_statements(sql)
        except duckdb.Error as exc:
            raise QueryError(f"cannot parse SQL: {str(exc).splitlines()[0]}") from None
        if len(statements) != 1:
            raise QueryError(f"expected exactly one statement, got {len(statements)}")
        stmt = statements[0]
        kind = stmt.type.name
        if kind not in READ_ONLY_TYPES:
            raise QueryError(f"refused: only read-only queries (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN) are allowed, got {kind}")
        if kind == "EXPLAIN":
            inner = re.sub(r"^\s*explain\s+(analy[sz]e\s+)?", "", _strip_comments(stmt.query), flags=re.IGNORECASE)
            try:
                inner_statements = parser.extract_statements(inner)
            except duckdb.Error:
                inner_statements = []
            if len(inner_statements) != 1 or inner_statements[0].type.name != "SELECT":
                raise QueryError("refused: EXPLAIN is allowed only for a plain SELECT")
        return stmt.query
    finally:
        parser.close()


def _strip_comments(sql: str) -> str:
    """Leading SQL comments removed, so the EXPLAIN prefix can be found."""
    prev = None
    while prev != sql:
        prev = sql
        sql = re.sub(r"^\s*(--[^\n]*\n|/\*.*?\*/)", "", sql, flags=re.DOTALL)
    return sql


# --- the differential -------------------------------------------------------


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k / n``.

    Unlike the normal approximation it stays inside [0, 1] and keeps its
    coverage at the 100-200 cells of a manual differential and for rare
    classes (basophils, immature granulocytes).
    """
    if n <= 0:
        raise ValueError(f"expected n > 0 cells, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"expected 0 <= k <= n, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"expected a confidence between 0 and 1, got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _reference_text(rng: tuple[float | None, float | None] | None) -> str:
    if rng is None:
        return ""
    lo, hi = rng
    if lo is None and hi is None:
        return ""
    if lo is None:
        return f"<={hi:g}"
    if hi is None:
        return f">={lo:g}"
    return f"{lo:g}-{hi:g}"


def _flag(percent: float, rng: tuple[float | None, float | None] | None) -> str:
    if rng is None:
        return ""
    lo, hi = rng
    if lo is not None and percent < lo:
        return "low"
    if hi is not None and percent > hi:
        return "high"
    return ""


DIFFERENTIAL_COLUMNS = [
    "sample_id", "white_cells", "cell_class", "count", "model_count", "percent", "ci_low", "ci_high", "reference",
    "flag", "needs_review", "verified", "signed_off_by", "signed_off_at", "errors", "ood_share", "reliable", "warning",
]


def _counted_class(rows: pd.DataFrame) -> pd.Series:
    """The class a cell counts under: the reviewer's verified class where there is one, else the model's."""
    if "verified_class" not in rows.columns:
        return rows["predicted_class"]
    return rows["verified_class"].where(rows["verified_class"].notna(), rows["predicted_class"])


def _sign_off(rows: pd.DataFrame) -> tuple[Any, Any]:
    """(by, at) of a sample's sign-off, or (None, None)."""
    if "signed_off_by" not in rows.columns or not rows["signed_off_by"].notna().any():
        return None, None
    first = rows[rows["signed_off_by"].notna()].iloc[0]
    return first["signed_off_by"], first["signed_off_at"]


def differential_from_frame(
    frame: pd.DataFrame,
    sample: str | None = None,
    *,
    class_names: Iterable[str] | None = None,
    non_wbc: Iterable[str] = DEFAULT_NON_WBC,
    reference_ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
    min_cells: int = DEFAULT_MIN_CELLS,
    ood_share_limit: float | None = None,
    shift_rules: Mapping[str, ShiftRule] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """The white-cell differential of prediction rows (one row per image already).

    A cell counts under its verified class where a reviewer gave one
    (columns from :func:`wbc_batch.review.counts.attach_verdicts`), else
    under the model's; ``model_count`` keeps the model's count beside it.

    Args:
        frame: rows of the ``predictions`` view (latest per image), optionally with verdict columns.
        sample: only this sample id.
        class_names: classes to report (default: the ``p_<class>`` columns).
        non_wbc: classes left out of white-cell counts.
        reference_ranges: percent ranges per class, (low, high), None = open.
        min_cells: fewer white cells than this adds a warning.
        ood_share_limit: overrides the ``max_share`` of the rule below.
        shift_rules: run id -> the rule its manifest recorded
            (:func:`run_shift_rules`); a sample is judged by the rule of the
            runs its rows come from, the default :class:`~wbc_batch.ood.ShiftRule`
            without one. A sample that is shifted by
            :func:`wbc_batch.ood.sample_shifted` (the rule the run manifest
            and the report use) is unreliable: its percentages, intervals and
            flags are left empty so nobody reads them as a result.
        confidence: level of the Wilson intervals.

    Returns:
        One row per sample and class, columns ``DIFFERENTIAL_COLUMNS``;
        ``percent``, ``ci_low``, ``ci_high`` in percent of white cells.
    """
    if ood_share_limit is not None and not 0 <= ood_share_limit <= 1:
        raise ValueError(f"expected an out-of-distribution share limit between 0 and 1, got {ood_share_limit}")
    if min_cells < 0:
        raise ValueError(f"expected min_cells >= 0, got {min_cells}")
    ranges = dict(DEFAULT_REFERENCE_RANGES if reference_ranges is None else reference_ranges)
    excluded = set(non_wbc)
    classes = list(class_names) if class_names is not None else [c[2:] for c in frame.columns if c.startswith("p_")]
    ok_all = frame[frame["status"] == "ok"] if len(frame) else frame
    extra = sorted(set(_counted_class(ok_all).dropna()) - set(classes) - excluded) if len(frame) else []
    white_classes = [c for c in classes if c not in excluded] + extra
    if sample is not None:
        known = sorted(frame["sample_id"].dropna().unique()) if len(frame) else []
        if sample not in known:
            shown = ", ".join(map(str, known[:20])) + (" ..." if len(known) > 20 else "")
            raise ValueError(f"no sample {sample!r} in the committed results (samples: {shown or 'none'})")
        frame = frame[frame["sample_id"] == sample]
    out: list[dict[str, Any]] = []
    if not len(frame):
        return pd.DataFrame(out, columns=DIFFERENTIAL_COLUMNS)
    samples = frame["sample_id"].fillna("").astype(str)
    for sid in sorted(samples.unique()):
        rows = frame[samples == sid]
        ok = rows[rows["status"] == "ok"]
        counted = _counted_class(ok)
        white = counted[~counted.isin(excluded) & counted.notna()]
        model_white = ok["predicted_class"][~ok["predicted_class"].isin(excluded) & ok["predicted_class"].notna()]
        n = len(white)
        ood = ok["out_of_distribution"].astype("boolean").fillna(False).astype(bool)
        ood_share = float(ood.mean()) if len(ok) else 0.0
        rule = _sample_rule(ok, shift_rules, ood_share_limit)
        reliable = not sample_shifted(len(ok), int(ood.sum()), rule)
        review = int(ok["needs_review"].astype("boolean").fillna(False).astype(bool).sum())
        warnings: list[str] = []
        if not reliable:
            warnings.append(f"UNRELIABLE: {ood_share:.0%} of images out of distribution ({int(ood.sum())} of {len(ok)}; "
                            f"limit {rule.describe()}); do not report this differential")
        if n == 0:
            warnings.append("no white cells")
        elif n < min_cells:
            warnings.append(f"only {n} white cells (fewer than {min_cells})")
        counts, model_counts = white.value_counts(), model_white.value_counts()
        verified = int(ok["verified_class"].notna().sum()) if "verified_class" in ok.columns else 0
        signed_by, signed_at = _sign_off(rows)
        for cls in white_classes:
            k = int(counts.get(cls, 0))
            rng = ranges.get(cls)
            pct = lo = hi = None
            flag = ""
            if n and reliable:
                pct = 100.0 * k / n
                ci = wilson_interval(k, n, confidence)
                lo, hi = 100.0 * ci[0], 100.0 * ci[1]
                flag = _flag(pct, rng)
            out.append({
                "sample_id": sid, "white_cells": n, "cell_class": cls, "count": k,
                "model_count": int(model_counts.get(cls, 0)), "percent": pct,
                "ci_low": lo, "ci_high": hi, "reference": _reference_text(rng), "flag": flag,
                "needs_review": review, "verified": verified, "signed_off_by": signed_by, "signed_off_at": signed_at,
                "errors": int((rows["status"] != "ok").sum()), "ood_share": ood_share,
                "reliable": reliable, "warning": "; ".join(warnings),
            })
    df = pd.DataFrame(out, columns=DIFFERENTIAL_COLUMNS)
    for col in ("percent", "ci_low", "ci_high"):
        df[col] = df[col].astype("float64")
    return df


def differential(output: str, sample: str | None = None, **options: Any) -> pd.DataFrame:
    """Per-sample white-cell differential of the committed results, reviewers' verdicts applied.

    Counts one row per image (the ``predictions`` view), so re-runs never
    double count. ``options`` are those of :func:`differential_from_frame`;
    each sample is judged by the unreliable-sample rule its runs recorded.
    """
    options = {"shift_rules": run_shift_rules(read_manifests(output)), **options}
    from wbc_batch.review.counts import attach_verdicts

    return differential_from_frame(attach_verdicts(load_results(output), output), sample, **options)


# --- canned queries and formatting -------------------------------------------


REVIEW_QUEUE_SQL = """
SELECT sample_id, image_uri, predicted_class, confidence, out_of_distribution, explanation_suspect,
       heatmap_uri, model_version, run_id
FROM predictions
WHERE status = 'ok' AND needs_review
ORDER BY confidence ASC NULLS FIRST, image_uri
"""

RUNS_SQL = """
SELECT run_id, status, started_at, finished_at, model_version, total, ok, error, needs_review,
       out_of_distribution, round(images_per_second, 2) AS images_per_second, domain_shift, input
FROM runs
"""


def drift_sql(class_names: Iterable[str]) -> str:
    """Class mix and mean confidence per run day and model version.

    Uses every committed row (``predictions_raw``): a re-run under a new
    model is meant to show up under its own version.
    """
    shares = "".join(
        f",\n       avg(CASE WHEN predicted_class = {_literal(c)} THEN 1.0 ELSE 0.0 END) AS {_ident('share_' + c)}"
        for c in class_names
    )
    return f"""
SELECT CAST(coalesce(run_date, CAST(processed_at AS DATE)) AS VARCHAR) AS day, model_version, count(*) AS cells,
       avg(confidence) AS mean_confidence,
       avg(CASE WHEN out_of_distribution THEN 1.0 ELSE 0.0 END) AS ood_share,
       avg(CASE WHEN needs_review THEN 1.0 ELSE 0.0 END) AS review_share{shares}
FROM predictions_raw
WHERE status = 'ok'
GROUP BY ALL
ORDER BY day, model_version
"""


def query_frame(output: str, sql: str | None = None, *, canned: str | None = None, sample: str | None = None,
                **differential_options: Any) -> pd.DataFrame:
    """Run one read-only statement or a canned query and return its rows.

    Raises:
        QueryError: the SQL is refused or fails.
        ValueError: bad combination of arguments.
    """
    if (sql is None) == (canned is None):
        raise ValueError("expected either SQL or one canned query "
                         "(--differential, --review-queue, --runs, --drift, --agreement)")
    if canned is not None and canned not in CANNED:
        raise ValueError(f"unknown canned query {canned!r}; expected one of {', '.join(CANNED)}")
    if sample is not None and canned != "differential":
        raise ValueError("--sample goes with --differential only")
    if sql is not None:
        sql = check_read_only(sql)
    import duckdb

    results = read_results(output)
    con = connect(results)
    try:
        if canned in ("differential", "agreement"):
            from wbc_batch.review.counts import agreement_from_frame, attach_verdicts

            if canned == "agreement":  # every committed row: each run against the same verdicts
                raw = con.execute("SELECT * FROM predictions_raw WHERE status = 'ok'").fetch_df()
                return agreement_from_frame(attach_verdicts(raw, output), results.class_names)
            frame = attach_verdicts(con.execute("SELECT * FROM predictions").fetch_df(), output)
            return differential_from_frame(frame, sample,
                                           **{"shift_rules": run_shift_rules(results.manifests), **differential_options})
        if canned == "review-queue":
            sql = REVIEW_QUEUE_SQL
        elif canned == "runs":
            sql = RUNS_SQL
        elif canned == "drift":
            sql = drift_sql(results.class_names)
        try:
            return con.execute(sql).fetch_df()
        except duckdb.Error as exc:
            raise QueryError(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()


def format_frame(frame: pd.DataFrame, fmt: str = "table") -> str:
    """Render rows as an aligned table, CSV or JSON (records, ISO dates, null for missing)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "json":
        return frame.to_json(orient="records", date_format="iso", indent=2) or "[]"
    if fmt == "csv":
        return frame.to_csv(index=False)
    if not len(frame):
        return "(no rows)\n" if not len(frame.columns) else " ".join(map(str, frame.columns)) + "\n(no rows)\n"
    if list(frame.columns) == ["explain_key", "explain_value"]:  # a plan reads best as DuckDB drew it
        return "".join(f"{k}\n{v}\n" for k, v in zip(frame.explain_key, frame.explain_value))
    frame = frame.copy()
    for col in frame.select_dtypes(include="object").columns:
        frame[col] = frame[col].where(frame[col].notna(), "")
    with pd.option_context("display.max_colwidth", 120, "display.width", 250):
        return frame.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4g}") + "\n"


def run_query(output: str, sql: str | None = None, fmt: str = "table", canned: str | None = None,
              sample: str | None = None, **differential_options: Any) -> str:
    """``wbc-batch query``: one read-only statement or canned query, formatted.

    Args:
        output: local folder or ``s3://bucket/prefix``.
        sql: one SELECT/WITH/SHOW/DESCRIBE/EXPLAIN statement over
            ``predictions``, ``predictions_raw`` and ``runs``.
        fmt: ``table``, ``csv`` or ``json``.
        canned: ``differential``, ``review-queue``, ``runs``, ``drift`` or ``agreement``.
        sample: with ``differential``, only this sample.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    frame = query_frame(output, sql, canned=canned, sample=sample, **differential_options)
    if canned == "differential" and fmt == "table":  # percent to 0.1 for people; csv/json keep full precision
        frame = frame.copy()
        for col in ("percent", "ci_low", "ci_high"):
            frame[col] = frame[col].map(lambda v: "-" if pd.isna(v) else f"{v:.1f}")
        frame["ood_share"] = frame["ood_share"].map(lambda v: f"{v:.1%}")
    return format_frame(frame, fmt)
