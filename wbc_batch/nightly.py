"""Nightly incremental runs over a growing input: exactly once, safe to re-run, one writer at a time.

What is "new" is decided from what OUTPUT already holds. The truth is the
committed results (rows whose ``run_id`` has ``OUTPUT/runs/<run_id>.json``
with ``status == "succeeded"``, see ``docs/DESIGN.md``). An image is *done*
when a committed ``ok`` row with the same ``image_uri`` and ``image_sha256``
exists.

Change detection from the listing: every row records what the input listing
said of its image (``source_size``, ``source_etag`` on S3, ``source_mtime``;
``results.SOURCE_FIELDS``). A night lists the input (no extra request per
object on S3; a ``stat`` per file locally) and joins the listing with the
committed rows in DuckDB (``KNOWN_SQL``): an entry whose size and ETag (S3),
or size and mtime (local, where there is no ETag), equal those a committed
row recorded is taken to hold the bytes that row hashed, and is not read.
Only the other entries (new, changed in the listing, or from rows written
before these columns existed) are read and hashed (sha256), so a night with
nothing new reads no image at all. What this trusts: that a change of content
changes the ETag (S3: always) or the size or mtime (local: a tool that
rewrites a file and restores its mtime, at the same size, defeats it).
``--rehash`` reads and hashes every entry, the full pass. An entry whose
listing changed but whose bytes did not (``touch``, a copy without ``-p``)
is read every night: the rows it matches keep the old listing state.

Decision per candidate image (``uri``, ``sha256``), over the committed rows
considered (see model policy below), in one DuckDB query (``PLAN_SQL``):

* an ``ok`` row for (uri, sha256)                  -> skipped (done)
* a ``permanent`` error row (a corrupt image)      -> skipped, unless ``--retry-errors``
* a ``transient`` error row (storage failure)      -> retried
* rows for the uri, but only with other hashes     -> changed, processed again
* no row                                           -> new

Model policy: by default a new model processes only images that no
committed row covers under *any* model, so a model upgrade does not silently
re-run the whole archive. With ``--reprocess-on-model-change`` only rows of
tonight's artifact count, told apart by artifact digest (``model_digest``),
so every image without a row of this exact artifact is processed, a new
``model.json`` under the same version included. Rows written before rows
carried a digest (null ``model_digest``) count when their ``model_version``
is tonight's. The night pins the digest it planned with, so the run refuses
an artifact that changed in between (exit 4).

Exactly once: the run id is the date's first id not committed yet
(``nightly-YYYYMMDD`` of the UTC date, then ``nightly-YYYYMMDD-2``, ``-3``,
...; :func:`next_run_id`), decided under the lease, so a re-run after a kill
gets the same id and rewrites the same part files (part files left by an
earlier, uncommitted attempt of the same run id are deleted first by
``run_classify``: otherwise an attempt that wrote more part files than the
re-run would leave extra files that the re-run's manifest would commit), and
a second run on the same date that finds new images commits them under an
id of its own. An explicit ``--run-id`` that is already committed is not run
again (``run_classify`` would discard its committed rows). The commit itself
is the manifest that ``run_classify`` writes last; a night with nothing to
process commits nothing (no manifest, no part file) and returns
``status: "nothing_new"`` with its counts. Which images failed is in the
manifest's ``counts.error`` / ``counts.errors_by_kind`` and in the error rows
themselves.

Lease: ``OUTPUT/state/lease.json`` is created with a conditional create
(``write_bytes_if_absent``: S3 ``If-None-Match: *``, local ``O_EXCL``), so of
two runs started at once exactly one creates it; the other fails with
:class:`LeaseHeldError`. The holder renews the lease every ``ttl/4`` by a
compare-and-swap (S3 ``If-Match: <etag>``; locally a read-compare-replace
under ``flock``). A lease whose ``expires_at`` has passed (its holder was
killed) is taken over by the same compare-and-swap against the ETag that was
read, so of several runs racing to take over one stale lease exactly one
wins. Release is a compare-and-swap that marks the lease released, never an
unconditional delete, so a run can never remove a lease it no longer owns.

On S3 the store must honour ``If-None-Match``/``If-Match``; each acquire
first checks that with a probe object and refuses a store that ignores them.

Race semantics and assumptions: a holder that cannot renew (lost the CAS, or
storage unreachable) for ``0.75 * ttl`` by its own monotonic clock ends its
process at once (``os._exit``) before anyone may take over, so it never
writes its manifest after losing the lease (self-fencing). This is safe when
clock skew between hosts is well below ``ttl/4`` and when the Ray tasks of a
killed driver stop with it (Ray ends a job's workers when its driver dies;
the ttl gives that time). Choose ``--lease-seconds`` far above a renewal
round trip; the default is 15 minutes. ``run_classify`` renews the lease
(compare-and-swap) right before it writes the manifest (``before_commit``),
so a driver frozen (SIGSTOP, a suspended VM) past the ttl fails that swap and
does not commit. What remains is the window of one object write between that
swap and the manifest write.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from wbc_batch import storage
from wbc_batch.errors import EXIT_LEASE_HELD, WbcError

if TYPE_CHECKING:  # pipeline imports Ray and TensorFlow; keep them off this module's import path
    from wbc_batch.pipeline import ClassifyConfig

log = logging.getLogger(__name__)

LEASE_PATH = "state/lease.json"
DEFAULT_LEASE_SECONDS = 900.0
ROW_COLUMNS = ["image_uri", "image_sha256", "status", "error_kind", "model_version", "model_digest", "run_id"]
ROWS_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("image_sha256", pa.string()), ("status", pa.string()), ("error_kind", pa.string()),
    ("model_version", pa.string()), ("model_digest", pa.string()), ("run_id", pa.string()),
    ("source_size", pa.int64()), ("source_etag", pa.string()), ("source_mtime", pa.timestamp("us", tz="UTC")),
])  # ROW_COLUMNS plus what the listing said (results.SOURCE_FIELDS)
_LIST_CAP = 1000  # URIs listed per category in the manifest; counts are always exact


class LeaseHeldError(WbcError, RuntimeError):
    """Another nightly run holds the lease on this OUTPUT (or won the race to take it): exit 75, try later."""

    exit_code = EXIT_LEASE_HELD
    prefix = ""  # the message names the holder and says what to do


class LeaseLostError(RuntimeError):
    """This run's lease was taken over or could not be renewed; it must not commit."""


# --- lease -----------------------------------------------------------------


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


class _LeaseStore:
    """Conditional create / read / compare-and-swap of one small JSON document."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def create(self, data: bytes) -> str | None:
        """Create if absent; return the new ETag, or None when it exists."""
        raise NotImplementedError

    def read(self) -> tuple[bytes, str] | None:
        """Return (content, etag), or None when absent."""
        raise NotImplementedError

    def swap(self, data: bytes, etag: str) -> str | None:
        """Replace only if the current ETag is ``etag``; return the new ETag or None."""
        raise NotImplementedError


class _S3LeaseStore(_LeaseStore):
    def verify_conditional_writes(self) -> None:
        """Refuse a store that ignores ``If-None-Match`` / ``If-Match`` (the lease would be unsafe there).

        Some S3-compatible stores accept the headers and overwrite anyway; a
        lease on such a store would let two runs commit. Three small writes to
        a probe object beside the lease tell the difference.
        """
        probe = storage.join(self.uri.rsplit("/", 1)[0], f".conditional-probe-{uuid.uuid4().hex}")
        probe_store = _S3LeaseStore(probe)
        try:
            first = probe_store.create(b"1")
            second = storage.write_bytes_if_absent(probe, b"2")
            wrong_etag = probe_store.swap(b"3", '"0000000000000000000000000000000a"')
        finally:
            storage.delete(probe)
        if first is None or second or wrong_etag is not None:
            raise storage.StorageError(
                f"the object store behind {self.uri} ignores conditional writes (If-None-Match/If-Match); "
                "a nightly lease cannot be safe there"
            )

    def create(self, data: bytes) -> str | None:
        if not storage.write_bytes_if_absent(self.uri, data):
            return None
        got = self.read()
        # Nobody can replace a fresh, unexpired lease, so what we read back is ours.
        if got is None or got[0] != data:
            return None
        return got[1]

    def read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = storage.split_s3(self.uri)
        try:
            resp = storage.s3_client().get_object(Bucket=bucket, Key=key)
            return resp["Body"].read(), str(resp["ETag"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            code = exc.response.get("Error", {}).get("Code")
            raise storage.StorageError(f"cannot read lease {self.uri}: {code}") from None
        except BotoCoreError as exc:
            raise storage.StorageError(f"cannot read lease {self.uri}: {type(exc).__name__}") from None

    def swap(self, data: bytes, etag: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = storage.split_s3(self.uri)
        try:
            resp = storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)
            return str(resp["ETag"])
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "404", "NoSuchKey"):
                return None
            raise storage.StorageError(f"cannot write lease {self.uri}: {code}") from None
        except BotoCoreError as exc:
            raise storage.StorageError(f"cannot write lease {self.uri}: {type(exc).__name__}") from None


class _LocalLeaseStore(_LeaseStore):
    """A local lease; every step runs under ``flock`` on a lock file beside it.

    ``O_EXCL`` alone cannot take over a stale file race-free (rename and
    replace are not compare-and-swap), so the read-compare-replace happens
    under an exclusive ``flock``. A local OUTPUT is on one machine, where
    ``flock`` is reliable; it is not for network file systems.
    """

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        lock = Path(self.uri).with_name(".lease.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        with self._locked():
            return self._etag(data) if storage.write_bytes_if_absent(self.uri, data) else None

    def read(self) -> tuple[bytes, str] | None:
        with self._locked():
            return self._read_unlocked()

    def _read_unlocked(self) -> tuple[bytes, str] | None:
        try:
            data = Path(self.uri).read_bytes()
        except FileNotFoundError:
            return None
        return data, self._etag(data)

    def swap(self, data: bytes, etag: str) -> str | None:
        with self._locked():
            current = self._read_unlocked()
            if current is None or current[1] != etag:
                return None
            storage.write_bytes(self.uri, data)
            return self._etag(data)


class Lease:
    """A renewable, expiring lease on one OUTPUT, held for the length of a nightly run.

    Args:
        output_uri: the OUTPUT folder or ``s3://`` prefix the lease protects.
        run_id: recorded in the lease so the loser's message names the holder.
        ttl_s: seconds a lease stays valid without renewal; also how long a
            killed run blocks the next one.
        fence: called (from the heartbeat thread) when the lease is lost;
            the default ends the process so it cannot commit.
    """

    def __init__(self, output_uri: str, run_id: str, ttl_s: float = DEFAULT_LEASE_SECONDS,
                 fence: Callable[[str], None] | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease seconds must be positive, got {ttl_s}")
        self.uri = storage.join(output_uri, LEASE_PATH)
        self.run_id = run_id
        self.ttl_s = float(ttl_s)
        self.owner = uuid.uuid4().hex
        self.store: _LeaseStore = _S3LeaseStore(self.uri) if storage.is_remote(self.uri) else _LocalLeaseStore(self.uri)
        self._etag: str | None = None
        self._acquired_at = 0.0
        self._renewals = 0
        self._last_ok = 0.0  # monotonic time of the last successful write
        self._lost = threading.Event()
        self._lock = threading.Lock()  # the heartbeat and check() must not race on one ETag
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fence: Callable[[str], None] = fence or _exit_on_lost_lease
        self.took_over: dict[str, Any] | None = None

    def _document(self, released: bool = False) -> bytes:
        now = _now()
        doc = {
            "owner": self.owner,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": _iso(self._acquired_at or now),
            "renewed_at": _iso(now),
            "renewals": self._renewals,
            "expires_at_epoch": now if released else now + self.ttl_s,
            "expires_at": _iso(now if released else now + self.ttl_s),
            "released": released,
        }
        return json.dumps(doc, sort_keys=True).encode()

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeldError` naming the current holder."""
        if isinstance(self.store, _S3LeaseStore):
            self.store.verify_conditional_writes()
        for _ in range(3):  # a lease deleted by hand between our steps: start over
            self._acquired_at = _now()
            etag = self.store.create(self._document())
            if etag is not None:
                self._held(etag)
                return
            current = self.store.read()
            if current is None:
                continue
            data, seen = current
            holder = _parse_lease(data)
            expired = holder.get("released") or float(holder.get("expires_at_epoch", 0)) <= _now()
            if not expired:
                raise LeaseHeldError(_held_message(self.uri, holder))
            self._acquired_at = _now()
            etag = self.store.swap(self._document(), seen)
            if etag is None:
                raise LeaseHeldError(
                    f"another nightly run took over the expired lease {self.uri} first; not running"
                )
            if not holder.get("released"):
                self.took_over = {k: holder.get(k) for k in ("run_id", "host", "pid", "expires_at")}
                log.warning("took over expired lease of run %s (%s pid %s)", holder.get("run_id"),
                            holder.get("host"), holder.get("pid"))
            self._held(etag)
            return
        raise LeaseHeldError(f"lease {self.uri} keeps changing; another run is starting, not running")

    def _held(self, etag: str) -> None:
        self._etag = etag
        self._last_ok = time.monotonic()

    def renew(self) -> None:
        """Extend the lease by one ttl; raise :class:`LeaseLostError` if it is no longer ours."""
        with self._lock:
            if self._etag is None or self._lost.is_set():
                raise LeaseLostError(f"lease {self.uri} is not held by this run")
            self._renewals += 1
            etag = self.store.swap(self._document(), self._etag)
            if etag is None:
                self._lost.set()
                raise LeaseLostError(f"lease {self.uri} was taken over by another run")
            self._held(etag)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease is still ours and unexpired."""
        self.renew()

    def start_heartbeat(self) -> None:
        """Renew every ttl/4 in a daemon thread; fence the process when the lease is lost."""
        self._thread = threading.Thread(target=self._heartbeat, name="wbc-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                self.renew()
                continue
            except LeaseLostError as exc:
                self._fence(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - storage hiccup: retry until our own deadline
                log.warning("could not renew lease %s: %s", self.uri, exc)
            if time.monotonic() - self._last_ok > 0.75 * self.ttl_s:
                self._lost.set()
                self._fence(f"could not renew lease {self.uri} for {0.75 * self.ttl_s:.0f}s")
                return

    def release(self) -> None:
        """Mark the lease released (compare-and-swap), so the next run need not wait for expiry."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            self._release_locked()

    def _release_locked(self) -> None:
        if self._etag is None or self._lost.is_set():
            return
        try:
            if self.store.swap(self._document(released=True), self._etag) is None:
                log.warning("lease %s was no longer ours at release", self.uri)
        except storage.StorageError as exc:
            log.warning("could not release lease %s (it expires by itself): %s", self.uri, exc)
        self._etag = None

    def __enter__(self) -> Lease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse_lease(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}  # unreadable: treated as expired (expires_at_epoch 0), taken over by CAS


def _held_message(uri: str, holder: dict[str, Any]) -> str:
    return (
        f"another nightly run holds the lease {uri} (run {holder.get('run_id')}, host {holder.get('host')}, "
        f"pid {holder.get('pid')}, expires {holder.get('expires_at')}); not running. "
        "Try again after it finishes or its lease expires."
    )


def _exit_on_lost_lease(message: str) -> None:
    """Self-fencing: end the process at once so it cannot write its manifest."""
    print(f"wbc-batch nightly: {message}; stopping without committing", file=sys.stderr, flush=True)
    os._exit(EXIT_LEASE_HELD)


# --- what OUTPUT already holds ----------------------------------------------


def committed_rows(output_uri: str) -> tuple[set[str], pa.Table]:
    """Committed run ids and the columns nightly needs (``ROWS_SCHEMA``) of every committed row.

    Which part files count is the one commit rule queries apply,
    :func:`wbc_batch.results.committed_parts` (a run whose manifest says
    ``succeeded`` and, when the manifest lists its ``parquet_files``, only
    those); rows are filtered on their own ``run_id`` too. One lazy pyarrow
    dataset reads just these ten columns; Parquet written before the
    ``source_*`` columns existed reads them as nulls (those images are read
    and hashed once more, then recorded), and before ``model_digest`` existed
    a null digest.
    """
    import pyarrow.dataset as ds

    from wbc_batch.results import committed_parts, committed_run_ids, part_files, read_manifests

    manifests = read_manifests(output_uri)
    committed = committed_run_ids(manifests)
    files = [p.path for p in committed_parts(part_files(output_uri), manifests)]
    if not files:
        return committed, ROWS_SCHEMA.empty_table()
    fs, _ = storage.arrow_filesystem(output_uri)
    dataset = ds.dataset(files, schema=ROWS_SCHEMA, format="parquet", filesystem=fs)
    try:
        table = dataset.to_table(filter=ds.field("run_id").isin(sorted(committed)))
    except OSError as exc:
        raise storage.StorageError(f"cannot read results under {output_uri}: {str(exc).splitlines()[0]}") from None
    return committed, table


# --- deciding what to run -----------------------------------------------------


@dataclass
class NightlyOptions:
    """Nightly-only choices on top of the classify options.

    Attributes:
        retry_errors: also retry images whose committed row is a permanent error.
        reprocess_on_model_change: count only rows of the current model version
            (see the module docstring for the policy).
        lease_seconds: lease ttl; a killed run blocks the next one this long.
        hash_workers: parallel reads while hashing candidates.
        rehash: read and hash every listed image, ignoring what the listing
            says (size, ETag, mtime); the full pass of earlier versions.
    """

    retry_errors: bool = False
    reprocess_on_model_change: bool = False
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    hash_workers: int = 16
    rehash: bool = False


CATEGORIES = ("new", "changed", "retried", "skipped_done", "skipped_permanent")


@dataclass
class NightPlan:
    """What one night will do with each candidate image.

    ``decisions`` holds one row per candidate (``image_uri``, ``category``);
    the per-category lists are built from it on demand, so a night over a
    million unchanged images never holds a million-string list.
    """

    decisions: pa.Table = field(default_factory=lambda: pa.table({"image_uri": pa.array([], pa.string()),
                                                                  "category": pa.array([], pa.string())}))
    vanished: list[str] = field(default_factory=list)

    def _of(self, *categories: str) -> list[str]:
        mask = pc.is_in(self.decisions.column("category"), value_set=pa.array(categories, pa.string()))
        return self.decisions.filter(mask).column("image_uri").to_pylist()

    new = property(lambda self: self._of("new"))
    changed = property(lambda self: self._of("changed"))
    retried = property(lambda self: self._of("retried"))
    skipped_done = property(lambda self: self._of("skipped_done"))
    skipped_permanent = property(lambda self: self._of("skipped_permanent"))

    @property
    def to_process(self) -> list[str]:
        """Image URIs to classify tonight, sorted."""
        return sorted(self._of("new", "changed", "retried"))

    def counts(self) -> dict[str, int]:
        """Exact count per category, plus ``vanished`` and ``to_process``."""
        found = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(self.decisions.column("category")).to_pylist()}
        out = {c: found.get(c, 0) for c in CATEGORIES}
        out["vanished"] = len(self.vanished)
        out["to_process"] = out["new"] + out["changed"] + out["retried"]
        return out

    def summary(self) -> dict[str, Any]:
        """Counts (exact) and URI lists (first ``_LIST_CAP``) for the run manifest."""
        out: dict[str, Any] = {"counts": self.counts()}
        for c in ("new", "changed", "retried", "skipped_permanent"):
            out[c] = sorted(self._of(c))[:_LIST_CAP]
        out["vanished"] = sorted(self.vanished)[:_LIST_CAP]
        return out


def _rows_table(rows: pa.Table | Iterable[dict[str, Any]]) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    rows = list(rows)
    names = ROWS_SCHEMA.names
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=ROWS_SCHEMA)


def _candidates_table(candidates: pa.Table | Mapping[str, str | None]) -> pa.Table:
    if isinstance(candidates, pa.Table):
        return candidates
    uris = list(candidates)
    return pa.table({"image_uri": pa.array(uris, pa.string()),
                     "sha": pa.array([candidates[u] for u in uris], pa.string())})


def _duckdb() -> Any:
    import duckdb

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    con.execute("SET enable_external_access = false")
    return con


# Listing entries whose size and ETag (S3) or size and mtime (local, no ETag) equal what a committed
# row with a hash recorded: their bytes are taken to be those the row hashed. An entry matching rows
# of different hashes (its file changed while a run read it) is read again.
KNOWN_SQL = """
SELECT l.image_uri, min(r.image_sha256) AS sha
FROM listing l JOIN rows r
  ON r.image_uri = l.image_uri AND r.source_size = l.source_size
 AND r.source_etag IS NOT DISTINCT FROM l.source_etag
 AND (l.source_etag IS NOT NULL OR r.source_mtime = l.source_mtime)
WHERE r.image_sha256 IS NOT NULL
GROUP BY l.image_uri
HAVING count(DISTINCT r.image_sha256) = 1
"""

# One decision per candidate (uri, sha of its bytes now or null when unreadable); see plan_night.
PLAN_SQL = """
WITH r AS (
    SELECT image_uri, image_sha256,
           CASE WHEN status = 'ok' THEN 'ok' ELSE coalesce(error_kind, 'transient') END AS outcome
    FROM rows
    WHERE NOT $only_current OR model_digest = $digest
       OR ((model_digest IS NULL OR $digest IS NULL) AND model_version = $version)
), m AS (
    SELECT c.image_uri, any_value(c.sha) AS sha,
           coalesce(bool_or(r.outcome = 'ok' AND r.image_sha256 = c.sha), false) AS done,
           coalesce(bool_or(r.outcome = 'permanent' AND r.image_sha256 = c.sha), false) AS permanent,
           coalesce(bool_or(r.image_sha256 = c.sha), false) AS same_bytes,
           count(r.image_uri) > 0 AS seen
    FROM candidates c LEFT JOIN r ON r.image_uri = c.image_uri
    GROUP BY c.image_uri
)
SELECT image_uri,
       CASE WHEN done THEN 'skipped_done'
            WHEN permanent AND NOT $retry_errors THEN 'skipped_permanent'
            WHEN same_bytes THEN 'retried'
            WHEN seen AND sha IS NULL THEN 'retried'  -- unreadable now, but it had rows: not new
            WHEN seen THEN 'changed'
            ELSE 'new' END AS category
FROM m ORDER BY image_uri
"""


def known_hashes(listing: pa.Table, rows: pa.Table) -> pa.Table:
    """(``image_uri``, ``sha``) of listing entries the committed rows already hashed in this state (``KNOWN_SQL``).

    Args:
        listing: :func:`wbc_batch.storage.list_entries` of the input.
        rows: committed rows with ``ROWS_SCHEMA``.
    """
    con = _duckdb()
    try:
        con.register("listing", listing)
        con.register("rows", _rows_table(rows))
        return con.sql(KNOWN_SQL).to_arrow_table()
    finally:
        con.close()


def plan_night(
    candidates: pa.Table | Mapping[str, str | None],
    rows: pa.Table | Iterable[dict[str, Any]],
    model_version: str,
    *,
    model_digest: str | None = None,
    retry_errors: bool = False,
    reprocess_on_model_change: bool = False,
) -> NightPlan:
    """Sort candidate images into new / changed / retried / skipped, in one DuckDB query (``PLAN_SQL``).

    Args:
        candidates: table (``image_uri``, ``sha``) or mapping image URI -> sha256
            of its current bytes (None: unreadable now, so it is processed and
            gets an error row of its own).
        rows: committed rows with at least ``ROW_COLUMNS`` (table or dicts).
        model_version: the version tonight's model carries.
        model_digest: tonight's artifact digest; None: compare versions only.
        retry_errors: retry permanent error rows too.
        reprocess_on_model_change: only rows of tonight's artifact count: its
            ``model_digest``, or ``model_version`` for rows without a digest.

    Returns:
        The plan; ``to_process`` is what to classify.
    """
    con = _duckdb()
    try:
        con.register("candidates", _candidates_table(candidates))
        con.register("rows", _rows_table(rows))
        decisions = con.sql(PLAN_SQL, params={"only_current": reprocess_on_model_change, "version": model_version,
                                           "digest": model_digest, "retry_errors": retry_errors}).to_arrow_table()
    finally:
        con.close()
    return NightPlan(decisions=decisions)


def hash_images(uris: list[str], workers: int = 16) -> tuple[dict[str, str | None], list[str]]:
    """Read and sha256 each image in parallel.

    Returns:
        (uri -> sha256 or None when storage failed, URIs that no longer exist).
    """

    def one(uri: str) -> tuple[str, str | None, bool]:
        try:
            return uri, hashlib.sha256(storage.read_bytes(uri)).hexdigest(), True
        except FileNotFoundError:
            return uri, None, False
        except (storage.StorageError, OSError) as exc:
            log.warning("cannot read %s to hash it (it will be processed and recorded): %s", uri, exc)
            return uri, None, True

    hashes: dict[str, str | None] = {}
    vanished: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for uri, digest, present in pool.map(one, uris):
            if present:
                hashes[uri] = digest
            else:
                vanished.append(uri)
    return hashes, vanished


def default_run_id(now: dt.datetime | None = None) -> str:
    """``nightly-YYYYMMDD`` of the UTC date: the first run id of a night."""
    now = now or dt.datetime.now(dt.UTC)
    return f"nightly-{now:%Y%m%d}"


def next_run_id(committed: Collection[str], now: dt.datetime | None = None) -> str:
    """The night's first run id not committed yet: ``nightly-YYYYMMDD``, then ``-2``, ``-3``, ...

    Deterministic given what is committed, so a run killed before its commit
    is re-run under the same id (and its part files are rewritten), while a
    second run on the same UTC date after a commit gets an id of its own.
    """
    base = default_run_id(now)
    if base not in committed:
        return base
    k = 2
    while f"{base}-{k}" in committed:
        k += 1
    return f"{base}-{k}"


def plan_from_listing(input_uri: str, rows: pa.Table, model_version: str, options: NightlyOptions,
                      model_digest: str | None = None) -> tuple[NightPlan, pa.Table, dict[str, Any]]:
    """List the input, read and hash only entries that are new or changed in the listing, and plan.

    Returns:
        (plan, the listing of the input, what was read: ``entries``,
        ``unchanged_in_listing``, ``read_and_hashed``, ``rehash``).
    """
    listing = storage.list_entries(input_uri, head_remote_manifest_entries=True)
    known = known_hashes(listing, rows) if not options.rehash else pa.table(
        {"image_uri": pa.array([], pa.string()), "sha": pa.array([], pa.string())})
    unknown = pc.invert(pc.is_in(listing.column("image_uri"), value_set=known.column("image_uri")))
    to_read = listing.filter(unknown).column("image_uri").to_pylist()
    hashes, vanished = hash_images(to_read, options.hash_workers)
    hashed = pa.table({"image_uri": pa.array(list(hashes), pa.string()),
                       "sha": pa.array(list(hashes.values()), pa.string())})
    candidates = pa.concat_tables([known.select(["image_uri", "sha"]).cast(hashed.schema), hashed])
    plan = plan_night(candidates, rows, model_version, model_digest=model_digest, retry_errors=options.retry_errors,
                      reprocess_on_model_change=options.reprocess_on_model_change)
    plan.vanished = vanished
    reads = {"entries": listing.num_rows, "unchanged_in_listing": known.num_rows, "read_and_hashed": len(to_read),
             "rehash": options.rehash}
    return plan, listing, reads


# --- the run ------------------------------------------------------------------


def run_nightly(config: ClassifyConfig, options: NightlyOptions | None = None) -> dict[str, Any]:
    """Classify what is new or changed under ``config.input_uri`` since the last committed runs.

    Args:
        config: classify settings; ``run_id`` None means the night's next
            free id (:func:`next_run_id`).
        options: nightly choices (retry, model policy, lease ttl, rehash).

    Returns:
        The run manifest with a ``nightly`` section (counts and URIs of new,
        changed, retried and skipped images, and how many were read), or a
        summary without a commit: ``status: "nothing_new"`` when nothing is
        to be processed, ``"already_committed"`` when an explicit ``run_id``
        is committed already.

    Raises:
        LeaseHeldError: another run holds the lease on this OUTPUT.
        ModelArtifactError: the model's digest is not the pinned one (``config.model_digest``).
    """
    from wbc_batch.model import ModelArtifactError, artifact_digest, read_metadata, shipped_model_dir

    options = options or NightlyOptions()
    model_uri = config.model_uri or str(shipped_model_dir())
    meta = read_metadata(model_uri)
    digest = artifact_digest(model_uri)
    if config.model_digest is not None and digest != config.model_digest:
        raise ModelArtifactError(f"model {model_uri} has artifact digest {digest}, not the pinned "
                                 f"{config.model_digest} (--model-digest or WBC_MODEL_DIGEST); refusing another artifact")
    with Lease(config.output_uri, config.run_id or default_run_id(), options.lease_seconds) as lease:
        committed, rows = committed_rows(config.output_uri)
        run_id = config.run_id or next_run_id(committed)
        lease.run_id = run_id  # named in the lease from its next renewal on
        base: dict[str, Any] = {"run_id": run_id, "input": config.input_uri, "output": config.output_uri,
                                "model": {"version": meta.version, "sha256": meta.model_sha256, "digest": digest}}
        if run_id in committed:
            log.warning("run %s is already committed; nothing to do", run_id)
            return {**base, "status": "already_committed", "nightly": {"counts": {"to_process": 0}}}
        started = time.monotonic()
        plan, listing, reads = plan_from_listing(config.input_uri, rows, meta.version, options, model_digest=digest)
        nightly = {
            **plan.summary(),
            "listing": reads,
            "policy": {"retry_errors": options.retry_errors,
                       "reprocess_on_model_change": options.reprocess_on_model_change,
                       "model_version": meta.version, "model_digest": digest},
            "planning_seconds": round(time.monotonic() - started, 3),
            "lease": {"uri": lease.uri, "ttl_seconds": lease.ttl_s, "took_over": lease.took_over},
        }
        to_process = plan.to_process
        if not to_process:
            # Nothing to commit: no manifest, no part files. The next run may reuse this run id.
            log.warning("nothing new under %s for model %s (%d listed, %d read); nothing committed",
                        config.input_uri, meta.version, reads["entries"], reads["read_and_hashed"])
            return {**base, "status": "nothing_new", "nightly": nightly}
        from wbc_batch.pipeline import run_classify

        extra = {**(config.manifest_extra or {}), "nightly": nightly}
        tonight = listing.filter(pc.is_in(listing.column("image_uri"), value_set=pa.array(to_process, pa.string())))
        lease.check()
        # run_classify discards part files of an earlier, uncommitted attempt of this run id first
        # and writes the manifest (the commit) last.
        # pinned to the digest planned with: an artifact changed since is refused, not run under this plan
        return run_classify(replace(config, run_id=run_id, uris=to_process, listing=tonight, manifest_extra=extra,
                                    model_digest=digest, before_commit=lambda _manifest: lease.check()))
