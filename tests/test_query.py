"""Query tests: known rows as Parquet plus manifests, read back through real DuckDB."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from tests.results_factory import CLASSES, T0, cell, cells, make_table, row_schema, write_run
from wbc_batch import query
from wbc_batch.cli import main
from wbc_batch.errors import EXIT_CORRUPT_RESULTS

# Sample S1: exactly 100 white cells (+3 non-WBC, +1 unreadable), 10 of them low-confidence.
S1 = {"neutrophil": 62, "lymphocyte": 18, "monocyte": 10, "eosinophil": 4, "basophil": 1, "ig": 5}


def _s1_rows() -> list[dict]:
    rows = cells("S1", S1) + cells("S1", {"non_wbc": 3})
    for r in rows[:10]:
        r["confidence"] = 0.5 + 0.01 * rows.index(r)  # neutrophils 0..9 need review
    rows.append(cell("/in/S1/broken.jpg", "S1", None))
    return rows


@pytest.fixture()
def results(tmp_path: Path) -> str:
    """S1 (100 cells), S2 (40 cells), S3 (30% out of distribution) in one committed run."""
    out = str(tmp_path / "out")
    s3 = cells("S3", {"neutrophil": 70, "lymphocyte": 30})
    for r in s3[:30]:
        r["out_of_distribution"] = True
    rows = _s1_rows() + cells("S2", {"neutrophil": 20, "lymphocyte": 20}) + s3
    write_run(out, "run-1", make_table(rows, "run-1"), parts=3)
    return out


def test_wilson_interval_matches_known_values() -> None:
    lo, hi = query.wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)  # textbook value
    lo, hi = query.wilson_interval(0, 100)
    z = 1.959963984540054
    assert lo == 0.0 and hi == pytest.approx(z * z / (100 + z * z))
    with pytest.raises(ValueError, match="n > 0"):
        query.wilson_interval(0, 0)


def test_differential_exact_numbers_intervals_and_flags(results: str) -> None:
    d = query.differential(results)
    s1 = d[d.sample_id == "S1"].set_index("cell_class")
    assert list(s1.index) == ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil"]
    assert set(s1.white_cells) == {100}
    assert s1["count"].to_dict() == S1
    assert s1.percent.to_dict() == pytest.approx({k: float(v) for k, v in S1.items()})
    for cls, k in S1.items():
        lo, hi = query.wilson_interval(k, 100)
        assert s1.loc[cls, "ci_low"] == pytest.approx(100 * lo) and s1.loc[cls, "ci_high"] == pytest.approx(100 * hi)
    assert s1.loc["neutrophil", "ci_low"] == pytest.approx(52.21, abs=0.01)
    assert s1.loc["neutrophil", "ci_high"] == pytest.approx(70.90, abs=0.01)  # by hand: 0.6156 +- 0.0935
    assert s1.flag.to_dict() == {"neutrophil": "high", "lymphocyte": "low", "monocyte": "high",
                                 "eosinophil": "", "basophil": "", "ig": "high"}
    assert s1.loc["ig", "reference"] == "<=0.9" and s1.loc["neutrophil", "reference"] == "40-60"
    assert set(s1.needs_review) == {10} and set(s1.errors) == {1}
    assert set(s1.warning) == {""} and bool(s1.reliable.all())

    s2 = d[d.sample_id == "S2"].set_index("cell_class")
    assert set(s2.white_cells) == {40} and s2.loc["neutrophil", "percent"] == pytest.approx(50.0)
    assert set(s2.warning) == {"only 40 white cells (fewer than 100)"}
    assert s2.loc["neutrophil", "flag"] == "" and s2.loc["lymphocyte", "flag"] == "high"


def test_out_of_distribution_sample_is_unreliable(results: str) -> None:
    s3 = query.differential(results, "S3")
    assert set(s3.sample_id) == {"S3"}
    assert s3.ood_share.tolist() == pytest.approx([0.3] * 6) and not s3.reliable.any()
    assert s3.percent.isna().all() and s3.ci_low.isna().all() and (s3.flag == "").all()
    assert s3.warning.iloc[0].startswith("UNRELIABLE: 30% of images out of distribution")
    relaxed = query.differential(results, "S3", ood_share_limit=0.5).set_index("cell_class")
    assert relaxed.loc["neutrophil", "percent"] == pytest.approx(70.0) and relaxed.reliable.all()


def test_configurable_ranges_and_five_class_model(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    five = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    rows = cells("A", {"neutrophil": 3, "lymphocyte": 1})
    write_run(out, "r5", make_table(rows, "r5", classes=five))
    d = query.differential(out, reference_ranges={"neutrophil": (80.0, 100.0)}, min_cells=4).set_index("cell_class")
    assert list(d.index) == five
    assert d.loc["neutrophil", "percent"] == pytest.approx(75.0) and d.loc["neutrophil", "flag"] == "low"
    assert d.loc["lymphocyte", "flag"] == "" and set(d.warning) == {""}


def test_unknown_sample_is_a_clear_error(results: str) -> None:
    with pytest.raises(ValueError, match="no sample 'nope'.*S1, S2, S3"):
        query.differential(results, "nope")


def test_dedup_across_reruns_retries_and_uncommitted_runs(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    a, b, c = (f"/in/X/{n}.jpg" for n in "abc")
    write_run(out, "r1", make_table([cell(a, "X", "neutrophil"), cell(b, "X", None, error_kind="transient"),
                                     cell(c, "X", "monocyte")], "r1", processed_at=T0))
    later = T0.replace(hour=9)
    # a re-run under a new model changes a's class; b's transient error succeeds on retry
    write_run(out, "r2", make_table([cell(a, "X", "lymphocyte"), cell(b, "X", "eosinophil")], "r2",
                                    processed_at=later, model_version="1.1.0"), run_date="2026-11-26")
    # a newer error for c must not hide its earlier success
    write_run(out, "r3", make_table([cell(c, "X", None, error_kind="transient")], "r3", processed_at=later))
    # killed before its manifest, and a failed run: both invisible
    write_run(out, "r4", make_table([cell(a, "X", "basophil"), cell("/in/X/d.jpg", "X", "ig")], "r4",
                                    processed_at=later.replace(hour=10)), status=None)
    write_run(out, "r5", make_table([cell(a, "X", "basophil")], "r5", processed_at=later.replace(hour=11)),
              status="failed")

    latest = query.load_results(out)
    assert latest.image_uri.tolist() == [a, b, c]
    assert latest.set_index("image_uri").predicted_class.to_dict() == {a: "lymphocyte", b: "eosinophil", c: "monocyte"}
    assert latest.set_index("image_uri").run_id.to_dict() == {a: "r2", b: "r2", c: "r1"}
    raw = query.load_results(out, latest_only=False)
    assert sorted(raw.run_id) == ["r1", "r1", "r1", "r2", "r2", "r3"]
    everything = query.load_results(out, committed_only=False, latest_only=False)
    assert set(everything.run_id) == {"r1", "r2", "r3", "r4", "r5"}
    d = query.differential(out).set_index("cell_class")
    assert set(d.white_cells) == {3} and d["count"].sum() == 3
    assert set(d.errors) == {0}
    # same through SQL
    frame = query.query_frame(out, "SELECT count(*) AS n, count(DISTINCT image_uri) AS u FROM predictions")
    assert frame.to_dict("records") == [{"n": 3, "u": 3}]


def test_stale_part_file_of_an_earlier_attempt_is_ignored(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    write_run(out, "r1", make_table(cells("X", {"neutrophil": 4}), "r1"), parts=2, status=None)
    write_run(out, "r1", make_table(cells("X", {"monocyte": 1}), "r1"), parts=1)  # manifest lists part 0 only
    assert query.load_results(out).predicted_class.tolist() == ["monocyte"]


def test_views_schema_and_runs(results: str) -> None:
    con = query.connect(results)
    try:
        cols = [r[0] for r in con.execute("DESCRIBE predictions").fetchall()]
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    finally:
        con.close()
    assert cols[: len(row_schema(CLASSES))] == row_schema(CLASSES).names and cols[-1] == "run_date"
    assert {"predictions", "predictions_raw", "runs"} <= tables
    runs = query.query_frame(results, canned="runs")
    assert runs.run_id.tolist() == ["run-1"] and runs.total.tolist() == [244] and runs.error.tolist() == [1]


def test_factory_schema_matches_the_writer() -> None:
    results_mod = pytest.importorskip("wbc_batch.results")
    if not hasattr(results_mod, "prediction_schema"):
        pytest.skip("wbc_batch.results has no prediction_schema yet")
    assert results_mod.prediction_schema(CLASSES).names == row_schema(CLASSES).names
    assert results_mod.prediction_schema(CLASSES).types == row_schema(CLASSES).types


def test_review_queue_and_drift(results: str, tmp_path: Path) -> None:
    q = query.query_frame(results, canned="review-queue")
    assert len(q) == 10 + 30  # 10 low-confidence S1 cells, 30 OOD S3 cells
    assert q.confidence.tolist() == sorted(q.confidence.tolist())
    assert q.image_uri.iloc[0] == "/in/S1/neutrophil-000.jpg"
    assert {"heatmap_uri", "image_uri", "sample_id"} <= set(q.columns)
    drift = query.query_frame(results, canned="drift")
    assert len(drift) == 1 and drift.cells.iloc[0] == 243
    assert drift.share_neutrophil.iloc[0] == pytest.approx((62 + 20 + 70) / 243)
    assert drift.ood_share.iloc[0] == pytest.approx(30 / 243)


REFUSED_KIND = r"refused: only read-only queries \(SELECT, WITH, SHOW, DESCRIBE, EXPLAIN\) are allowed, got "
FILE_ACCESS_OFF = "Permission Error: Cannot access file .* file system operations are disabled by configuration"


@pytest.mark.parametrize(("sql", "message"), [
    ("CREATE TABLE t AS SELECT 1", REFUSED_KIND + "CREATE$"),
    ("INSERT INTO predictions_raw_data SELECT * FROM predictions_raw_data", REFUSED_KIND + "INSERT$"),
    ("DELETE FROM predictions_raw_data", REFUSED_KIND + "DELETE$"),
    ("UPDATE predictions_raw_data SET status = 'ok'", REFUSED_KIND + "UPDATE$"),
    ("DROP VIEW predictions", REFUSED_KIND + "DROP$"),
    ("COPY (SELECT 1) TO '{tmp}/copied.csv'", REFUSED_KIND + "COPY$"),
    ("ATTACH '{tmp}/other.duckdb'", REFUSED_KIND + "ATTACH$"),
    ("SET enable_external_access = true", REFUSED_KIND + "SET$"),
    ("INSTALL httpfs", REFUSED_KIND + "LOAD$"),  # DuckDB's parser types INSTALL as a LOAD statement
    ("LOAD httpfs", REFUSED_KIND + "LOAD$"),
    ("PRAGMA database_list", REFUSED_KIND + "PRAGMA$"),
    ("SELECT 1; DROP TABLE predictions_raw_data", "^expected exactly one statement, got 2$"),
    ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "^refused: EXPLAIN is allowed only for a plain SELECT$"),
    ("/* hidden */ EXPORT DATABASE '{tmp}/dump'", REFUSED_KIND + "EXPORT$"),
    ("CALL pragma_version()", REFUSED_KIND + "CALL$"),
    ("SELECT * FROM read_csv('/etc/passwd')", FILE_ACCESS_OFF),
    ("SELECT * FROM read_text('/etc/hostname')", FILE_ACCESS_OFF),
    ("SELECT * FROM glob('/*')", FILE_ACCESS_OFF),
    ("SELECT count(*) FROM read_parquet('{out}/predictions/*/*.parquet')", FILE_ACCESS_OFF),
])
def test_writes_and_file_access_are_refused(results: str, tmp_path: Path, sql: str, message: str) -> None:
    statement = sql.format(tmp=tmp_path, out=results)
    with pytest.raises(query.QueryError, match=message):
        query.query_frame(results, statement)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written beside the results


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM predictions",
    "with x as (select * from predictions_raw) select count(*) from x",
    "FROM runs SELECT run_id",
    "SHOW TABLES",
    "DESCRIBE predictions",
    "SUMMARIZE predictions",
    "-- comment\nEXPLAIN SELECT * FROM predictions",
])
def test_read_only_statements_run(results: str, sql: str) -> None:
    assert len(query.query_frame(results, sql)) >= 1


def test_formats(results: str) -> None:
    rows = json.loads(query.run_query(results, canned="differential", sample="S1", fmt="json"))
    neut = next(r for r in rows if r["cell_class"] == "neutrophil")
    assert neut["count"] == 62 and neut["percent"] == pytest.approx(62.0) and neut["flag"] == "high"
    csv_text = query.run_query(results, "SELECT sample_id, count(*) AS n FROM predictions GROUP BY 1 ORDER BY 1", fmt="csv")
    assert csv_text.splitlines() == ["sample_id,n", "S1,104", "S2,40", "S3,100"]
    table = query.run_query(results, canned="differential", sample="S3")
    assert "UNRELIABLE" in table
    with pytest.raises(ValueError, match="unknown format"):
        query.run_query(results, "SELECT 1", fmt="xml")


def test_missing_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results under"):
        query.load_results(str(tmp_path / "nothing"))


def test_committed_run_without_rows_gives_empty_frames(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    write_run(out, "r1", make_table([], "r1"))
    assert query.load_results(out).empty
    assert query.differential(out).empty
    assert query.query_frame(out, canned="runs").run_id.tolist() == ["r1"]


@pytest.mark.s3
def test_s3_results(s3_bucket: str) -> None:
    out = f"s3://{s3_bucket}/results"
    write_run(out, "run-1", make_table(_s1_rows(), "run-1"), parts=2)
    write_run(out, "run-2", make_table(cells("S1", {"ig": 50}, prefix="/other"), "run-2"), status=None)
    d = query.differential(out, "S1").set_index("cell_class")
    assert d["count"].to_dict() == S1
    assert query.query_frame(out, "SELECT count(*) AS n FROM predictions_raw").n.tolist() == [104]
    assert len(query.load_results(out, committed_only=False, latest_only=False)) == 154


# --- CLI ----------------------------------------------------------------------


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("query", "report"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--differential" in out and "--review-queue" in out and "--run-id" in out


def test_cli_query_outputs(results: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", results, "--differential", "--sample", "S1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["cell_class"]: r["count"] for r in rows} == S1
    assert main(["query", results, "SELECT count(*) AS n FROM predictions", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n244\n"
    assert main(["query", results, "--review-queue"]) == 0
    assert "heatmap_uri" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, needle", [
    (["query", "{out}", "DROP TABLE predictions_raw_data"], 2, "refused"),
    (["query", "{out}", "SELECT * FROM read_csv('/etc/passwd')"], 2, "Permission"),
    (["query", "{out}", "SELECT nope FROM predictions"], 2, "nope"),
    (["query", "{out}"], 2, "expected SQL"),
    (["query", "{out}", "SELECT 1", "--runs"], 2, "not both"),
    (["query", "{out}", "--runs", "--sample", "S1"], 2, "--sample"),
    (["query", "{out}", "--differential", "--sample", "nope"], 2, "no sample"),
    (["query", "{missing}", "--runs"], 2, "no results under"),
])
def test_cli_errors_are_one_line(results: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 argv: list[str], code: int, needle: str) -> None:
    args = [a.format(out=results, missing=tmp_path / "missing") for a in argv]
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wbc-batch query: ") and needle in err


def test_percent_columns_are_floats(results: str) -> None:
    d = query.differential(results)
    assert d.percent.dtype == "float64" and not math.isnan(d.percent.iloc[0])
    assert isinstance(d, pd.DataFrame)


def test_corrupt_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    write_run(out, "good", make_table(cells("X", {"neutrophil": 2}), "good"))
    write_run(out, "killed", make_table(cells("X", {"monocyte": 2}), "killed"), status=None)
    killed = next((tmp_path / "out" / "predictions").rglob("part-killed-*.parquet"))
    killed.write_bytes(killed.read_bytes()[:100])  # half-written by a killed run: ignored, even unfiltered
    assert len(query.load_results(out, committed_only=False)) == 2
    (tmp_path / "out" / "runs" / "broken.json").write_text("{not json")  # never a commit
    good = next((tmp_path / "out" / "predictions").rglob("part-good-*.parquet"))
    intact = good.read_bytes()
    for damaged in (b"garbage", intact[:-30] + intact[-8:]):  # not Parquet at all; a damaged footer
        good.write_bytes(damaged)
        assert main(["query", out, "--runs"]) == EXIT_CORRUPT_RESULTS  # neither invalid input (2) nor storage (3)
        err = capsys.readouterr().err
        assert err.startswith("wbc-batch query: corrupt results: part file ") and err.count("\n") == 1
        assert "of committed run good cannot be decoded" in err and "--run-id good" in err


# --- archive scale: a lazy dataset, partition pruning, one schema for every part ------------------------------


def _damage_pages(path: Path) -> None:
    """Overwrite the first column's pages of a Parquet file, leaving its footer intact."""
    import pyarrow.parquet as pq

    data = bytearray(path.read_bytes())
    col = pq.read_metadata(path).row_group(0).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data[start + 20: start + col.total_compressed_size - 5] = b"\xff" * (col.total_compressed_size - 25)
    path.write_bytes(bytes(data))


@pytest.fixture()
def two_nights(tmp_path: Path) -> str:
    """Night 1 (2026-11-25): sample N1, 120 cells, 12 need review; night 2 (2026-11-26): sample N2 in two parts."""
    out = str(tmp_path / "out")
    n1 = cells("N1", {"neutrophil": 60, "lymphocyte": 60})
    for r in n1[:12]:
        r["confidence"] = 0.5
    write_run(out, "night-1", make_table(n1, "night-1"), run_date="2026-11-25")
    write_run(out, "night-2", make_table(cells("N2", {"monocyte": 50, "neutrophil": 50}), "night-2",
                                         processed_at=T0.replace(day=26)), run_date="2026-11-26", parts=2)
    return out


@pytest.mark.parametrize("damage", ["footer", "pages"])
def test_one_night_never_opens_another_nights_files(two_nights: str, tmp_path: Path, damage: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    night2 = sorted((tmp_path / "out" / "predictions" / "run_date=2026-11-26").glob("part-*.parquet"))
    if damage == "footer":
        night2[1].write_bytes(b"garbage")
    else:
        _damage_pages(night2[1])
    # night 1 alone: the damaged file is never opened, so every query of that night runs
    d = query.differential(two_nights, run_dates=["2026-11-25"]).set_index("cell_class")
    assert set(d.sample_id) == {"N1"} and d.loc["neutrophil", "count"] == 60 and d.loc["neutrophil", "needs_review"] == 12
    assert main(["query", two_nights, "--review-queue", "--run-date", "2026-11-25", "--format", "csv"]) == 0
    queue = capsys.readouterr().out.splitlines()
    assert len(queue) == 1 + 12 and all(",N1," in line or line.startswith("N1,") for line in queue[1:])
    assert main(["query", two_nights, "SELECT count(*) AS n FROM predictions_raw", "--run-date", "2026-11-25",
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n120\n"
    if damage == "pages":  # footers intact: a run_date filter in SQL prunes the night without --run-date
        frame = query.query_frame(two_nights, "SELECT count(*) AS n FROM predictions_raw WHERE run_date = '2026-11-25'")
        assert frame.n.tolist() == [120]
    # the whole archive reads it and says which file of which run is damaged (exit 6, one line)
    assert main(["query", two_nights, "--review-queue"]) == EXIT_CORRUPT_RESULTS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"part file {night2[1]} of committed run night-2 cannot be decoded" in err


def test_run_date_scope_and_errors(two_nights: str, capsys: pytest.CaptureFixture[str]) -> None:
    both = query.query_frame(two_nights, "SELECT run_date, count(*) AS n FROM predictions GROUP BY 1 ORDER BY 1",
                             run_dates=["2026-11-25", "2026-11-26"])
    assert [str(pd.Timestamp(d).date()) for d in both.run_date] == ["2026-11-25", "2026-11-26"] and both.n.tolist() == [120, 100]
    assert query.load_results(two_nights, run_dates=["2026-11-27"]).empty  # a night without runs: no rows
    assert query.query_frame(two_nights, canned="runs", run_dates=["2026-11-25"]).run_id.tolist() == ["night-1", "night-2"]
    assert main(["query", two_nights, "--differential", "--run-date", "25/11/2026"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a run date as YYYY-MM-DD, got '25/11/2026'" in err


def test_columns_are_projected_and_run_date_is_pushed_down(two_nights: str) -> None:
    results = query.read_results(two_nights)
    assert len(results.parts) == 3 and results.run_ids == {"night-1", "night-2"}
    con = query.connect(results)
    try:
        plan = "\n".join(r[1] for r in con.execute(
            "EXPLAIN SELECT sample_id FROM predictions_raw WHERE run_date = DATE '2026-11-25'").fetchall())
        n = con.execute("SELECT count(*) FROM predictions_raw WHERE run_date = DATE '2026-11-25'").fetchone()[0]
    finally:
        con.close()
    assert n == 120
    # one operator, the Arrow scan: the run_date filter is handed to it (pyarrow prunes the other night's files
    # by their partition) instead of a Filter operator above the scan, and only the column the query uses leaves
    # the files
    boxes = [line.strip("│╭╮╰╯─┬┴ ") for line in plan.splitlines()]
    boxes = [line for line in boxes if line]
    assert boxes[0] == "Python Arrow Scan" and boxes[1] == "Function: PYTHON_ARROW_SCAN", plan
    assert not any(line in ("Filter", "FILTER") for line in boxes), plan
    projections = next(i for i, line in enumerate(boxes) if line.startswith("Projections:"))
    filters = " ".join(boxes[boxes.index("Filters:") + 1: projections])
    assert "\"run_date\" = DATE '2026-11-25'" in filters, plan
    assert boxes[projections] == "Projections: sample_id", plan
    assert "p_neutrophil" not in plan


def test_parts_of_different_ages_and_models_share_one_schema(tmp_path: Path) -> None:
    """A run of a five-class model whose Parquet predates model_digest and source_* (float64 probabilities)."""
    import pyarrow as pa

    out = str(tmp_path / "out")
    write_run(out, "new", make_table(cells("A", {"ig": 2}), "new"), run_date="2026-11-26")
    five = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    old = make_table(cells("B", {"neutrophil": 3}), "old", classes=five).drop_columns(
        ["model_digest", "source_size", "source_etag", "source_mtime"])
    old = old.set_column(old.schema.get_field_index("p_neutrophil"), "p_neutrophil",
                         old.column("p_neutrophil").cast(pa.float64()))
    write_run(out, "old", old, run_date="2026-11-24")
    rows = query.load_results(out)
    assert rows.sample_id.tolist() == ["A", "A", "B", "B", "B"]
    assert rows.model_digest.isna().tolist() == [False, False, True, True, True]
    assert rows.source_size.isna().all() and rows.p_ig.isna().tolist() == [False, False, True, True, True]
    assert rows.p_neutrophil.dtype == "float32" and rows.run_date.astype(str).tolist()[-1] == "2026-11-24"
    d = query.differential(out).set_index(["sample_id", "cell_class"])
    assert d.loc[("B", "neutrophil"), "count"] == 3 and d.loc[("A", "ig"), "count"] == 2


def test_review_queue_takes_each_images_latest_ok_row(tmp_path: Path) -> None:
    """Re-runs: only an image's latest ok row decides; an error row never hides an ok one (as in ``predictions``)."""
    out = str(tmp_path / "out")
    a, b, c, d = (f"/in/X/{n}.jpg" for n in "abcd")
    write_run(out, "r1", make_table([cell(a, "X", "monocyte", 0.5), cell(b, "X", "monocyte", 0.99),
                                     cell(c, "X", "ig", 0.6), cell(d, "X", "ig", 0.7)], "r1"))
    write_run(out, "r2", make_table([cell(a, "X", "monocyte", 0.99), cell(b, "X", "lymphocyte", 0.4),
                                     cell(c, "X", None), cell(d, "X", "ig", 0.8)], "r2",
                                    processed_at=T0.replace(hour=9)), run_date="2026-11-26")
    q = query.query_frame(out, canned="review-queue")
    assert q.image_uri.tolist() == [b, c, d] and q.run_id.tolist() == ["r2", "r1", "r2"]
    via_view = query.query_frame(out, "SELECT image_uri FROM predictions WHERE status = 'ok' AND needs_review "
                                      "ORDER BY confidence NULLS FIRST, image_uri")
    assert via_view.image_uri.tolist() == q.image_uri.tolist()  # c: its ok row beats the later error row
