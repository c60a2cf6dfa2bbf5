"""Report tests: known results plus real images and heatmaps, rendered to one HTML file.

The Chromium test opens the report in a real headless browser, takes a
screenshot and checks that every embedded image decoded.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest

from tests.results_factory import T0, cell, cells, make_table, write_run
from tests.review_factory import heatmap_overlay
from wbc_batch import storage
from wbc_batch.cli import main
from wbc_batch.errors import EXIT_CORRUPT_RESULTS
from wbc_batch.report import render_report, write_report

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "pbc"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]


def _write_images(base: str, output: str, sample: str, folder: str, n: int, ext: str = ".jpg") -> list[dict]:
    """Copy ``n`` bundled images of a class into ``base/sample`` (re-encoded as ``ext``) with their heatmaps."""
    rows = []
    for src in sorted((SAMPLES / folder).iterdir())[:n]:
        bgr = cv2.imread(str(src))
        data = cv2.imencode(ext, bgr)[1].tobytes()
        uri = storage.join(base, sample, src.stem + ext)
        storage.write_bytes(uri, data)
        sha = hashlib.sha256(data).hexdigest()
        heat = storage.join(output, "heatmaps", sha[:2], f"{sha}-1.0.0.jpg")
        storage.write_bytes(heat, heatmap_overlay(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        rows.append(cell(uri, sample, folder, image_sha256=sha, heatmap_uri=heat))
    return rows


def _build(base: str, output: str) -> None:
    """slide-A: 15 white cells, 5 need review (one a TIFF, one a missing file); slide-B: mostly OOD; domain shift."""
    a = (_write_images(base, output, "slide-A", "neutrophil", 6) + _write_images(base, output, "slide-A", "lymphocyte", 4)
         + _write_images(base, output, "slide-A", "monocyte", 2, ext=".tif") + _write_images(base, output, "slide-A", "eosinophil", 2))
    for r, conf in zip([a[0], a[6], a[10], a[12]], [0.41, 0.62, 0.55, 0.78]):
        r["confidence"] = conf
    b = _write_images(base, output, "slide-B", "lymphocyte", 3)
    for r in b[:2]:
        r["out_of_distribution"] = True
    missing = cell(storage.join(base, "slide-A", "gone.jpg"), "slide-A", "neutrophil", confidence=0.3)
    evil = cell(storage.join(base, "<script>alert(1)</script>", "x.jpg"), "<script>alert(1)</script>", "basophil")
    rows = a + b + [missing, evil, cell(storage.join(base, "slide-A", "bad.jpg"), "slide-A", None)]
    write_run(output, "run-1", make_table(rows, "run-1"),
              domain_shift={"detected": True, "ood_share": 0.11, "samples": ["slide-B"]})


@pytest.fixture()
def report_case(tmp_path: Path) -> tuple[str, str]:
    base, out = str(tmp_path / "input"), str(tmp_path / "out")
    _build(base, out)
    return base, out


def test_report_is_self_contained(report_case: tuple[str, str], tmp_path: Path) -> None:
    _, out = report_case
    path = write_report(out)
    assert path == str(Path(out) / "reports" / "run-1.html")
    doc = Path(path).read_text()
    assert doc.index('id="domain-shift"') < doc.index("<h2>Run summary")  # warning at the top
    assert 'id="unreliable"' in doc and "slide-B — NOT REPORTABLE" in doc
    assert doc.count("<svg") == 2
    srcs = re.findall(r'<img src="([^"]*)"', doc)
    assert len(srcs) == 2 * 6  # 6 cells awaiting review with files x (original, heatmap); the missing one has none
    assert all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert "gone.jpg" in doc and "original: not found" in doc
    assert not re.search(r'(src|href)="(?!data:)', doc)  # nothing fetched from anywhere
    assert "<script>" not in doc and "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    # slide-A: 6 neutrophils of 15 white cells (one missing-file cell counts: it was classified)
    assert re.search(r"<td>neutrophil</td><td class=num>7</td><td class=num>46.7</td>", doc)


def test_report_scope_is_the_run_as_of_its_commit(report_case: tuple[str, str], tmp_path: Path) -> None:
    base, out = report_case
    later = make_table(cells("slide-A", {"basophil": 5}, prefix=base), "run-2", processed_at=T0.replace(hour=12))
    write_run(out, "run-2", later, finished_at=T0.replace(hour=12, minute=5))
    doc1 = Path(write_report(out, "run-1", str(tmp_path / "r1.html"))).read_text()
    doc2 = Path(write_report(out, out_file=str(tmp_path / "r2.html"))).read_text()
    assert "Run run-1" in doc1 and "Run run-2" in doc2
    assert re.search(r"<td>basophil</td><td class=num>1</td>", doc1)  # the run-1 basophil only
    assert re.search(r"<td>basophil</td><td class=num>5</td>", doc2)  # slide-A as of run-2
    assert "slide-B" not in doc2.split("<h2>Differential")[1].split("<h2>Charts")[0]


def test_report_errors(tmp_path: Path, report_case: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, out = report_case
    write_run(out, "run-9", make_table([], "run-9"), status="failed")
    with pytest.raises(ValueError, match="not committed"):
        write_report(out, "run-9")
    with pytest.raises(ValueError, match="no run 'nope'"):
        write_report(out, "nope")
    empty = str(tmp_path / "empty")
    write_run(empty, "r0", make_table([], "r0"), status=None)
    with pytest.raises(ValueError, match="no committed run"):
        write_report(empty)
    assert main(["report", out, "--run-id", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wbc-batch report: invalid input: no run 'nope'") and err.count("\n") == 1
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no results under" in capsys.readouterr().err
    target = tmp_path / "cli.html"
    assert main(["report", out, "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target) and target.stat().st_size > 10_000


@pytest.mark.s3
def test_report_from_s3(s3_bucket: str) -> None:
    base, out = f"s3://{s3_bucket}/input", f"s3://{s3_bucket}/out"
    _build(base, out)
    uri = write_report(out)
    assert uri == f"{out}/reports/run-1.html"
    doc = storage.read_bytes(uri).decode()
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', doc)) == 12


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_chromium(report_case: tuple[str, str], tmp_path: Path) -> None:
    _, out = report_case
    report = Path(write_report(out, out_file=str(tmp_path / "report.html")))
    # A copy with a probe script: the report itself has none, and its CSP forbids scripts.
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.dataset.images=i.length;"
             "document.body.dataset.loaded=i.filter(x=>x.complete&&x.naturalWidth>0).length;"
             "document.body.dataset.svgs=document.querySelectorAll('svg').length;"
             "document.body.dataset.height=document.documentElement.scrollHeight;});</script>")
    doc = report.read_text().replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    checked = tmp_path / "checked.html"
    checked.write_text(doc.replace("</body>", probe + "</body>"))
    base = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*base, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body))
    assert attrs["images"] == "12" and attrs["loaded"] == "12", attrs
    assert attrs["svgs"] == "2"

    shot = tmp_path / "report.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    png = cv2.imread(str(shot))
    assert png is not None and png.shape[:2] == (2400, 1280)
    assert png.std() > 20  # not a blank page
    keep = os.environ.get("WBC_REPORT_SCREENSHOT")
    if keep:  # for a person to look at
        shutil.copy(shot, keep)


@pytest.mark.parametrize(("option", "model", "marker"), [
    (None, 0.9516, "review &lt; 0.9516"),  # a default run: the model's threshold, as the rows were judged
    (0.8, 0.9516, "review &lt; 0.8"),  # --review-threshold wins
    (None, None, None),  # a manifest from before model.review_threshold was recorded
])
def test_confidence_histogram_marks_the_effective_review_threshold(
        tmp_path: Path, option: float | None, model: float | None, marker: str | None) -> None:
    import json

    from wbc_batch.report import effective_review_threshold, render_report
    from wbc_batch.results import RunManifest

    out = str(tmp_path / "out")
    write_run(out, "r", make_table(cells("S", {"neutrophil": 3}), "r"))
    path = tmp_path / "out" / "runs" / "r.json"
    manifest = json.loads(path.read_text())
    manifest["options"] = {"review_threshold": option}
    if model is not None:
        manifest["model"]["review_threshold"] = model
    path.write_text(json.dumps(manifest))
    assert effective_review_threshold(RunManifest.from_json(manifest)) == (option if option is not None else model)
    html = render_report(out)[1]
    if marker is None:
        assert "review &lt;" not in html
    else:
        assert marker in html and html.count("review &lt;") == 1


def _corrupt_parts(out: str, run_id: str) -> None:
    for part in Path(out, "predictions").rglob(f"part-{run_id}-*.parquet"):
        part.write_bytes(b"not parquet")


def test_report_reads_only_its_runs_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs over other slides, on this night and others, are never opened: damaged, they cannot fail the report."""
    out = str(tmp_path / "out")
    write_run(out, "night-1", make_table(cells("S1", {"neutrophil": 4}), "night-1"), run_date="2026-11-24",
              finished_at=T0.replace(day=24))
    write_run(out, "other", make_table(cells("S9", {"monocyte": 3}), "other"), finished_at=T0.replace(hour=7))
    write_run(out, "night-2", make_table(cells("S2", {"lymphocyte": 5}), "night-2"))
    write_run(out, "night-3", make_table(cells("S3", {"ig": 2}), "night-3"), run_date="2026-11-26",
              finished_at=T0.replace(day=26))
    for rid in ("night-1", "other", "night-3"):
        _corrupt_parts(out, rid)
    doc = render_report(out, "night-2")[1]
    assert re.search(r"<td>lymphocyte</td><td class=num>5</td>", doc) and "Sample S1" not in doc
    # an earlier run that shares a sample is read (the sample as of this run), so its damage shows
    write_run(out, "night-2b", make_table(cells("S2", {"basophil": 1}, prefix="/late"), "night-2b"),
              finished_at=T0.replace(hour=9))
    assert re.search(r"<td>lymphocyte</td><td class=num>5</td>", render_report(out, "night-2b")[1])
    _corrupt_parts(out, "night-2")
    assert main(["report", out, "--run-id", "night-2b"]) == EXIT_CORRUPT_RESULTS
    assert "of committed run night-2 cannot be decoded" in capsys.readouterr().err


def test_report_reads_earlier_runs_without_a_sample_list(tmp_path: Path) -> None:
    """Manifests written before runs recorded ``counts.sample_ids`` may hold any sample: they are read, as before."""
    import json

    out = str(tmp_path / "out")
    write_run(out, "old", make_table(cells("S1", {"neutrophil": 4}), "old"), finished_at=T0)
    manifest_path = Path(out, "runs", "old.json")
    manifest = json.loads(manifest_path.read_text())
    del manifest["counts"]["sample_ids"]
    manifest_path.write_text(json.dumps(manifest))
    write_run(out, "new", make_table(cells("S1", {"monocyte": 1}, prefix="/late"), "new"),
              finished_at=T0.replace(hour=9))
    doc = render_report(out, "new")[1]
    assert re.search(r"<td>neutrophil</td><td class=num>4</td>", doc)
    assert re.search(r"<td>monocyte</td><td class=num>1</td>", doc)


def test_run_times_read_to_the_second_in_utc() -> None:
    from wbc_batch.report import readable_time

    assert readable_time("2026-12-02T08:07:27.846123+00:00") == "2026-12-02 08:07:27 UTC"
    assert readable_time("2026-12-02T09:07:27+01:00") == "2026-12-02 08:07:27 UTC"
    assert readable_time("2026-12-02T08:07:27") == "2026-12-02 08:07:27 UTC"  # naive means UTC
    assert readable_time(None) == "?" and readable_time("yesterday") == "yesterday"
