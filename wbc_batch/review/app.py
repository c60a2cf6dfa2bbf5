"""``wbc-batch review``: the morning review as a small web app over committed results.

FastAPI's tutorial layout: one app, a router for samples and one for cell
images, a dependency-free auth middleware, Pydantic bodies. The page itself
is plain HTML, CSS and JavaScript shipped in ``static/`` and read into
memory at start, so no request path ever reaches the file system and
nothing is fetched from the internet.

Security, in the order a request meets it:

* **Host**: bound to a loopback address, only loopback ``Host`` headers are
  served (a DNS-rebinding page cannot talk to it).
* **Token**: ``Authorization: Bearer <token>``, or the HttpOnly,
  SameSite=Strict cookie that ``/?token=<token>`` sets once (then redirects
  the token out of the address bar). None: 401. Wrong: 403.
* **Writes**: with the cookie, a POST must carry ``X-WBC-Review: 1`` and a
  same-origin ``Origin`` if any: a form or image on another site cannot
  send that header without a CORS preflight, which this app never grants.
* **Images**: only ``image_uri`` and ``heatmap_uri`` of committed rows are
  ever read, looked up by a cell id; S3 credentials stay on the server.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

import pandas as pd
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from wbc_batch import query, storage
from wbc_batch.ood import ShiftRule, sample_shifted
from wbc_batch.review.counts import attach_verdicts
from wbc_batch.review.records import (
    AMEND,
    CONFIRM,
    RECLASSIFY,
    SIGN_OFF,
    VerdictStore,
    current_verdicts,
    make_record,
    validate_reviewer,
)

__all__ = ["ReviewSettings", "ReviewState", "create_app", "serve"]

CSRF_HEADER = "x-wbc-review"
RELOAD_SECONDS = 30.0
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass
class ReviewSettings:
    """What the app needs to start: where the results are, the token, where it listens."""

    output: str
    token: str
    host: str = "127.0.0.1"
    port: int = 8765

    @property
    def cookie_name(self) -> str:
        """Cookies ignore ports: two apps on one machine must not overwrite each other's."""
        return f"wbc_review_{self.port}"

    @property
    def cookie_value(self) -> str:
        """A value derived from the token, so the cookie never holds the token itself."""
        return hmac.new(self.token.encode(), b"wbc-review-cookie", hashlib.sha256).hexdigest()


# --- state ------------------------------------------------------------------


def cell_id(image_uri: str) -> str:
    """A cell's id in URLs: a hash of its URI, so no path ever appears in a request."""
    return hashlib.sha256(image_uri.encode("utf-8")).hexdigest()[:20]


def _plain(value: Any) -> Any:
    """numpy and pandas scalars as JSON values (NaN and NaT become null)."""
    if value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return value


@dataclass
class ReviewState:
    """Committed rows (reloaded at most every 30 s) and the verdict store, shared by all requests."""

    output: str
    store: VerdictStore = field(init=False)
    rows: pd.DataFrame = field(init=False)
    cells: dict[str, dict[str, Any]] = field(init=False)
    class_names: list[str] = field(init=False)
    shift_rules: dict[str, ShiftRule] = field(init=False)
    loaded_at: float = 0.0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.store = VerdictStore(self.output)
        self.reload()

    def reload(self) -> None:
        """Read the committed results again (a nightly run may have committed since)."""
        rows = query.load_results(self.output)
        rules = query.run_shift_rules(query.read_manifests(self.output))
        classes = [c[2:] for c in rows.columns if c.startswith("p_")]
        rows = rows.assign(cell_id=[cell_id(str(u)) for u in rows["image_uri"]])
        with self.lock:
            self.rows, self.class_names, self.shift_rules, self.loaded_at = rows, classes, rules, time.monotonic()
            self.cells = {r["cell_id"]: r for r in rows[rows["status"] == "ok"].to_dict("records")}

    def maybe_reload(self) -> None:
        """Reload when the last load is older than RELOAD_SECONDS."""
        if time.monotonic() - self.loaded_at > RELOAD_SECONDS:
            self.reload()

    @property
    def non_wbc(self) -> list[str]:
        """Classes left out of white-cell counts."""
        return [c for c in query.DEFAULT_NON_WBC if c in self.class_names]

    def reviewed(self) -> pd.DataFrame:
        """Rows with every verdict recorded so far (by anyone) applied."""
        return attach_verdicts(self.rows, self.store.refresh())

    def sample_rows(self, sample_id: str) -> pd.DataFrame:
        """One sample's rows with verdicts, or 404."""
        rows = self.reviewed()
        rows = rows[rows["sample_id"].fillna("") == sample_id]
        if not len(rows):
            raise HTTPException(404, f"no sample {sample_id!r} in the committed results")
        return rows


# --- JSON views ---------------------------------------------------------------


def _awaiting(ok: pd.DataFrame) -> pd.Series:
    flagged = ok["needs_review"].astype("boolean").fillna(False).astype(bool)
    return flagged & ok["verified_class"].isna()


def _sign_off_json(rows: pd.DataFrame) -> dict[str, Any] | None:
    signed = rows[rows["signed_off_by"].notna()]
    if not len(signed):
        return None
    return {"by": _plain(signed.iloc[0]["signed_off_by"]), "at": _plain(signed.iloc[0]["signed_off_at"])}


def sample_summary(sample_id: str, rows: pd.DataFrame, rules: dict[str, ShiftRule]) -> dict[str, Any]:
    """One line of the samples page; "unreliable" by the rule the sample's runs recorded, as the differential judges."""
    ok = rows[rows["status"] == "ok"]
    ood = ok["out_of_distribution"].astype("boolean").fillna(False).astype(bool)
    share = float(ood.mean()) if len(ok) else 0.0
    rule = ShiftRule.strictest(rules[r] for r in set(ok["run_id"].dropna()) if r in rules) if rules else ShiftRule()
    return {
        "sample_id": sample_id, "cells": len(ok), "errors": int((rows["status"] != "ok").sum()),
        "flagged": int(ok["needs_review"].astype("boolean").fillna(False).sum()),
        "awaiting": int(_awaiting(ok).sum()), "verified": int(ok["verified_class"].notna().sum()),
        "out_of_distribution": int(ood.sum()), "ood_share": share,
        "unreliable": sample_shifted(len(ok), int(ood.sum()), rule), "signed_off": _sign_off_json(rows),
        "run_ids": sorted({str(r) for r in rows["run_id"].dropna()}),
    }


def _cell_json(r: dict[str, Any], classes: list[str], actions: dict[tuple[str, str], str]) -> dict[str, Any]:
    probs = sorted(((c, _plain(r.get(f"p_{c}"))) for c in classes), key=lambda kv: -(kv[1] or 0.0))
    return {
        "id": r["cell_id"], "name": PurePosixPath(str(r["image_uri"])).name, "uri": r["image_uri"],
        "predicted": r["predicted_class"], "confidence": _plain(r["confidence"]),
        "top": [{"cls": c, "p": p} for c, p in probs[:3] if p is not None],
        "needs_review": bool(_plain(r["needs_review"])), "ood": bool(_plain(r["out_of_distribution"])),
        "suspect": bool(_plain(r["explanation_suspect"])), "cam_in_cell": _plain(r["cam_in_cell"]),
        "has_heatmap": bool(_plain(r["heatmap_uri"])), "run_id": r["run_id"], "model_version": r["model_version"],
        "verified": _plain(r["verified_class"]), "verified_by": _plain(r["verified_by"]),
        "verified_at": _plain(r["verified_at"]), "action": actions.get((r["image_uri"], r["image_sha256"])),
    }


def sample_detail(state: ReviewState, sample_id: str) -> dict[str, Any]:
    """Everything the sample page shows: cells, sign-off, trail."""
    rows = state.sample_rows(sample_id)
    ok = rows[rows["status"] == "ok"]
    records = state.store.table()
    actions = {(v.image_uri, v.image_sha256): v.action for v in current_verdicts(records).itertuples()}
    trail = records.to_pandas()
    trail = trail[trail["sample_id"] == sample_id].sort_values(["reviewed_at", "record_id"])
    names = {str(u): PurePosixPath(str(u)).name for u in ok["image_uri"]}
    return {
        "summary": sample_summary(sample_id, rows, state.shift_rules),
        "cells": [_cell_json(r, state.class_names, actions) for r in ok.to_dict("records")],
        "errors": [{"name": PurePosixPath(str(r["image_uri"])).name, "error": r["error"]}
                   for r in rows[rows["status"] != "ok"].to_dict("records")],
        "trail": [{"at": _plain(t["reviewed_at"]), "reviewer": t["reviewer"], "action": t["action"],
                   "cell": names.get(str(t["image_uri"]), None) if t["image_uri"] else None,
                   "predicted": _plain(t["predicted_class"]), "verified": _plain(t["verified_class"]),
                   "reason": _plain(t["reason"]), "source": t["source"]} for t in trail.to_dict("records")],
    }


# --- request bodies -------------------------------------------------------------


class CellVerdict(BaseModel):
    """One cell's verdict from the page."""

    cell: str = Field(max_length=64)
    verified_class: str = Field(max_length=64)


class VerdictsIn(BaseModel):
    """A keystroke's worth of verdicts (one cell), or "confirm the rest" (many)."""

    reviewer: str = Field(max_length=200)
    verdicts: list[CellVerdict] = Field(min_length=1, max_length=5000)
    reason: str | None = Field(default=None, max_length=1000)


class SignOffIn(BaseModel):
    """Sign-off of a sample."""

    reviewer: str = Field(max_length=200)


# --- routes -------------------------------------------------------------------


def _state(request: Request) -> ReviewState:
    return request.app.state.review


def _reviewer(name: str) -> str:
    try:
        return validate_reviewer(name)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _records_for(state: ReviewState, sample_id: str, body: VerdictsIn) -> list[dict[str, Any]]:
    """Verdict records for one POST: confirm/reclassify, or amend (with a reason) once the sample is signed."""
    reviewer = _reviewer(body.reviewer)
    rows = state.sample_rows(sample_id)
    signed = rows["signed_off_by"].notna().any()
    if signed and not (body.reason or "").strip():
        raise HTTPException(409, f"sample {sample_id} is signed off; a change is an amendment and needs a reason")
    now = datetime.now(timezone.utc)
    records = []
    for v in body.verdicts:
        row = state.cells.get(v.cell)
        if row is None or str(row["sample_id"] or "") != sample_id:
            raise HTTPException(404, f"no cell {v.cell} in sample {sample_id}")
        if v.verified_class not in state.class_names:
            raise HTTPException(422, f"unknown class {v.verified_class!r}; expected one of {', '.join(state.class_names)}")
        action = AMEND if signed else CONFIRM if v.verified_class == row["predicted_class"] else RECLASSIFY
        try:
            records.append(make_record(action=action, reviewer=reviewer, sample_id=sample_id, row=row,
                                       verified_class=v.verified_class, reason=body.reason, at=now))
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
    return records


samples = APIRouter(prefix="/api")


@samples.get("/session")
def session(state: ReviewState = Depends(_state)) -> dict[str, Any]:
    """What the page needs once: classes in model order, which are not white cells, the output."""
    return {"output": state.output, "classes": state.class_names, "non_wbc": state.non_wbc}


@samples.get("/samples")
def list_samples(state: ReviewState = Depends(_state)) -> list[dict[str, Any]]:
    """Every sample with its counts and sign-off."""
    with state.lock:
        state.maybe_reload()
        rows = state.reviewed()
    keys = rows["sample_id"].fillna("")
    return [sample_summary(str(sid), part, state.shift_rules) for sid, part in rows.groupby(keys, sort=True)]


@samples.get("/samples/{sample_id}")
def get_sample(sample_id: str, state: ReviewState = Depends(_state)) -> dict[str, Any]:
    """One sample's cells, sign-off and trail."""
    with state.lock:
        return sample_detail(state, sample_id)


@samples.post("/samples/{sample_id}/verdicts")
def post_verdicts(sample_id: str, body: VerdictsIn, state: ReviewState = Depends(_state)) -> dict[str, Any]:
    """Record verdicts (one new file) and return the sample as it now stands."""
    with state.lock:
        state.store.append(_records_for(state, sample_id, body))
        return sample_detail(state, sample_id)


@samples.post("/samples/{sample_id}/sign-off")
def sign_off(sample_id: str, body: SignOffIn, state: ReviewState = Depends(_state)) -> dict[str, Any]:
    """Sign a sample off once every flagged cell has a verdict; it is locked from then on."""
    reviewer = _reviewer(body.reviewer)
    with state.lock:
        rows = state.sample_rows(sample_id)
        if rows["signed_off_by"].notna().any():
            raise HTTPException(409, f"sample {sample_id} is already signed off")
        waiting = int(_awaiting(rows[rows["status"] == "ok"]).sum())
        if waiting:
            raise HTTPException(409, f"{waiting} flagged cell(s) still await a verdict")
        state.store.append([make_record(action=SIGN_OFF, reviewer=reviewer, sample_id=sample_id)])
        return sample_detail(state, sample_id)


images = APIRouter(prefix="/api/cells")
_BROWSER_FORMATS = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}


def _image_response(uri: str | None) -> Response:
    """The bytes of an image a committed row names; formats browsers cannot show are re-encoded as JPEG."""
    if not uri:
        raise HTTPException(404, "no image")
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise HTTPException(404, "image not found") from None
    except storage.StorageError:
        raise HTTPException(502, "image storage unreachable") from None
    media = next((m for magic, m in _BROWSER_FORMATS.items() if data.startswith(magic)), None)
    if media is None:
        from wbc_batch.imaging import ImageDecodeError, decode_image, encode_jpeg

        try:
            data, media = encode_jpeg(decode_image(data), quality=92), "image/jpeg"
        except (ImageDecodeError, ValueError):
            raise HTTPException(415, "not a displayable image") from None
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


@images.get("/{cell}/image")
def cell_image(cell: str, state: ReviewState = Depends(_state)) -> Response:
    """The original cell image."""
    row = state.cells.get(cell)
    return _image_response(row["image_uri"] if row else None)


@images.get("/{cell}/heatmap")
def cell_heatmap(cell: str, state: ReviewState = Depends(_state)) -> Response:
    """The Grad-CAM overlay of the predicted class."""
    row = state.cells.get(cell)
    return _image_response(row["heatmap_uri"] if row else None)


# --- auth -----------------------------------------------------------------------


def _host_allowed(settings: ReviewSettings, request: Request) -> bool:
    """Bound to loopback: serve loopback Host headers only (DNS rebinding)."""
    if settings.host not in LOOPBACK_HOSTS and not settings.host.startswith("127."):
        return True
    header = request.headers.get("host") or ""
    host = header.split("]")[0] + "]" if header.startswith("[") else header.partition(":")[0]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


def _denied(status: int, message: str, request: Request) -> Response:
    if request.url.path.startswith("/api/"):
        resp: Response = JSONResponse({"detail": message}, status_code=status)
    else:
        resp = HTMLResponse(f"<!DOCTYPE html><title>WBC review</title><p>{message}</p>", status_code=status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


def _authorise(settings: ReviewSettings, request: Request) -> tuple[str | None, Response | None]:
    """How the request proved itself ("bearer" or "cookie"), or the refusal to send."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), settings.token.encode()):
            return "bearer", None
        return None, _denied(403, "invalid token", request)
    cookie = request.cookies.get(settings.cookie_name)
    if cookie is not None:
        if hmac.compare_digest(cookie.encode(), settings.cookie_value.encode()):
            return "cookie", None
        return None, _denied(403, "invalid or expired session: open the link printed by wbc-batch review", request)
    return None, _denied(401, "token required: open the link printed by wbc-batch review", request)


def _token_login(settings: ReviewSettings, request: Request, supplied: str) -> Response:
    """``?token=``: check it, set the session cookie and redirect it out of the address bar and history."""
    if not hmac.compare_digest(supplied.encode(), settings.token.encode()):
        return _denied(403, "invalid token", request)
    rest = request.url.remove_query_params("token")
    resp = RedirectResponse(rest.path + (f"?{rest.query}" if rest.query else ""), status_code=303)
    resp.set_cookie(settings.cookie_name, settings.cookie_value, httponly=True, samesite="strict", path="/")
    return resp


def _auth_middleware(settings: ReviewSettings) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    async def middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if not _host_allowed(settings, request):
            resp: Response = PlainTextResponse("unexpected Host header", status_code=400)
        elif (supplied := request.query_params.get("token")) is not None:
            resp = _token_login(settings, request, supplied)
        else:
            how, refusal = _authorise(settings, request)
            if refusal is not None:
                resp = refusal
            elif how == "cookie" and request.method not in ("GET", "HEAD") and (
                    request.headers.get(CSRF_HEADER) != "1" or not _same_origin(request)):
                resp = _denied(403, f"cross-site request refused (missing {CSRF_HEADER} header or foreign Origin)", request)
            else:
                resp = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    return middleware


# --- the app --------------------------------------------------------------------


def _static_files() -> dict[str, bytes]:
    """The page's files, read once from the package (no request ever names a file)."""
    root = resources.files("wbc_batch.review") / "static"
    return {name: (root / name).read_bytes() for name in STATIC_FILES}


def create_app(settings: ReviewSettings, state: ReviewState | None = None) -> FastAPI:
    """The review app over ``settings.output``.

    Raises:
        FileNotFoundError: no results under OUTPUT.
        StorageError: the results cannot be read.
    """
    app = FastAPI(title="wbc-batch review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = state or ReviewState(settings.output)
    files = _static_files()
    app.middleware("http")(_auth_middleware(settings))
    app.include_router(samples)
    app.include_router(images)

    @app.get("/", response_class=HTMLResponse)
    def index() -> Response:
        """The page (one page; the sample view is #sample=<id>)."""
        return Response(files["index.html"], media_type="text/html; charset=utf-8")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        """Nothing: browsers ask for it, and a 404 would fill the console."""
        return Response(status_code=204)

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        """app.js and app.css from memory."""
        if name not in files or name == "index.html":
            raise HTTPException(404, "not found")
        return Response(files[name], media_type=f"{STATIC_FILES[name]}; charset=utf-8")

    return app


def resolve_token(environ: dict[str, str]) -> tuple[str, bool]:
    """The token from WBC_REVIEW_TOKEN, else a new one; and whether it was generated."""
    given = environ.get("WBC_REVIEW_TOKEN", "").strip()
    return (given, False) if given else (secrets.token_urlsafe(24), True)


def serve(output: str, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          generated: bool = False) -> None:
    """Load the results, print how to open the app, and serve until interrupted."""
    import uvicorn

    if token is None:
        raise ValueError("expected a token (see resolve_token)")
    settings = ReviewSettings(output=output, token=token, host=host, port=port)
    app = create_app(settings)
    state: ReviewState = app.state.review
    shown = f"[{host}]" if ":" in host else host
    print(f"review app for {output}: {len(state.cells)} cells in {state.rows['sample_id'].nunique()} samples", flush=True)
    if generated:
        print(f"open http://{shown}:{port}/?token={token}", flush=True)
    else:
        print(f"open http://{shown}:{port}/?token=<WBC_REVIEW_TOKEN>  (the token from the environment)", flush=True)
    print("stop with Ctrl+C", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False, date_header=False)
