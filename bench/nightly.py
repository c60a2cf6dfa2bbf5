"""Nightly planning cost: a night with nothing new (listing only) against the full pass (read + hash everything).

Builds a local input of N image files (hard links to real images, so no
extra disk), commits one synthetic run that holds an ``ok`` row for every
image with the sha256 and listing state a classify run would have recorded,
then times, each in a fresh state and ``--repeats`` times:

- ``nothing_new``: ``run_nightly`` end to end on that input (lease, committed
  rows, listing, DuckDB plan, no commit), counting image reads;
- ``rehash``: the same with ``--rehash``, i.e. what every night cost before
  change detection (every image read and hashed).

    .venv/bin/python bench/nightly.py --n 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "pbc"


def build(n: int, work: Path) -> tuple[Path, str]:
    """N image files under ``work/input`` and an OUTPUT holding one committed run over all of them."""
    import pyarrow.parquet as pq

    from wbc_batch import results, storage

    src = sorted(p for p in (DATA if DATA.is_dir() else REPO / "samples" / "pbc").rglob("*.jpg")
                 if not p.name.startswith("."))
    inp = work / "input"
    for i in range(n):
        dst = inp / f"slide-{i // 100:04d}" / f"{i:06d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src[i % len(src)], dst)
    listing = storage.list_entries(str(inp)).to_pylist()
    classes = ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil", "non_wbc"]
    schema = results.prediction_schema(classes)
    now = datetime.now(timezone.utc)
    rows = [{"image_uri": e["image_uri"], "image_sha256": hashlib.sha256(Path(e["image_uri"]).read_bytes()).hexdigest(),
             "sample_id": Path(e["image_uri"]).parent.name, "predicted_class": "neutrophil", "confidence": 0.99,
             "needs_review": False, "status": "ok", "model_version": "1.1.0", "model_sha256": "ab" * 32,
             "run_id": "nightly-bench", "processed_at": now, "source_size": e["source_size"],
             "source_etag": e["source_etag"], "source_mtime": e["source_mtime"]} for e in listing]
    out = work / "out"
    buf = io.BytesIO()
    pq.write_table(results.pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
    part = results.part_file_uri(str(out), now.strftime("%Y-%m-%d"), "nightly-bench", 0)
    storage.write_bytes(part, buf.getvalue())
    results.write_manifest(str(out), results.RunManifest(run_id="nightly-bench", parquet_files=[part]))
    return inp, str(out)


def one_night(inp: Path, out: str, rehash: bool) -> dict:
    from wbc_batch import storage
    from wbc_batch.nightly import NightlyOptions, run_nightly
    from wbc_batch.pipeline import ClassifyConfig

    reads = 0
    real = storage.read_bytes

    def counting(uri: str) -> bytes:
        nonlocal reads
        reads += uri.endswith(".jpg")
        return real(uri)

    storage.read_bytes = counting
    try:
        t0 = time.perf_counter()
        result = run_nightly(ClassifyConfig(input_uri=str(inp), output_uri=out), NightlyOptions(rehash=rehash))
        seconds = time.perf_counter() - t0
    finally:
        storage.read_bytes = real
    assert result["status"] == "nothing_new", result["status"]
    return {"seconds": round(seconds, 3), "image_reads": reads, "planning_seconds": result["nightly"]["planning_seconds"],
            **result["nightly"]["listing"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000, help="images in the input (default 10000)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats of each kind of night")
    p.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wbc-nightly-bench-") as tmp:
        t0 = time.perf_counter()
        inp, out = build(args.n, Path(tmp))
        setup = time.perf_counter() - t0
        runs = {"nothing_new": [], "rehash": []}
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(one_night(inp, out, rehash=kind == "rehash"))
    report = {"n": args.n, "setup_seconds": round(setup, 1), "load_before": os.getloadavg()[0], "runs": runs,
              "median_seconds": {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
