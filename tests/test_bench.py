"""The benchmark harness runs end to end on a tiny input and writes a complete report.

Not a timing test: the machine is shared, so only the report's structure and
internal consistency are checked, never a throughput figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "pbc"


def test_bench_harness_writes_a_complete_report(tmp_path: Path) -> None:
    out, raw = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--sizes", "16,24", "--baseline-n", "2",
           "--floor-n", "16", "--batch-size", "8", "--data", str(SAMPLES), "--workdir", str(tmp_path / "work"),
           "--out", str(out), "--json", str(raw), "--small-sizes", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(raw.read_text())

    assert report["sizes"] == [16, 24]
    assert report["images"]["unique"] == 64  # the bundled samples: 8 folders x 8
    assert report["machine"]["nproc"] >= 1 and report["machine"]["free_g"]
    assert [r["n"] for r in report["baseline"]] == [2]
    floor = report["floor"][0]
    assert floor["model_ms_per_image"] > 0 and floor["decode_ms_per_image"] > 0
    expected_floor = 1e3 / (floor["model_ms_per_image"] + floor["decode_ms_per_image"])
    assert floor["images_per_s"] == pytest.approx(expected_floor, rel=0.01)
    full = report["full_floor"][0]
    assert full["n"] == 16 and full["images_per_s"] == pytest.approx(16 / full["seconds"], rel=0.01)
    assert full["cpu_ms_per_image"] > 0
    assert not (tmp_path / "work" / "full-floor").exists(), "the full floor's heatmaps are cleaned up"
    assert [r["n"] for r in report["pipeline"]] == [16, 24]
    for r in report["pipeline"]:
        assert r["images_per_s"] > 0 and r["seconds"] > 0
        assert 0 < r["first_row_s"] <= r["seconds"], "the first row arrives within the run"
        assert {"verify_model_s", "listing_s", "ray_connect_s"} <= set(r["phases"])
        assert 0 < r["tree_cpu_util"] <= 1.0
        assert r["peak_rss_mb"] > 100, "the sampler must see the Ray tree, not only the driver"
        assert r["processes_peak"] >= 3
        assert r["parquet_files"] == 1

    summary = report["summary"]
    for n in ("16", "24"):
        p = summary["pipeline"][n]
        assert p["vs_baseline"] == pytest.approx(
            p["images_per_s"]["median"] / summary["baseline_images_per_s"]["median"], rel=0.02, abs=0.01)
        assert p["vs_floor"] == pytest.approx(
            p["images_per_s"]["median"] / summary["floor_images_per_s"]["median"], rel=0.02, abs=1e-3)
        assert p["vs_full_floor"] == pytest.approx(
            p["images_per_s"]["median"] / summary["full_floor_images_per_s"]["median"], rel=0.02, abs=1e-3)
    assert set(summary["scaling"]) >= {"marginal_images_per_s", "marginal_cpu_ms_per_image", "time_ratio", "size_ratio",
                                       "peak_rss_ratio"}

    text = out.read_text()
    for heading in ("# Benchmarks", "## Machine", "## Throughput", "## Pipeline: scaling, CPU and memory"):
        assert heading in text
    assert "bench/run.py" in text and "shared" in text
    assert "| pipeline n=24 |" in text
    assert "| full floor (n=16) |" in text and "% of full floor" in text and "first row s" in text
    assert not (tmp_path / "work" / "links").exists(), "64 samples cover 24 images without symlinks"

    # small runs: a cold `wbc-batch classify` against the cold one-at-a-time loop on the same 8 images
    small = report["small"]
    assert small["sizes"] == [8] and small["compare_tree"] is None
    [loop] = small["loops"]
    assert loop["n"] == 8 and 0 < loop["first_image_s"] <= loop["loop_s"] < loop["in_process_s"] < loop["wall_s"]
    assert loop["import_s"] > 0 and loop["model_load_s"] > 0 and loop["cpu_s"] > 0
    here, on_ray = small["runs"]  # a cold classify with each runner
    assert (here["tree"], here["runner"], on_ray["tree"], on_ray["runner"]) == ("in-process", "in-process", "ray", "ray")
    for run in (here, on_ray):
        assert run["n"] == 8
        assert 0 < run["run_start_s"] < run["first_row_s"] < run["wall_s"] and run["after_run_s"] > 0
        assert run["first_heatmap_s"] is not None and run["first_heatmap_s"] < run["wall_s"]
        assert run["faithfulness_images"] == 1 and run["faithfulness_sample_size"] == 1  # sized to the run
        assert {"actor_ready_s", "tensorflow_import_s", "faithfulness_s", "commit_s"} <= set(run["phases"])
    assert "ray_connect_s" in on_ray["phases"] and "ray_connect_s" not in here["phases"]
    assert "## Small runs" in text and "| 8 | classify, in-process |" in text and "| 8 | classify, ray |" in text
    assert "| tensorflow_import_s |" in text


def test_small_runs_alone_write_their_section_and_compare_another_checkout_by_its_code(tmp_path: Path) -> None:
    """The small-runs section on its own (--sizes ''), as the markdown a report gets, from made-up figures."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import run as bench
    finally:
        sys.path.remove(str(REPO / "bench"))

    def cli(n: int, tree: str, wall: float) -> dict:
        return {"n": n, "tree": tree, "wall_s": wall, "cpu_s": 9.0, "cpu_ms_per_image": 9000 / n, "run_start_s": 1.2,
                "run_s": wall - 3, "first_row_s": wall - 2, "first_heatmap_s": wall - 2.5, "after_run_s": 1.5,
                "phases": {"ray_connect_s": 4.0, "faithfulness_s": 0.4 if tree == "ray" else 3.2},
                "faithfulness_images": 1 if tree == "ray" else 8, "faithfulness_sample_size": 1, "load_before": 1.0}

    small = {"sizes": [16], "repeats": 2, "compare_tree": "/tmp/base", "compare_commit": "abc1234",
             "this_commit": "def5678+dirty",
             "runs": [cli(16, "ray", 12.0), cli(16, "compare", 20.0), cli(16, "ray", 14.0), cli(16, "compare", 22.0)],
             "loops": [{"n": 16, "wall_s": 9.0, "first_result_s": 5.0, "cpu_s": 8.0, "cpu_ms_per_image": 500.0,
                        "loop_s": 4.0, "first_image_s": 1.5, "load_before": 1.0}] * 2}
    text = "\n".join(bench.small_markdown(small))
    assert "| 16 | classify, ray | 13.0 | 11.0 |" in text and "| 16 | classify, compare | 21.0 | 19.0 |" in text
    assert "classify, in-process" not in text  # no such runs in these figures
    assert "| 16 | cold loop (process start to last image) | 9.0 | 5.0 |" in text
    assert "| faithfulness_s | 0.4 | 3.2 |" in text and "| run_start_s | 1.2 | 1.2 |" in text
    assert "`/tmp/base` at `abc1234`" in text
    assert bench.main(["--sizes", "", "--small-sizes", "", "--out", str(tmp_path / "x.md")]) == 2
    assert bench.main(["--sizes", "", "--compare-tree", str(tmp_path), "--out", str(tmp_path / "x.md")]) == 2


def test_manifest_beyond_the_distinct_images_uses_new_uris(tmp_path: Path) -> None:
    """Listing de-duplicates URIs, so sizes above the image count must still list n distinct URIs."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import run as bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    from wbc_batch import storage

    _, paths = bench.find_images(SAMPLES)
    manifest = bench.build_manifest(bench.interleave_classes(paths), 150, tmp_path)
    uris = storage.list_images(str(manifest))
    assert len(uris) == 150
    assert {Path(u).resolve() for u in uris} == {p.resolve() for p in paths}
