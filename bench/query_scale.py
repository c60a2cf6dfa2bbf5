"""Queries at archive scale: what one night's differential, the review queue and one run's report cost as the archive grows.

Builds synthetic OUTPUT archives with pyarrow directly (the schema of
``results.prediction_schema``, one committed nightly run per night over 30
nights, part files and manifests as classify writes them), then runs each
command in a fresh subprocess and records its wall time and peak RSS
(``ru_maxrss`` of the child from ``os.wait4``):

- ``differential``: ``wbc-batch query OUT --differential --run-date <night 15> --format csv``
- ``review_queue``: ``wbc-batch query OUT --review-queue --format csv``
- ``review_queue_night``: the same with ``--run-date <night 15>`` (the morning's queue)
- ``report``: ``wbc-batch report OUT --run-id <night 15's run> --out <tmp>.html``

Rows are realistic: ~150 cells per slide, the shipped model's class mix, ~7 %
under the review threshold, ~1 % out of distribution, 0.2 % error rows of
which the transient ones are retried (same URI) the next night. Image paths
point at files that do not exist, so the report's gallery costs a failed
open per thumbnail rather than a decode.

    .venv/bin/python bench/query_scale.py --rows 30000 1000000 --repeats 3
    .venv/bin/python bench/query_scale.py --rows 30000 1000000 --repeats 1 --code /tmp/old --no-run-date  # before
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLASSES = ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil", "non_wbc"]
MIX = [0.007, 0.03, 0.01, 0.30, 0.06, 0.55, 0.043]  # shares of the shipped model's classes on routine slides
NIGHTS = 30
CELLS_PER_SLIDE = 150
FIRST_NIGHT = date(2026, 10, 1)
REVIEW_THRESHOLD = 0.952
COMMANDS = ("differential", "review_queue", "review_queue_night", "report")


def _night_table(night: int, n: int, schema, work: Path, out: str, retry: list[str], rng: np.random.Generator):
    """One night's rows: ``n`` new images in slides of ~150, plus the previous night's transient errors again."""
    import pyarrow as pa

    day = FIRST_NIGHT + timedelta(days=night)
    run_id = f"nightly-{day:%Y%m%d}"
    slides = np.arange(n) // CELLS_PER_SLIDE
    uris = [f"{work}/input/{day:%Y-%m-%d}/slide-{night:02d}-{s:04d}/{i:06d}.jpg" for i, s in enumerate(slides)] + retry
    samples = [u.rsplit("/", 2)[1] for u in uris]
    m = len(uris)
    status = np.where(rng.random(m) < 0.002, "error", "ok")
    status[n:] = "ok"  # a retried transient error succeeds
    ok = status == "ok"
    cls_idx = rng.choice(len(CLASSES), size=m, p=MIX)
    conf = np.clip(1.0 - rng.beta(0.3, 25.0, size=m), 0.2, 1.0).astype(np.float32)
    ood = rng.random(m) < 0.01
    suspect = rng.random(m) < 0.01
    needs_review = ok & ((conf < REVIEW_THRESHOLD) | ood | suspect)
    sha = [hashlib.sha256(u.encode()).hexdigest() for u in uris]
    start = datetime(day.year, day.month, day.day, 1, 0, tzinfo=timezone.utc)
    processed = np.datetime64(start.replace(tzinfo=None), "us") + (np.arange(m) * 10_000).astype("timedelta64[us]")

    def masked(values, typ):
        return pa.array(values, type=typ, mask=~ok)

    cols = {
        "image_uri": pa.array(uris, pa.string()),
        "image_sha256": pa.array([s if k else None for s, k in zip(sha, ok)], pa.string()),
        "sample_id": pa.array(samples, pa.string()),
        "predicted_class": masked(np.array(CLASSES, dtype=object)[cls_idx], pa.string()),
        "confidence": masked(conf, pa.float32()),
    }
    rest = ((1.0 - conf) / (len(CLASSES) - 1)).astype(np.float32)
    for j, c in enumerate(CLASSES):
        cols[f"p_{c}"] = masked(np.where(cls_idx == j, conf, rest), pa.float32())
    error_kind = np.where(rng.random(m) < 0.5, "transient", "permanent")
    cols.update({
        "needs_review": pa.array(needs_review),
        "status": pa.array(status.tolist(), pa.string()),
        "error": pa.array([None if k else "read failed: cannot read image: SlowDown" for k in ok], pa.string()),
        "error_kind": pa.array([None if k else e for k, e in zip(ok, error_kind)], pa.string()),
        "heatmap_uri": pa.array([f"{out}/heatmaps/{s[:2]}/{s}-1.1.0.jpg" if k else None for s, k in zip(sha, ok)],
                                pa.string()),
        "model_version": pa.array(["1.1.0"] * m, pa.string()),
        "model_sha256": pa.array(["ab" * 32] * m, pa.string()),
        "model_digest": pa.array(["cd" * 32] * m, pa.string()),
        "run_id": pa.array([run_id] * m, pa.string()),
        "processed_at": pa.array(processed, pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC")),
        "image_width": masked(np.full(m, 360, np.int32), pa.int32()),
        "image_height": masked(np.full(m, 363, np.int32), pa.int32()),
        "cam_in_cell": masked(rng.uniform(0.4, 1.0, m).astype(np.float32), pa.float32()),
        "cam_peak_in_cell": masked(~suspect, pa.bool_()),
        "input_zoom": masked(np.ones(m, np.float32), pa.float32()),
        "cell_area_share": masked(rng.uniform(0.1, 0.5, m).astype(np.float32), pa.float32()),
        "explanation_suspect": masked(suspect, pa.bool_()),
        "ood_score": masked(np.where(ood, 9.0, rng.uniform(0.5, 3.0, m)).astype(np.float32), pa.float32()),
        "out_of_distribution": masked(ood, pa.bool_()),
        "source_size": pa.array(rng.integers(20_000, 40_000, m), pa.int64()),
        "source_etag": pa.array([None] * m, pa.string()),
        "source_mtime": pa.array(processed - np.timedelta64(3600, "s"), pa.timestamp("us")).cast(
            pa.timestamp("us", tz="UTC")),
    })
    table = pa.Table.from_pydict(cols, schema=schema)
    next_retry = [u for u, k, e in zip(uris, ok, error_kind) if not k and e == "transient"]
    return run_id, day, table, next_retry, start


def build(rows: int, work: Path) -> str:
    """An OUTPUT under ``work`` with ``rows`` new images over 30 nights, one committed run per night."""
    import pyarrow.parquet as pq

    from wbc_batch import results, storage

    out = str(work / "out")
    schema = results.prediction_schema(CLASSES)
    rng = np.random.default_rng(rows)
    retry: list[str] = []
    for night in range(NIGHTS):
        n = rows // NIGHTS + (1 if night < rows % NIGHTS else 0)
        run_id, day, table, retry, start = _night_table(night, n, schema, work, out, retry, rng)
        files = []
        for seq, offset in enumerate(range(0, table.num_rows, 100_000)):  # PartWriter's part size
            buf = io.BytesIO()
            pq.write_table(table.slice(offset, 100_000), buf, compression="zstd")
            uri = results.part_file_uri(out, f"{day:%Y-%m-%d}", run_id, seq)
            storage.write_bytes(uri, buf.getvalue())
            files.append(uri)
        counts = results.RunCounts()
        counts.add(table.select(["sample_id", "status", "error_kind", "predicted_class", "needs_review",
                                 "explanation_suspect", "out_of_distribution"]))
        finished = start + timedelta(seconds=table.num_rows / 100)
        results.write_manifest(out, results.RunManifest.from_json({
            "run_id": run_id, "status": "succeeded", "input": f"{work}/input/{day:%Y-%m-%d}", "output": out,
            "model": {"uri": "builtin", "version": "1.1.0", "sha256": "ab" * 32, "digest": "cd" * 32,
                      "class_names": CLASSES, "non_wbc_classes": ["non_wbc"], "review_threshold": REVIEW_THRESHOLD},
            "started_at": start.isoformat(), "finished_at": finished.isoformat(), "counts": counts.to_dict(),
            "timings": {"seconds": table.num_rows / 100, "images_per_second": 100.0}, "parquet_files": files,
            "options": {}, "domain_shift": {"detected": False}}))
    return out


def command(kind: str, out: str, tmp: Path, run_date: bool = True) -> list[str]:
    """The CLI arguments of one measurement (``run_date=False``: checkouts before ``--run-date``, whole archive)."""
    night = FIRST_NIGHT + timedelta(days=NIGHTS // 2)
    scope = ["--run-date", f"{night:%Y-%m-%d}"] if run_date else []
    if kind == "differential":
        return ["query", out, "--differential", *scope, "--format", "csv"]
    if kind == "review_queue":
        return ["query", out, "--review-queue", "--format", "csv"]
    if kind == "review_queue_night":
        return ["query", out, "--review-queue", *scope, "--format", "csv"]
    return ["report", out, "--run-id", f"nightly-{night:%Y%m%d}", "--out", str(tmp / "report.html")]


def _peak_rss_mb(args: list[str], code: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, stdout lines) of one run, the child reaped by ``os.wait4``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    with tempfile.TemporaryFile() as sink:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "wbc_batch.cli", *args], stdout=sink,
                                stderr=subprocess.PIPE, env=env, cwd=code)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.returncode != 0:
            raise RuntimeError(f"wbc-batch {' '.join(args)} failed ({proc.returncode}): {err[-500:]}")
        sink.seek(0)
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: sink.read(1 << 20), b""))
    return seconds, usage.ru_maxrss / 1024, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[30_000, 1_000_000], help="archive sizes (rows over 30 nights)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each command per archive, alternated")
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose wbc_batch runs the commands (default: this one)")
    p.add_argument("--no-run-date", action="store_true",
                   help="for a checkout without query --run-date: differential and review_queue_night over the whole archive")
    p.add_argument("--work", type=Path, default=None, help="build the archives here and keep them (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = p.parse_args(argv)
    tmp_ctx = tempfile.TemporaryDirectory(prefix="wbc-query-bench-") if args.work is None else None
    base = Path(tmp_ctx.name) if tmp_ctx else args.work
    report: dict = {"code": str(args.code.resolve()), "run_date_option": not args.no_run_date, "load_before": round(os.getloadavg()[0], 1), "archives": {}}
    try:
        archives = {}
        for rows in args.rows:
            work = base / f"rows-{rows}"
            if not (work / "out" / "runs").is_dir():
                t0 = time.perf_counter()
                build(rows, work)
                print(f"built {rows} rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            archives[rows] = str(work / "out")
            size = sum(f.stat().st_size for f in (work / "out" / "predictions").rglob("*.parquet"))
            report["archives"][rows] = {"parquet_mb": round(size / 2**20, 1), "runs": {k: [] for k in COMMANDS}}
        for _ in range(args.repeats):
            for rows, out in archives.items():
                for kind in COMMANDS:
                    seconds, rss, lines = _peak_rss_mb(command(kind, out, base, not args.no_run_date), args.code)
                    report["archives"][rows]["runs"][kind].append(
                        {"seconds": round(seconds, 2), "peak_rss_mb": round(rss, 1), "stdout_lines": lines})
                    print(f"{rows:>9} {kind:<13} {seconds:6.2f} s {rss:7.1f} MB {lines} lines", file=sys.stderr)
        for entry in report["archives"].values():
            entry["median"] = {k: {"seconds": statistics.median(r["seconds"] for r in v),
                                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in v)}
                               for k, v in entry["runs"].items()}
        if len(args.rows) >= 2:
            small, large = (report["archives"][r]["median"] for r in (min(args.rows), max(args.rows)))
            report["ratio_largest_to_smallest"] = {
                k: {m: round(large[k][m] / small[k][m], 2) for m in ("seconds", "peak_rss_mb")} for k in COMMANDS}
        report["load_after"] = round(os.getloadavg()[0], 1)
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
