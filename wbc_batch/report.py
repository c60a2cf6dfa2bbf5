"""A self-contained HTML report of one run: summary, differentials, charts, review gallery.

One file with everything inside it (images as ``data:`` URIs, charts as
inline SVG, CSS inline, no scripts), so it can be mailed, archived next to
the run or opened from S3 without a server and without network access.

Scope: the run summary, class chart and confidence histogram describe the
run's own rows. The differential and the review gallery describe the
samples the run touched, as they stood when the run committed: the latest
committed row per image from this run and the runs that finished before
it, so a nightly run that completed a sample shows the whole sample, and
re-rendering an old run's report gives the same numbers. Only the part
files of this run and of earlier runs whose manifest lists one of its
samples (``counts.sample_ids``) are read; earlier runs whose manifest
predates that list are read too, as they may hold one. A run over new
slides therefore reads its own files and nothing else, however large the
archive. Reviewers'
verdicts (``OUTPUT/reviews/``) are applied as they stand when the report is
written: each cell counts under its verified class, with the model's count
beside it, and each sample shows how many cells are verified and who signed
it off.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from wbc_batch import query, storage
from wbc_batch.results import RunManifest
from wbc_batch.review.counts import attach_verdicts

__all__ = ["bar_chart_svg", "histogram_svg", "render_report", "write_report"]

log = logging.getLogger(__name__)

REPORTS_DIR = "reports"
THUMB_PX = 220
MAX_GALLERY = 60
HIST_BINS = 20
# What the differential and the gallery read of each row of the run's samples.
REPORT_INPUT = (*query.DIFFERENTIAL_INPUT, "confidence", "heatmap_uri", "explanation_suspect", "processed_at")


# --- data -------------------------------------------------------------------


def _pick_run(manifests: Mapping[str, RunManifest], run_id: str | None) -> RunManifest:
    """The manifest to report: the given run, or the latest succeeded one."""
    committed = query.committed_run_ids(manifests)
    if run_id is not None:
        manifest = manifests.get(run_id)
        if manifest is None:
            known = ", ".join(sorted(committed)[-10:]) or "none"
            raise ValueError(f"no run {run_id!r} under this OUTPUT (committed runs: {known})")
        if run_id not in committed:
            raise ValueError(f"run {run_id!r} is not committed (manifest status {manifest.status!r}, "
                             "expected 'succeeded'); its rows do not count")
        return manifest
    if not committed:
        raise ValueError("no committed run to report (no runs/<run_id>.json with status 'succeeded')")
    return max((manifests[r] for r in committed), key=lambda m: (m.finished_at or "", m.run_id))


def _runs_as_of(manifests: Mapping[str, RunManifest], manifest: RunManifest, samples: set[str]) -> set[str]:
    """This run and the committed runs that finished no later than it and may hold one of its samples.

    ISO strings in UTC sort by time. A manifest without ``counts.sample_ids``
    (written before runs recorded them) may hold any sample, so it is kept.
    """
    cutoff = query.parse_time(manifest.finished_at)
    out = {manifest.run_id}
    if cutoff is None:
        return out
    for rid in query.committed_run_ids(manifests):
        finished = query.parse_time(manifests[rid].finished_at)
        if finished is None or finished > cutoff:
            continue
        listed = manifests[rid].counts.sample_ids
        if listed is None or not samples.isdisjoint(listed):
            out.add(rid)
    return out


def effective_review_threshold(manifest: RunManifest) -> float | None:
    """The review threshold a run applied: ``--review-threshold`` when given, else the model's default.

    The model's default is ``model.review_threshold`` of the manifest; runs
    committed before it was recorded there give None unless the option was set.
    """
    for value in (manifest.options.get("review_threshold"), manifest.model.review_threshold):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


# --- images -----------------------------------------------------------------


def _thumbnail_data_uri(uri: str | None) -> tuple[str | None, str]:
    """A small JPEG ``data:`` URI of an image, or None and why it is missing.

    Originals may be TIFF or BMP, which browsers do not show, and may be
    large, so every image is decoded and re-encoded as a small JPEG.
    """
    if not uri:
        return None, "no image"
    from wbc_batch.imaging import ImageDecodeError, decode_image, encode_jpeg

    try:
        rgb = decode_image(storage.read_bytes(uri))
    except FileNotFoundError:
        return None, "not found"
    except (storage.StorageError, ImageDecodeError, OSError, ValueError) as exc:
        return None, type(exc).__name__
    import cv2

    h, w = rgb.shape[:2]
    scale = min(1.0, THUMB_PX / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(rgb, quality=85)).decode("ascii"), ""


# --- HTML pieces --------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt_pct(value: Any) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.1f}"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1d2630;
background:#fff;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #e3e8ee;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}.muted{color:#5b6773;font-size:13px}
.alert{border-radius:6px;padding:12px 16px;margin:14px 0;font-size:15px}
.alert.danger{background:#fdecea;border:2px solid #c62828;color:#7f1d1d}
.alert.warn{background:#fff8e1;border:1px solid #f0b400;color:#6b4e00}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{padding:4px 10px;border-bottom:1px solid #e3e8ee;text-align:left}
th{background:#f4f6f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.flag-high,.flag-low{font-weight:600;color:#b71c1c}.unreliable td{color:#8a939c}
.summary td:first-child{color:#5b6773}.charts{display:flex;flex-wrap:wrap;gap:28px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.card{border:1px solid #e3e8ee;border-radius:6px;padding:8px;font-size:12px}
.pair{display:flex;gap:6px}.pair figure{margin:0;flex:1;text-align:center}
.pair img{width:100%;height:auto;image-rendering:auto;border-radius:3px;background:#f4f6f8}
.pair figcaption{color:#5b6773;font-size:11px}.missing{padding:40px 4px;background:#f4f6f8;color:#8a939c;border-radius:3px}
.uri{word-break:break-all;color:#5b6773}
"""


def readable_time(value: str | None) -> str:
    """A manifest's ISO time as people read it, to the second in UTC (``2026-12-02 08:07:27 UTC``)."""
    parsed = query.parse_time(value)
    if parsed is None:
        return value or "?"
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _summary_table(manifest: RunManifest) -> str:
    counts, timings, model = manifest.counts, manifest.timings, manifest.model
    rows = [
        ("Run", manifest.run_id),
        ("Status", manifest.status),
        ("Input", manifest.input),
        ("Output", manifest.output),
        ("Model", f"{model.version or '?'} (sha256 {(model.sha256 or '')[:12]})"),
        ("Started / finished", f"{readable_time(manifest.started_at)} / {readable_time(manifest.finished_at)}"),
        ("Images", counts.total),
        ("Classified / errors", f"{counts.ok} / {counts.error}"),
        ("Need review", counts.needs_review),
        ("Out of distribution", counts.out_of_distribution),
        ("Throughput", f"{timings.images_per_second:.1f} images/s in {timings.seconds:.1f} s"),
    ]
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _alerts(manifest: RunManifest, diff: pd.DataFrame) -> str:
    parts: list[str] = []
    if manifest.shift_detected:
        details = {k: v for k, v in manifest.domain_shift.items() if k != "detected"}
        evidence = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                             for k, v in details.items())
        parts.append('<div class="alert danger" id="domain-shift"><strong>Domain shift detected.</strong> '
                     "Many images in this run do not look like the images the model was trained on; its "
                     "classifications may be confidently wrong. Do not report these differentials without "
                     f"manual review.{(' <br><span class=muted>' + _e(evidence) + '</span>') if evidence else ''}</div>")
    if len(diff):
        per_sample = diff.drop_duplicates("sample_id")
        bad = per_sample[~per_sample["reliable"].astype(bool)]
        if len(bad):
            names = ", ".join(f"{s} ({share:.0%} out of distribution)" for s, share in zip(bad.sample_id, bad.ood_share))
            parts.append(f'<div class="alert danger" id="unreliable"><strong>Unreliable differentials:</strong> '
                         f"{_e(names)}. These samples are shown without percentages.</div>")
        low = per_sample[per_sample["reliable"].astype(bool) & (per_sample["warning"] != "")]
        if len(low):
            parts.append('<div class="alert warn"><strong>Warnings:</strong> '
                         + "; ".join(f"{_e(s)}: {_e(w)}" for s, w in zip(low.sample_id, low.warning)) + "</div>")
    return "".join(parts)


def _differential_html(diff: pd.DataFrame) -> str:
    if not len(diff):
        return '<p class="muted">No classified cells in the samples of this run.</p>'
    out: list[str] = []
    by_sample: dict[Any, list[dict[str, Any]]] = {}
    for record in diff.to_dict("records"):  # plain dicts: a night holds hundreds of samples
        by_sample.setdefault(record["sample_id"], []).append(record)
    for sid in sorted(by_sample):
        rows = by_sample[sid]
        first = rows[0]
        reliable = bool(first["reliable"])
        signed = (f"signed off by {first['signed_off_by']} at {pd.Timestamp(first['signed_off_at']):%Y-%m-%d %H:%M} UTC"
                  if first.get("signed_off_by") else "not signed off")
        meta = (f"{int(first['white_cells'])} white cells · {int(first['needs_review'])} flagged for review · "
                f"{int(first.get('verified', 0))} verified by a reviewer · {signed} · "
                f"{int(first['errors'])} unreadable · {first['ood_share']:.0%} out of distribution")
        note = f'<div class="alert {"danger" if not reliable else "warn"}">{_e(first["warning"])}</div>' if first["warning"] else ""
        body = []
        for r in rows:
            ci = "—" if pd.isna(r["ci_low"]) else f"{r['ci_low']:.1f}–{r['ci_high']:.1f}"
            flag = f'<span class="flag-{_e(r["flag"])}">{_e(r["flag"].upper())}</span>' if r["flag"] else ""
            body.append(f"<tr><td>{_e(r['cell_class'])}</td><td class=num>{int(r['count'])}</td>"
                        f"<td class=num>{_fmt_pct(r['percent'])}</td><td class=num>{ci}</td><td>{_e(r['reference'])}</td>"
                        f"<td>{flag}</td><td class=num>{int(r['model_count'])}</td></tr>")
        table_class = "" if reliable else ' class="unreliable"'
        out.append(f'<section class="sample"><h3>Sample {_e(sid)}{"" if reliable else " — NOT REPORTABLE"}</h3>'
                   f'<div class="muted">{_e(meta)}</div>{note}<table{table_class}><tr><th>Class</th><th>Count</th>'
                   f"<th>%</th><th>95% CI (Wilson)</th><th>Reference %</th><th>Flag</th><th>Model count</th></tr>{''.join(body)}</table></section>")
    return "".join(out)


def bar_chart_svg(counts: Sequence[tuple[str, int]], title: str) -> str:
    """Horizontal bar chart as inline SVG: one bar per label with its count and share."""
    total = sum(c for _, c in counts) or 1
    peak = max((c for _, c in counts), default=0) or 1
    row, left, width = 24, 110, 300
    height = 30 + row * max(1, len(counts))
    bars = []
    for i, (label, n) in enumerate(counts):
        y = 24 + i * row
        w = width * n / peak
        bars.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" font-size="12">{_e(label)}</text>'
                    f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row - 6}" fill="#3f7cbf"/>'
                    f'<text x="{left + w + 4:.1f}" y="{y + 14}" font-size="11" fill="#33404d">{n} ({100 * n / total:.1f}%)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" role="img" '
            f'aria-label="{_e(title)}"><text x="0" y="14" font-size="13" font-weight="600">{_e(title)}</text>'
            f"{''.join(bars)}</svg>")


def histogram_svg(values: Sequence[float], title: str, bins: int = HIST_BINS, marker: float | None = None) -> str:
    """Histogram of values in [0, 1] as inline SVG, with an optional vertical marker (the review threshold)."""
    counts = [0] * bins
    for v in values:
        if v is None or pd.isna(v):
            continue
        counts[min(bins - 1, max(0, int(float(v) * bins)))] += 1
    peak = max(counts) or 1
    left, top, width, height = 40, 24, 360, 150
    bw = width / bins
    rects = "".join(
        f'<rect x="{left + i * bw + 1:.1f}" y="{top + height - height * c / peak:.1f}" width="{bw - 2:.1f}" '
        f'height="{height * c / peak:.1f}" fill="#5b9a68"><title>{i / bins:.2f}–{(i + 1) / bins:.2f}: {c}</title></rect>'
        for i, c in enumerate(counts))
    axis = (f'<line x1="{left}" y1="{top + height}" x2="{left + width}" y2="{top + height}" stroke="#33404d"/>'
            + "".join(f'<text x="{left + width * t:.1f}" y="{top + height + 14}" font-size="11" text-anchor="middle">{t:g}</text>'
                      for t in (0, 0.25, 0.5, 0.75, 1))
            + f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end">{peak}</text>'
            + f'<text x="{left - 4}" y="{top + height}" font-size="11" text-anchor="end">0</text>')
    mark = ""
    if marker is not None and 0 <= marker <= 1:
        x = left + width * marker
        mark = (f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + height}" stroke="#c62828" stroke-dasharray="4 3"/>'
                f'<text x="{x - 4:.1f}" y="{top + 10}" font-size="11" fill="#c62828" text-anchor="end">review &lt; {marker:g}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{top + height + 24}" role="img" '
            f'aria-label="{_e(title)}"><text x="0" y="14" font-size="13" font-weight="600">{_e(title)}</text>'
            f"{rects}{axis}{mark}</svg>")


def _gallery_html(queue: pd.DataFrame, total: int) -> str:
    if not len(queue):
        return '<p class="muted">No cells need review.</p>'
    uris = [u for pair in zip(queue["image_uri"], queue["heatmap_uri"]) for u in pair]
    with ThreadPoolExecutor(max_workers=8) as pool:
        thumbs = list(pool.map(_thumbnail_data_uri, uris))

    def figure(data: tuple[str | None, str], caption: str) -> str:
        src, why = data
        inner = f'<img src="{src}" alt="{_e(caption)}">' if src else f'<div class="missing">{_e(caption)}: {_e(why)}</div>'
        return f"<figure>{inner}<figcaption>{_e(caption)}</figcaption></figure>"

    cards = []
    for i, r in enumerate(queue.itertuples()):
        why = []
        if bool(r.out_of_distribution):
            why.append("out of distribution")
        if bool(r.explanation_suspect):
            why.append("explanation off the cell")
        cards.append(
            f'<div class="card"><div class="pair">{figure(thumbs[2 * i], "original")}{figure(thumbs[2 * i + 1], "Grad-CAM")}</div>'
            f"<div><strong>{_e(r.predicted_class)}</strong> {float(r.confidence):.2f} · sample {_e(r.sample_id)}"
            f"{(' · ' + _e(', '.join(why))) if why else ''}</div><div class=uri>{_e(r.image_uri)}</div></div>")
    more = f'<p class="muted">Showing the {len(queue)} least confident of {total} cells awaiting review; ' \
           "run <code>wbc-batch query OUTPUT --review-queue</code> for all.</p>" if total > len(queue) else ""
    return f'{more}<div class="gallery">{"".join(cards)}</div>'


# --- the report ---------------------------------------------------------------


def render_report(output: str, run_id: str | None = None, *, max_gallery: int = MAX_GALLERY,
                  **differential_options: Any) -> tuple[str, str]:
    """Build the report HTML; returns (run id, HTML text).

    Raises:
        ValueError: no committed run, or ``run_id`` is unknown or not committed.
    """
    if max_gallery < 0:
        raise ValueError(f"expected max_gallery >= 0, got {max_gallery}")
    manifests = query.read_manifests(output)
    if not manifests:
        query.read_results(output, manifests=manifests)  # FileNotFoundError when OUTPUT holds no results at all
    manifest = _pick_run(manifests, run_id)
    rid = manifest.run_id
    mine = query.read_results(output, run_ids={rid}, manifests=manifests)  # this run's part files only
    con = query.connect(mine)
    try:
        own = query.fetch_df(con, mine, "SELECT predicted_class, confidence, status, sample_id FROM predictions_raw")
    finally:
        con.close()
    samples = set(own["sample_id"].dropna())
    scope = _runs_as_of(manifests, manifest, samples)
    scoped = mine if scope == {rid} else query.read_results(output, run_ids=scope, manifests=manifests)
    con = query.connect(scoped)
    try:
        cols = ", ".join(f'"{c}"' for c in REPORT_INPUT)
        latest = query.fetch_df(con, scoped, f"SELECT {cols} FROM predictions WHERE list_contains(?::VARCHAR[], sample_id) "
                                             "ORDER BY sample_id, image_uri", [sorted(samples)])
    finally:
        con.close()
    latest = attach_verdicts(latest, output)
    # each sample judged by the rule its runs recorded (ood.sample_shifted), as the manifest's domain_shift was
    diff = query.differential_from_frame(latest, class_names=scoped.class_names or None,
                                         **{"shift_rules": query.run_shift_rules(scoped.manifests), **differential_options})

    ok = own[own["status"] == "ok"]
    class_order = [c for c in scoped.class_names if c in set(ok["predicted_class"])]
    class_order += sorted(set(ok["predicted_class"].dropna()) - set(class_order))
    vc = ok["predicted_class"].value_counts()
    chart = bar_chart_svg([(c, int(vc.get(c, 0))) for c in class_order], f"Predicted classes ({len(ok)} images)")
    threshold = effective_review_threshold(manifest)
    hist = histogram_svg(ok["confidence"].tolist(), "Confidence (calibrated)",
                         marker=float(threshold) if isinstance(threshold, (int, float)) else None)

    review = latest[(latest["status"] == "ok") & latest["needs_review"].astype("boolean").fillna(False).astype(bool)]
    review = review.sort_values(["confidence", "image_uri"], na_position="first")
    gallery = _gallery_html(review.head(max_gallery), len(review))

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>WBC report {_e(rid)}</title><style>{CSS}</style></head><body>
<h1>White-cell classification report</h1>
<div class="muted">Run {_e(rid)} · generated {generated} · decision support only: every result needs review by a trained person</div>
{_alerts(manifest, diff)}
<h2>Run summary</h2>{_summary_table(manifest)}
<h2>Differential per sample</h2>
<p class="muted">Latest committed classification per image for the {len(samples)} sample(s) of this run, as of this run.
Each cell counts under the class a reviewer verified where there is one ("Model count": the model's own count).
Non-white cells and unreadable images are left out; intervals are 95% Wilson intervals; flags compare the point
estimate with adult reference ranges.</p>
{_differential_html(diff)}
<h2>Charts</h2><div class="charts">{chart}{hist}</div>
<h2>Cells awaiting review</h2><p class="muted">Least confident first; original image beside its Grad-CAM heatmap.</p>
{gallery}
</body></html>
"""
    return rid, doc


def write_report(output: str, run_id: str | None = None, out_file: str | None = None, **options: Any) -> str:
    """Write the HTML report of a run and return where it went.

    Args:
        output: local folder or ``s3://bucket/prefix`` holding the results.
        run_id: the run to report (default: the latest succeeded run).
        out_file: local path or ``s3://`` URI (default ``OUTPUT/reports/<run_id>.html``).
        options: ``max_gallery`` and the options of
            :func:`wbc_batch.query.differential_from_frame`.
    """
    rid, doc = render_report(output, run_id, **options)
    target = out_file or storage.join(output, REPORTS_DIR, f"{rid}.html")
    storage.write_bytes(target, doc.encode("utf-8"))
    return target
