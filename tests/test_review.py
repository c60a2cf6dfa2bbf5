"""Review and sign-off: verdict records, counts, import/export, and the web app in a real headless Chromium.

The server runs in its own process (``python -m wbc_batch.cli review``), as a
technologist would start it; Selenium drives Debian's chromium-driver. The
results are built from real bundled JPEGs (tests/review_factory.py), so no
model runs. Set WBC_REVIEW_SCREENSHOTS=<folder> to keep the screenshots.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.processes import free_port
from tests.review_factory import build
from wbc_batch import storage
from wbc_batch.cli import main
from wbc_batch.query import differential, query_frame
from wbc_batch.report import render_report
from wbc_batch.review.app import cell_id
from wbc_batch.review.records import (
    VERDICT_SCHEMA,
    VerdictStore,
    current_verdicts,
    make_record,
    read_verdicts,
    signoffs,
)

TOKEN = "review-test-token-0123456789abcdef"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until ``check()`` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception as exc:  # an element the page replaced under us: look again
            if type(exc).__name__ != "StaleElementReferenceException":
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def http(port: int, path: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
         bearer: bool = True) -> tuple[int, dict[str, str], bytes]:
    """One request without following redirects; Bearer token unless told otherwise."""
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = {"Authorization": f"Bearer {TOKEN}"} if bearer else {}
    hdrs.update(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


@contextmanager
def review_server(output: str) -> Iterator[int]:
    """``wbc-batch review OUTPUT`` in a subprocess; yields its port once it answers."""
    port = free_port()
    env = {**os.environ, "WBC_REVIEW_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "wbc_batch.cli", "review", output, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"review server exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            return http(port, "/api/session")[0] == 200
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, what="the review server")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def results(tmp_path: Path) -> tuple[str, list[dict]]:
    out = str(tmp_path / "out")
    return out, build(str(tmp_path / "in"), out)


def _cell(specs: list[dict], sample: str, predicted: str, confidence: float | None = None) -> dict:
    return next(s for s in specs if s["sample_id"] == sample and s["predicted_class"] == predicted
                and (confidence is None or s["confidence"] == confidence))


# --- records --------------------------------------------------------------------


def test_records_are_append_only_and_concurrent_writers_lose_nothing(results: tuple[str, list[dict]]) -> None:
    out, specs = results
    row = {**_cell(specs, "slide-A", "lymphocyte", 0.55), "run_id": "run-1", "model_version": "1.0.0"}
    stores = [VerdictStore(out), VerdictStore(out)]

    def write(store: VerdictStore, n: int) -> None:
        for i in range(n):
            store.append([make_record(action="reclassify", reviewer=f"r{id(store) % 7}", sample_id="slide-A", row=row,
                                      verified_class="monocyte")])

    threads = [threading.Thread(target=write, args=(s, 15)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = storage.list_files(storage.join(out, "reviews"))
    assert len(files) == 60 and len(set(files)) == 60
    table = read_verdicts(out)
    assert table.num_rows == 60 and table.schema == VERDICT_SCHEMA
    assert len(set(table.column("record_id").to_pylist())) == 60
    # The latest verdict stands; a verdict is bound to the content it was given for.
    later = make_record(action="confirm", reviewer="Bo", sample_id="slide-A", row={**row, "predicted_class": "monocyte"},
                        verified_class="monocyte")
    replaced = make_record(action="reclassify", reviewer="Bo", sample_id="slide-A",
                           row={**row, "image_sha256": "0" * 64}, verified_class="basophil")
    stores[0].append([later, replaced])
    current = current_verdicts(read_verdicts(out))
    assert len(current) == 2
    assert current.set_index("image_sha256").loc[row["image_sha256"], "verified_by"] == "Bo"
    with pytest.raises(ValueError, match="needs a reason"):
        make_record(action="amend", reviewer="Bo", sample_id="slide-A", row=row, verified_class="monocyte")
    with pytest.raises(ValueError, match="reviewer name is required"):
        make_record(action="sign-off", reviewer="  ", sample_id="slide-A")
    stores[0].append([make_record(action="sign-off", reviewer="Ana", sample_id="slide-A")])
    stores[1].append([make_record(action="sign-off", reviewer="Bo", sample_id="slide-A")])
    assert signoffs(read_verdicts(out)).set_index("sample_id").loc["slide-A", "signed_off_by"] == "Ana"  # first stands
    assert not any("reviews" in f for f in storage.list_files(storage.join(out, "predictions")))


# --- counts, import, export ---------------------------------------------------------


def _write_csv(path: Path, rows: list[dict[str, str]]) -> str:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _locations(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """(input base, OUTPUT, DEST) on the local disk or in a fresh bucket of the loopback S3 endpoint."""
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/in", f"s3://{bucket}/out", f"s3://{bucket}/labels"
    return str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "labels")


def test_counts_report_and_agreement_follow_the_verdicts(results: tuple[str, list[dict]], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, specs = results
    mono, neut = _cell(specs, "slide-A", "lymphocyte", 0.55), _cell(specs, "slide-A", "neutrophil", 0.62)
    baso = _cell(specs, "slide-A", "basophil")
    store = VerdictStore(out)
    for spec, cls in ((mono, "monocyte"), (neut, "neutrophil"), (baso, "eosinophil")):
        row = {**spec, "run_id": "run-1", "model_version": "1.0.0"}
        store.append([make_record(action="confirm" if cls == spec["predicted_class"] else "reclassify", reviewer="Ana",
                                  sample_id="slide-A", row=row, verified_class=cls)])
    # Counts: slide-A's monocyte and eosinophil under their verified classes, the model's count beside them.
    diff = differential(out).set_index(["sample_id", "cell_class"])
    assert diff.loc[("slide-A", "monocyte"), ["count", "model_count"]].tolist() == [2, 1]
    assert diff.loc[("slide-A", "lymphocyte"), ["count", "model_count"]].tolist() == [2, 3]
    assert diff.loc[("slide-A", "eosinophil"), "count"] == 2 and diff.loc[("slide-A", "basophil"), "count"] == 0
    assert diff.loc[("slide-A", "neutrophil"), "verified"] == 3 and pd_isna(diff.loc[("slide-A", "neutrophil"), "signed_off_by"])
    assert diff.loc[("slide-B", "neutrophil"), "verified"] == 0
    store.append([make_record(action="sign-off", reviewer="Ana", sample_id="slide-A")])
    assert differential(out, "slide-A")["signed_off_by"].unique().tolist() == ["Ana"]
    assert main(["query", out, "--differential", "--sample", "slide-A", "--format", "csv"]) == 0
    assert "model_count" in capsys.readouterr().out.splitlines()[0]
    _, doc = render_report(out)
    assert "3 verified by a reviewer · signed off by Ana at" in doc and "<th>Model count</th>" in doc

    agreement = query_frame(out, canned="agreement").set_index("predicted_class")
    assert agreement.loc["(all)", ["verified", "agreed"]].tolist() == [3, 1]
    assert agreement.loc["lymphocyte", ["verified", "agreed", "as_monocyte"]].tolist() == [1, 0, 1]
    assert agreement.loc["neutrophil", "agreement_pct"] == 100.0
    assert agreement.loc["monocyte", "sensitivity_pct"] == 0.0  # the reviewer's monocyte, missed by the model
    assert main(["query", out, "--agreement", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(agreement)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_import_and_export_round_trip(where: str, tmp_path: Path, request: pytest.FixtureRequest,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    base, out, dest = _locations(where, tmp_path, request)
    specs = build(base, out)
    mono = _cell(specs, "slide-A", "lymphocyte", 0.55)  # really a monocyte
    neut = _cell(specs, "slide-A", "neutrophil", 0.62)
    baso = _cell(specs, "slide-A", "basophil")
    bad = _write_csv(tmp_path / "bad.csv", [{"image_uri": "/nowhere/x.jpg", "verified_class": "monocyte"}])
    assert main(["import-verdicts", out, bad, "--reviewer", "LIS"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wbc-batch import-verdicts: invalid input: 1 image_uri value(s) name no classified cell") and err.count("\n") == 1
    assert read_verdicts(out).num_rows == 0  # all or nothing
    good = _write_csv(tmp_path / "verdicts.csv", [
        {"image_uri": mono["image_uri"], "verified_class": "monocyte"},
        {"image_uri": neut["image_uri"], "verified_class": "neutrophil"}])
    by_hash = tmp_path / "by-hash.parquet"
    pq.write_table(pa.table({"image_sha256": [baso["image_sha256"]], "verified_class": ["eosinophil"]}), by_hash)
    assert main(["import-verdicts", out, good, "--reviewer", "LIS"]) == 0
    assert main(["import-verdicts", out, str(by_hash), "--reviewer", "Ana"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"2 verdicts recorded under {out}/reviews"
    records = read_verdicts(out).to_pandas().sort_values("image_uri")
    assert sorted(records.action) == ["confirm", "reclassify", "reclassify"]
    assert set(records.source) == {"import:verdicts.csv", "import:by-hash.parquet"}
    # Into a signed sample, an import is an amendment with a reason.
    VerdictStore(out).append([make_record(action="sign-off", reviewer="Ana", sample_id="slide-A")])
    again = _write_csv(tmp_path / "again.csv", [{"image_uri": neut["image_uri"], "verified_class": "ig", "reason": "band"}])
    assert main(["import-verdicts", out, again, "--reviewer", "Bo"]) == 0
    capsys.readouterr()
    amend = read_verdicts(out).to_pandas().query("action == 'amend'")
    assert amend[["verified_class", "reason"]].values.tolist() == [["ig", "band"]]

    assert main(["export-labels", out, dest]) == 0
    assert capsys.readouterr().out.startswith(f"3 verified cells in {dest} (3 written")
    for spec, cls in ((mono, "monocyte"), (neut, "ig"), (baso, "eosinophil")):
        copied = storage.read_bytes(storage.join(dest, cls, f"{spec['image_sha256']}.jpg"))
        assert copied == storage.read_bytes(spec["image_uri"])  # byte for byte
        assert hashlib.sha256(copied).hexdigest() == spec["image_sha256"]
    listing = storage.read_bytes(storage.join(dest, "labels.csv")).decode().splitlines()
    assert len(listing) == 4 and listing[0].startswith("file,verified_class,image_uri")
    # A changed verdict moves the cell on the next export; nothing is left in the old class folder.
    assert main(["import-verdicts", out, _write_csv(tmp_path / "fix.csv", [
        {"image_uri": baso["image_uri"], "verified_class": "basophil", "reason": "recheck"}]), "--reviewer", "Bo"]) == 0
    assert main(["export-labels", out, dest, "--signed-only"]) == 0
    names = [f[len(dest):] for f in storage.list_files(dest)]
    assert sorted(names) == sorted(["/labels.csv", f"/basophil/{baso['image_sha256']}.jpg", f"/ig/{neut['image_sha256']}.jpg",
                                    f"/monocyte/{mono['image_sha256']}.jpg"])


def pd_isna(value: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


# --- the server: auth, CSRF, what it serves ---------------------------------------------


def test_server_refuses_without_token_and_cross_site_writes(results: tuple[str, list[dict]]) -> None:
    out, specs = results
    mono = _cell(specs, "slide-A", "lymphocyte", 0.55)
    cid = cell_id(mono["image_uri"])
    body = {"reviewer": "Ana", "verdicts": [{"cell": cid, "verified_class": "monocyte"}]}
    with review_server(out) as port:
        status, headers, _ = http(port, "/", bearer=False)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        for path in ("/api/samples", "/static/app.js", f"/api/cells/{cid}/image"):
            assert http(port, path, bearer=False)[0] == 401
        assert http(port, "/api/samples", headers={"Authorization": "Bearer wrong"})[0] == 403
        assert http(port, "/api/samples", bearer=False, headers={"Cookie": f"wbc_review_{port}=forged"})[0] == 403
        assert http(port, "/?token=wrong", bearer=False)[0] == 403

        status, headers, _ = http(port, f"/?token={TOKEN}", bearer=False)
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        jar = {"Cookie": cookie.split(";")[0]}
        status, headers, page = http(port, "/", bearer=False, headers=jar)
        assert status == 200 and b"/static/app.js" in page and "script-src 'self'" in headers["content-security-policy"]
        assert http(port, "/api/samples", bearer=False, headers=jar)[0] == 200

        # Writes with the cookie need the app's header and a same-origin Origin: a foreign page has neither.
        post = "/api/samples/slide-A/verdicts"
        assert http(port, post, "POST", body, bearer=False, headers=jar)[0] == 403
        assert http(port, post, "POST", body, bearer=False,
                    headers={**jar, "X-WBC-Review": "1", "Origin": "http://evil.example"})[0] == 403
        assert http(port, post, "POST", body, bearer=False, headers={**jar, "X-WBC-Review": "1"})[0] == 200
        assert http(port, "/api/samples", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding

        # Only images of committed rows, by cell id; nothing else of the file system.
        status, headers, data = http(port, f"/api/cells/{cid}/image")
        assert status == 200 and headers["content-type"] == "image/jpeg" and data == Path(mono["image_uri"]).read_bytes()
        assert http(port, f"/api/cells/{cid}/heatmap")[0] == 200
        for path in ("/api/cells/0000/image", "/static/..%2F..%2Fapp.py", "/static/index.html", "/etc/passwd",
                     "/api/samples/slide-A/../../runs/run-1.json"):
            assert http(port, path)[0] == 404, path
        assert http(port, post, "POST", {**body, "verdicts": [{"cell": cid, "verified_class": "dragon"}]})[0] == 422
        assert http(port, post, "POST", {**body, "reviewer": " "})[0] == 422
        assert http(port, "/api/samples/slide-B/verdicts", "POST", body)[0] == 404  # a cell of another sample
        status, _, answer = http(port, "/api/samples/slide-A/sign-off", "POST", {"reviewer": "Ana"})
        assert status == 409 and b"2 flagged cell(s) still await a verdict" in answer
    assert read_verdicts(out).num_rows == 1


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_two_reviewers_at_once_lose_nothing(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    base, out, _ = _locations(where, tmp_path, request)
    specs = build(base, out)
    cells = [s for s in specs if s["sample_id"] == "slide-A" and s["predicted_class"]]
    sent: list[tuple[str, str]] = []
    with review_server(out) as port_a, review_server(out) as port_b:
        def reviewer(port: int, name: str, picks: list[dict]) -> None:
            for s in picks:
                cls = "monocyte" if s["confidence"] < 0.9 else s["predicted_class"]
                status, _, answer = http(port, "/api/samples/slide-A/verdicts", "POST",
                                         {"reviewer": name, "verdicts": [{"cell": cell_id(s["image_uri"]), "verified_class": cls}]})
                assert status == 200, answer
                sent.append((name, s["image_uri"]))

        threads = [threading.Thread(target=reviewer, args=(port_a, "Ana", cells)),
                   threading.Thread(target=reviewer, args=(port_b, "Bo", cells[::-1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(sent) == 2 * len(cells)
        # Each app sees the other's verdicts: every cell verified, nothing awaiting.
        for port in (port_a, port_b):
            samples = json.loads(http(port, "/api/samples")[2])
            a = next(s for s in samples if s["sample_id"] == "slide-A")
            assert (a["verified"], a["awaiting"]) == (len(cells), 0)
        status, _, answer = http(port_b, "/api/samples/slide-A/sign-off", "POST", {"reviewer": "Bo"})
        assert status == 200 and json.loads(answer)["summary"]["signed_off"]["by"] == "Bo"
        if where == "s3":  # images come from S3 through the server
            status, _, data = http(port_a, f"/api/cells/{cell_id(cells[0]['image_uri'])}/image")
            assert status == 200 and data == storage.read_bytes(cells[0]["image_uri"])
    records = read_verdicts(out).to_pandas()
    kept = sorted(zip(records.reviewer[records.action != "sign-off"], records.image_uri[records.action != "sign-off"]))
    assert kept == sorted(sent)
    assert len(storage.list_files(storage.join(out, "reviews"))) == len(sent) + 1


# --- the page, in Chromium -------------------------------------------------------------


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    if _chromium() is None or shutil.which("chromedriver") is None:
        pytest.skip("chromium and chromium-driver are not installed (make system-deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--window-size=1400,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: Any, name: str) -> None:
    folder = os.environ.get("WBC_REVIEW_SCREENSHOTS")
    png = driver.get_screenshot_as_png()
    assert len(png) > 10_000
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"{name}.png").write_bytes(png)


def test_review_in_chromium_keyboard_sign_off_and_amend(results: tuple[str, list[dict]], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    out, specs = results
    d = browser
    css = lambda sel: d.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
    # Read the page in one script call: the app re-renders parts of it as the server answers.
    selected = lambda: d.execute_script("const t = document.querySelector('.tile.sel'); return t && t.dataset.cell")  # noqa: E731
    records = lambda n: wait_for(lambda: (t := read_verdicts(out)).num_rows >= n and t, what=f"{n} records")  # noqa: E731
    body = lambda: d.find_element(By.TAG_NAME, "body")  # noqa: E731
    baso, mono = _cell(specs, "slide-A", "basophil"), _cell(specs, "slide-A", "lymphocyte", 0.55)
    neut, eos = _cell(specs, "slide-A", "neutrophil", 0.62), _cell(specs, "slide-A", "eosinophil")

    with review_server(out) as port:
        d.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
        wait_for(lambda: css("#samples tr.row"), what="the samples table")
        assert d.current_url == f"http://127.0.0.1:{port}/"  # the token left the address bar
        assert not any(c["value"] == TOKEN for c in d.get_cookies())
        _screenshot(d, "samples")
        name = d.find_element(By.ID, "reviewer")
        name.send_keys("Ana Tech", Keys.ENTER)
        body().send_keys(Keys.ENTER)  # open the selected (first) sample
        wait_for(lambda: css("#gallery .tile"), what="the gallery")
        tiles = css("#gallery .tile")
        assert [t.get_attribute("class").count("queue") for t in tiles[:4]] == [1, 1, 1, 0]  # review queue first, marked
        assert selected() == cell_id(baso["image_uri"])  # starts at the first cell awaiting review
        _screenshot(d, "sample")

        body().send_keys(Keys.ENTER)  # confirm the basophil, next
        wait_for(lambda: selected() == cell_id(mono["image_uri"]), what="the next cell")
        body().send_keys("5")  # it is a monocyte
        wait_for(lambda: selected() == cell_id(neut["image_uri"]), what="the next cell")
        mono_row = lambda: d.execute_script(  # noqa: E731
            "return [...document.querySelectorAll('#differential tr[data-class=monocyte] td')].map(t => t.textContent)")
        wait_for(lambda: mono_row()[1:4:2] == ["1", "2"], what="model 1, verified 2: the differential follows")
        body().send_keys(Keys.ENTER)
        records(3)
        wait_for(lambda: selected() == cell_id(eos["image_uri"]), what="the first class group")
        body().send_keys(Keys.ARROW_LEFT)
        assert selected() == cell_id(neut["image_uri"])
        body().send_keys(Keys.ARROW_RIGHT)
        assert selected() == cell_id(eos["image_uri"])
        wait_for(lambda: d.find_element(By.ID, "sign-off").is_enabled(), what="sign-off enabled")
        _screenshot(d, "sample-reviewed")

        d.find_element(By.ID, "sign-off").click()
        wait_for(lambda: d.find_element(By.ID, "dialog").is_displayed(), what="the sign-off dialog")
        d.find_element(By.ID, "dialog-input").send_keys(Keys.ENTER)  # the name is filled in
        wait_for(lambda: css("#signbox.signed"), what="the signed state")
        wait_for(lambda: "Signed off by Ana Tech" in d.find_element(By.ID, "signbox").text, what="who signed")

        css(f"#t-{cell_id(eos['image_uri'])}")[0].click()
        body().send_keys("6")  # signed: a change asks for a reason
        wait_for(lambda: d.find_element(By.ID, "dialog").is_displayed(), what="the amendment dialog")
        d.find_element(By.ID, "dialog-input").send_keys("second look: band neutrophil", Keys.ENTER)
        records(5)
        _screenshot(d, "sample-amended")

        body().send_keys(Keys.ESCAPE)  # back to the samples; slide-B: confirm the rest
        wait_for(lambda: css("#samples tr.row"), what="the samples table")
        body().send_keys(Keys.ARROW_DOWN, Keys.ENTER)
        wait_for(lambda: "slide-B" in d.find_element(By.ID, "crumb").text and css("#gallery .tile"), what="slide-B")
        body().send_keys(Keys.SHIFT, Keys.ENTER)
        wait_for(lambda: d.find_element(By.ID, "dialog").is_displayed(), what="the confirm dialog")
        d.find_element(By.ID, "dialog-ok").send_keys(Keys.ENTER)
        table = records(10)
        wait_for(lambda: "5 verified" in d.find_element(By.ID, "sample-counts").text, what="slide-B verified")
        logs = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs

    frame = table.to_pandas().sort_values(["reviewed_at", "record_id"])
    a = frame[frame.sample_id == "slide-A"]
    assert a.action.tolist() == ["confirm", "reclassify", "confirm", "sign-off", "amend"]
    assert a.verified_class.tolist()[:3] == ["basophil", "monocyte", "neutrophil"]
    assert set(frame.reviewer) == {"Ana Tech"} and set(frame.source) == {"app"}
    amend = a[a.action == "amend"].iloc[0]
    assert (amend.image_uri, amend.verified_class, amend.reason) == (eos["image_uri"], "neutrophil", "second look: band neutrophil")
    assert (frame[frame.sample_id == "slide-B"].action == "confirm").sum() == 5
    diff = differential(out).set_index(["sample_id", "cell_class"])
    assert diff.loc[("slide-A", "monocyte"), "count"] == 2 and diff.loc[("slide-A", "eosinophil"), "count"] == 0
    assert diff.loc[("slide-A", "neutrophil"), "signed_off_by"] == "Ana Tech"
