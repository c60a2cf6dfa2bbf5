"""Nightly runs: what counts as new, the lease, and real killed / concurrent runs against S3 on loopback.

The fast tests drive the planner and the lease directly (local files and a real moto S3 server).
The slow ones start ``python jobs/nightly.py`` as real processes, kill one with SIGKILL, race two,
and read what a query would see straight from the bucket (boto3 + pyarrow, not the code under test).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import descendants
from tests.results_factory import cell, make_table, write_run
from wbc_batch import storage
from wbc_batch.nightly import (
    EXIT_LEASE_HELD,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    committed_rows,
    default_run_id,
    plan_night,
)

REPO = Path(__file__).resolve().parent.parent
V1 = "1.0.0"


# --- planning --------------------------------------------------------------------------------


def _row(uri: str, sha: str | None, status: str = "ok", kind: str | None = None, version: str = V1,
         digest: str | None = None) -> dict[str, Any]:
    return {"image_uri": uri, "image_sha256": sha, "status": status, "error_kind": kind,
            "model_version": version, "model_digest": digest, "run_id": "r"}


@pytest.mark.parametrize(
    ("rows", "current", "options", "expected"),
    [
        ([], "h1", {}, "new"),
        ([_row("a", "h1")], "h1", {}, "skipped_done"),
        ([_row("a", "h0")], "h1", {}, "changed"),
        ([_row("a", "h1", "error", "transient")], "h1", {}, "retried"),
        ([_row("a", "h1", "error", "permanent")], "h1", {}, "skipped_permanent"),
        ([_row("a", "h1", "error", "permanent")], "h1", {"retry_errors": True}, "retried"),
        ([_row("a", "h1", "error", "transient"), _row("a", "h1")], "h1", {}, "skipped_done"),
        ([_row("a", None, "error", "transient")], None, {}, "retried"),
        # model policy: by default any version's row counts; with the flag only the current one
        ([_row("a", "h1", version="0.9.0")], "h1", {}, "skipped_done"),
        ([_row("a", "h1", version="0.9.0")], "h1", {"reprocess_on_model_change": True}, "new"),
        ([_row("a", "h1", version="0.9.0"), _row("a", "h1")], "h1", {"reprocess_on_model_change": True},
         "skipped_done"),
        # ... told apart by artifact digest: another model.json under the same version is another model
        ([_row("a", "h1", digest="d0")], "h1", {"reprocess_on_model_change": True, "model_digest": "d1"}, "new"),
        ([_row("a", "h1", digest="d0")], "h1", {"model_digest": "d1"}, "skipped_done"),
        ([_row("a", "h1", version="0.9.0", digest="d1")], "h1",
         {"reprocess_on_model_change": True, "model_digest": "d1"}, "skipped_done"),
        # rows written before rows carried a digest count by version
        ([_row("a", "h1")], "h1", {"reprocess_on_model_change": True, "model_digest": "d1"}, "skipped_done"),
        ([_row("a", "h1", version="0.9.0")], "h1", {"reprocess_on_model_change": True, "model_digest": "d1"}, "new"),
    ],
)
def test_plan_night_sorts_each_image(rows: list[dict[str, Any]], current: str | None, options: dict[str, Any],
                                     expected: str) -> None:
    plan = plan_night({"a": current}, rows, V1, **options)
    found = [c for c in ("new", "changed", "retried", "skipped_done", "skipped_permanent") if "a" in getattr(plan, c)]
    assert found == [expected]
    assert plan.to_process == (["a"] if expected in ("new", "changed", "retried") else [])


def test_plan_summary_counts_every_category() -> None:
    rows = [_row("done", "d"), _row("bad", "b", "error", "permanent"), _row("moved", "m0")]
    plan = plan_night({"done": "d", "bad": "b", "moved": "m1", "fresh": "f"}, rows, V1)
    summary = plan.summary()
    assert summary["counts"] == {"new": 1, "changed": 1, "retried": 0, "skipped_done": 1, "skipped_permanent": 1,
                                 "vanished": 0, "to_process": 2}
    assert summary["new"] == ["fresh"] and summary["changed"] == ["moved"] and summary["skipped_permanent"] == ["bad"]


def test_default_run_id_is_one_per_utc_night() -> None:
    import datetime as dt

    late = dt.datetime(2026, 11, 26, 23, 59, tzinfo=dt.UTC)
    assert default_run_id(late) == "nightly-20261126" == default_run_id(late.replace(hour=0))


def test_committed_rows_ignore_uncommitted_runs(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    write_run(out, "good", make_table([cell("/in/s/a.jpg", "s", "neutrophil")], "good"))
    write_run(out, "killed", make_table([cell("/in/s/b.jpg", "s", "monocyte")], "killed"), status=None)
    write_run(out, "failed", make_table([cell("/in/s/c.jpg", "s", "monocyte")], "failed"), status="failed")
    committed, rows = committed_rows(out)
    assert committed == {"good"}
    assert rows.column("image_uri").to_pylist() == ["/in/s/a.jpg"]
    committed, rows = committed_rows(str(tmp_path / "empty"))
    assert committed == set() and rows.num_rows == 0


# --- the lease -------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def output_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An OUTPUT on local disk or in a fresh bucket of the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/results"


def test_second_lease_is_refused_with_the_holder_named(output_uri: str) -> None:
    with Lease(output_uri, "night-a", ttl_s=60):
        with pytest.raises(LeaseHeldError, match=r"another nightly run holds the lease .*run night-a"):
            Lease(output_uri, "night-b", ttl_s=60).acquire()
    # released: the next run takes it at once, without waiting for the expiry
    with Lease(output_uri, "night-c", ttl_s=60) as lease:
        assert lease.took_over is None


def test_expired_lease_is_taken_over_and_its_old_holder_cannot_renew(output_uri: str) -> None:
    dead = Lease(output_uri, "killed", ttl_s=0.5)
    dead.acquire()  # no heartbeat: as if the process was killed
    time.sleep(0.7)
    taker = Lease(output_uri, "next", ttl_s=60)
    taker.acquire()
    assert taker.took_over and taker.took_over["run_id"] == "killed"
    with pytest.raises(LeaseLostError):
        dead.renew()
    dead.release()  # must not remove the new holder's lease
    with pytest.raises(LeaseHeldError):
        Lease(output_uri, "third", ttl_s=60).acquire()
    taker.release()


@pytest.mark.parametrize("stale", [False, True])
def test_racing_runs_exactly_one_wins(output_uri: str, stale: bool) -> None:
    if stale:
        Lease(output_uri, "killed", ttl_s=0.2).acquire()
        time.sleep(0.4)
    winners: list[str] = []
    losers: list[str] = []
    barrier = threading.Barrier(6)

    def attempt(i: int) -> None:
        lease = Lease(output_uri, f"run-{i}", ttl_s=60)
        barrier.wait()
        try:
            lease.acquire()
            winners.append(lease.run_id)
        except LeaseHeldError as exc:
            losers.append(str(exc))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 5, (winners, losers)


def test_heartbeat_renews_and_fences_a_run_that_lost_its_lease(output_uri: str) -> None:
    fenced = threading.Event()
    lease = Lease(output_uri, "long-run", ttl_s=4.0, fence=lambda msg: fenced.set())
    lease.acquire()
    first = json.loads(storage.read_bytes(lease.uri))
    lease.start_heartbeat()
    deadline = time.time() + 30  # generous: a loaded machine may delay the thread, not change the outcome
    doc = first
    while time.time() < deadline and doc["renewals"] < 2:
        time.sleep(0.1)
        doc = json.loads(storage.read_bytes(lease.uri))
    assert doc["renewals"] >= 2 and doc["owner"] == first["owner"]
    assert doc["expires_at_epoch"] > first["expires_at_epoch"], "renewals must push the expiry forward"
    with pytest.raises(LeaseHeldError):
        Lease(output_uri, "intruder", ttl_s=60).acquire()
    # an operator (or a run with a skewed clock) replaces the lease behind its back
    storage.write_bytes(lease.uri, json.dumps({"run_id": "other", "expires_at_epoch": time.time() + 60}).encode())
    assert fenced.wait(timeout=30), "a run that lost its lease must be stopped before it can commit"
    lease.release()
    assert json.loads(storage.read_bytes(lease.uri))["run_id"] == "other", "release must not touch another's lease"


# --- real processes against S3 on loopback ----------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(inp: str, out: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "jobs" / "nightly.py"), inp, out, "--batch-size", "4", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:  # a hang guard only
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _committed(s3: Any, keys: Callable[..., list[str]], bucket: str,
               prefix: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """What a query sees, read independently: manifests with status succeeded, and their runs' rows.

    ``s3`` and ``keys`` are the ``s3_client`` and ``s3_keys`` fixtures (boto3, not the code under test).
    """
    import pyarrow.parquet as pq

    manifests = {}
    for key in keys(bucket, f"{prefix}/runs/"):
        m = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        if m.get("status") == "succeeded":
            manifests[m["run_id"]] = m
    rows = []
    for key in keys(bucket, f"{prefix}/predictions/"):
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
        rows += [r for r in table.select(["image_uri", "image_sha256", "status", "error_kind", "run_id"]).to_pylist()
                 if r["run_id"] in manifests]
    return manifests, rows


@pytest.fixture()
def images(samples_dir: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of 9 real sample images from different classes."""
    picks = []
    for folder in sorted(p for p in samples_dir.iterdir() if p.is_dir()):
        picks += [(f"{folder.name}-{f.name}", f.read_bytes()) for f in sorted(folder.iterdir())[:2]]
    return picks[:9]


@pytest.fixture()
def reaper() -> Iterator[list[int]]:
    """Pids of processes a test started; whatever still runs at the end is ended, by pid."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _padding(samples_dir: Path) -> list[tuple[str, bytes]]:
    """Every bundled sample (64) under its own name: enough batches that a run is still busy after its first heatmap.

    Seven images in batches of 4 are done a fraction of a second after their first heatmap lands, less than the
    poll-and-kill takes; 71 images are 18 batches, and the 17 after the first outlast it on any load.
    """
    return [(f"pad-{folder.name}-{f.name}", f.read_bytes())
            for folder in sorted(p for p in samples_dir.iterdir() if p.is_dir()) for f in sorted(folder.iterdir())]


@pytest.mark.s3
def test_killed_run_then_rerun_then_next_nights(s3_bucket: str, s3_client: Any, s3_keys: Callable[..., list[str]],
                                                images: list[tuple[str, bytes]], samples_dir: Path,
                                                reaper: list[int]) -> None:
    """SIGKILL mid-run, re-run: exactly once. Next night: only new and changed images; a corrupt one stays skipped."""
    inp, out = f"s3://{s3_bucket}/incoming", f"s3://{s3_bucket}/results"
    first, later, padding = images[:6], images[6:9], _padding(samples_dir)
    for name, data in first:
        s3_client.put_object(Bucket=s3_bucket, Key=f"incoming/slide-1/{name}", Body=data)
    for name, data in padding:
        s3_client.put_object(Bucket=s3_bucket, Key=f"incoming/slide-0/{name}", Body=data)
    s3_client.put_object(Bucket=s3_bucket, Key="incoming/slide-1/corrupt.jpg",
                         Body=b"\xff\xd8\xff\xe0 not really a jpeg")
    expected_ok = {f"{inp}/slide-1/{n}" for n, _ in first} | {f"{inp}/slide-0/{n}" for n, _ in padding}
    night1_new = len(expected_ok) + 1

    # 0. the lease is sized from what step 2 waits for: a re-run's start-up up to its lease check. The same
    # command against another OUTPUT whose lease is held measures it on these cores, under their present load;
    # the killed run's lease leaves at least 3/4 of its length after the kill (renewed every quarter), so a
    # lease of 4x that start-up (10 s at least) lets a re-run started at once meet it unexpired
    held = {"run_id": "holder", "owner": "test", "expires_at_epoch": time.time() + 3600, "released": False}
    s3_client.put_object(Bucket=s3_bucket, Key="measure/state/lease.json", Body=json.dumps(held).encode())
    t0 = time.monotonic()
    code, _, err = _finish(_start(inp, f"s3://{s3_bucket}/measure", "--run-id", "measure"))
    start_up = time.monotonic() - t0
    assert code == EXIT_LEASE_HELD and "run holder" in err, err
    lease_s = f"{max(10.0, 4 * start_up):.0f}"

    # 1. night 1 is killed with SIGKILL once it is under way (its first heatmap is written)
    # on Ray, so that the Ray processes a killed driver leaves are seen to end (auto would run 71 images in-process)
    proc = _start(inp, out, "--run-id", "nightly-1", "--lease-seconds", lease_s, "--runner", "ray")
    reaper.append(proc.pid)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not s3_keys(s3_bucket, "results/heatmaps/"):
        time.sleep(0.2)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.communicate()}"
    below = descendants(proc.pid)
    reaper.extend(below)
    assert [p for p in below if p != proc.pid], "a run on Ray has Ray's processes below its driver"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    manifests, rows = _committed(s3_client, s3_keys, s3_bucket, "results")
    assert manifests == {} and rows == [], "a killed run must leave nothing that counts"
    assert not s3_keys(s3_bucket, "results/runs/")

    # 2. re-run at once: the killed run's lease has not expired, so it is refused with a clear message
    code, _, err = _finish(_start(inp, out, "--run-id", "nightly-1", "--lease-seconds", lease_s))
    assert code == EXIT_LEASE_HELD, err
    assert "another nightly run holds the lease" in err and "run nightly-1" in err
    assert "Traceback" not in err

    # 3. after the expiry the re-run takes the lease over and commits exactly one row per image
    lease = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="results/state/lease.json")["Body"].read())
    time.sleep(max(0.0, lease["expires_at_epoch"] - time.time()) + 0.5)
    code, stdout, err = _finish(_start(inp, out, "--run-id", "nightly-1", "--lease-seconds", lease_s))
    assert code == 0, err
    manifests, rows = _committed(s3_client, s3_keys, s3_bucket, "results")
    assert set(manifests) == {"nightly-1"}
    ok = Counter(r["image_uri"] for r in rows if r["status"] == "ok")
    assert ok == Counter({u: 1 for u in expected_ok}), "exactly one successful row per image"
    [bad] = [r for r in rows if r["status"] == "error"]
    assert bad["image_uri"].endswith("corrupt.jpg") and bad["error_kind"] == "permanent"
    night1 = manifests["nightly-1"]["nightly"]
    assert night1["counts"]["new"] == night1_new and night1["lease"]["took_over"]["run_id"] == "nightly-1"
    assert f"{night1_new} new" in stdout
    deadline = time.time() + 90  # the killed driver's raylet/GCS notice it is gone and exit on their own
    while any(_alive(p) for p in below if p != proc.pid) and time.time() < deadline:
        time.sleep(2)
    assert not any(_alive(p) for p in below if p != proc.pid), "Ray processes of the killed driver outlived it"

    # 4. next night: two new images, one image replaced by other bytes under the same key
    for name, data in later[:2]:
        s3_client.put_object(Bucket=s3_bucket, Key=f"incoming/slide-2/{name}", Body=data)
    changed_name = first[0][0]
    s3_client.put_object(Bucket=s3_bucket, Key=f"incoming/slide-1/{changed_name}", Body=later[2][1])
    code, _, err = _finish(_start(inp, out, "--run-id", "nightly-2", "--lease-seconds", lease_s))
    assert code == 0, err
    manifests, rows = _committed(s3_client, s3_keys, s3_bucket, "results")
    night2 = manifests["nightly-2"]
    assert night2["nightly"]["counts"] == {"new": 2, "changed": 1, "retried": 0, "skipped_done": night1_new - 2,
                                           "skipped_permanent": 1, "vanished": 0, "to_process": 3}
    assert night2["nightly"]["skipped_permanent"] == [f"{inp}/slide-1/corrupt.jpg"], "a corrupt image is not retried"
    assert night2["counts"]["total"] == 3 and night2["counts"]["ok"] == 3
    assert sorted(r["image_uri"] for r in rows if r["run_id"] == "nightly-2") == sorted(
        [f"{inp}/slide-1/{changed_name}", *(f"{inp}/slide-2/{n}" for n, _ in later[:2])])
    changed_rows = [r for r in rows if r["image_uri"] == f"{inp}/slide-1/{changed_name}" and r["status"] == "ok"]
    assert len({r["image_sha256"] for r in changed_rows}) == 2, "the changed image has a row for each content"


@pytest.mark.s3
def test_two_concurrent_runs_only_one_commits(s3_bucket: str, s3_client: Any, s3_keys: Callable[..., list[str]],
                                              images: list[tuple[str, bytes]], reaper: list[int]) -> None:
    inp, out = f"s3://{s3_bucket}/incoming", f"s3://{s3_bucket}/results"
    for name, data in images[:4]:
        s3_client.put_object(Bucket=s3_bucket, Key=f"incoming/slide-1/{name}", Body=data)
    procs = {rid: _start(inp, out, "--run-id", rid, "--no-heatmaps") for rid in ("nightly-a", "nightly-b")}
    reaper.extend(p.pid for p in procs.values())
    results = {rid: _finish(p) for rid, p in procs.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, EXIT_LEASE_HELD], results
    [(winner, _)] = [(rid, r) for rid, r in results.items() if r[0] == 0]
    [(_, loser)] = [(rid, r) for rid, r in results.items() if r[0] != 0]
    err_lines = [ln for ln in loser[2].splitlines() if ln.startswith("wbc-batch nightly:")]
    assert len(err_lines) == 1 and "another nightly run holds the lease" in err_lines[0]
    assert f"run {winner}" in err_lines[0]
    manifests, rows = _committed(s3_client, s3_keys, s3_bucket, "results")
    assert set(manifests) == {winner}
    assert Counter(r["image_uri"] for r in rows) == Counter({f"{inp}/slide-1/{n}": 1 for n, _ in images[:4]})
    assert all(f"part-{winner}-" in k for k in s3_keys(s3_bucket, "results/predictions/")), "the loser wrote nothing"


def test_cli_reports_a_held_lease_in_one_line(tmp_path: Path, small_input: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from wbc_batch.cli import main

    out = str(tmp_path / "out")
    with Lease(out, "nightly-holder", ttl_s=60):
        code = main(["nightly", str(small_input), out, "--run-id", "nightly-other"])
    captured = capsys.readouterr()
    assert code == EXIT_LEASE_HELD
    [line] = captured.err.strip().splitlines()
    assert line.startswith("wbc-batch nightly: another nightly run holds the lease") and "nightly-holder" in line
    assert not (tmp_path / "out" / "runs").exists(), "the loser must write nothing"


# --- change detection from the listing ------------------------------------------------------------


def _night_one(out: str, inp: Path, run_id: str = "nightly-20261125", *, with_source: bool = True) -> list[str]:
    """Commit rows for every image under ``inp`` as a classify run over it records them (hash and listing)."""
    import hashlib

    from wbc_batch.results import SOURCE_COLUMNS

    listing = storage.list_entries(str(inp)).to_pylist()
    specs = [cell(e["image_uri"], "s", "neutrophil", image_sha256=hashlib.sha256(Path(e["image_uri"]).read_bytes())
                  .hexdigest(), **({k: e[k] for k in SOURCE_COLUMNS} if with_source else {})) for e in listing]
    table = make_table(specs, run_id)
    if not with_source:  # Parquet written before the source_* columns existed
        table = table.drop_columns(list(SOURCE_COLUMNS))
    write_run(out, run_id, table)
    return [e["image_uri"] for e in listing]


@pytest.fixture()
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every image URI whose bytes storage.read_bytes is asked for."""
    from wbc_batch.imaging import is_image_name

    reads: list[str] = []
    real = storage.read_bytes

    def counting(uri: str) -> bytes:
        if is_image_name(uri):  # not the model's metadata
            reads.append(uri)
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", counting)
    return reads


def _config(inp: Path, out: str) -> Any:
    from wbc_batch.pipeline import ClassifyConfig

    return ClassifyConfig(input_uri=str(inp), output_uri=out)


def test_a_night_with_nothing_new_reads_no_image_and_commits_nothing(tmp_path: Path, small_input: Path,
                                                                     count_reads: list[str]) -> None:
    from wbc_batch.nightly import NightlyOptions, run_nightly

    out = str(tmp_path / "out")
    uris = _night_one(out, small_input)
    parts = sorted((tmp_path / "out" / "predictions").rglob("*.parquet"))
    result = run_nightly(_config(small_input, out))
    assert result["status"] == "nothing_new"
    assert count_reads == [], "no image may be read when the listing shows nothing new"
    assert result["nightly"]["listing"] == {"entries": len(uris), "unchanged_in_listing": len(uris),
                                            "read_and_hashed": 0, "rehash": False}
    assert result["nightly"]["counts"]["skipped_done"] == len(uris)
    assert sorted((tmp_path / "out" / "predictions").rglob("*.parquet")) == parts, "nothing committed"
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["nightly-20261125.json"]
    assert not (tmp_path / "out" / "heatmaps").exists()
    # --rehash: the full pass, every image read once, still nothing to do
    result = run_nightly(_config(small_input, out), NightlyOptions(rehash=True))
    assert result["status"] == "nothing_new" and sorted(count_reads) == sorted(uris)


def test_the_night_names_and_pins_the_artifact_digest(tmp_path: Path, small_input: Path) -> None:
    from dataclasses import replace

    from wbc_batch.model import ModelArtifactError, artifact_digest
    from wbc_batch.nightly import NightlyOptions, plan_from_listing, run_nightly

    out = str(tmp_path / "out")
    uris = _night_one(out, small_input)  # rows of model 1.0.0 with digest "cd" * 32
    result = run_nightly(_config(small_input, out))
    assert result["status"] == "nothing_new" and result["model"]["digest"] == artifact_digest(None)
    assert result["nightly"]["policy"]["model_digest"] == artifact_digest(None)
    with pytest.raises(ModelArtifactError, match="not the pinned"):
        run_nightly(replace(_config(small_input, out), model_digest="00" * 32))
    _, rows = committed_rows(out)
    assert set(rows.column("model_digest").to_pylist()) == {"cd" * 32}
    again = NightlyOptions(reprocess_on_model_change=True)
    assert plan_from_listing(str(small_input), rows, V1, again, model_digest="cd" * 32)[0].to_process == []
    assert sorted(plan_from_listing(str(small_input), rows, V1, again, model_digest="ef" * 32)[0].to_process) == \
        sorted(uris), "same version, another artifact: every image again"


def test_only_new_or_changed_entries_are_read_and_processed(tmp_path: Path, small_input: Path,
                                                            count_reads: list[str]) -> None:
    from wbc_batch.nightly import NightlyOptions, plan_from_listing

    out = str(tmp_path / "out")
    uris = _night_one(out, small_input)
    changed, same_size = Path(uris[0]), Path(uris[1])
    changed.write_bytes(Path(uris[2]).read_bytes())  # other bytes under the same name
    data = same_size.read_bytes()
    same_size.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, new content, new mtime
    os.utime(same_size, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    fresh = small_input / "slide-C" / "new.jpg"
    fresh.parent.mkdir()
    fresh.write_bytes(Path(uris[3]).read_bytes())
    _, rows = committed_rows(out)
    plan, _, reads = plan_from_listing(str(small_input), rows, V1, NightlyOptions())
    assert sorted(count_reads) == sorted([str(changed), str(same_size), str(fresh)])
    assert reads["read_and_hashed"] == 3 and reads["unchanged_in_listing"] == len(uris) - 2
    assert plan.changed == sorted([str(changed), str(same_size)]) and plan.new == [str(fresh)]
    assert plan.to_process == sorted([str(changed), str(same_size), str(fresh)])


def test_rows_without_source_columns_are_read_once(tmp_path: Path, small_input: Path, count_reads: list[str]) -> None:
    from wbc_batch.nightly import NightlyOptions, plan_from_listing

    out = str(tmp_path / "out")
    uris = _night_one(out, small_input, with_source=False)
    _, rows = committed_rows(out)
    assert rows.column("source_size").null_count == len(uris)
    plan, _, reads = plan_from_listing(str(small_input), rows, V1, NightlyOptions())
    assert sorted(count_reads) == sorted(uris) and plan.to_process == [] and len(plan.skipped_done) == len(uris)


def test_next_run_id_gives_a_second_run_on_the_same_date_its_own_id() -> None:
    import datetime as dt

    from wbc_batch.nightly import next_run_id

    now = dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)
    assert next_run_id(set(), now) == "nightly-20261126"
    assert next_run_id({"nightly-20261125"}, now) == "nightly-20261126"
    assert next_run_id({"nightly-20261126"}, now) == "nightly-20261126-2"
    assert next_run_id({"nightly-20261126", "nightly-20261126-2"}, now) == "nightly-20261126-3"


@pytest.mark.s3
def test_s3_listing_records_size_etag_and_time(s3_bucket: str, s3_client: Any) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="in/a/x.jpg", Body=b"12345")
    s3_client.put_object(Bucket=s3_bucket, Key="in/a/notes.txt", Body=b"no image")
    [entry] = storage.list_entries(f"s3://{s3_bucket}/in").to_pylist()
    assert entry["image_uri"] == f"s3://{s3_bucket}/in/a/x.jpg" and entry["source_size"] == 5
    assert entry["source_etag"] == '"827ccb0eea8a706c4c34a16891f84e7b"' and entry["source_mtime"] is not None


def test_real_nights_record_the_listing_skip_unread_and_run_twice_on_one_date(
        tmp_path: Path, small_input: Path, ray_local: None, count_reads: list[str]) -> None:
    """Real classify runs: rows carry the listing; nothing new reads nothing; new images later that date run as -2."""
    from wbc_batch.nightly import default_run_id, run_nightly
    from wbc_batch.pipeline import ClassifyConfig

    out = str(tmp_path / "out")
    config = ClassifyConfig(input_uri=str(small_input), output_uri=out, batch_size=4, write_heatmaps=False,
                            faithfulness_sample=0)
    first = run_nightly(config)
    today = default_run_id()
    assert first["status"] == "succeeded" and first["run_id"] == today and first["counts"]["total"] == 12
    _, rows = committed_rows(out)
    assert rows.column("source_size").null_count == 0 and rows.column("source_mtime").null_count == 0
    count_reads.clear()
    assert run_nightly(config)["status"] == "nothing_new" and count_reads == []
    extra = small_input / "slide-C" / "late.jpg"
    extra.parent.mkdir()
    extra.write_bytes(next(small_input.rglob("*.jpg")).read_bytes())
    second = run_nightly(config)
    assert second["run_id"] == f"{today}-2" and second["nightly"]["counts"]["new"] == 1
    assert second["counts"]["total"] == 1 and second["nightly"]["listing"]["read_and_hashed"] == 1
    _, rows = committed_rows(out)
    assert Counter(rows.column("image_uri").to_pylist()) == Counter(
        {str(p): 1 for p in small_input.rglob("*.jpg")}), "exactly one row per image over both runs"
