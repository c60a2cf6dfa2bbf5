"""Writing results: the Parquet schema, part files and run manifests.

Commit protocol (see docs/DESIGN.md): part files are named
``part-<run_id>-<nnnnn>.parquet`` so a re-run of the same run id rewrites the
same names; the run manifest ``runs/<run_id>.json`` with ``status:
succeeded`` is written last and is the only thing that makes a run's rows
count. A run killed at any point therefore leaves nothing that queries see.

The manifest has one typed form, :class:`RunManifest`: the pipeline builds it
and writes it with :func:`write_manifest`; the CLI, queries, reports,
nightly and the review app read it with :func:`read_manifest` /
:func:`RunManifest.from_json`, so its keys are spelled in one place.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
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
        # below 1 when a cell that filled the image was shown smaller (geometry.py); null before it existed
        pa.field("input_zoom", pa.float32()),
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
               "input_zoom", "explanation_suspect", "ood_score", "out_of_distribution"}
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


_PART_RE = re.compile(r"^part-(?P<run_id>.+)-(?P<seq>\d{5,})\.parquet$")  # seq as part_file_uri writes it


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
class Tallies:
    """The run totals that the streaming counter and the manifest both carry (one list of names)."""

    total: int = 0
    ok: int = 0
    error: int = 0
    needs_review: int = 0
    out_of_distribution: int = 0
    explanation_suspect: int = 0

    def tallies(self) -> dict[str, int]:
        """The totals by name, in manifest order."""
        return {f.name: getattr(self, f.name) for f in fields(Tallies)}

    def set_tallies(self, values: dict[str, int]) -> None:
        """Set every total from ``values`` (a missing one reads 0)."""
        for f in fields(Tallies):
            setattr(self, f.name, int(values.get(f.name, 0)))


@dataclass
class RunCounts(Tallies):
    """Counters accumulated while the rows stream past."""

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
        """JSON form for the manifest (``counts``)."""
        return self.summary().to_json()

    def summary(self) -> ManifestCounts:
        """The totals as the manifest records them."""
        out = ManifestCounts(
            per_class=dict(sorted(self.per_class.items())), errors_by_kind=dict(self.errors_by_kind),
            samples=len(self.per_sample), sample_ids=sorted(self.per_sample))
        out.set_tallies(self.tallies())
        return out


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




# --- the run manifest ---------------------------------------------------------
#
# A manifest is data from storage, possibly written by an older version or by
# hand, so reading it never fails on a missing key or a value of the wrong
# kind; each field falls back to the default documented on it. Writing keeps
# the keys and their order as classify has always written them (docs/DESIGN.md).

STATUS_SUCCEEDED = "succeeded"


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _strs(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, list) else None


def _number(value: Any) -> float | None:
    """A JSON number (not a bool: ``true`` is no count), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int:
    number = _number(value)
    return int(number) if number is not None else 0


def _float(value: Any) -> float:
    number = _number(value)
    return float(number) if number is not None else 0.0


@dataclass
class ModelRef:
    """The artifact a run used (``model``); absent keys of older manifests read None or empty."""

    uri: str | None = None
    name: str | None = None
    version: str | None = None
    sha256: str | None = None
    digest: str | None = None  # whole-artifact digest (model.artifact_digest); None before runs recorded it
    class_names: list[str] = field(default_factory=list)
    non_wbc_classes: list[str] = field(default_factory=list)
    review_threshold: float | None = None  # the model's default; None before runs recorded it

    def to_json(self) -> dict[str, Any]:
        """The ``model`` object of the manifest."""
        return {"uri": self.uri, "name": self.name, "version": self.version, "sha256": self.sha256,
                "digest": self.digest, "class_names": list(self.class_names),
                "non_wbc_classes": list(self.non_wbc_classes), "review_threshold": self.review_threshold}

    @classmethod
    def from_json(cls, data: Any) -> ModelRef:
        """Read ``model``; anything but an object reads as an unknown model."""
        d = _dict(data)
        return cls(uri=_str(d.get("uri")), name=_str(d.get("name")), version=_str(d.get("version")),
                   sha256=_str(d.get("sha256")), digest=_str(d.get("digest")),
                   class_names=_strs(d.get("class_names")) or [],
                   non_wbc_classes=_strs(d.get("non_wbc_classes")) or [],
                   review_threshold=_number(d.get("review_threshold")))


@dataclass
class ManifestCounts(Tallies):
    """What a run counted (``counts``); a count an older manifest lacks reads 0."""

    per_class: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    # The samples the run touched: a report reads an earlier run's parts only when it shares one.
    # None for manifests written before runs recorded them: such a run may hold any sample.
    sample_ids: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``counts`` object of the manifest (``sample_ids`` left out when unknown)."""
        out: dict[str, Any] = {
            **self.tallies(),
            "per_class": dict(self.per_class), "errors_by_kind": dict(self.errors_by_kind), "samples": self.samples,
        }
        if self.sample_ids is not None:
            out["sample_ids"] = list(self.sample_ids)
        return out

    @classmethod
    def from_json(cls, data: Any) -> ManifestCounts:
        """Read ``counts``; values that are not numbers read 0."""
        d = _dict(data)
        counts = cls(per_class={str(k): _int(v) for k, v in _dict(d.get("per_class")).items()},
                     errors_by_kind={str(k): _int(v) for k, v in _dict(d.get("errors_by_kind")).items()},
                     samples=_int(d.get("samples")), sample_ids=_strs(d.get("sample_ids")))
        counts.set_tallies({f.name: _int(d.get(f.name)) for f in fields(Tallies)})
        return counts


@dataclass
class RunTimings:
    """How long a run took (``timings``); absent values read 0, ``first_row_seconds`` None."""

    seconds: float = 0.0
    images_per_second: float = 0.0
    first_row_seconds: float | None = None  # None when the run had no row (and before runs recorded it)
    phases: dict[str, float] = field(default_factory=dict)  # fixed costs by phase (verify_model_s, listing_s ...)

    def to_json(self) -> dict[str, Any]:
        """The ``timings`` object of the manifest."""
        out: dict[str, Any] = {"seconds": self.seconds, "images_per_second": self.images_per_second}
        if self.first_row_seconds is not None:
            out["first_row_seconds"] = self.first_row_seconds
        out["phases"] = dict(self.phases)
        return out

    @classmethod
    def from_json(cls, data: Any) -> RunTimings:
        """Read ``timings``."""
        d = _dict(data)
        return cls(seconds=_float(d.get("seconds")), images_per_second=_float(d.get("images_per_second")),
                   first_row_seconds=_number(d.get("first_row_seconds")),
                   phases={str(k): _float(v) for k, v in _dict(d.get("phases")).items()})


@dataclass
class RunManifest:
    """The run manifest ``runs/<run_id>.json``: the commit marker of a run and what it did.

    Nested objects that every reader uses are typed (``model``, ``counts``,
    ``timings``); the rest stay JSON objects because only people and the
    ``runs`` view read them. Keys this version does not know (``nightly``
    and other ``manifest_extra``) are kept in ``extra`` and written back at
    the top level, so reading and writing a manifest loses nothing.
    """

    run_id: str
    status: str | None = STATUS_SUCCEEDED  # only "succeeded" commits; None when a manifest states none
    input: str | None = None
    output: str | None = None
    model: ModelRef = field(default_factory=ModelRef)
    started_at: str | None = None  # ISO 8601 strings, as written; query.parse_time reads them
    finished_at: str | None = None
    run_date: str | None = None  # the night (YYYY-MM-DD) of the run's part files
    counts: ManifestCounts = field(default_factory=ManifestCounts)
    timings: RunTimings = field(default_factory=RunTimings)
    resources: dict[str, Any] = field(default_factory=dict)  # workers, gpus_per_worker, cpus_per_worker
    # The part files the commit covers. None for manifests that list none: then every part of the run id counts.
    parquet_files: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the ClassifyConfig settings of the run, n_uris
    # {"detected": bool, "evaluated": bool, the rule (max_share, min_ood), per-sample shares ...};
    # older manifests that wrote a bare true/false read as {"detected": that}.
    domain_shift: dict[str, Any] = field(default_factory=dict)
    faithfulness: dict[str, Any] | None = None  # written only when the run measured it
    warnings: list[str] = field(default_factory=list)  # written only when there are some
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)  # where it was read from; never written

    @property
    def committed(self) -> bool:
        """The commit rule: only a manifest that says succeeded makes its run's rows count."""
        return self.status == STATUS_SUCCEEDED

    @property
    def shift_detected(self) -> bool:
        """True when the run raised the domain-shift alarm."""
        return bool(self.domain_shift.get("detected"))

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``runs/<run_id>.json``, keys in the order classify writes them."""
        out: dict[str, Any] = {
            "run_id": self.run_id, "status": self.status, "input": self.input, "output": self.output,
            "model": self.model.to_json(), "started_at": self.started_at, "finished_at": self.finished_at,
            "run_date": self.run_date, "counts": self.counts.to_json(), "timings": self.timings.to_json(),
            "resources": dict(self.resources),
        }
        if self.parquet_files is not None:
            out["parquet_files"] = list(self.parquet_files)
        out["options"] = dict(self.options)
        out["domain_shift"] = dict(self.domain_shift)
        if self.faithfulness is not None:
            out["faithfulness"] = self.faithfulness
        if self.warnings:
            out["warnings"] = list(self.warnings)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], run_id: str | None = None) -> RunManifest:
        """Read a manifest of any age; ``run_id`` names it when it does not name itself (the file name)."""
        shift = data.get("domain_shift")
        faithfulness = data.get("faithfulness")
        return cls(
            run_id=str(data.get("run_id") or run_id or ""),
            status=_str(data.get("status")),
            input=_str(data.get("input")),
            output=_str(data.get("output")),
            model=ModelRef.from_json(data.get("model")),
            started_at=_str(data.get("started_at")),
            finished_at=_str(data.get("finished_at")),
            run_date=_str(data.get("run_date")),
            counts=ManifestCounts.from_json(data.get("counts")),
            timings=RunTimings.from_json(data.get("timings")),
            resources=_dict(data.get("resources")),
            parquet_files=_strs(data.get("parquet_files")),
            options=_dict(data.get("options")),
            domain_shift=_dict(shift) if isinstance(shift, Mapping) else ({"detected": shift} if isinstance(shift, bool) else {}),
            faithfulness=_dict(faithfulness) if isinstance(faithfulness, Mapping) else None,
            warnings=_strs(data.get("warnings")) or [],
            extra={k: v for k, v in data.items() if k not in _MANIFEST_KEYS and not str(k).startswith("_")},
        )

    @classmethod
    def parse(cls, text: str | bytes, run_id: str | None = None, path: str | None = None) -> RunManifest | None:
        """A manifest file's content; None when it is not a JSON object.

        The manifest is written in one piece, so one that does not parse was
        never committed: readers skip it rather than fail.
        """
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        manifest = cls.from_json(data, run_id)
        manifest.path = path
        return manifest


_MANIFEST_KEYS = frozenset({"run_id", "status", "input", "output", "model", "started_at", "finished_at", "run_date",
                            "counts", "timings", "resources", "parquet_files", "options", "domain_shift",
                            "faithfulness", "warnings"})


def write_manifest(output: str, manifest: RunManifest) -> str:
    """Write the run manifest: the commit marker, so always the last write of a run."""
    uri = manifest_uri(output, validate_run_id(manifest.run_id))
    storage.write_bytes(uri, json.dumps(manifest.to_json(), indent=2, default=str).encode())
    return uri


def read_manifest(output: str, run_id: str) -> RunManifest | None:
    """One run's manifest; None when it has none or it does not parse (the run is not committed)."""
    uri = manifest_uri(output, validate_run_id(run_id))
    try:
        text = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    return RunManifest.parse(text, run_id, path=uri)


# --- what counts: the commit rule over files (readers: query, report, nightly) ---------------------

_RUN_DATE_RE = re.compile(r"(?:^|/)run_date=(\d{4}-\d{2}-\d{2})(?:/|$)")


@dataclass(frozen=True)
class Part:
    """One part file: where it is in the pyarrow filesystem, its run (from the name) and night (from the folder)."""

    path: str
    run_id: str | None
    run_date: str | None


def read_error(output: str, exc: Exception) -> storage.StorageError:
    """The one-line error for results that cannot be read (listing, footer or scan), naming OUTPUT."""
    return storage.StorageError(f"cannot read results under {output}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _list(fs: Any, path: str, output: str) -> list[str]:
    """Files under ``path`` (recursive, sorted); empty when the folder is absent."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise read_error(output, exc) from None
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def read_manifests(output: str) -> dict[str, RunManifest]:
    """Every run manifest under ``OUTPUT/runs``, keyed by run id.

    A manifest that is not a JSON object is skipped: the manifest is the
    commit marker and is written atomically, so an unreadable one is not a
    commit (:meth:`RunManifest.parse`).
    """
    fs, root = storage.arrow_filesystem(output)
    out: dict[str, RunManifest] = {}
    for path in _list(fs, f"{root}/{RUNS_DIR}", output):
        if not path.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(path) as fh:
                text = fh.read()
        except OSError as exc:
            raise read_error(output, exc) from None
        manifest = RunManifest.parse(text, run_id=path.rsplit("/", 1)[-1][: -len(".json")], path=path)
        if manifest is not None:
            out[manifest.run_id] = manifest
    return out


def committed_run_ids(manifests: Mapping[str, RunManifest]) -> set[str]:
    """Run ids whose manifest says ``status: succeeded`` (the commit rule)."""
    return {rid for rid, m in manifests.items() if m.committed}


def _committed_files(manifest: RunManifest) -> set[str] | None:
    """Part-file names a committed manifest lists, or None when it lists none."""
    if manifest.parquet_files is None:
        return None
    return {f.rstrip("/").rsplit("/", 1)[-1] for f in manifest.parquet_files}


def part_files(output: str) -> list[Part]:
    """Every ``*.parquet`` under ``OUTPUT/predictions`` (sorted), with its run id and night; no file is opened."""
    fs, root = storage.arrow_filesystem(output)
    out = []
    for path in _list(fs, f"{root}/{PREDICTIONS_DIR}", output):
        if not path.endswith(".parquet"):
            continue
        date = _RUN_DATE_RE.search(path)
        out.append(Part(path, part_run_id(path.rsplit("/", 1)[-1]), date.group(1) if date else None))
    return out


def committed_parts(parts: Iterable[Part], manifests: Mapping[str, RunManifest]) -> list[Part]:
    """The part files whose rows count: the commit rule applied to file names.

    A file counts when its run's manifest says succeeded and, when the
    manifest lists its ``parquet_files``, it is one of them (not a stale part
    of an earlier attempt of the run id). Skipping the others up front also
    skips half-written files. Rows are filtered on their own ``run_id`` as
    well (:attr:`wbc_batch.query.Results.run_ids`).
    """
    committed = committed_run_ids(manifests)
    out = []
    for part in parts:
        if part.run_id is None or part.run_id not in committed:
            continue
        listed = _committed_files(manifests[part.run_id])
        if listed is not None and part.path.rsplit("/", 1)[-1] not in listed:
            continue
        out.append(part)
    return out
