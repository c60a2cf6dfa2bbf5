"""One interface over local folders and S3-compatible object storage.

S3 endpoint and credentials come from the standard AWS chain (environment,
``AWS_ENDPOINT_URL``, profiles, instance roles); nothing here prints or
stores them. Local writes are atomic (temporary file, then rename) so a
killed process never leaves a half-written file under its final name.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from wbc_batch import errors
from wbc_batch.imaging import is_image_name

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")
_local = threading.local()


class StorageError(errors.StorageError):
    """Storage that cannot be reached or used (endpoint down, no permission, disk full): exit 3."""


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into bucket and key."""
    if not is_remote(uri):
        raise ValueError(f"expected an s3:// URI, got {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI lacks a bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI."""
    base = str(base)
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}"
        return out
    return str(Path(base, *parts))


def s3_client() -> Any:
    """A per-thread boto3 S3 client with adaptive retries and bounded timeouts."""
    client = getattr(_local, "s3", None)
    if client is None:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"max_attempts": int(os.environ.get("WBC_S3_MAX_ATTEMPTS", "6")), "mode": "adaptive"},
            connect_timeout=5,
            read_timeout=30,
        )
        client = boto3.session.Session().client("s3", config=config)
        _local.s3 = client
    return client


def _is_not_found(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


def _reason(exc: Exception) -> str:
    """A short, credential-free reason: the S3 error code, or the botocore exception class."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    if code:
        return str(code)
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
        return f"{name} (is the S3 endpoint reachable?)"
    return name


def read_bytes(uri: str) -> bytes:
    """Read a whole object or file.

    Raises:
        FileNotFoundError: the object does not exist.
        StorageError: the storage failed after retries.
    """
    if not is_remote(uri):
        return Path(uri).read_bytes()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(uri) from None
        raise StorageError(f"cannot read {uri}: {_reason(exc)}") from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot read {uri}: {_reason(exc)}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object or file, atomically for local paths."""
    if is_remote(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot write {uri}: {_reason(exc)}") from None
        return
    path = Path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc.strerror or exc}") from None


def write_bytes_if_absent(uri: str, data: bytes) -> bool:
    """Create a file or object only if it does not exist yet.

    Returns:
        True if this call created it, False if it already existed.
    """
    if is_remote(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise StorageError(f"cannot write {uri}: {_reason(exc)}") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot write {uri}: {_reason(exc)}") from None
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True


def exists(uri: str) -> bool:
    """True when the file or object exists."""
    if not is_remote(uri):
        return Path(uri).exists()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _is_not_found(exc):
            return False
        raise StorageError(f"cannot reach {uri}: {_reason(exc)}") from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot reach {uri}: {_reason(exc)}") from None


def delete(uri: str) -> None:
    """Delete a file or object if present."""
    if is_remote(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot delete {uri}: {_reason(exc)}") from None
        return
    try:
        Path(uri).unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot delete {uri}: {exc.strerror or exc}") from None


# What a listing says about each entry, without reading it: size, and the ETag (S3) or the
# modification time (local; S3's LastModified too). Nightly compares them with what the committed
# rows recorded to decide which images it must read and hash again.
Entry = tuple[str, "int | None", "str | None", "int | None"]  # (uri, size, etag, mtime in µs since the epoch, UTC)


def list_files(prefix: str) -> list[str]:
    """All files under a local folder or S3 prefix, recursively, sorted.

    Local symbolic links are followed only when they resolve inside the
    folder; others are skipped with a warning (an input folder must not be a
    way to read arbitrary files).
    """
    return [e[0] for e in _list_entries(prefix)]


def _list_entries(prefix: str) -> list[Entry]:
    """:func:`list_files` with each file's size, ETag and mtime (no extra request on S3)."""
    if is_remote(prefix):
        return _list_s3(prefix)
    root = Path(prefix)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {prefix}")
    real_root = root.resolve()
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(real_root) or not target.is_file():
                    log.warning("skipping symlink %s: it points outside the input folder", p)
                    continue
            out.append((str(p), *_stat(str(p))))
    return sorted(out)


def _stat(path: str) -> tuple[int | None, None, int | None]:
    """(size, None, mtime µs) of a local file, following links; Nones when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None, None
    return st.st_size, None, st.st_mtime_ns // 1000


def _s3_mtime(value: Any) -> int | None:
    return int(value.timestamp() * 1_000_000) if value is not None else None


def _list_s3(prefix: str) -> list[Entry]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(prefix)
    if key and not key.endswith("/"):
        key += "/"
    out: list[Entry] = []
    try:
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                out.append((f"s3://{bucket}/{obj['Key']}", obj.get("Size"), obj.get("ETag"),
                            _s3_mtime(obj.get("LastModified"))))
    except ClientError as exc:
        raise StorageError(f"cannot list {prefix}: {_reason(exc)}") from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot list {prefix}: {_reason(exc)}") from None
    return sorted(out)


def _head(uri: str) -> Entry:
    """One S3 object's listing entry by HEAD (no bytes read); Nones when it is absent or unreachable."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        resp = s3_client().head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError):
        return uri, None, None, None
    return uri, resp.get("ContentLength"), resp.get("ETag"), _s3_mtime(resp.get("LastModified"))


def is_manifest(uri: str) -> bool:
    """True when an input names a manifest file rather than a folder or prefix."""
    return uri.lower().endswith(MANIFEST_SUFFIXES) and (is_remote(uri) or Path(uri).is_file())


def read_manifest(uri: str) -> list[str]:
    """URIs listed in a manifest: one per line, or a CSV/Parquet ``uri`` column.

    Relative entries are resolved against the manifest's own location.
    """
    data = read_bytes(uri)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if "uri" not in table.column_names:
            raise ValueError(f"manifest {uri} has no 'uri' column (columns: {', '.join(table.column_names)})")
        entries = [str(v) for v in table.column("uri").to_pylist() if v]
    elif lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        if reader.fieldnames is None or "uri" not in reader.fieldnames:
            raise ValueError(f"manifest {uri} has no 'uri' column")
        entries = [row["uri"].strip() for row in reader if row.get("uri", "").strip()]
    else:
        lines = data.decode("utf-8-sig").splitlines()
        entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    base = uri.rsplit("/", 1)[0] if is_remote(uri) else str(Path(uri).parent)
    return [e if is_remote(e) or os.path.isabs(e) else join(base, e) for e in entries]


def list_images(input_uri: str) -> list[str]:
    """Image URIs of a folder, S3 prefix or manifest, sorted and de-duplicated.

    Raises:
        FileNotFoundError: the folder or manifest does not exist.
        StorageError: the storage cannot be reached.
    """
    if is_manifest(input_uri):
        uris = read_manifest(input_uri)
    else:
        uris = [u for u in list_files(input_uri) if is_image_name(u)]
    return sorted(dict.fromkeys(uris))


LISTING_SCHEMA_FIELDS = (("image_uri", "string"), ("source_size", "int64"), ("source_etag", "string"),
                         ("source_mtime", "timestamp[us, tz=UTC]"))


def list_entries(input_uri: str, *, head_remote_manifest_entries: bool = False) -> Any:
    """:func:`list_images` as an Arrow table with what the listing says of each image, reading no image.

    Columns: ``image_uri`` string, ``source_size`` int64, ``source_etag``
    string (S3 only), ``source_mtime`` timestamp[us, UTC] (local mtime, S3
    LastModified). A folder or prefix gets them from its listing at no extra
    cost; entries of a manifest are stat'ed (local) or, with
    ``head_remote_manifest_entries``, HEAD-requested (S3), else left null.
    Null means "unknown": such an image is always read.

    Raises:
        FileNotFoundError: the folder or manifest does not exist.
        StorageError: the storage cannot be reached.
    """
    import pyarrow as pa

    if is_manifest(input_uri):
        uris = sorted(dict.fromkeys(read_manifest(input_uri)))
        remote = [u for u in uris if is_remote(u)]
        heads: dict[str, Entry] = {}
        if remote and head_remote_manifest_entries:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=16) as pool:
                heads = {e[0]: e for e in pool.map(_head, remote)}
        entries = [heads.get(u, (u, None, None, None)) if is_remote(u) else (u, *_stat(u)) for u in uris]
    else:
        entries = [e for e in _list_entries(input_uri) if is_image_name(e[0])]
    cols: list[tuple[Any, ...]] = list(zip(*entries)) if entries else [(), (), (), ()]
    return pa.table({
        "image_uri": pa.array(cols[0], type=pa.string()),
        "source_size": pa.array(cols[1], type=pa.int64()),
        "source_etag": pa.array(cols[2], type=pa.string()),
        "source_mtime": pa.array(cols[3], type=pa.int64()).cast(pa.timestamp("us", tz="UTC")),
    })


def check_writable(uri: str) -> None:
    """Fail early with a clear message when OUTPUT cannot be written.

    Raises:
        StorageError: "OUTPUT <uri> is not writable: <reason>".
    """
    probe = join(uri, f".wbc-write-probe-{os.getpid()}")
    try:
        write_bytes(probe, b"probe")
        delete(probe)
    except StorageError as exc:
        reason = str(exc).removeprefix(f"cannot write {probe}: ").removeprefix(f"cannot delete {probe}: ")
        raise StorageError(f"OUTPUT {uri} is not writable: {reason}") from None


def _arrow_s3() -> Any:
    """The pyarrow S3 filesystem for the current AWS_* settings (cached per settings)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    attempts = int(os.environ.get("WBC_S3_MAX_ATTEMPTS", "6"))
    return _arrow_s3_for(endpoint, region, attempts)


@lru_cache(maxsize=8)
def _arrow_s3_for(endpoint: str | None, region: str | None, attempts: int) -> Any:
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                              "connect_timeout": 5.0, "request_timeout": 30.0}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path within it, for Parquet I/O."""
    import pyarrow.fs as pafs

    if is_remote(uri):
        bucket, key = split_s3(uri)
        return _arrow_s3(), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())
