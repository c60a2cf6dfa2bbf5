"""The run manifest (results.RunManifest) and the part-file commit protocol, on real files; no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.results_factory import cells, make_table
from wbc_batch import query, results
from wbc_batch.results import ManifestCounts, ModelRef, RunManifest, RunTimings

# The keys classify writes, in order (docs/DESIGN.md; tests/test_pipeline.py reads them from real runs).
MANIFEST_KEYS = ["run_id", "status", "input", "output", "model", "started_at", "finished_at", "run_date", "counts",
                 "timings", "resources", "parquet_files", "options", "domain_shift", "faithfulness", "warnings"]
MODEL_KEYS = ["uri", "name", "version", "sha256", "digest", "class_names", "non_wbc_classes", "review_threshold"]
COUNT_KEYS = ["total", "ok", "error", "needs_review", "out_of_distribution", "explanation_suspect", "per_class",
              "errors_by_kind", "samples", "sample_ids"]


def full_manifest(run_id: str = "run-1") -> RunManifest:
    """A manifest with every field set, as run_classify builds it."""
    return RunManifest(
        run_id=run_id, input="/in", output="/out",
        model=ModelRef(uri="shipped", name="wbc", version="1.1.0", sha256="ab" * 32, digest="cd" * 32,
                       class_names=["lymphocyte", "neutrophil", "non_wbc"], non_wbc_classes=["non_wbc"],
                       review_threshold=0.7),
        started_at="2026-11-25T08:00:00+00:00", finished_at="2026-11-25T08:05:00+00:00", run_date="2026-11-25",
        counts=ManifestCounts(total=3, ok=2, error=1, needs_review=1, per_class={"neutrophil": 2},
                              errors_by_kind={"decode": 1}, samples=1, sample_ids=["S"]),
        timings=RunTimings(seconds=1.5, images_per_second=2.0, first_row_seconds=0.4, phases={"listing_s": 0.01}),
        resources={"workers": 1, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0},
        parquet_files=["/out/predictions/run_date=2026-11-25/part-run-1-00000.parquet"],
        options={"batch_size": 32, "n_uris": 3},
        domain_shift={"detected": False, "evaluated": True, "max_share": 0.2, "min_ood": 3},
        faithfulness={"n_images": 2}, warnings=["shared paths"], extra={"nightly": {"counts": {"new": 3}}})


def test_round_trip_keeps_every_field_and_the_written_shape() -> None:
    manifest = full_manifest()
    data = json.loads(json.dumps(manifest.to_json()))
    assert list(data) == [*MANIFEST_KEYS, "nightly"]
    assert list(data["model"]) == MODEL_KEYS and list(data["counts"]) == COUNT_KEYS
    assert list(data["timings"]) == ["seconds", "images_per_second", "first_row_seconds", "phases"]
    assert RunManifest.from_json(data) == manifest
    assert manifest.committed and not manifest.shift_detected


def test_optional_sections_are_left_out_when_empty() -> None:
    data = RunManifest(run_id="r", parquet_files=[]).to_json()
    assert "faithfulness" not in data and "warnings" not in data and "first_row_seconds" not in data["timings"]
    assert data["parquet_files"] == [] and data["status"] == "succeeded"


def test_an_older_manifest_reads_with_defaults() -> None:
    """A manifest from before digests, sample ids, part lists and the shift rule were recorded."""
    old = {"run_id": "old", "status": "succeeded", "model": {"version": "1.0.0", "sha256": "ab" * 32},
           "counts": {"total": 4, "ok": 4}, "timings": {"seconds": 2}, "domain_shift": True}
    manifest = RunManifest.from_json(old)
    assert manifest.model.digest is None and manifest.model.review_threshold is None
    assert manifest.counts.sample_ids is None and manifest.counts.needs_review == 0
    assert manifest.parquet_files is None  # every part of the run id counts
    assert manifest.timings.first_row_seconds is None and manifest.timings.seconds == 2.0
    assert manifest.domain_shift == {"detected": True} and manifest.shift_detected
    assert manifest.faithfulness is None and manifest.warnings == [] and manifest.extra == {}
    written = manifest.to_json()
    assert "parquet_files" not in written and "sample_ids" not in written["counts"]  # "unknown" stays unknown


def test_values_of_the_wrong_kind_read_as_defaults() -> None:
    manifest = RunManifest.from_json({"model": "v1", "counts": {"total": "many", "ok": True, "error": 2.0},
                                      "timings": [], "parquet_files": "x", "options": None, "warnings": "w",
                                      "domain_shift": "yes", "_manifest_path": "/x"}, run_id="from-file-name")
    assert manifest.run_id == "from-file-name" and manifest.status is None and not manifest.committed
    assert manifest.model == ModelRef() and manifest.timings == RunTimings()
    assert (manifest.counts.total, manifest.counts.ok, manifest.counts.error) == (0, 0, 2)
    assert manifest.parquet_files is None and manifest.options == {} and manifest.warnings == []
    assert manifest.domain_shift == {} and manifest.extra == {}  # "_" keys are reader bookkeeping, not data


def test_write_manifest_and_read_it_back(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    manifest = full_manifest("night-1")
    uri = results.write_manifest(out, manifest)
    assert Path(uri) == tmp_path / "out" / "runs" / "night-1.json"
    assert json.loads(Path(uri).read_text()) == json.loads(json.dumps(manifest.to_json()))
    back = results.read_manifest(out, "night-1")
    assert back == manifest and back is not None and back.path == uri
    assert results.read_manifest(out, "absent") is None
    with pytest.raises(ValueError, match="invalid run id"):
        results.read_manifest(out, "../elsewhere")


def test_a_manifest_that_does_not_parse_is_no_commit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    results.write_manifest(str(out), RunManifest(run_id="good"))
    (out / "runs" / "torn.json").write_text('{"run_id": "torn", "status": "succ')
    (out / "runs" / "list.json").write_text("[1, 2]")
    (out / "runs" / "unnamed.json").write_text('{"status": "succeeded"}')
    assert results.read_manifest(str(out), "torn") is None and results.read_manifest(str(out), "list") is None
    manifests = query.read_manifests(str(out))
    assert sorted(manifests) == ["good", "unnamed"]  # a manifest without run_id is named by its file
    assert query.committed_run_ids(manifests) == {"good", "unnamed"}


def test_part_file_names_carry_the_run_id() -> None:
    uri = results.part_file_uri("/out", "2026-11-25", "nightly-20261125-2", 7)
    assert uri == "/out/predictions/run_date=2026-11-25/part-nightly-20261125-2-00007.parquet"
    assert results.part_run_id(uri.rsplit("/", 1)[-1]) == "nightly-20261125-2"
    assert results.part_run_id("notes.parquet") is None and results.part_run_id("part-x-7.parquet") is None
    assert results.manifest_uri("/out", "r") == "/out/runs/r.json"


def test_only_the_parts_a_committed_manifest_lists_count(tmp_path: Path) -> None:
    """PartWriter's files, a stale part of an earlier attempt, another run's parts, and the commit rule."""
    out = str(tmp_path / "out")
    table = make_table(cells("S", {"neutrophil": 3, "lymphocyte": 2}), "r1")
    writer = results.PartWriter(out, "2026-11-25", "r1", table.schema, rows_per_file=2)
    for i in range(table.num_rows):
        writer.add(table.slice(i, 1))
    files = writer.close()
    assert [Path(f).name for f in files] == [f"part-r1-{i:05d}.parquet" for i in range(3)]
    assert sum(pq.read_metadata(f).num_rows for f in files) == 5
    stale = results.part_file_uri(out, "2026-11-25", "r1", 3)  # an earlier attempt wrote one more part
    Path(stale).write_bytes(Path(files[0]).read_bytes())
    other = results.PartWriter(out, "2026-11-25", "r2", table.schema)
    other.add(table)
    other.close()  # r2 has no manifest: never committed

    counts = results.RunCounts()
    counts.add(table)
    assert counts.to_dict() == counts.summary().to_json()
    assert counts.summary().sample_ids == ["S"] and counts.summary().per_class == {"lymphocyte": 2, "neutrophil": 3}
    results.write_manifest(out, RunManifest(run_id="r1", output=out, counts=counts.summary(), parquet_files=files))

    manifests = query.read_manifests(out)
    counted = [Path(p.path).name for p in query.committed_parts(query.part_files(out), manifests)]
    assert counted == [Path(f).name for f in files]

    assert results.discard_previous_attempt(out, "r1") == 4  # the manifest first, then every part of r1
    assert results.read_manifest(out, "r1") is None
    left = [p.run_id for p in query.part_files(out)]
    assert left == ["r2"]
