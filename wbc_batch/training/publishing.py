"""The model registry: promote a candidate only when it beats the current model on held-out images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wbc_batch import storage
from wbc_batch.model import META_FILE, ModelArtifactError, artifact_digest
from wbc_batch.training.evaluation import evaluate


def _artifact_names(uri: str) -> list[str]:
    """Every file of an artifact folder (local or S3) by its name inside the folder, ``/``-separated; [] when none."""
    try:
        files = storage.list_files(uri)
    except FileNotFoundError:
        return []
    if storage.is_remote(uri):
        prefix = uri.rstrip("/") + "/"
        return [f[len(prefix):] for f in files]
    return [Path(f).relative_to(uri).as_posix() for f in files]


def _copy_artifact(src: str, dst: str) -> str:
    """Copy every file of an artifact folder and check the copy's artifact digest.

    Files of ``dst`` that ``src`` lacks are removed first; model.json is
    written last so a reader never pairs it with a half-copied model.

    Returns:
        The artifact digest of ``src``, which ``dst`` now has.

    Raises:
        ModelArtifactError: ``src`` holds no file, or the copy's digest differs
            from the source's (a file changed or could not be read alike).
    """
    names = _artifact_names(src)
    if not names:
        raise ModelArtifactError(f"model artifact not found: no files under {src}")
    want = artifact_digest(src)
    for name in sorted(set(_artifact_names(dst)) - set(names)):
        storage.delete(storage.join(dst, name))
    for name in sorted(names, key=lambda n: (n == META_FILE, n)):
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
    got = artifact_digest(dst)
    if got != want:
        raise ModelArtifactError(f"copy of {src} to {dst} has artifact digest {got}, not the source's {want}")
    return want


def _check_version_folder(folder: str, digest: str) -> bool:
    """Whether ``versions/<version>/`` already holds this artifact (True) or nothing (False).

    Raises:
        ModelArtifactError: it holds another artifact under the same version.
    """
    if not _artifact_names(folder):
        return False
    held = artifact_digest(folder)
    if held != digest:
        raise ModelArtifactError(f"{folder} already holds artifact digest {held}, not {digest}; "
                                 "published versions are immutable: give the candidate a new version")
    return True


def _score(report: dict[str, Any]) -> tuple[float, float, float]:
    """Ranking key: macro-F1, then accuracy, then lower NLL."""
    return (round(report["macro_f1"], 6), round(report["accuracy"], 6), -round(report["nll_calibrated"], 6))


def publish(candidate_uri: str, location: str, data_uri: str, split: str = "test") -> dict[str, Any]:
    """Make a candidate the current model at LOCATION only if it beats the current one.

    Both models are evaluated on the *candidate's* held-out split (by content
    hash), on the same images. Models are told apart by artifact digest: a
    candidate with the current model's digest is not evaluated or copied. Layout::

        LOCATION/current/             the model to use
        LOCATION/versions/<version>/  every model ever published, the previous one included

    Returns:
        ``{"promoted", "reason", "current", "candidate" {version, digest, score, split},
        "previous" {version, digest, score} | None}``; ``score`` is None when
        nothing was evaluated.

    Raises:
        ModelArtifactError: the candidate has the current model's version but
            another digest, or ``versions/<version>/`` of the candidate or the
            current model holds another artifact (nothing is written then), or
            a copy's digest differs from its source's.
    """
    from wbc_batch.model import read_metadata

    cand_meta = read_metadata(candidate_uri)
    cand_digest = artifact_digest(candidate_uri)
    current = storage.join(location, "current")
    cand_info: dict[str, Any] = {"version": cand_meta.version, "digest": cand_digest, "score": None, "split": None}
    cur_meta = read_metadata(current) if storage.exists(storage.join(current, META_FILE)) else None
    cur_digest = artifact_digest(current) if cur_meta is not None else None
    if cur_meta is not None and cur_digest == cand_digest:
        return {
            "promoted": False, "reason": f"candidate is the current model (artifact digest {cand_digest}); nothing to do",
            "current": current, "candidate": cand_info,
            "previous": {"version": cur_meta.version, "digest": cur_digest, "score": None},
        }
    if cur_meta is not None and cur_meta.version == cand_meta.version:
        raise ModelArtifactError(f"candidate {candidate_uri} has the current model's version {cand_meta.version!r} "
                                 f"but another artifact digest ({cand_digest}, current {cur_digest}); "
                                 "published versions are immutable: give the candidate a new version")
    cand_folder = storage.join(location, "versions", cand_meta.version)
    cand_archived = _check_version_folder(cand_folder, cand_digest)
    cand_eval = evaluate(candidate_uri, data_uri, split=split)
    cand_info.update(score=_score(cand_eval["metrics"]), split=cand_eval["split"])
    previous: dict[str, Any] | None = None
    if cur_meta is not None and cur_digest is not None:
        if cur_meta.class_names != cand_meta.class_names:
            return {
                "promoted": False,
                "reason": f"class lists differ (current {cur_meta.class_names}, candidate {cand_meta.class_names}); "
                "publish to a new location",
                "current": current, "candidate": cand_info, "previous": None,
            }
        cur_folder = storage.join(location, "versions", cur_meta.version)
        cur_archived = _check_version_folder(cur_folder, cur_digest)
        cur_eval = evaluate(current, data_uri, split=split, split_source=candidate_uri)
        previous = {"version": cur_meta.version, "digest": cur_digest, "score": _score(cur_eval["metrics"])}
        if not cand_info["score"] > previous["score"]:
            return {
                "promoted": False,
                "reason": f"candidate (macro-F1, accuracy, -NLL) {cand_info['score']} "
                f"does not beat current {previous['score']}",
                "current": current, "candidate": cand_info, "previous": previous,
            }
        if not cur_archived:
            _copy_artifact(current, cur_folder)
    if not cand_archived:
        _copy_artifact(candidate_uri, cand_folder)
    _copy_artifact(candidate_uri, current)
    return {
        "promoted": True,
        "reason": "no current model" if previous is None else "candidate beats current",
        "current": current, "candidate": cand_info, "previous": previous,
    }
