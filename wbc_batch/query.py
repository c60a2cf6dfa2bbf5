"""Read-only DuckDB over committed results, and the canned queries a lab needs.

The committed part files are a lazy pyarrow dataset (local or S3 through
:func:`wbc_batch.storage.arrow_filesystem`, because DuckDB's own S3 support,
the httpfs extension, cannot be had where this runs) registered in an
in-memory DuckDB. Nothing is loaded up front (only each file's footer is
checked): a query reads only the columns it uses, a ``run_date`` filter in
SQL reads no row of other nights, ``run_dates`` (``--run-date``) leaves
other nights' files unopened, and a report reads only its run's files. Once the
dataset is registered the connection loses all file-system access and its
configuration is locked, so a user's SQL can read the results and nothing
else.

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

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from wbc_batch import storage
from wbc_batch.errors import CorruptResultsError, InvalidInputError
from wbc_batch.ood import DEFAULT_MAX_SHARE, ShiftRule, sample_shifted
from wbc_batch.results import (  # the commit rule lives with the writer; re-exported here for readers
    PREDICTIONS_DIR,
    Part,
    RunManifest,
    committed_parts,
    committed_run_ids,
    part_files,
    prediction_schema,
    read_error,
    read_manifests,
)

__all__ = [
    "BASE_COLUMNS", "CANNED", "DEFAULT_REFERENCE_RANGES", "Part", "QueryError", "Results", "check_read_only",
    "committed_parts", "committed_run_ids", "connect", "differential", "differential_from_frame",
    "domain_shift_detected", "fetch_df", "format_frame", "load_results", "part_files", "query_frame",
    "read_manifests", "read_results", "row_schema", "run_query", "wilson_interval",
]

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


# Columns every row has (docs/DESIGN.md), besides the per-class p_<class> columns: the schema classify
# writes (wbc_batch.results.prediction_schema, the one definition) plus the run_date partition.
BASE_COLUMNS: dict[str, pa.DataType] = {
    **{f.name: f.type for f in prediction_schema([])},
    "run_date": pa.date32(),
}


class QueryError(InvalidInputError):
    """A query that is refused (writes, several statements) or cannot run (a ValueError; exit 2)."""


# --- loading ----------------------------------------------------------------


@dataclass
class Results:
    """The committed rows of one OUTPUT as a lazy pyarrow dataset, and its run manifests.

    Nothing but the part files' footers has been read: DuckDB scans
    ``dataset`` with the columns and filters a query needs
    (:func:`connect`), so memory follows what a query keeps, not the archive.

    Attributes:
        dataset: the part files in scope (the commit rule applied to file
            names, then ``run_ids`` and ``run_dates``), one schema for all
            (:func:`row_schema`), ``run_date`` from the Hive partition.
        runs: one row per manifest (any status), see :func:`_runs_table`.
        manifests: every manifest (:class:`wbc_batch.results.RunManifest`), keyed by run id.
        run_ids: rows count only when their own ``run_id`` is one of these
            (None: every row of the files, ``committed_only=False``).
        parts: the part files in ``dataset``.
        output: the OUTPUT location read.
    """

    dataset: Any
    runs: pa.Table
    manifests: dict[str, RunManifest] = field(default_factory=dict)
    run_ids: frozenset[str] | None = None
    parts: list[Part] = field(default_factory=list)
    output: str = ""

    @property
    def class_names(self) -> list[str]:
        """Classes seen in the data, from the ``p_<class>`` columns, in model order."""
        return [c[2:] for c in self.dataset.schema.names if c.startswith("p_")]

    @property
    def rows(self) -> pa.Table:
        """Every counted row in memory (small OUTPUTs and tests; queries scan :attr:`dataset` instead)."""
        return self.dataset.to_table(filter=_run_filter(self.run_ids))


def run_shift_rules(manifests: Mapping[str, RunManifest]) -> dict[str, ShiftRule]:
    """The unreliable-sample rule (:class:`wbc_batch.ood.ShiftRule`) each committed run applied, by run id."""
    return {rid: ShiftRule.from_manifest(manifests[rid]) for rid in committed_run_ids(manifests)}


def _rule_for_runs(runs: set[str], shift_rules: Mapping[str, ShiftRule] | None,
                   ood_share_limit: float | None) -> ShiftRule:
    """The strictest rule of these runs (the default without any), ``ood_share_limit`` overriding."""
    rule = ShiftRule.strictest(shift_rules[r] for r in runs if r in shift_rules) if shift_rules else ShiftRule()
    return rule if ood_share_limit is None else ShiftRule(max_share=ood_share_limit, min_ood=rule.min_ood)


def _check_run_dates(run_dates: Collection[str]) -> set[str]:
    out = set()
    for day in run_dates:
        try:
            out.add(datetime.strptime(str(day), "%Y-%m-%d").date().isoformat())
        except ValueError:
            raise ValueError(f"expected a run date as YYYY-MM-DD, got {day!r}") from None
    return out


class _TrackedFile:
    """A file object over a pyarrow input file that remembers an I/O failure.

    Parquet reads go through it so that a storage failure (exit 3) is never
    taken for a damaged file (exit 6): a decode error with no I/O error
    behind it is the file's fault.
    """

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.io_error: OSError | None = None
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        try:
            return self.fh.read() if n is None or n < 0 else self.fh.read(n)
        except OSError as exc:
            self.io_error = exc
            raise

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.fh.seek(pos, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _corrupt(part: Part, exc: Exception) -> CorruptResultsError:
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    rid = part.run_id
    return CorruptResultsError(
        f"part file {part.path} of committed run {rid} cannot be decoded ({reason}); re-run that run id "
        f"(classify --run-id {rid}) or delete its manifest runs/{rid}.json to uncommit it")


def _part_schema(fs: Any, part: Part, output: str, must_count: bool) -> pa.Schema | None:
    """A part file's schema from its footer (one small read); None for an unreadable file that does not count.

    Raises:
        CorruptResultsError: a file that counts cannot be decoded.
        StorageError: the storage failed.
    """
    try:
        fh = fs.open_input_file(part.path)
    except OSError as exc:
        if not must_count:
            return None
        raise read_error(output, exc) from None
    tracked = _TrackedFile(fh)
    try:
        return pq.read_schema(tracked)
    except (OSError, pa.ArrowException) as exc:
        if not must_count:
            return None  # an uncommitted run's file may be incomplete; it never counts anyway
        if tracked.io_error is not None:
            raise read_error(output, tracked.io_error) from None
        raise _corrupt(part, exc) from None
    finally:
        fh.close()


def row_schema(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """One schema for part files of any age and model: base columns in DESIGN order, ``p_<class>`` after ``confidence``.

    Classes appear in the order the files (oldest night first) name them;
    base columns take the types of :data:`BASE_COLUMNS` (a file without one
    reads it as nulls), probabilities are float32, other columns keep the
    type they first had.
    """
    seen: dict[str, pa.DataType] = {}
    for schema in schemas:
        for f in schema:
            if f.name != "run_date":
                seen.setdefault(f.name, f.type)
    p_cols = [n for n in seen if n.startswith("p_")]
    extra = [n for n in seen if n not in BASE_COLUMNS and n not in p_cols]
    base = list(BASE_COLUMNS)
    at = base.index("confidence") + 1
    return pa.schema([pa.field(n, BASE_COLUMNS[n]) for n in base[:at]]
                     + [pa.field(n, pa.float32()) for n in p_cols]
                     + [pa.field(n, BASE_COLUMNS[n]) for n in base[at:]]
                     + [pa.field(n, seen[n]) for n in extra])


def _run_filter(run_ids: Collection[str] | None) -> Any:
    import pyarrow.dataset as ds

    return None if run_ids is None else ds.field("run_id").isin(sorted(run_ids))


def parse_time(value: Any) -> datetime | None:
    """A manifest's ISO time as an aware datetime (naive means UTC); None when absent or malformed."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _runs_table(manifests: Mapping[str, RunManifest]) -> pa.Table:
    """One row per manifest with the fields people filter and sort on."""
    rows: list[dict[str, Any]] = []
    for rid, m in manifests.items():
        rows.append({
            "run_id": rid,
            "status": m.status,
            "started_at": parse_time(m.started_at),
            "finished_at": parse_time(m.finished_at),
            "model_version": m.model.version,
            "model_sha256": m.model.sha256,
            "input": m.input,
            "output": m.output,
            "total": m.counts.total,
            "ok": m.counts.ok,
            "error": m.counts.error,
            "needs_review": m.counts.needs_review,
            "out_of_distribution": m.counts.out_of_distribution,
            "seconds": m.timings.seconds,
            "images_per_second": m.timings.images_per_second,
            "domain_shift": m.shift_detected,
            "manifest": json.dumps(m.to_json(), default=str),
        })
    schema = pa.schema([
        ("run_id", pa.string()), ("status", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
        ("model_version", pa.string()), ("model_sha256", pa.string()), ("input", pa.string()), ("output", pa.string()),
        ("total", pa.int64()), ("ok", pa.int64()), ("error", pa.int64()), ("needs_review", pa.int64()),
        ("out_of_distribution", pa.int64()), ("seconds", pa.float64()), ("images_per_second", pa.float64()),
        ("domain_shift", pa.bool_()), ("manifest", pa.string()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def domain_shift_detected(manifest: RunManifest) -> bool:
    """True when a manifest reports a domain shift (older ``true`` reads as ``{"detected": true}``)."""
    return manifest.shift_detected


def read_results(output: str, *, committed_only: bool = True, run_ids: Collection[str] | None = None,
                 run_dates: Collection[str] | None = None,
                 manifests: dict[str, RunManifest] | None = None) -> Results:
    """The committed rows under ``OUTPUT/predictions`` as a lazy dataset, and the manifests under ``OUTPUT/runs``.

    Only the listing, the manifests and the footers of the part files in
    scope are read here; rows are read when a query scans them
    (:func:`connect`). Files outside the scope are never opened: a night
    not asked for, or another run, costs nothing and cannot fail the query.

    Args:
        output: local folder or ``s3://bucket/prefix`` given to ``classify``.
        committed_only: keep only rows of runs whose manifest says succeeded
            (the commit rule, :func:`committed_parts`); False reads every part
            file, for debugging (unreadable uncommitted files are skipped).
        run_ids: if given, keep only rows of these runs (after the commit rule).
        run_dates: if given, only the part files under these
            ``run_date=YYYY-MM-DD`` partitions.
        manifests: :func:`read_manifests` of ``output`` when already read.

    Raises:
        FileNotFoundError: OUTPUT has neither ``runs/`` nor ``predictions/``.
        StorageError: the storage cannot be read.
        CorruptResultsError: a part file in scope that counts cannot be decoded.
        ValueError: a run date that is not YYYY-MM-DD.
    """
    import pyarrow.dataset as ds

    if not output:
        raise ValueError("expected an OUTPUT folder or s3:// URI, got an empty string")
    days = _check_run_dates(run_dates) if run_dates is not None else None
    fs, root = storage.arrow_filesystem(output)
    manifests = read_manifests(output) if manifests is None else manifests
    files = part_files(output)
    if not manifests and not files:
        raise FileNotFoundError(f"no results under {output} (expected {output}/runs/<run_id>.json and {output}/predictions/)")
    keep_runs: set[str] | None = committed_run_ids(manifests) if committed_only else None
    if run_ids is not None:
        keep_runs = set(run_ids) if keep_runs is None else keep_runs & set(run_ids)
    wanted = committed_parts(files, manifests) if committed_only else files
    if keep_runs is not None:
        wanted = [p for p in wanted if p.run_id is None or p.run_id in keep_runs]
    if days is not None:
        wanted = [p for p in wanted if p.run_date in days]
    counted = {p.path for p in committed_parts(wanted, manifests)}

    # Footers only; object stores answer one request at a time slowly, so a few are in flight.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(wanted)))) as pool:
        schemas = list(pool.map(lambda p: _part_schema(fs, p, output, p.path in counted), wanted))
    parts = [p for p, s in zip(wanted, schemas) if s is not None]
    schema = row_schema(s for s in schemas if s is not None)
    if parts:
        dataset = ds.dataset([p.path for p in parts], schema=schema, format="parquet", filesystem=fs,
                             partitioning=ds.partitioning(pa.schema([("run_date", pa.date32())]), flavor="hive"),
                             partition_base_dir=f"{root}/{PREDICTIONS_DIR}")
    else:
        dataset = ds.dataset(schema.empty_table())
    return Results(dataset=dataset, runs=_runs_table(manifests), manifests=manifests,
                   run_ids=frozenset(keep_runs) if keep_runs is not None else None, parts=parts, output=output)


def diagnose_scan_error(results: Results, exc: Exception) -> None:
    """Turn a failed scan of the part files into the error it stands for; return when ``exc`` is not one.

    Footers are checked by :func:`read_results`; a file whose footer is
    intact but whose pages are damaged fails only when DuckDB scans it, and
    Arrow's message does not always name the file. The file named, else
    each file in scope in turn, is read again in full: a read failure is a
    storage error (exit 3), bytes that do not decode are corrupt results
    (exit 6), and when every file reads the storage failed during the scan.

    Raises:
        CorruptResultsError, StorageError: whichever it is.
    """
    text = str(exc)
    named = [p for p in results.parts if p.path in text]
    if not named and f"'{SCAN_NAME}'" not in text:
        return
    fs, _ = storage.arrow_filesystem(results.output)
    for part in named or results.parts:
        try:
            with fs.open_input_file(part.path) as fh:
                data = fh.read()
        except OSError as io_exc:
            raise read_error(results.output, io_exc) from None
        try:
            pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowException) as decode_exc:
            raise _corrupt(part, decode_exc) from None
        del data
    raise read_error(results.output, exc)


def fetch_df(con: Any, results: Results, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
    """Run ``sql`` on a :func:`connect` connection; a part file that fails the scan is diagnosed.

    Raises:
        CorruptResultsError, StorageError: a part file failed the scan
            (:func:`diagnose_scan_error`); other DuckDB errors pass through.
    """
    import duckdb

    try:
        return con.execute(sql, params).fetch_df() if params is not None else con.execute(sql).fetch_df()
    except duckdb.Error as exc:
        diagnose_scan_error(results, exc)
        raise


# --- DuckDB -----------------------------------------------------------------


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


SCAN_NAME = "predictions_raw_data"  # the registered dataset; predictions_raw filters it on run_id
LATEST_PER_IMAGE_SQL = """
SELECT * FROM predictions_raw
QUALIFY row_number() OVER (
    PARTITION BY image_uri
    ORDER BY (status = 'ok') DESC, processed_at DESC NULLS LAST, run_id DESC
) = 1
"""


def connect(output: str | Results, *, committed_only: bool = True, run_ids: Collection[str] | None = None,
            run_dates: Collection[str] | None = None) -> Any:
    """An in-memory DuckDB connection with the result views, unable to touch any file.

    The committed part files are registered as a lazy pyarrow dataset:
    DuckDB hands each scan its columns and filters, so a query reads only
    the columns it uses, and a filter on ``run_date`` skips whole nights
    (their files are never opened). The dataset is registered before file
    access is switched off; a user's SQL cannot reach any other file.

    Args:
        output: OUTPUT location, or :class:`Results` already read.
        committed_only, run_ids, run_dates: see :func:`read_results`.

    Returns:
        A ``duckdb.DuckDBPyConnection`` with ``predictions``, ``predictions_raw``
        and ``runs``; external access is disabled and the configuration locked.
    """
    import duckdb

    results = output if isinstance(output, Results) else read_results(
        output, committed_only=committed_only, run_ids=run_ids, run_dates=run_dates)
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register(SCAN_NAME, results.dataset)
        con.register("_runs_arrow", results.runs)
        con.execute("CREATE TABLE runs_data AS SELECT * FROM _runs_arrow")
        con.unregister("_runs_arrow")
        where = ""
        if results.run_ids is not None:  # rows are filtered on their own run_id too, not only by file name
            where = " WHERE run_id IN (" + ", ".join(map(_literal, sorted(results.run_ids))) + ")" if results.run_ids else " WHERE false"
        con.execute(f"CREATE VIEW predictions_raw AS SELECT * FROM {SCAN_NAME}{where}")
        con.execute("CREATE VIEW runs AS SELECT * FROM runs_data ORDER BY started_at NULLS FIRST, run_id")
        con.execute(f"CREATE VIEW predictions AS {LATEST_PER_IMAGE_SQL}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def load_results(output: str, *, committed_only: bool = True, latest_only: bool = True,
                 run_ids: Collection[str] | None = None, run_dates: Collection[str] | None = None,
                 columns: Iterable[str] | None = None) -> pd.DataFrame:
    """Prediction rows as a DataFrame.

    Args:
        output: local folder or ``s3://bucket/prefix``.
        committed_only: apply the commit rule (rows of runs without a
            succeeded manifest never count).
        latest_only: one row per image (the ``predictions`` view); False
            gives every row (``predictions_raw``).
        run_ids: restrict to rows of these runs before picking the latest.
        run_dates: restrict to these nights (``YYYY-MM-DD``) before picking the latest.
        columns: only these columns (default: all); only they are read.
    """
    results = read_results(output, committed_only=committed_only, run_ids=run_ids, run_dates=run_dates)
    con = connect(results)
    try:
        view = "predictions" if latest_only else "predictions_raw"
        cols = "*" if columns is None else ", ".join(map(_ident, columns))
        return fetch_df(con, results, f"SELECT {cols} FROM {view} ORDER BY sample_id NULLS LAST, image_uri, processed_at")
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


def _pair_counts(samples: np.ndarray, classes: np.ndarray) -> dict[tuple[str, str], int]:
    """How many cells of each (sample, class)."""
    if not len(samples):
        return {}
    return pd.DataFrame({"s": samples, "c": classes}).groupby(["s", "c"]).size().to_dict()


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
    white_classes = _white_classes(frame, class_names, excluded)
    if sample is not None:
        frame = _only_sample(frame, sample)
    if not len(frame):
        return pd.DataFrame([], columns=DIFFERENTIAL_COLUMNS)
    tally = _SampleTallies.of(frame, excluded, with_runs=bool(shift_rules))
    out: list[dict[str, Any]] = []
    for sid in tally.samples:
        n_ok, n, n_ood, review, verified = tally.figures(sid)
        ood_share = n_ood / n_ok if n_ok else 0.0
        rule = _rule_for_runs(tally.runs.get(sid, set()), shift_rules, ood_share_limit)
        reliable = not sample_shifted(n_ok, n_ood, rule)
        warning = "; ".join(_sample_warnings(n_ok, n, n_ood, reliable, rule, min_cells))
        signed_by, signed_at = tally.signed.get(sid, (None, None))
        for cls in white_classes:
            k = int(tally.counts.get((sid, cls), 0))
            out.append({
                "sample_id": sid, "white_cells": n, "cell_class": cls, "count": k,
                "model_count": int(tally.model_counts.get((sid, cls), 0)),
                **_share(k, n if reliable else 0, ranges.get(cls), confidence),
                "reference": _reference_text(ranges.get(cls)),
                "needs_review": review, "verified": verified, "signed_off_by": signed_by, "signed_off_at": signed_at,
                "errors": int(tally.errors.get(sid, 0)), "ood_share": ood_share,
                "reliable": reliable, "warning": warning,
            })
    df = pd.DataFrame(out, columns=DIFFERENTIAL_COLUMNS)
    for col in ("percent", "ci_low", "ci_high"):
        df[col] = df[col].astype("float64")
    return df


def _white_classes(frame: pd.DataFrame, class_names: Iterable[str] | None, excluded: set[str]) -> list[str]:
    """The classes a differential reports: the model's white-cell classes, then verified ones it does not have."""
    classes = list(class_names) if class_names is not None else [c[2:] for c in frame.columns if c.startswith("p_")]
    ok_all = frame[frame["status"] == "ok"] if len(frame) else frame
    extra = sorted(set(_counted_class(ok_all).dropna()) - set(classes) - excluded) if len(frame) else []
    return [c for c in classes if c not in excluded] + extra


def _only_sample(frame: pd.DataFrame, sample: str) -> pd.DataFrame:
    """The rows of one sample; an unknown sample is an error that lists the known ones."""
    known = sorted(frame["sample_id"].dropna().unique()) if len(frame) else []
    if sample not in known:
        shown = ", ".join(map(str, known[:20])) + (" ..." if len(known) > 20 else "")
        raise ValueError(f"no sample {sample!r} in the committed results (samples: {shown or 'none'})")
    return frame[frame["sample_id"] == sample]


def _sample_warnings(n_ok: int, n_white: int, n_ood: int, reliable: bool, rule: ShiftRule,
                     min_cells: int) -> list[str]:
    """Why a sample's differential must not be read, or must be read with care."""
    warnings: list[str] = []
    if not reliable:
        share = n_ood / n_ok if n_ok else 0.0
        warnings.append(f"UNRELIABLE: {share:.0%} of images out of distribution ({n_ood} of {n_ok}; "
                        f"limit {rule.describe()}); do not report this differential")
    if n_white == 0:
        warnings.append("no white cells")
    elif n_white < min_cells:
        warnings.append(f"only {n_white} white cells (fewer than {min_cells})")
    return warnings


def _share(k: int, n: int, rng: tuple[float | None, float | None] | None, confidence: float) -> dict[str, Any]:
    """Percent, Wilson interval and range flag of k of n white cells; empty when n is 0 (or not reliable)."""
    if not n:
        return {"percent": None, "ci_low": None, "ci_high": None, "flag": ""}
    pct = 100.0 * k / n
    lo, hi = wilson_interval(k, n, confidence)
    return {"percent": pct, "ci_low": 100.0 * lo, "ci_high": 100.0 * hi, "flag": _flag(pct, rng)}


@dataclass
class _SampleTallies:
    """Every per-sample figure of a differential, from one grouped pass over the rows.

    Why grouped: a night holds hundreds of samples, and a loop over samples
    that filters the frame each time is quadratic; this is one pass, then a
    loop of plain Python over the samples.
    """

    samples: list[str]  # every sample id of the rows, ok or not, sorted
    by_sample: dict[str, tuple[int, int, int, int, int]]  # sample -> ok, white, ood, review, verified
    errors: dict[str, int]
    counts: dict[tuple[str, str], int]  # (sample, counted class) of white cells
    model_counts: dict[tuple[str, str], int]  # (sample, the model's class) of white cells
    runs: dict[str, set[str]]  # sample -> run ids its ok rows come from (only when shift rules are given)
    signed: dict[str, tuple[Any, Any]]  # sample -> (signed_off_by, signed_off_at)

    @classmethod
    def of(cls, frame: pd.DataFrame, excluded: set[str], with_runs: bool) -> _SampleTallies:
        sid_all = frame["sample_id"].fillna("").astype(str).to_numpy()
        is_ok = (frame["status"] == "ok").to_numpy()
        ok, sid_ok = frame[is_ok], sid_all[is_ok]
        counted, predicted = _counted_class(ok), ok["predicted_class"]
        white = (~counted.isin(excluded) & counted.notna()).to_numpy()
        model_white = (~predicted.isin(excluded) & predicted.notna()).to_numpy()
        grouped = pd.DataFrame({
            "ok": 1, "white": white.astype(int),
            "ood": _flag_column(ok, "out_of_distribution"), "review": _flag_column(ok, "needs_review"),
            "verified": (ok["verified_class"].notna().to_numpy() if "verified_class" in ok.columns
                         else np.zeros(len(ok), dtype=bool)).astype(int),
        }, index=sid_ok).groupby(level=0).sum()
        runs: dict[str, set[str]] = {}
        if with_runs and "run_id" in ok.columns:
            for sid, rid in zip(sid_ok, ok["run_id"]):
                if rid is not None and rid == rid:
                    runs.setdefault(sid, set()).add(rid)
        signed: dict[str, tuple[Any, Any]] = {}
        if "signed_off_by" in frame.columns:
            has = frame["signed_off_by"].notna().to_numpy()
            for sid, by, at in zip(sid_all[has], frame["signed_off_by"][has], frame["signed_off_at"][has]):
                signed.setdefault(sid, (by, at))  # the first row that carries it, as the frame is ordered
        return cls(
            samples=sorted(set(sid_all)),
            by_sample={str(sid): (int(a), int(b), int(c), int(d), int(e)) for sid, a, b, c, d, e in grouped.itertuples()},
            errors=pd.Series((~is_ok).astype(int), index=sid_all).groupby(level=0).sum().to_dict(),
            counts=_pair_counts(sid_ok[white], counted.to_numpy()[white]),
            model_counts=_pair_counts(sid_ok[model_white], predicted.to_numpy()[model_white]),
            runs=runs, signed=signed)

    def figures(self, sid: str) -> tuple[int, int, int, int, int]:
        """(ok images, white cells, out of distribution, needing review, verified) of one sample."""
        return self.by_sample.get(sid, (0, 0, 0, 0, 0))


def _flag_column(rows: pd.DataFrame, column: str) -> np.ndarray:
    """A nullable boolean column as 0/1, a missing value as 0."""
    return rows[column].astype("boolean").fillna(False).astype(bool).to_numpy().astype(int)


def differential(output: str, sample: str | None = None, *, run_dates: Collection[str] | None = None,
                 **options: Any) -> pd.DataFrame:
    """Per-sample white-cell differential of the committed results, reviewers' verdicts applied.

    Counts one row per image (the ``predictions`` view), so re-runs never
    double count. ``options`` are those of :func:`differential_from_frame`;
    each sample is judged by the unreliable-sample rule its runs recorded.
    ``run_dates`` limits it to the rows of those nights (see :func:`query_frame`).
    """
    return query_frame(output, canned="differential", sample=sample, run_dates=run_dates, **options)


# --- canned queries and formatting -------------------------------------------


# The ok rows of ``predictions`` that need review. An error row never beats an ok row, so an image's
# latest ok row is its ``predictions`` row; only images with several ok rows need the window, and only
# they and the rows that need review are held in memory (not every image of the archive).
# ``needs_review = true``, not a bare ``needs_review``: DuckDB pushes the comparison into the Arrow scan,
# while a bare boolean column is filtered only after every other column of the row has been read.
REVIEW_QUEUE_SQL = """
WITH repeated AS (
    SELECT hash(image_uri) AS h FROM predictions_raw WHERE status = 'ok' GROUP BY 1 HAVING count(*) > 1
)
SELECT sample_id, image_uri, predicted_class, confidence, out_of_distribution, explanation_suspect,
       heatmap_uri, model_version, run_id
FROM predictions_raw
WHERE status = 'ok' AND (needs_review = true OR hash(image_uri) IN (SELECT h FROM repeated))
QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY processed_at DESC NULLS LAST, run_id DESC) = 1
    AND needs_review = true
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


# What the differential and the agreement read of each row (verdicts join on image_uri + image_sha256).
DIFFERENTIAL_INPUT = ("image_uri", "image_sha256", "sample_id", "predicted_class", "status", "needs_review",
                      "out_of_distribution", "run_id")
AGREEMENT_INPUT = ("image_uri", "image_sha256", "sample_id", "predicted_class", "run_id", "run_date", "model_version")


def query_frame(output: str, sql: str | None = None, *, canned: str | None = None, sample: str | None = None,
                run_dates: Collection[str] | None = None, **differential_options: Any) -> pd.DataFrame:
    """Run one read-only statement or a canned query and return its rows.

    Args:
        output, sql, canned, sample: see :func:`run_query`.
        run_dates: only rows of these nights (``YYYY-MM-DD``): the part files
            of other nights are never opened, and ``predictions`` picks the
            latest row per image among these nights' rows. ``runs`` is not
            affected.
        differential_options: see :func:`differential_from_frame`.

    Raises:
        QueryError: the SQL is refused or fails.
        ValueError: bad combination of arguments.
        CorruptResultsError: a committed part file in scope cannot be decoded.
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

    results = read_results(output, run_dates=run_dates)
    con = connect(results)
    try:
        if canned in ("differential", "agreement"):
            from wbc_batch.review.counts import agreement_from_frame, attach_verdicts

            if canned == "agreement":  # every committed row: each run against the same verdicts
                cols = ", ".join(map(_ident, AGREEMENT_INPUT))
                raw = fetch_df(con, results, f"SELECT {cols} FROM predictions_raw WHERE status = 'ok'")
                return agreement_from_frame(attach_verdicts(raw, output), results.class_names)
            cols = ", ".join(map(_ident, DIFFERENTIAL_INPUT))
            frame = attach_verdicts(fetch_df(con, results, f"SELECT {cols} FROM predictions"), output)
            options = {"class_names": results.class_names or None, "shift_rules": run_shift_rules(results.manifests),
                       **differential_options}
            return differential_from_frame(frame, sample, **options)
        if canned == "review-queue":
            sql = REVIEW_QUEUE_SQL
        elif canned == "runs":
            sql = RUNS_SQL
        elif canned == "drift":
            sql = drift_sql(results.class_names)
        assert sql is not None  # one of the branches above, or the caller's
        try:
            return fetch_df(con, results, sql)
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
              sample: str | None = None, run_dates: Collection[str] | None = None, **differential_options: Any) -> str:
    """``wbc-batch query``: one read-only statement or canned query, formatted.

    Args:
        output: local folder or ``s3://bucket/prefix``.
        sql: one SELECT/WITH/SHOW/DESCRIBE/EXPLAIN statement over
            ``predictions``, ``predictions_raw`` and ``runs``.
        fmt: ``table``, ``csv`` or ``json``.
        canned: ``differential``, ``review-queue``, ``runs``, ``drift`` or ``agreement``.
        sample: with ``differential``, only this sample.
        run_dates: only these nights' rows (``YYYY-MM-DD``); see :func:`query_frame`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    frame = query_frame(output, sql, canned=canned, sample=sample, run_dates=run_dates, **differential_options)
    if canned == "differential" and fmt == "table":  # percent to 0.1 for people; csv/json keep full precision
        frame = frame.copy()
        for col in ("percent", "ci_low", "ci_high"):
            frame[col] = frame[col].map(lambda v: "-" if pd.isna(v) else f"{v:.1f}")
        frame["ood_share"] = frame["ood_share"].map(lambda v: f"{v:.1%}")
    return format_frame(frame, fmt)
