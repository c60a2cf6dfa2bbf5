"""The versioned model artifact: a Keras file beside ``model.json``.

An artifact is a folder (local or ``s3://``)::

    model.keras   the Keras 3 model (no lambdas, loads with safe_mode=True)
    model.json    metadata: version, classes, input contract, Grad-CAM layer,
                  calibration temperature, review threshold, data fingerprint,
                  metrics, OOD statistics, the sha256 of model.keras and, for
                  a version derived from another, the parent's digest
    split.csv     (optional) the train/val/test split it was trained with

Two checks, both before Keras touches the file:

* ``model_sha256`` in model.json must match model.keras, so a truncated or
  swapped weight file is refused whatever the settings.
* The **artifact digest** (:func:`artifact_digest`) covers every file of the
  folder: the sha256 of a canonical listing of each file's sha256 and name
  (:func:`artifact_listing`). A run records it in every row (``model_digest``)
  and in its manifest, and ``--model-digest`` / ``WBC_MODEL_DIGEST`` pins it:
  any other artifact, including the same weights with another model.json, is
  refused.

Artifacts are immutable: a change of temperature, threshold or OOD statistics
is a new version in a new folder (:func:`write_derived_artifact`) that records
its parent's digest, never an edit in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wbc_batch import storage
from wbc_batch.errors import ModelError, UsageError

ARTIFACT_FORMAT = "wbc-batch-model/1"
MODEL_FILE = "model.keras"
META_FILE = "model.json"
SPLIT_FILE = "split.csv"
DEFAULT_REVIEW_THRESHOLD = 0.90
TRUSTED_PREFIXES_ENV = "WBC_TRUSTED_MODEL_PREFIXES"
DIGEST_ENV = "WBC_MODEL_DIGEST"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Keys of model.json a derived version may not set through ``updates``: they describe the artifact itself.
_IDENTITY_KEYS = frozenset({"format", "version", "model_sha256", "parent_digest", "parent_version", "changelog",
                            "created_at"})


class ModelArtifactError(ModelError):
    """A model artifact that is missing, malformed, tampered with, untrusted or not the pinned one (exit 4)."""


@dataclass
class ModelMetadata:
    """What ``model.json`` holds; see the module docstring."""

    version: str
    class_names: list[str]
    image_size: int
    gradcam_layer: str
    embedding_layer: str = "embedding"
    temperature: float = 1.0
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD
    non_wbc_classes: list[str] = field(default_factory=lambda: ["non_wbc"])
    model_sha256: str = ""
    name: str = "wbc-resnet"
    format: str = ARTIFACT_FORMAT
    created_at: str = ""
    changelog: list[str] = field(default_factory=list)
    intended_use: str = (
        "Research and laboratory workflow support: pre-classifying single white-cell images "
        "from CellaVision-style analysers for review by a trained person. Not for diagnosis."
    )
    input: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    parent_digest: str = ""  # artifact digest of the version this one was derived from ("" for none)
    parent_version: str = ""

    @property
    def field_scale(self) -> float:
        """The magnification applied to every image before the network (:func:`wbc_batch.geometry.rescale_field`).

        1.0 except for a model adapted to a lab whose cells are another size
        than its first lab's; ``adapt`` writes it to ``preprocessing``.
        """
        return float(self.preprocessing.get("field_scale", 1.0))

    @property
    def wbc_classes(self) -> list[str]:
        """The classes that count as white cells in a differential."""
        return [c for c in self.class_names if c not in self.non_wbc_classes]

    def to_json(self) -> str:
        """Serialise to pretty JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        """Build from parsed JSON, refusing unknown formats and missing fields."""
        if data.get("format") != ARTIFACT_FORMAT:
            raise ModelArtifactError(f"expected model format {ARTIFACT_FORMAT!r}, got {data.get('format')!r}")
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("version", "class_names", "image_size", "gradcam_layer") if k not in data]
        if missing:
            raise ModelArtifactError(f"model.json lacks required fields: {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def default_input_contract(image_size: int) -> dict[str, Any]:
    """The documented input of the shipped architecture."""
    return {
        "shape": [None, image_size, image_size, 3],
        "dtype": "float32",
        "value_range": [0, 255],
        "channel_order": "RGB",
    }


def default_preprocessing(image_size: int) -> dict[str, Any]:
    """How images are turned into model input (see ``wbc_batch.imaging``)."""
    return {
        "decode": "cv2.imdecode IMREAD_COLOR (EXIF orientation applied, grey to 3 channels, alpha dropped, 16-bit to 8-bit)",
        "color": "BGR to RGB",
        "resize": f"cv2.resize to {image_size}x{image_size}, INTER_AREA, whole image (no crop)",
        "scaling": "none outside the model; the model's first layer (stain_norm) standardises each channel of each image",
    }


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a local file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_trusted_location(uri: str) -> bool:
    """Local artifacts are trusted; remote ones only under prefixes the operator lists.

    ``WBC_TRUSTED_MODEL_PREFIXES`` is a comma-separated list of URI prefixes.
    A prefix matches whole path segments only (``s3://lab/models`` trusts
    ``s3://lab/models/v3`` but not ``s3://lab/models-evil/v3``), and a URI
    with a ``..`` segment is never trusted.
    """
    if not storage.is_remote(uri):
        return True
    if ".." in uri.split("/"):
        return False
    prefixes = [p.strip().rstrip("/") for p in os.environ.get(TRUSTED_PREFIXES_ENV, "").split(",") if p.strip()]
    target = uri.rstrip("/")
    return any(p.startswith("s3://") and len(p) > len("s3://") and (target == p or target.startswith(p + "/"))
               for p in prefixes)


def shipped_model_dir() -> Path:
    """Folder of the model shipped with the package (the default for classify)."""
    return Path(__file__).resolve().parent / "models" / "wbc-resnet"


# --- the artifact digest -----------------------------------------------------


def artifact_listing(file_sha256: Mapping[str, str]) -> str:
    """The canonical listing an artifact digest is taken over.

    One line per file, ``<sha256>  <name>`` and a newline, sorted by name in
    code-point order, where ``name`` is the path inside the artifact folder
    with ``/`` separators: what ``sha256sum`` prints, so the digest can be
    checked by hand (README.md, "Security").

    Args:
        file_sha256: file name -> hex sha256 of its bytes.

    Raises:
        ModelArtifactError: a name holding a newline or starting with ``/``.
    """
    for name in file_sha256:
        if "\n" in name or "\r" in name or name.startswith("/") or not name:
            raise ModelArtifactError(f"cannot list artifact file name {name!r}")
    return "".join(f"{file_sha256[name]}  {name}\n" for name in sorted(file_sha256))


def digest_of_listing(file_sha256: Mapping[str, str]) -> str:
    """Hex sha256 of :func:`artifact_listing`: the artifact digest of these files."""
    return hashlib.sha256(artifact_listing(file_sha256).encode("utf-8")).hexdigest()


def normalise_digest(text: str) -> str:
    """A digest as given by a person (``sha256:`` prefix, upper case, spaces allowed) in canonical form.

    Raises:
        UsageError: not 64 hex digits.
    """
    value = str(text).strip().lower().removeprefix("sha256:")
    if not _HEX64.match(value):
        raise UsageError(f"--model-digest expects the 64 hex digits of an artifact digest "
                         f"(a run manifest's model.digest), got {text!r}")
    return value


def pinned_digest(option: str | None = None) -> str | None:
    """The artifact digest a run must use: ``--model-digest``, else ``WBC_MODEL_DIGEST``, else None (not pinned)."""
    value = option or os.environ.get(DIGEST_ENV, "").strip()
    return normalise_digest(value) if value else None


def _read_files(uri: str) -> dict[str, bytes]:
    """Every file of an artifact folder (local or S3), by its name inside the folder.

    Local symbolic links to files are read through (Keras would read them
    too); linked folders are not descended into.
    """
    files: dict[str, bytes] = {}
    if storage.is_remote(uri):
        prefix = uri.rstrip("/") + "/"
        for full in storage.list_files(uri):
            files[full[len(prefix):]] = storage.read_bytes(full)
    else:
        root = Path(uri)
        if not root.is_dir():
            raise ModelArtifactError(f"model artifact not found: {uri} is not a folder")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in filenames:
                path = Path(dirpath, name)
                if path.is_file():
                    files[path.relative_to(root).as_posix()] = path.read_bytes()
    if not files:
        raise ModelArtifactError(f"model artifact not found: no files under {uri}")
    return files


def artifact_digest(uri: str | os.PathLike[str] | None = None) -> str:
    """The digest over every file of an artifact (local or ``s3://``; None: the shipped model).

    Equal digests mean byte-identical artifacts: same weights, same
    model.json (temperature, thresholds, OOD statistics), same split.
    """
    files = _read_files(str(uri) if uri is not None else str(shipped_model_dir()))
    return digest_of_listing({name: hashlib.sha256(data).hexdigest() for name, data in files.items()})


def read_metadata(uri: str) -> ModelMetadata:
    """Read and validate ``model.json`` of an artifact without loading Keras."""
    try:
        raw = storage.read_bytes(storage.join(uri, META_FILE))
    except FileNotFoundError:
        raise ModelArtifactError(f"model artifact {uri} lacks {META_FILE}") from None
    return _parse_metadata(raw, uri)


def _parse_metadata(raw: bytes, uri: str) -> ModelMetadata:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelArtifactError(f"{META_FILE} of {uri} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelArtifactError(f"{META_FILE} of {uri} is not a JSON object")
    return ModelMetadata.from_dict(data)


@dataclass
class ModelArtifact:
    """A loaded, verified model and its metadata."""

    model: Any
    meta: ModelMetadata
    uri: str
    digest: str = ""  # artifact digest over every file (artifact_digest)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256


@dataclass
class _VerifiedFiles:
    files: dict[str, bytes]
    sha256: dict[str, str]
    digest: str
    meta: ModelMetadata


def _verified_files(uri: str, allow_untrusted: bool, expected_digest: str | None) -> _VerifiedFiles:
    """Read every file of an artifact once and run every check that needs no Keras."""
    if not allow_untrusted and not is_trusted_location(uri):
        raise ModelArtifactError(
            f"refusing model from untrusted location {uri}: pass --trust-model or list its prefix in {TRUSTED_PREFIXES_ENV}"
        )
    files = _read_files(uri)
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    digest = digest_of_listing(sha)
    if expected_digest is not None and digest != normalise_digest(expected_digest):
        raise ModelArtifactError(
            f"model {uri} has artifact digest {digest}, not the pinned {normalise_digest(expected_digest)} "
            f"(--model-digest or {DIGEST_ENV}); refusing another artifact"
        )
    if META_FILE not in files:
        raise ModelArtifactError(f"model artifact {uri} lacks {META_FILE}")
    meta = _parse_metadata(files[META_FILE], uri)
    if MODEL_FILE not in files:
        raise ModelArtifactError(f"model artifact {uri} lacks {MODEL_FILE}")
    if not meta.model_sha256:
        raise ModelArtifactError(f"{META_FILE} of {uri} has no model_sha256; refusing an unverifiable model")
    if sha[MODEL_FILE] != meta.model_sha256:
        raise ModelArtifactError(
            f"model file of {uri} does not match model.json: sha256 {sha[MODEL_FILE][:12]}... "
            f"expected {meta.model_sha256[:12]}..."
        )
    return _VerifiedFiles(files=files, sha256=sha, digest=digest, meta=meta)


def verify_artifact(uri: str | os.PathLike[str] | None = None, *, allow_untrusted: bool = False,
                    expected_digest: str | None = None) -> ModelArtifact:
    """Every check of :func:`load_artifact` that needs no Keras; the model is not loaded.

    For a driver that needs only the metadata and the digest (classify's:
    the model actors load the model): no TensorFlow import, no model build.

    Returns:
        A :class:`ModelArtifact` whose ``model`` is None.

    Raises:
        ModelArtifactError: as :func:`load_artifact`, except the checks made
            while Keras deserialises the model (``safe_mode``, output count).
    """
    uri = str(uri) if uri is not None else str(shipped_model_dir())
    checked = _verified_files(uri, allow_untrusted, expected_digest)
    return ModelArtifact(model=None, meta=checked.meta, uri=uri, digest=checked.digest, files=checked.sha256)


def load_artifact(uri: str | os.PathLike[str] | None = None, *, allow_untrusted: bool = False,
                  expected_digest: str | None = None) -> ModelArtifact:
    """Load and verify a model artifact.

    Every file is read once; the checks and Keras all see those bytes, so a
    file changed while loading cannot slip in between check and use.

    Args:
        uri: artifact folder (local path or ``s3://``); None for the shipped model.
        allow_untrusted: permit a remote location not listed in
            ``WBC_TRUSTED_MODEL_PREFIXES``.
        expected_digest: refuse the artifact unless its digest over every
            file (:func:`artifact_digest`) is this one (``--model-digest``).

    Returns:
        The Keras model (loaded with ``safe_mode=True``), its metadata, the
        artifact digest and each file's sha256.

    Raises:
        ModelArtifactError: missing files, bad metadata, untrusted location,
            a digest other than ``expected_digest``, or a model file whose
            sha256 differs from ``model.json``.
    """
    uri = str(uri) if uri is not None else str(shipped_model_dir())
    checked = _verified_files(uri, allow_untrusted, expected_digest)
    meta = checked.meta
    import keras

    tmp = Path(tempfile.mkdtemp(prefix="wbc-model-"))
    try:
        model_path = tmp / MODEL_FILE
        model_path.write_bytes(checked.files[MODEL_FILE])
        try:
            model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
        except ValueError as exc:  # safe_mode refuses Python lambdas and other code in the file
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ModelArtifactError(f"model file of {uri} refused by Keras safe_mode: {reason}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if int(model.output_shape[-1]) != len(meta.class_names):
        raise ModelArtifactError(
            f"model has {model.output_shape[-1]} outputs but model.json names {len(meta.class_names)} classes"
        )
    return ModelArtifact(model=model, meta=meta, uri=uri, digest=checked.digest, files=checked.sha256)


def write_derived_artifact(parent_uri: str | os.PathLike[str] | None, out_uri: str, updates: Mapping[str, Any], *,
                           version: str, note: str, allow_untrusted: bool = False) -> tuple[ModelMetadata, str]:
    """Write a new artifact version that differs from its parent only in ``model.json``.

    The one way to recalibrate, change a threshold or refit OOD statistics:
    the parent stays byte for byte as it was (rows that name its digest keep
    meaning what they meant), and the new folder records where it came from.

    Args:
        parent_uri: the verified parent artifact (None: the shipped model).
        out_uri: a new folder or ``s3://`` prefix; refused when it holds any file.
        updates: top-level ``model.json`` keys to set (``temperature``,
            ``review_threshold``, ``ood``, ``metrics`` ...); not the identity
            keys (version, format, model_sha256, parent_*, changelog, created_at).
        version: the new version string; must differ from the parent's.
        note: one changelog line saying what changed and how it was measured.
        allow_untrusted: read a parent from a remote location not listed as trusted.

    Returns:
        The new metadata and the new artifact's digest.

    Raises:
        ModelArtifactError: the parent fails verification, ``out_uri`` is not
            empty, ``version`` is the parent's, or ``updates`` sets an identity key.
    """
    parent = str(parent_uri) if parent_uri is not None else str(shipped_model_dir())
    checked = _verified_files(parent, allow_untrusted, None)
    bad = sorted(set(updates) & _IDENTITY_KEYS)
    if bad:
        raise ModelArtifactError(f"updates may not set {', '.join(bad)}: they are set from version and note")
    if not version or version == checked.meta.version:
        raise ModelArtifactError(f"a derived artifact needs a new version, got {version!r} (parent {checked.meta.version!r})")
    if not note.strip():
        raise ModelArtifactError("a derived artifact needs a changelog note saying what changed")
    try:
        existing = storage.list_files(out_uri)
    except FileNotFoundError:
        existing = []
    if existing:
        raise ModelArtifactError(f"refusing to write into {out_uri}: it already holds {len(existing)} file(s); "
                                 "artifacts are immutable, choose a new folder")
    data = json.loads(checked.files[META_FILE])
    data.update(updates)
    entry = f"{version}: {note.strip()} (derived from {checked.meta.version}, digest {checked.digest[:12]})"
    data.update(version=version, parent_digest=checked.digest, parent_version=checked.meta.version,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                changelog=[*data.get("changelog", []), entry])
    meta = ModelMetadata.from_dict(data)  # validate before writing anything
    for name in sorted(checked.files):
        if name != META_FILE:
            storage.write_bytes(storage.join(out_uri, name), checked.files[name])
    storage.write_bytes(storage.join(out_uri, META_FILE), (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
    return meta, artifact_digest(out_uri)


def _without_optimizer(model: Any) -> Any:
    """A weight-identical copy without optimizer state (a third of the file size)."""
    if getattr(model, "optimizer", None) is None:
        return model
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def save_artifact(model: Any, meta: ModelMetadata, out_uri: str, split_csv: str | None = None) -> ModelMetadata:
    """Write a model and its metadata as an artifact folder (local or S3).

    The sha256 is computed from the written file and stored in model.json,
    which is written last so a half-written artifact never loads.

    Returns:
        The metadata as written (with ``model_sha256`` filled in).
    """
    tmp = Path(tempfile.mkdtemp(prefix="wbc-save-"))
    try:
        _without_optimizer(model).save(tmp / MODEL_FILE)
        meta.model_sha256 = file_sha256(tmp / MODEL_FILE)
        if not meta.input:
            meta.input = default_input_contract(meta.image_size)
        if not meta.preprocessing:
            meta.preprocessing = default_preprocessing(meta.image_size)
        if not meta.outputs:
            meta.outputs = {"logits": {str(i): c for i, c in enumerate(meta.class_names)}}
        storage.write_bytes(storage.join(out_uri, MODEL_FILE), (tmp / MODEL_FILE).read_bytes())
        if split_csv is not None:
            storage.write_bytes(storage.join(out_uri, SPLIT_FILE), split_csv.encode())
        storage.write_bytes(storage.join(out_uri, META_FILE), meta.to_json().encode())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
