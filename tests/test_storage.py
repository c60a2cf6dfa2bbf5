"""wbc_batch/storage.py on local folders and on a real S3 endpoint on loopback (moto server, no mocks)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wbc_batch import storage
from wbc_batch.storage import StorageError

# --- URIs ---------------------------------------------------------------------------------------


def test_uris() -> None:
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/data/s3://b") and not storage.is_remote("b/k")
    assert storage.split_s3("s3://bucket/a/b.jpg") == ("bucket", "a/b.jpg")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    for bad in ("/local/path", "s3:///key"):
        with pytest.raises(ValueError):
            storage.split_s3(bad)
    assert storage.join("s3://b/out/", "/runs/", "r1.json") == "s3://b/out/runs/r1.json"
    assert storage.join("/out", "runs", "r1.json") == str(Path("/out", "runs", "r1.json"))
    assert storage.is_manifest("s3://b/list.TXT") and not storage.is_manifest("s3://b/folder")


# --- local --------------------------------------------------------------------------------------


def test_local_write_read_exists_delete(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "b" / "file.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"one")  # parents are made
    assert storage.exists(uri) and storage.read_bytes(uri) == b"one"
    storage.write_bytes(uri, b"two")  # replaced whole
    assert storage.read_bytes(uri) == b"two"
    assert os.listdir(tmp_path / "a" / "b") == ["file.bin"], "no temporary file is left beside it"
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting what is gone is fine


def test_local_missing_file_and_unwritable_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing.jpg"))
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    with pytest.raises(StorageError, match=r"^cannot write .*a-file/sub/x"):
        storage.write_bytes(str(blocker / "sub" / "x"), b"data")
    with pytest.raises(StorageError, match=r"^OUTPUT .*a-file is not writable"):
        storage.check_writable(str(blocker))
    storage.check_writable(str(tmp_path / "out"))
    assert not list((tmp_path / "out").iterdir()), "the probe is removed"


def test_local_write_if_absent(tmp_path: Path) -> None:
    uri = str(tmp_path / "state" / "lease.json")
    assert storage.write_bytes_if_absent(uri, b"first") is True
    assert storage.write_bytes_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def test_local_listing_is_recursive_sorted_and_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for rel in ("b/2.jpg", "a/1.png", "a/notes.txt", "c/d/3.JPEG"):
        storage.write_bytes(str(root / rel), rel.encode())
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    (root / "a" / "link-out.jpg").symlink_to(outside)
    (root / "a" / "link-in.jpg").symlink_to(root / "b" / "2.jpg")
    files = storage.list_files(str(root))
    assert files == sorted(files)
    assert [Path(f).relative_to(root).as_posix() for f in files] == [
        "a/1.png", "a/link-in.jpg", "a/notes.txt", "b/2.jpg", "c/d/3.JPEG"]
    assert [Path(u).name for u in storage.list_images(str(root))] == ["1.png", "link-in.jpg", "2.jpg", "3.JPEG"]
    table = storage.list_entries(str(root))
    assert table.schema.names == [name for name, _ in storage.LISTING_SCHEMA_FIELDS]
    sizes = dict(zip(table.column("image_uri").to_pylist(), table.column("source_size").to_pylist()))
    assert sizes[str(root / "b" / "2.jpg")] == len(b"b/2.jpg")
    assert table.column("source_etag").null_count == table.num_rows  # local files have no ETag
    assert table.column("source_mtime").null_count == 0
    with pytest.raises(FileNotFoundError, match="input folder not found"):
        storage.list_files(str(tmp_path / "nope"))


def test_local_manifests(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("# cells\nslide/1.jpg\n\n/abs/2.jpg\nslide/1.jpg\ns3://b/3.jpg\n")
    assert storage.list_images(str(tmp_path / "list.txt")) == sorted(
        [str(tmp_path / "slide" / "1.jpg"), "/abs/2.jpg", "s3://b/3.jpg"])
    (tmp_path / "list.csv").write_text("uri,sample\nx.jpg,s1\n,s2\n")
    assert storage.read_manifest(str(tmp_path / "list.csv")) == [str(tmp_path / "x.jpg")]
    (tmp_path / "bad.csv").write_text("path\nx.jpg\n")
    with pytest.raises(ValueError, match="no 'uri' column"):
        storage.read_manifest(str(tmp_path / "bad.csv"))
    pq.write_table(pa.table({"uri": ["p.jpg", None]}), tmp_path / "list.parquet")
    assert storage.read_manifest(str(tmp_path / "list.parquet")) == [str(tmp_path / "p.jpg")]


def test_local_arrow_filesystem(tmp_path: Path) -> None:
    fs, path = storage.arrow_filesystem(str(tmp_path / "x" / ".." / "t.parquet"))
    assert path == str((tmp_path / "t.parquet").resolve())
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(io.BytesIO(storage.read_bytes(path))).column("a").to_pylist() == [1, 2]


# --- S3 on loopback ------------------------------------------------------------------------------


@pytest.fixture()
def s3(s3_bucket: str) -> Iterator[str]:
    """``s3://<fresh bucket>``, with storage's per-thread client made anew for the loopback endpoint."""
    storage._local.__dict__.pop("s3", None)
    yield f"s3://{s3_bucket}"
    storage._local.__dict__.pop("s3", None)


@pytest.mark.s3
def test_s3_write_read_exists_delete(s3: str, s3_client: Any, s3_keys: Callable[..., list[str]]) -> None:
    bucket, _ = storage.split_s3(s3)
    uri = storage.join(s3, "out", "a", "file.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"one")
    assert s3_client.get_object(Bucket=bucket, Key="out/a/file.bin")["Body"].read() == b"one"
    assert storage.exists(uri) and storage.read_bytes(uri) == b"one"
    storage.delete(uri)
    assert not storage.exists(uri) and s3_keys(bucket) == []
    storage.delete(uri)  # deleting what is gone is fine
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)


@pytest.mark.s3
def test_s3_write_if_absent(s3: str) -> None:
    uri = storage.join(s3, "state", "lease.json")
    assert storage.write_bytes_if_absent(uri, b"first") is True
    assert storage.write_bytes_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


@pytest.mark.s3
def test_s3_listing_and_entries(s3: str, s3_client: Any) -> None:
    bucket, _ = storage.split_s3(s3)
    for key in ("in/b/2.jpg", "in/a/1.png", "in/a/notes.txt", "input-other/x.jpg"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    assert storage.list_files(f"{s3}/in") == [f"{s3}/in/a/1.png", f"{s3}/in/a/notes.txt", f"{s3}/in/b/2.jpg"]
    assert storage.list_images(f"{s3}/in/") == [f"{s3}/in/a/1.png", f"{s3}/in/b/2.jpg"]
    table = storage.list_entries(f"{s3}/in")
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    head = s3_client.head_object(Bucket=bucket, Key="in/b/2.jpg")
    assert rows[f"{s3}/in/b/2.jpg"]["source_size"] == len(b"in/b/2.jpg")
    assert rows[f"{s3}/in/b/2.jpg"]["source_etag"] == head["ETag"]
    assert rows[f"{s3}/in/b/2.jpg"]["source_mtime"] is not None
    storage.write_bytes(f"{s3}/lists/cells.txt", b"../in/a/1.png\nin-here.jpg\n")
    assert storage.is_manifest(f"{s3}/lists/cells.txt")
    assert storage.read_manifest(f"{s3}/lists/cells.txt") == [f"{s3}/lists/../in/a/1.png", f"{s3}/lists/in-here.jpg"]
    assert storage.list_files(f"{s3}/nothing-here") == []


@pytest.mark.s3
def test_s3_missing_bucket_is_a_storage_error(s3: str) -> None:
    gone = "s3://wbc-no-such-bucket-0123"
    with pytest.raises(StorageError, match=r"^cannot list s3://wbc-no-such-bucket-0123/in: NoSuchBucket"):
        storage.list_files(f"{gone}/in")
    with pytest.raises(StorageError, match=r"^cannot read .*: NoSuchBucket"):
        storage.read_bytes(f"{gone}/x")
    with pytest.raises(StorageError, match=r"^OUTPUT s3://wbc-no-such-bucket-0123/out is not writable: NoSuchBucket"):
        storage.check_writable(f"{gone}/out")
    storage.check_writable(f"{s3}/out")


@pytest.mark.s3
def test_s3_arrow_filesystem_reads_what_storage_wrote(s3: str) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2, 3]}), buf)
    storage.write_bytes(f"{s3}/t/part.parquet", buf.getvalue())
    fs, path = storage.arrow_filesystem(f"{s3}/t/part.parquet")
    assert path == f"{storage.split_s3(s3)[0]}/t/part.parquet"
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2, 3]
