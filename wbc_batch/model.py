"""The versioned model artifact: a Keras file beside ``model.json``.

An artifact is a folder (local or ``s3://``)::

    model.keras   the Keras 3 model (no lambdas, loads with safe_mode=True)
    model.json    metadata: version, classes, input contract, Grad-CAM layer,
                  calibration temperature, review threshold, data fingerprint,
                  metrics, OOD statistics and the sha256 of model.keras
    split.csv     (optional) the train/val/test split it was trained with

Loading verifies the sha256 before Keras touches the file, so a tampered or
truncated model is refused with a clear error instead of being run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wbc_batch import storage

ARTIFACT_FORMAT = "wbc-batch-model/1"
MODEL_FILE = "model.keras"
META_FILE = "model.json"
SPLIT_FILE = "split.csv"
DEFAULT_REVIEW_THRESHOLD = 0.90
TRUSTED_PREFIXES_ENV = "WBC_TRUSTED_MODEL_PREFIXES"


class ModelArtifactError(RuntimeError):
    """A model artifact that is missing, malformed, tampered with or untrusted."""


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


def _materialise(uri: str) -> Path:
    """Return a local folder holding the artifact, downloading remote ones."""
    if not storage.is_remote(uri):
        path = Path(uri)
        if not path.is_dir():
            raise ModelArtifactError(f"model artifact not found: {uri} is not a folder")
        return path
    local = Path(tempfile.mkdtemp(prefix="wbc-model-"))
    for name in (META_FILE, MODEL_FILE):
        try:
            (local / name).write_bytes(storage.read_bytes(storage.join(uri, name)))
        except FileNotFoundError:
            raise ModelArtifactError(f"model artifact {uri} lacks {name}") from None
    return local


def read_metadata(uri: str) -> ModelMetadata:
    """Read and validate ``model.json`` of an artifact without loading Keras."""
    try:
        raw = storage.read_bytes(storage.join(uri, META_FILE))
    except FileNotFoundError:
        raise ModelArtifactError(f"model artifact {uri} lacks {META_FILE}") from None
    try:
        return ModelMetadata.from_dict(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise ModelArtifactError(f"{META_FILE} of {uri} is not valid JSON: {exc}") from None


@dataclass
class ModelArtifact:
    """A loaded, verified model and its metadata."""

    model: Any
    meta: ModelMetadata
    uri: str


def load_artifact(uri: str | os.PathLike[str] | None = None, *, allow_untrusted: bool = False) -> ModelArtifact:
    """Load and verify a model artifact.

    Args:
        uri: artifact folder (local path or ``s3://``); None for the shipped model.
        allow_untrusted: permit a remote location not listed in
            ``WBC_TRUSTED_MODEL_PREFIXES``.

    Returns:
        The Keras model (loaded with ``safe_mode=True``) and its metadata.

    Raises:
        ModelArtifactError: missing files, bad metadata, untrusted location or
            a model file whose sha256 differs from ``model.json``.
    """
    uri = str(uri) if uri is not None else str(shipped_model_dir())
    if not allow_untrusted and not is_trusted_location(uri):
        raise ModelArtifactError(
            f"refusing model from untrusted location {uri}: pass --trust-model or list its prefix in {TRUSTED_PREFIXES_ENV}"
        )
    local = _materialise(uri)
    meta = read_metadata(str(local))
    model_path = local / MODEL_FILE
    if not model_path.is_file():
        raise ModelArtifactError(f"model artifact {uri} lacks {MODEL_FILE}")
    actual = file_sha256(model_path)
    if not meta.model_sha256:
        raise ModelArtifactError(f"{META_FILE} of {uri} has no model_sha256; refusing an unverifiable model")
    if actual != meta.model_sha256:
        raise ModelArtifactError(
            f"model file of {uri} does not match model.json: sha256 {actual[:12]}... expected {meta.model_sha256[:12]}..."
        )
    import keras

    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except ValueError as exc:  # safe_mode refuses Python lambdas and other code in the file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelArtifactError(f"model file of {uri} refused by Keras safe_mode: {reason}") from None
    if int(model.output_shape[-1]) != len(meta.class_names):
        raise ModelArtifactError(
            f"model has {model.output_shape[-1]} outputs but model.json names {len(meta.class_names)} classes"
        )
    return ModelArtifact(model=model, meta=meta, uri=uri)


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
