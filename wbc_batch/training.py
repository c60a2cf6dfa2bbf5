"""Retraining on Ray Train, calibration, evaluation and promotion of the classifier.

Why it is built this way:

* Data is read through Ray Data (list, read, hash, decode, resize in
  ``map_batches``) so the same job scales from a laptop folder to an S3
  prefix on a cluster; the split is decided by content hash
  (:mod:`wbc_batch.splits`) and written with the model.
* Training runs on ``TensorflowTrainer`` with **tf-keras** and
  ``MultiWorkerMirroredStrategy``: Keras 3 cannot run that strategy
  (keras-team/keras#20585). The graph comes from
  :func:`wbc_batch.architecture.build_classifier`, so after training the
  weights move into a Keras 3 model of the same graph (``set_weights``), which
  is what the artifact stores and ``classify`` loads.
* Every epoch writes a checkpoint to the run's storage (local or S3). A
  worker failure restarts the group (``FailureConfig``) and the loop resumes
  from the latest checkpoint; re-running the same command resumes too (the run
  name is derived from the data fingerprint and settings).
* Each replica writes the SHA-256 of its trainable weights into the epoch's
  checkpoint, so anyone can verify that the gradients were synchronised.
* Temperature and review threshold are fitted on the validation split only;
  the test split is only ever reported.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wbc_batch import imaging, metrics, splits, storage
from wbc_batch.architecture import cam_grid_size
from wbc_batch.model import META_FILE, MODEL_FILE, SPLIT_FILE, ModelMetadata

log = logging.getLogger(__name__)

MATURE_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
LEGACY_KERAS_ENV = {"TF_USE_LEGACY_KERAS": "1"}
WEIGHTS_FILE = "weights.npz"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"
PRECISIONS: tuple[str, ...] = ("auto", "float32", "mixed_bfloat16")


def resolve_precision(requested: str, use_gpu: bool) -> str:
    """The Keras dtype policy a run trains under.

    Why ``auto`` picks bfloat16 where the hardware has it: on CPUs with AMX or
    AVX512-BF16 (and on GPUs) mixed bfloat16 trains this network twice as fast
    as float32 (145 against 72 images/s measured on 2 cores); weights stay
    float32, so the artifact and classify are unchanged. Elsewhere bfloat16 is
    emulated and slower, so ``auto`` keeps float32.
    """
    if requested != "auto":
        return requested
    if use_gpu:
        return "mixed_bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "mixed_bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"


class TrainingError(RuntimeError):
    """Training that cannot start or finish (no data, too few classes, no checkpoint)."""


# --- configuration ----------------------------------------------------------


@dataclass
class TrainConfig:
    """Settings of one training run; see ``wbc-batch train --help`` for each."""

    data_uri: str
    model_out: str
    workers: int = 2
    epochs: int = 30
    image_size: int = 128
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    storage_path: str | None = None
    run_name: str | None = None
    max_failures: int = 2
    publish: str | None = None
    ray_address: str | None = None
    version: str | None = None
    seed: int = 1234
    on_cell_weight: float = 0.0
    init_from: str | None = None
    precision: str = "auto"
    command: str = ""
    class_weight_factors: dict[str, float] = field(default_factory=dict)
    decode_batch_size: int = 32
    label_map: dict[str, str] = field(default_factory=lambda: dict(splits.DEFAULT_LABEL_MAP))
    # Resume-path testing only: the last worker dies after this epoch on the first attempt.
    fault_injection_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.image_size < imaging.MIN_SIDE:
            raise ValueError(f"image size must be >= {imaging.MIN_SIDE}, got {self.image_size}")
        if self.batch_size < self.workers:
            raise ValueError(f"batch size ({self.batch_size}) must be at least the number of workers ({self.workers})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.on_cell_weight < 0:
            raise ValueError(f"on-cell weight must be >= 0, got {self.on_cell_weight}")
        for name, factor in self.class_weight_factors.items():
            if factor <= 0:
                raise ValueError(f"class weight factor of {name} must be > 0, got {factor}")

    @classmethod
    def from_args(cls, args: Any) -> TrainConfig:
        """Build from the ``wbc-batch train`` namespace."""
        return cls(
            data_uri=args.data,
            model_out=args.model_out,
            workers=args.workers,
            epochs=args.epochs,
            image_size=args.image_size,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            cpus_per_worker=args.cpus_per_worker,
            use_gpu=args.use_gpu,
            storage_path=args.storage_path,
            max_failures=args.max_failures,
            publish=args.publish,
            ray_address=args.ray_address,
            version=args.version,
            on_cell_weight=args.on_cell_weight,
            init_from=args.init_from,
            precision=args.precision,
            command=getattr(args, "command_line", ""),
            weight_decay=args.weight_decay,
            seed=args.seed,
            class_weight_factors=dict(args.class_weight or {}),
        )

    def checkpoint_root(self) -> str:
        """Where Ray Train keeps this run's checkpoints (beside MODEL_OUT unless set)."""
        return self.storage_path or f"{str(self.model_out).rstrip('/')}-checkpoints"


# --- data -------------------------------------------------------------------


def list_labelled_files(data_uri: str, label_map: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Image files of a class-folder layout (``DATA/<class>/<file>``) with their labels.

    Files whose name is not an image are skipped with a warning; files that
    merely *look* like images are caught later, when decoding.

    Returns:
        Rows ``{"uri", "rel", "folder", "label"}`` sorted by URI.
    """
    root = str(data_uri).rstrip("/")
    rows: list[dict[str, str]] = []
    for uri in storage.list_files(root):
        rel = uri[len(root) :].lstrip("/")
        parts = rel.split("/")
        if len(parts) < 2:
            log.warning("skipping %s: not inside a class folder", uri)
            continue
        if not imaging.is_image_name(parts[-1]):
            log.warning("skipping %s: not an image file name", uri)
            continue
        folder = parts[0]
        rows.append({"uri": uri, "rel": rel, "folder": folder, "label": splits.label_for_folder(folder, label_map)})
    if not rows:
        raise TrainingError(f"no images in class folders under {data_uri}")
    return rows


def cell_grid(model_input: np.ndarray, grid: int) -> np.ndarray:
    """The segmented cell's share of each cell of a ``grid`` x ``grid`` partition of a model input.

    The on-cell loss compares a class-activation map of that grid with it;
    the mask is classify's (:func:`~wbc_batch.localisation.model_input_mask`).
    """
    import cv2

    from wbc_batch.localisation import model_input_mask

    mask = model_input_mask(model_input).astype(np.float32)
    return cv2.resize(mask, (grid, grid), interpolation=cv2.INTER_AREA)


def decode_batch(batch: dict[str, np.ndarray], image_size: int, grid: int = 0) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: read, hash, decode and resize each file.

    Files that are not decodable images keep their row with ``ok=False`` and
    the reason in ``error``, so the driver can warn about each one.

    Args:
        batch: columns ``uri``, ``rel``, ``label`` (object arrays).
        image_size: model input side S.

        grid: with ``grid > 0`` also ``cell_grid`` (B, grid, grid) float32,
            the cell masks the on-cell loss needs.

    Returns:
        The input columns plus ``sha256``, ``ok``, ``error`` and ``image``
        (B, S, S, 3) uint8 (zeros on failed rows).
    """
    n = len(batch["uri"])
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    cells = np.zeros((n, grid, grid), dtype=np.float32)
    sha = np.empty(n, dtype=object)
    ok = np.zeros(n, dtype=bool)
    error = np.empty(n, dtype=object)
    for i, uri in enumerate(batch["uri"]):
        data = storage.read_bytes(str(uri))
        sha[i] = splits.sha256_hex(data)
        error[i] = ""
        try:
            images[i] = imaging.resize_for_model(imaging.decode_image(data), image_size)
            if grid:
                cells[i] = cell_grid(images[i], grid)
            ok[i] = True
        except imaging.ImageDecodeError as exc:
            error[i] = str(exc)
    out = {**{k: batch[k] for k in ("uri", "rel", "label")}, "sha256": sha, "ok": ok, "error": error, "image": images}
    if grid:
        out["cell_grid"] = cells
    return out


def _failed_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    bad = ~batch["ok"].astype(bool)
    return {"uri": batch["uri"][bad], "error": batch["error"][bad]}


def _index_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    good = batch["ok"].astype(bool)
    return {k: batch[k][good] for k in ("uri", "rel", "label", "sha256")}


def _label_and_split(
    batch: dict[str, np.ndarray], split_of: dict[str, str], class_index: dict[str, int]
) -> dict[str, np.ndarray]:
    good = batch["ok"].astype(bool)
    out = {
        "image": batch["image"][good],
        "label_index": np.array([class_index[str(c)] for c in batch["label"][good]], dtype=np.int64),
        "split": np.array([split_of[str(s)] for s in batch["sha256"][good]], dtype=object),
    }
    if "cell_grid" in batch:
        out["cell_grid"] = batch["cell_grid"][good]
    return out


def _only_split(batch: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    keep = batch["split"] == split
    return {k: batch[k][keep] for k in ("image", "label_index", "cell_grid") if k in batch}


def data_fingerprint(items: list[splits.LabelledImage]) -> str:
    """SHA-256 over the sorted ``sha256,label`` pairs: the same images and labels give the same value."""
    lines = sorted(f"{i.sha256},{i.label}\n" for i in items)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def split_csv_text(items: list[splits.LabelledImage], split_of: dict[str, str]) -> str:
    """The ``split.csv`` written with the model: sha256,label,split,uri (URI relative to DATA)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sha256", "label", "split", "uri"])
    for it in sorted(items, key=lambda i: i.uri):
        writer.writerow([it.sha256, it.label, split_of[it.sha256], it.uri])
    return buf.getvalue()


def read_split_csv(artifact_uri: str) -> dict[str, str] | None:
    """sha256 -> split from an artifact's ``split.csv``; None when it has none."""
    try:
        raw = storage.read_bytes(storage.join(artifact_uri, SPLIT_FILE))
    except FileNotFoundError:
        return None
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    if reader.fieldnames is None or not {"sha256", "split"} <= set(reader.fieldnames):
        raise ValueError(f"{SPLIT_FILE} of {artifact_uri} lacks sha256/split columns")
    return {row["sha256"]: row["split"] for row in reader}


# --- the per-worker training loop -------------------------------------------


def weights_sha256(arrays: list[np.ndarray]) -> str:
    """SHA-256 over the bytes of a list of weight arrays, in order."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class AugmentSpec:
    """The one augmentation policy: every training path draws its views from it.

    Why these ranges: a smear has no up, so all 8 dihedral views are equally
    valid; labs differ in magnification and crop (120 px tight crops to wide
    fields), so the cell's scale varies by a factor of about two; and in stain,
    optics and camera (colour cast, washed-out contrast, soft focus, vignetting,
    sensor noise, JPEG re-encoding), which the photometric terms imitate. The
    model's first layer standardises each channel, so global per-channel gain
    and offset are removed anyway; hue, saturation, gamma and blur are not.
    """

    zoom: tuple[float, float] = (0.65, 1.35)
    rotate_degrees: float = 20.0
    shift: float = 0.06
    hue: float = 0.06
    saturation: tuple[float, float] = (0.5, 1.5)
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.45, 1.15)
    brightness: tuple[float, float] = (0.75, 1.2)
    channel_gain: tuple[float, float] = (0.85, 1.15)
    blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 2.2)
    noise_probability: float = 0.3
    noise_std: tuple[float, float] = (1.0, 8.0)
    jpeg_probability: float = 0.3
    jpeg_quality: tuple[int, int] = (35, 95)
    vignette_probability: float = 0.3
    vignette_strength: tuple[float, float] = (0.1, 0.45)

    def describe(self) -> dict[str, Any]:
        """The spec as plain values for ``model.json``."""
        return {"dihedral": "rot90 x flip", **asdict(self)}


AUGMENT = AugmentSpec()


def _affine(tf: Any, side: int, zoom: Any, angle: Any, tx: Any, ty: Any) -> Any:
    """(1, 8) projective transform (output -> input coordinates) zooming and turning about the centre."""
    c = (side - 1) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = c - a0 * c - a1 * c + tx * side
    b2 = c - b0 * c - b1 * c + ty * side
    zero = tf.zeros_like(cos)
    return tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, zero, zero]), [1, 8])


def _warp(tf: Any, image: Any, transform: Any, fill_mode: str) -> Any:
    """Apply a projective transform to one (H, W, C) float32 image."""
    side = tf.shape(image)[0:2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=side, fill_value=0.0,
        interpolation="BILINEAR", fill_mode=fill_mode,
    )[0]


def _gaussian_blur(tf: Any, image: Any, sigma: Any) -> Any:
    """Separable 9-tap Gaussian blur of one (H, W, 3) image."""
    x = tf.range(-4.0, 5.0)
    k = tf.exp(-0.5 * tf.square(x / sigma))
    k = k / tf.reduce_sum(k)
    kx = tf.tile(tf.reshape(k, [1, 9, 1, 1]), [1, 1, 3, 1])
    ky = tf.tile(tf.reshape(k, [9, 1, 1, 1]), [1, 1, 3, 1])
    out = tf.nn.depthwise_conv2d(image[None], kx, [1, 1, 1, 1], "SAME")
    return tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "SAME")[0]


def _chance(tf: Any, p: float) -> Any:
    return tf.random.uniform([]) < p


def _uniform(tf: Any, bounds: tuple[float, float]) -> Any:
    return tf.random.uniform([], float(bounds[0]), float(bounds[1]))


def augment(tf: Any, image: Any, seed: Any = None, mask: Any = None, spec: AugmentSpec = AUGMENT) -> Any:
    """One random view of a cell under ``spec``, as TensorFlow ops (usable in ``tf.data``).

    Args:
        tf: the TensorFlow module.
        image: (S, S, 3) float32 RGB in [0, 255].
        mask: optional (g, g) cell grid: it follows the same rotation, flip,
            zoom and shift (areas brought in from outside count as off-cell).
        spec: the policy (default :data:`AUGMENT`).

    Returns:
        (S, S, 3) float32 in [0, 255]; with ``mask``, the pair (image, mask).
    """
    import math

    k = tf.random.uniform([], 0, 4, dtype=tf.int32)
    flip = _chance(tf, 0.5)
    image = tf.image.rot90(image, k)
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    zoom = tf.exp(_uniform(tf, (math.log(spec.zoom[0]), math.log(spec.zoom[1]))))
    angle = _uniform(tf, (-spec.rotate_degrees, spec.rotate_degrees)) * (math.pi / 180.0)
    tx, ty = _uniform(tf, (-spec.shift, spec.shift)), _uniform(tf, (-spec.shift, spec.shift))
    side = int(image.shape[0])
    image = _warp(tf, image, _affine(tf, side, zoom, angle, tx, ty), "REFLECT")
    if mask is not None:
        g = int(mask.shape[0])
        mask = tf.image.rot90(mask[..., None], k)
        mask = tf.cond(flip, lambda: tf.image.flip_left_right(mask), lambda: mask)
        mask = _warp(tf, mask, _affine(tf, g, zoom, angle, tx, ty), "CONSTANT")[..., 0]

    x = image / 255.0
    x = tf.image.adjust_hue(x, _uniform(tf, (-spec.hue, spec.hue)))
    x = tf.image.adjust_saturation(x, _uniform(tf, spec.saturation))
    x = tf.pow(tf.clip_by_value(x, 0.0, 1.0), _uniform(tf, spec.gamma))
    mean = tf.reduce_mean(x, axis=(0, 1), keepdims=True)
    x = (x - mean) * _uniform(tf, spec.contrast) + mean * _uniform(tf, spec.brightness)
    x = x * tf.random.uniform([1, 1, 3], spec.channel_gain[0], spec.channel_gain[1])
    x = tf.clip_by_value(x, 0.0, 1.0) * 255.0
    x = tf.cond(_chance(tf, spec.blur_probability),
                lambda: _gaussian_blur(tf, x, _uniform(tf, spec.blur_sigma)), lambda: x)
    yy, xx = tf.meshgrid(tf.linspace(-1.0, 1.0, side), tf.linspace(-1.0, 1.0, side), indexing="ij")
    vignette = 1.0 - _uniform(tf, spec.vignette_strength) * (tf.square(xx) + tf.square(yy)) / 2.0
    x = tf.cond(_chance(tf, spec.vignette_probability), lambda: x * vignette[..., None], lambda: x)
    x = tf.cond(_chance(tf, spec.noise_probability),
                lambda: x + tf.random.normal(tf.shape(x), stddev=_uniform(tf, spec.noise_std)), lambda: x)
    x = tf.clip_by_value(x, 0.0, 255.0)

    def jpeg() -> Any:
        quality = tf.random.uniform([], spec.jpeg_quality[0], spec.jpeg_quality[1] + 1, dtype=tf.int32)
        encoded = tf.image.adjust_jpeg_quality(tf.cast(tf.round(x), tf.uint8), quality)
        return tf.cast(encoded, tf.float32)

    x = tf.cond(_chance(tf, spec.jpeg_probability), jpeg, lambda: x)
    x = tf.ensure_shape(x, [side, side, 3])
    return x if mask is None else (x, mask)


def _load_shard(shard: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    xs, ys, ms = [], [], []
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        xs.append(batch["image"])
        ys.append(batch["label_index"])
        if "cell_grid" in batch:
            ms.append(batch["cell_grid"])
    if not xs:
        raise TrainingError("this worker received no training images")
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), (np.concatenate(ms) if ms else None)


def outside_share(tf: Any, feats: Any, kernel: Any, labels: Any, cells: Any) -> Any:
    """(B,) share of each image's true-class map ``relu(A @ w_label)`` that lies outside its cell grid.

    Args:
        tf: the TensorFlow module.
        feats: (B, g, g, C) last-stage features; kernel: (C, K) logits weights.
        labels: (B,) int class per image; cells: (B, g, g) cell share per grid cell.
    """
    w = tf.gather(tf.transpose(tf.cast(kernel, tf.float32)), tf.cast(labels, tf.int32))
    cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", tf.cast(feats, tf.float32), w))
    return tf.reduce_sum(cam * (1.0 - cells), axis=(1, 2)) / (tf.reduce_sum(cam, axis=(1, 2)) + 1e-6)


def on_cell_model(tf_keras: Any, classifier: Any, cam_layer: str, logits_layer: str, weight: float) -> Any:
    """Wrap a classifier so ``fit`` adds the on-cell term to the loss.

    Why: with global average pooling before one dense layer, the map
    ``relu(A @ w_c)`` on the last stage is exactly each location's
    contribution to the logit of ``c`` (what Grad-CAM shows). The term is the
    share of the true class's map outside the segmented cell, so the network
    learns to take its evidence from the cell rather than its surroundings
    (docs/EXPLANATIONS.md; ``tools/finetune_on_cell.py`` made model 1.1.0
    this way). The wrapper shares the classifier's variables; data are
    ``(image, (label, cell_grid), sample_weight)``.
    """
    import tensorflow as tf

    view = tf_keras.Model(classifier.inputs, [classifier.get_layer(cam_layer).output, classifier.output])
    dense = classifier.get_layer(logits_layer)
    ce_loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    class OnCell(tf_keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = classifier
            self.loss_tracker = tf_keras.metrics.Mean(name="loss")
            self.outside_tracker = tf_keras.metrics.Mean(name="outside")
            self.acc = tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")

        def call(self, inputs: Any, training: bool = False) -> Any:
            return self.classifier(inputs, training=training)

        @property
        def metrics(self) -> list[Any]:
            return [self.loss_tracker, self.outside_tracker, self.acc]

        def train_step(self, data: Any) -> dict[str, Any]:
            images, (labels, cells), weights = data
            with tf.GradientTape() as tape:
                feats, logits = view(images, training=True)
                ce = tf.reduce_sum(ce_loss(labels, logits) * weights) / tf.maximum(tf.reduce_sum(weights), 1e-6)
                outside = tf.reduce_mean(outside_share(tf, feats, dense.kernel, labels, cells))
                loss = ce + weight * outside
                # MirroredStrategy sums gradients over replicas: scale as Keras does for its own losses
                scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
            grads = tape.gradient(scaled, classifier.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, classifier.trainable_variables))
            self.loss_tracker.update_state(loss)
            self.outside_tracker.update_state(outside)
            self.acc.update_state(labels, logits)
            return {m.name: m.result() for m in self.metrics}

    return OnCell()


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Body of each Ray Train worker: tf-keras under ``MultiWorkerMirroredStrategy``.

    Each epoch ends with ``ray.train.report`` and a checkpoint folder
    ``epoch-NNNN`` holding the weights and optimizer state (rank 0) and one
    ``replica-<rank>.json`` per worker with the SHA-256 of its trainable weights.
    """
    os.environ.update(LEGACY_KERAS_ENV)
    import ray.train
    import tensorflow as tf
    import tf_keras

    from wbc_batch.architecture import build_classifier

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = max(1, int(cfg.get("cpus_per_worker", 1)))
    # intra-op only: collective all-reduce ops block an inter-op thread while they
    # wait for the peers, so a single inter-op thread deadlocks the strategy
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf_keras.utils.set_random_seed(int(cfg["seed"]))
    tf_keras.mixed_precision.set_global_policy(str(cfg.get("precision", "float32")))
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    x, y, cells = _load_shard(ray.train.get_dataset_shard("train"))
    on_cell = float(cfg.get("on_cell_weight", 0.0))
    if on_cell > 0 and cells is None:
        raise TrainingError("the on-cell loss needs cell grids in the training data")
    class_weights = np.asarray(cfg["class_weights"], dtype=np.float32)
    w = class_weights[y]
    steps, epochs, global_batch = int(cfg["steps_per_epoch"]), int(cfg["epochs"]), int(cfg["batch_size"])

    def dataset_fn(input_context: Any) -> Any:
        per_replica = input_context.get_per_replica_batch_size(global_batch)

        def view(im: Any, lab: Any, wt: Any, *cell: Any) -> Any:
            if not cell:
                return augment(tf, tf.cast(im, tf.float32)), lab, wt
            im, grid = augment(tf, tf.cast(im, tf.float32), mask=cell[0])
            return im, (lab, grid), wt  # the on-cell wrapper reads (label, cell grid)

        ds = tf.data.Dataset.from_tensor_slices((x, y, w, cells) if on_cell > 0 else (x, y, w))
        ds = ds.shuffle(len(x), seed=int(cfg["seed"]) + rank, reshuffle_each_iteration=True).repeat()
        ds = ds.map(view, num_parallel_calls=threads)
        ds = ds.batch(per_replica, drop_remainder=True).prefetch(2)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options)

    with strategy.scope():
        model = build_classifier(tf_keras, int(cfg["num_classes"]), image_size=int(cfg["image_size"]))
        total = epochs * steps
        warm = min(3 * steps, max(1, total // 10))
        schedule = tf_keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=max(1, total - warm),
            alpha=1e-3,
            warmup_target=float(cfg["learning_rate"]),
            warmup_steps=warm,
        )
        optimizer = tf_keras.optimizers.AdamW(learning_rate=schedule, weight_decay=float(cfg["weight_decay"]))
        if on_cell > 0:
            from wbc_batch.architecture import CAM_LAYER, LOGITS_LAYER

            fitter = on_cell_model(tf_keras, model, CAM_LAYER, LOGITS_LAYER, on_cell)
            fitter.compile(optimizer=optimizer)
        else:
            fitter = model
            model.compile(
                optimizer=optimizer,
                loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                weighted_metrics=["accuracy"],
            )
        optimizer.build(model.trainable_variables)
        if cfg.get("initial_weights") is not None:  # fine-tuning (--init-from); a checkpoint below overrides it
            model.set_weights(list(cfg["initial_weights"]))

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = json.loads(Path(d, STATE_FILE).read_text())
            saved = np.load(Path(d, WEIGHTS_FILE))
            model.set_weights([saved[k] for k in sorted(saved.files)])
            saved_opt = np.load(Path(d, OPTIMIZER_FILE))
            for var, key in zip(optimizer.variables, sorted(saved_opt.files)):
                var.assign(saved_opt[key])
        start_epoch = int(state["epoch"]) + 1

    creator = tf_keras.utils.experimental.DatasetCreator(dataset_fn)
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        hist = fitter.fit(creator, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps, verbose=0)
        # every rank must read the weights: BatchNormalization's moving statistics are
        # sync-on-read variables, and reading them is an all-reduce (the mean over workers)
        weights = model.get_weights()
        opt_state = [v.numpy() for v in optimizer.variables]
        digest = weights_sha256([v.numpy() for v in model.trainable_variables])
        epoch_metrics = {
            "epoch": epoch,
            "start_epoch": start_epoch,
            "loss": float(hist.history["loss"][-1]),
            "accuracy": float(hist.history["accuracy"][-1]),
            "epoch_seconds": time.time() - t0,
            "trainable_sha256": digest,
            "world_size": world,
        }
        if "outside" in hist.history:  # the on-cell term: share of the true class's evidence outside the cell
            epoch_metrics["outside_share"] = float(hist.history["outside"][-1])
        with tempfile.TemporaryDirectory() as d:
            replica = {"rank": rank, "epoch": epoch, "trainable_sha256": digest}
            Path(d, f"replica-{rank}.json").write_text(json.dumps(replica))
            if rank == 0:
                np.savez(Path(d, WEIGHTS_FILE), **{f"w{i:04d}": a for i, a in enumerate(weights)})
                np.savez(Path(d, OPTIMIZER_FILE), **{f"v{i:04d}": a for i, a in enumerate(opt_state)})
                Path(d, STATE_FILE).write_text(json.dumps(epoch_metrics))
            ray.train.report(
                epoch_metrics,
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"epoch-{epoch:04d}",
            )
        crash_at = cfg.get("fault_injection_epoch")
        if crash_at is not None and rank == world - 1 and epoch == int(crash_at) and start_epoch == 0:
            time.sleep(5)  # let the controller register this epoch's checkpoint first
            os._exit(1)  # a real worker death, to exercise FailureConfig and the resume path


# --- driver -----------------------------------------------------------------


def _dashboard_running() -> bool:
    """True when the connected Ray cluster serves the dashboard (and with it the state API)."""
    from ray._private.worker import get_dashboard_url

    try:
        return bool(get_dashboard_url())
    except Exception:  # noqa: BLE001 - any failure means no usable state API
        return False


def _trainer_class() -> type:
    """``TensorflowTrainer``, minus Ray 2.60's placement-group cleaner when there is no dashboard.

    Why: the cleaner asks the state API (served by the dashboard) whether the
    train controller is alive. Without a dashboard (``include_dashboard=False``,
    as in tests and on minimal clusters) the answer is empty, the cleaner reads
    that as "dead" and removes the placement group of the *running* workers,
    which kills them mid-epoch. The cleaner only matters when the controller
    dies uncleanly, so dropping it there is the lesser evil.
    """
    from ray.train.tensorflow import TensorflowTrainer

    class WbcTensorflowTrainer(TensorflowTrainer):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if _dashboard_running():
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return WbcTensorflowTrainer


def _ensure_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def keep_earlier_split(split_of: dict[str, str], earlier: dict[str, str] | None) -> dict[str, str]:
    """The content-hash split, except that images an earlier model held out stay held out.

    Why: a model fine-tuned from another must never train on that model's
    validation or test images, even when the dataset has grown and the
    hash-ordered cut of a class has moved.
    """
    if not earlier:
        return dict(split_of)
    return {sha: (earlier[sha] if earlier.get(sha) in ("val", "test") else split) for sha, split in split_of.items()}


def _prepare_data(config: TrainConfig, earlier_split: dict[str, str] | None = None) -> dict[str, Any]:
    """List, read, hash, decode and split DATA through Ray Data."""
    import ray

    rows = list_labelled_files(config.data_uri, config.label_map)
    grid = cam_grid_size(config.image_size) if config.on_cell_weight > 0 else 0
    ds = ray.data.from_items(rows).map_batches(
        decode_batch,
        fn_kwargs={"image_size": config.image_size, "grid": grid},
        batch_size=config.decode_batch_size,
        batch_format="numpy",
    )
    ds = ds.materialize()
    for bad in ds.map_batches(_failed_rows, batch_format="numpy").take_all():
        log.warning("skipping %s: %s", bad["uri"], bad["error"])
    index = ds.map_batches(_index_rows, batch_format="numpy").take_all()
    items = [
        splits.LabelledImage(str(r["rel"]), str(r["sha256"]), str(r["label"]), str(r["rel"]).split("/")[0])
        for r in index
    ]
    if not items:
        raise TrainingError(f"no decodable images under {config.data_uri}")
    classes = sorted({it.label for it in items})
    if len(classes) < 2:
        raise TrainingError(f"expected at least 2 classes under {config.data_uri}, got {classes}")
    split_of = keep_earlier_split(splits.assign_splits(items), earlier_split)
    class_index = {c: i for i, c in enumerate(classes)}
    labelled = ds.map_batches(
        _label_and_split, fn_kwargs={"split_of": split_of, "class_index": class_index}, batch_format="numpy"
    ).materialize()
    counts = Counter(split_of[it.sha256] for it in items)
    train_labels = Counter(it.label for it in items if split_of[it.sha256] == "train")
    for name in ("train", "val"):
        if counts.get(name, 0) == 0:
            raise TrainingError(f"the {name} split is empty: {len(items)} images are too few to train")
    return {
        "items": items,
        "classes": classes,
        "split_of": split_of,
        "labelled": labelled,
        "split_counts": {s: counts.get(s, 0) for s in splits.SPLITS},
        "train_label_counts": {c: train_labels.get(c, 0) for c in classes},
        "fingerprint": data_fingerprint(items),
    }


def _split_arrays(labelled: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    return _arrays(labelled.map_batches(_only_split, fn_kwargs={"split": split}, batch_format="numpy"))


def _arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Images and class indices of a (split) dataset as two arrays."""
    xs, ys = [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        xs.append(batch["image"])
        ys.append(batch["label_index"])
    if not xs:
        return np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def balanced_class_weights(counts: list[int]) -> list[float]:
    """n / (C * n_c) per class: every class contributes equally to the loss (absent classes get 0)."""
    total, k = sum(counts), len(counts)
    return [total / (k * c) if c else 0.0 for c in counts]


def scaled_class_weights(classes: list[str], weights: list[float], factors: dict[str, float]) -> list[float]:
    """Balanced weights times ``--class-weight`` factors (e.g. ``non_wbc=2``: a missed platelet costs double).

    Raises:
        TrainingError: a factor names a class the data does not have.
    """
    unknown = sorted(set(factors) - set(classes))
    if unknown:
        raise TrainingError(f"--class-weight names {unknown}, which are not classes of the data {classes}")
    return [w * float(factors.get(c, 1.0)) for c, w in zip(classes, weights)]


def initial_weights(config: TrainConfig, classes: list[str]) -> tuple[list[np.ndarray] | None, dict[str, Any]]:
    """Weights and provenance of ``--init-from`` (fine-tuning), or ``(None, {})`` to start from scratch.

    The artifact is loaded and verified like any model (sha256, ``safe_mode``);
    it must have the data's classes, in order, and the run's input size.
    """
    if not config.init_from:
        return None, {}
    from wbc_batch.model import load_artifact

    artifact = load_artifact(config.init_from, allow_untrusted=True)
    meta = artifact.meta
    if list(meta.class_names) != list(classes):
        raise TrainingError(f"--init-from model has classes {meta.class_names}, the data has {classes}")
    if int(meta.image_size) != config.image_size:
        raise TrainingError(f"--init-from model takes {meta.image_size} px images, this run {config.image_size} px")
    origin = {"uri": str(config.init_from), "version": meta.version, "model_sha256": meta.model_sha256}
    return [np.asarray(w) for w in artifact.model.get_weights()], origin


def _predict_logits(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for uint8 or float images, in batches (float32 0..255 in, as classify does)."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(np.asarray(model.predict_on_batch(images[i : i + batch_size].astype(np.float32))))
    return np.concatenate(out) if out else np.zeros((0, int(model.output_shape[-1])), np.float32)


def predict_embeddings(model: Any, embedding_layer: str, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pooled embeddings (the tensor classify's OOD score reads), in batches, without Grad-CAM's backward pass."""
    import keras

    sub = keras.Model(model.inputs, model.get_layer(embedding_layer).output)
    out = [np.asarray(sub.predict_on_batch(images[i : i + batch_size].astype(np.float32)))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, int(sub.output_shape[-1])), np.float32)


def fit_ood_statistics(model: Any, embedding_layer: str, x_train: np.ndarray, y_train: np.ndarray,
                       x_val: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The OOD statistics classify needs, fitted on train and thresholded on val.

    Why here: the score compares a new image with what *this* network saw,
    so each trained artifact carries its own statistics (``model.json["ood"]``);
    an empty dict (OOD off, with a warning) when the splits are too small.
    """
    from wbc_batch.ood import fit_ood

    if len(x_train) < 2 or len(x_val) < 2:
        log.warning("OOD statistics not fitted: %d train and %d val images", len(x_train), len(x_val))
        return {}
    return fit_ood(
        predict_embeddings(model, embedding_layer, x_train), y_train, x_train,
        predict_embeddings(model, embedding_layer, x_val), x_val, num_classes=num_classes,
    )


def _run_name(config: TrainConfig, fingerprint: str) -> str:
    """Same data and settings give the same name, so re-running a killed job resumes it."""
    c = config
    settings = "-".join(
        str(v)
        for v in (c.image_size, c.epochs, c.batch_size, c.learning_rate, c.workers, c.seed, c.on_cell_weight,
                  sorted(c.class_weight_factors.items()), c.init_from, c.weight_decay, c.precision)
    )
    return config.run_name or f"wbc-train-{fingerprint[:12]}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def provenance(config: TrainConfig, t_start: float) -> dict[str, Any]:
    """What anyone needs to rebuild an artifact: command, commit, package versions, hardware, wall time."""
    import platform
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {
        "command": config.command or None,
        "git_commit": commit,
        "packages": {n: package(n) for n in ("wbc-batch", "tensorflow", "tf-keras", "keras", "ray", "numpy",
                                              "opencv-python-headless")},
        "python": platform.python_version(),
        "hardware": {"cpu": cpu, "cpu_count": os.cpu_count(), "workers": config.workers,
                     "cpus_per_worker": config.cpus_per_worker, "use_gpu": config.use_gpu},
        "wall_seconds_to_artifact": round(time.time() - t_start, 1),
        "argv": list(sys.argv),
    }


def _read_replica_digests(checkpoint_dir: Path) -> dict[str, str]:
    return {
        str(json.loads(p.read_text())["rank"]): json.loads(p.read_text())["trainable_sha256"]
        for p in sorted(checkpoint_dir.glob("replica-*.json"))
    }


def calibration_from_val(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Temperature (NLL on val) and the review threshold on val.

    The threshold is the lowest whose accepted validation cells reach 99.5%
    accuracy with 95% one-sided confidence (Clopper-Pearson), so that it
    still holds on cells the model has not seen.

    Returns:
        ``{"temperature", "review_threshold", "val_coverage", "val_n"}``.
    """
    if len(labels) == 0:
        raise TrainingError("cannot calibrate on an empty validation split")
    temperature = metrics.fit_temperature(logits, labels)
    probs = metrics.softmax(logits, temperature)
    threshold, coverage = metrics.review_threshold_with_margin(probs.max(axis=1), probs.argmax(axis=1) == labels)
    return {
        "temperature": temperature,
        "review_threshold": threshold,
        "val_coverage": coverage,
        "val_n": int(len(labels)),
    }


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train, calibrate, evaluate and write a candidate artifact; publish if asked.

    Returns:
        A summary: ``model_out``, ``version``, ``classes``, ``split_counts``,
        ``calibration``, ``metrics`` (test split), ``final_epoch`` (rank-0
        metrics of the last epoch), ``replica_trainable_sha256`` (per rank),
        ``checkpoint``, ``train_seconds`` and ``publish`` (when requested).

    Raises:
        TrainingError: no images, fewer than 2 classes, empty splits, or a run
            that ended without a checkpoint.
    """
    import keras
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from wbc_batch.architecture import CAM_LAYER, EMBEDDING_LAYER, build_classifier
    from wbc_batch.model import save_artifact

    t_start = time.time()
    _ensure_ray(config.ray_address)
    data = _prepare_data(config, read_split_csv(config.init_from) if config.init_from else None)
    classes: list[str] = data["classes"]
    init_weights, init_origin = initial_weights(config, classes)
    train_ds = data["labelled"].map_batches(_only_split, fn_kwargs={"split": "train"}, batch_format="numpy")
    train_ds = train_ds.materialize()
    n_train = data["split_counts"]["train"]
    steps = max(1, n_train // config.batch_size)
    class_weights = scaled_class_weights(
        classes, balanced_class_weights([data["train_label_counts"][c] for c in classes]), config.class_weight_factors
    )
    run_name = _run_name(config, data["fingerprint"])
    precision = resolve_precision(config.precision, config.use_gpu)
    root = config.checkpoint_root()
    if storage.is_remote(root):
        fs, path = storage.arrow_filesystem(root)
        storage_kwargs: dict[str, Any] = {"storage_path": path, "storage_filesystem": fs}
    else:
        storage_kwargs = {"storage_path": str(Path(root).resolve())}
    trainer = _trainer_class()(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={
            "num_classes": len(classes),
            "image_size": config.image_size,
            "epochs": config.epochs,
            "steps_per_epoch": steps,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay,
            "class_weights": class_weights,
            "seed": config.seed,
            "cpus_per_worker": config.cpus_per_worker,
            "fault_injection_epoch": config.fault_injection_epoch,
            "on_cell_weight": config.on_cell_weight,
            "initial_weights": init_weights,
            "precision": precision,
        },
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": dict(LEGACY_KERAS_ENV)},
            **storage_kwargs,
        ),
        datasets={"train": train_ds},
    )
    t_train = time.time()
    result = trainer.fit()
    train_seconds = time.time() - t_train
    if result.checkpoint is None:
        raise TrainingError(f"training run {run_name} ended without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        saved = np.load(Path(d, WEIGHTS_FILE))
        weights = [saved[k] for k in sorted(saved.files)]
        replica_digests = _read_replica_digests(Path(d))
        final_state = json.loads(Path(d, STATE_FILE).read_text())

    model = build_classifier(keras, len(classes), image_size=config.image_size)
    model.set_weights(weights)
    x_val, y_val = _split_arrays(data["labelled"], "val")
    calibration = calibration_from_val(_predict_logits(model, x_val), y_val)
    x_train, y_train = _arrays(train_ds)  # materialised above for the trainer
    ood_stats = fit_ood_statistics(model, EMBEDDING_LAYER, x_train, y_train, x_val, len(classes))
    del x_train
    x_test, y_test = _split_arrays(data["labelled"], "test")
    non_wbc = [c for c in classes if c == splits.NON_WBC]
    wbc = [c for c in classes if c not in non_wbc]
    test_report: dict[str, Any] = {}
    if len(y_test):
        test_report = metrics.classification_report(
            _predict_logits(model, x_test),
            y_test,
            classes,
            calibration["temperature"],
            calibration["review_threshold"],
            subsets={"wbc": wbc, "mature5": list(MATURE_CLASSES)},
        )
    version = config.version or f"{datetime.now(timezone.utc):%Y%m%d.%H%M%S}-{data['fingerprint'][:8]}"
    meta = ModelMetadata(
        version=version,
        class_names=classes,
        image_size=config.image_size,
        gradcam_layer=CAM_LAYER,
        embedding_layer=EMBEDDING_LAYER,
        temperature=calibration["temperature"],
        review_threshold=calibration["review_threshold"],
        non_wbc_classes=non_wbc,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        changelog=[
            f"{version}: trained by wbc_batch.training on {config.data_uri}"
            + (f", fine-tuned from {init_origin['version']} ({init_origin['uri']})" if init_origin else "")
        ],
        training_data={
            "source": config.data_uri,
            "fingerprint_sha256": data["fingerprint"],
            "n_images": len(data["items"]),
            "split_counts": data["split_counts"],
            "label_map": config.label_map,
        },
        training={
            "trainer": "wbc_batch.training (Ray Train TensorflowTrainer, tf-keras, MultiWorkerMirroredStrategy)",
            "workers": config.workers,
            "epochs": config.epochs,
            "train_seconds": round(train_seconds, 1),
            "optimizer": f"AdamW lr {config.learning_rate} warm-up + cosine, weight decay {config.weight_decay}, "
            f"global batch {config.batch_size}",
            "augmentation": AUGMENT.describe(),
            "precision": precision,
            "provenance": provenance(config, t_start),
            "class_weights": {c: round(w, 4) for c, w in zip(classes, class_weights)},
            "run_name": run_name,
            "final_epoch": final_state,
            "on_cell_weight": config.on_cell_weight,
            **({"init_from": init_origin} if init_origin else {}),
        },
        metrics={"split": "test", **test_report, "calibration": calibration}
        if test_report
        else {"calibration": calibration},
        ood=ood_stats,
    )
    split_text = split_csv_text(data["items"], data["split_of"])
    save_artifact(model, meta, config.model_out, split_csv=split_text)
    summary: dict[str, Any] = {
        "model_out": config.model_out,
        "version": version,
        "classes": classes,
        "split_counts": data["split_counts"],
        "calibration": calibration,
        "metrics": test_report,
        "final_epoch": final_state,
        "replica_trainable_sha256": replica_digests,
        "checkpoint": result.checkpoint.path,
        "run_name": run_name,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t_start,
    }
    if config.publish:
        summary["publish"] = publish(config.model_out, config.publish, config.data_uri)
    return summary


# --- evaluation ---------------------------------------------------------------


def _read_and_hash(uri: str) -> tuple[str, bytes]:
    data = storage.read_bytes(uri)
    return splits.sha256_hex(data), data


def collect_logits(
    artifact: Any,
    data_uri: str,
    split: str | None = "test",
    split_of: dict[str, str] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Run a loaded artifact over the labelled images of one split.

    Args:
        artifact: a :class:`wbc_batch.model.ModelArtifact`.
        data_uri: class-folder layout, local or ``s3://``.
        split: which split to keep; None for every image.
        split_of: sha256 -> split; None to use every image.

    Returns:
        ``{"logits" (N, C), "labels" (N,), "uris", "skipped" [{uri, reason}], "split_source"}``.
    """
    meta = artifact.meta
    label_map = meta.training_data.get("label_map") or splits.DEFAULT_LABEL_MAP
    rows = list_labelled_files(data_uri, label_map)
    names = list(meta.class_names)
    skipped: list[dict[str, str]] = []
    chosen: list[tuple[str, int, bytes]] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for row, (sha, data) in zip(rows, pool.map(lambda r: _read_and_hash(r["uri"]), rows)):
            if split is not None and split_of is not None and split_of.get(sha) != split:
                continue
            if row["label"] not in names:
                reason = f"class {row['label']!r} is not one of the model's classes"
                skipped.append({"uri": row["uri"], "reason": reason})
                continue
            chosen.append((row["uri"], names.index(row["label"]), data))

    def decode(entry: tuple[str, int, bytes]) -> np.ndarray | str:
        try:
            return imaging.decode_image(entry[2])
        except imaging.ImageDecodeError as exc:
            return str(exc)

    logits, labels, uris = [], [], []
    size = meta.image_size
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(chosen), batch_size):
            part = chosen[start : start + batch_size]
            images, keep = [], []
            for entry, rgb in zip(part, pool.map(decode, part)):
                if isinstance(rgb, str):
                    log.warning("skipping %s: %s", entry[0], rgb)
                    skipped.append({"uri": entry[0], "reason": rgb})
                    continue
                images.append(rgb)
                keep.append(entry)
            if not images:
                continue
            batch = imaging.prepare_batch(images, size)
            logits.append(np.asarray(artifact.model.predict_on_batch(batch)))
            labels.extend(e[1] for e in keep)
            uris.extend(e[0] for e in keep)
    n_classes = len(names)
    return {
        "logits": np.concatenate(logits) if logits else np.zeros((0, n_classes), np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
        "uris": uris,
        "skipped": skipped,
    }


def evaluate(
    model_uri: str | None,
    data_uri: str,
    out_json: str | None = None,
    split: str = "test",
    split_source: str | None = None,
    allow_untrusted: bool = False,
) -> dict[str, Any]:
    """Evaluate an artifact on labelled images; the figures of ``wbc-batch evaluate``.

    The images of ``split`` are picked by content hash from the ``split.csv``
    of ``split_source`` (default: the model itself), so the test images are
    the ones the model never trained on; without a split.csv every image is
    used (``split`` is then reported as ``"all"``).

    Args:
        model_uri: artifact folder or ``s3://`` URI; None for the shipped model.
        data_uri: class-folder layout, local or ``s3://``.
        out_json: where to write the JSON (local path or ``s3://``), optional.
        split: ``train``, ``val``, ``test`` or ``all``.
        split_source: artifact whose split.csv decides the split.

    Returns:
        ``{"model", "data", "split", "n_images", "skipped", "metrics"}`` with
        ``metrics`` as in :func:`wbc_batch.metrics.classification_report`
        plus ``wbc`` (white-cell classes) and ``mature5`` subsets.
    """
    from wbc_batch.model import load_artifact

    if split not in (*splits.SPLITS, "all"):
        raise ValueError(f"expected split to be one of train, val, test, all; got {split!r}")
    artifact = load_artifact(model_uri, allow_untrusted=allow_untrusted)
    split_of = None if split == "all" else read_split_csv(split_source or artifact.uri)
    used_split = split if split_of is not None else "all"
    if split != "all" and split_of is None:
        log.warning("model %s has no %s: evaluating on every image", artifact.uri, SPLIT_FILE)
    got = collect_logits(artifact, data_uri, used_split if split_of is not None else None, split_of)
    if len(got["labels"]) == 0:
        raise ValueError(f"no labelled images of split {used_split!r} under {data_uri} for this model")
    meta = artifact.meta
    report = metrics.classification_report(
        got["logits"], got["labels"], meta.class_names, meta.temperature, meta.review_threshold,
        subsets={"wbc": meta.wbc_classes, "mature5": list(MATURE_CLASSES)},
    )
    result = {
        "model": {"uri": artifact.uri, "version": meta.version, "sha256": meta.model_sha256},
        "data": str(data_uri),
        "split": used_split,
        "n_images": int(len(got["labels"])),
        "skipped": got["skipped"],
        "metrics": report,
    }
    if out_json:
        storage.write_bytes(str(out_json), json.dumps(result, indent=2, allow_nan=False).encode())
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A few readable lines of an evaluation result."""
    m = result["metrics"]
    lines = [
        f"model {result['model']['version']} on {result['n_images']} images "
        f"({result['split']} split of {result['data']})",
        f"accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
        f"ECE raw {m['ece_raw']:.4f} calibrated {m['ece_calibrated']:.4f} (T={m['temperature']:.3f})",
    ]
    if "review" in m:
        r = m["review"]
        acc = "n/a" if r["accuracy_above"] is None else f"{r['accuracy_above']:.4f}"
        lines.append(f"review threshold {r['threshold']:.4f}: {r['coverage']:.1%} of cells above it, accuracy {acc}")
    for key, label in (("wbc", "white-cell classes"), ("mature5", "5 mature classes")):
        if key in m:
            sub = m[key]
            lines.append(f"{label} ({sub['n']} images): accuracy {sub['accuracy']:.4f}  macro-F1 {sub['macro_f1']:.4f}")
    lines.append("recall: " + ", ".join(f"{c} {'n/a' if r is None else f'{r:.3f}'}" for c, r in m["recall"].items()))
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} files (see JSON)")
    return "\n".join(lines)


# --- model.json updates and promotion -----------------------------------------


def update_metadata(model_uri: str, updates: dict[str, Any]) -> dict[str, Any]:
    """Read-modify-write of ``model.json``: set the given top-level keys, keep every other.

    Never touches ``model.keras``, so its sha256 stays valid.

    Returns:
        The JSON as written.
    """
    uri = storage.join(model_uri, META_FILE)
    data = json.loads(storage.read_bytes(uri))
    data.update(updates)
    storage.write_bytes(uri, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
    return data


def calibrate(model_uri: str | None, data_uri: str, write: bool = False) -> dict[str, Any]:
    """Refit temperature and review threshold of an artifact on its validation split.

    Uses real images picked by content hash from the artifact's split.csv.
    With ``write`` the two keys are set in model.json by read-modify-write
    (everything else, and model.keras, stays as it is).

    Returns:
        :func:`calibration_from_val` output plus ``val_nll_raw`` and ``val_nll_calibrated``.
    """
    from wbc_batch.model import load_artifact, shipped_model_dir

    artifact = load_artifact(model_uri)
    split_of = read_split_csv(artifact.uri)
    if split_of is None:
        raise ValueError(f"model {artifact.uri} has no {SPLIT_FILE}: cannot tell its validation images")
    got = collect_logits(artifact, data_uri, "val", split_of)
    result: dict[str, Any] = calibration_from_val(got["logits"], got["labels"])
    result["val_nll_raw"] = metrics.nll(got["logits"], got["labels"], 1.0)
    result["val_nll_calibrated"] = metrics.nll(got["logits"], got["labels"], result["temperature"])
    if write:
        update_metadata(
            str(model_uri or shipped_model_dir()),
            {"temperature": result["temperature"], "review_threshold": result["review_threshold"]},
        )
    return result


def _copy_artifact(src: str, dst: str) -> None:
    """Copy an artifact folder; model.json last so a reader never pairs it with a half-copied model."""
    for name in (MODEL_FILE, SPLIT_FILE, META_FILE):
        try:
            data = storage.read_bytes(storage.join(src, name))
        except FileNotFoundError:
            if name == SPLIT_FILE:
                storage.delete(storage.join(dst, name))
                continue
            raise
        storage.write_bytes(storage.join(dst, name), data)


def _score(report: dict[str, Any]) -> tuple[float, float, float]:
    """Ranking key: macro-F1, then accuracy, then lower NLL."""
    return (round(report["macro_f1"], 6), round(report["accuracy"], 6), -round(report["nll_calibrated"], 6))


def publish(candidate_uri: str, location: str, data_uri: str, split: str = "test") -> dict[str, Any]:
    """Make a candidate the current model at LOCATION only if it beats the current one.

    Both models are evaluated on the *candidate's* held-out split (by content
    hash), on the same images. Layout::

        LOCATION/current/             the model to use
        LOCATION/versions/<version>/  every model ever published, the previous one included

    Returns:
        ``{"promoted", "reason", "current", "candidate" {version, score}, "previous" {version, score} | None}``.
    """
    from wbc_batch.model import read_metadata

    cand_meta = read_metadata(candidate_uri)
    current = storage.join(location, "current")
    cand_eval = evaluate(candidate_uri, data_uri, split=split)
    cand_info = {"version": cand_meta.version, "score": _score(cand_eval["metrics"]), "split": cand_eval["split"]}
    previous: dict[str, Any] | None = None
    if storage.exists(storage.join(current, META_FILE)):
        cur_meta = read_metadata(current)
        if cur_meta.class_names != cand_meta.class_names:
            return {
                "promoted": False,
                "reason": f"class lists differ (current {cur_meta.class_names}, candidate {cand_meta.class_names}); "
                "publish to a new location",
                "current": current, "candidate": cand_info, "previous": None,
            }
        cur_eval = evaluate(current, data_uri, split=split, split_source=candidate_uri)
        previous = {"version": cur_meta.version, "score": _score(cur_eval["metrics"])}
        if not cand_info["score"] > previous["score"]:
            return {
                "promoted": False,
                "reason": f"candidate (macro-F1, accuracy, -NLL) {cand_info['score']} "
                f"does not beat current {previous['score']}",
                "current": current, "candidate": cand_info, "previous": previous,
            }
        _copy_artifact(current, storage.join(location, "versions", cur_meta.version))
    _copy_artifact(candidate_uri, storage.join(location, "versions", cand_meta.version))
    _copy_artifact(candidate_uri, current)
    return {
        "promoted": True,
        "reason": "no current model" if previous is None else "candidate beats current",
        "current": current, "candidate": cand_info, "previous": previous,
    }
