"""``run_adaptation``: fine-tune a model to a new lab from a few labelled cells per class.

Why it is built this way:

* A few cells per class are too few to train on alone, and fine-tuning on
  them alone makes the network forget the first lab. ``--replay`` mixes in
  cells from the base model's *own training split* (its validation and test
  images stay held out), and the new lab's cells are repeated so that each
  lab carries half of every batch; inside each lab the classes weigh the same
  (:func:`~wbc_batch.training.recipe.balanced_within_groups`).
* The run is the same Ray Train job as ``train`` (:func:`~wbc_batch.training.driver.fit_on_ray`),
  with the same schedule and optimizer, started from the base's weights, and
  by default the ``light`` augmentation preset: on Chula it adapted as well as
  ``strong`` (mean balanced accuracy over two slide folds 63.3% against 61.7%)
  and kept 2.5 points more of PBC (96.5% against 94.0% on its test split),
  since the replayed PBC cells are no longer trained on stain and blur they
  never show.
* With ten cells per class there is no honest validation split of the new
  lab. The settings (epochs, learning rate, lab share) are fixed, chosen once
  on a lab held out from everything else (MODEL_CARD.md, "Other labs"); the
  temperature is refitted on the base's validation images of the replay data
  (never trained on), and every cell needs review (:data:`~wbc_batch.metrics.ALWAYS_REVIEW`)
  until the lab calibrates on its own verified cells (``wbc-batch calibrate``).
* ``adapt`` measures how large the new lab's cells look against the
  replayed ones, class by class (:func:`~wbc_batch.geometry.relative_cell_size`),
  and when they differ by more than
  :data:`~wbc_batch.geometry.FIELD_SCALE_TOLERANCE` the adapted model carries a field
  scale (:func:`~wbc_batch.geometry.field_scale_for`) that every path applies
  to every image first: a wider field is cropped around its cell, a closer
  one padded, so the lab's cells reach the network at the size it learnt.
  The replayed cells are trained at that scale too, since the model will
  show them so: on Chula shown at 0.64x, 57.1% and 70.7% on the two folds
  against 54.1% and 53.1% unscaled, PBC 96.5% / 96.0% against 97.2% / 96.7%;
  with the replay left at its own scale the first lab fell to 81.0%
  (docs/OTHER_LABS.md). ``--keep-scale`` turns it off.
* ``--replay-distill W`` also teaches the replayed cells the base's own
  answers (its logits, softened, with share W of their loss; learning
  without forgetting, Li and Hoiem 2016), not only their labels: the
  first lab's cells then keep the base's view of them, ambiguities included,
  while the new lab's cells are taught by their labels alone. Off by
  default: on Chula's two folds W = 0.5 kept 0.15 points more of PBC (97.1%
  against 96.95%) and cost the new lab 4-6 points (MODEL_CARD.md).
* ``--lab-colours`` gives half of the new lab's share of each epoch to
  replayed cells shown in the colours of its images (:mod:`wbc_batch.colour`):
  the first lab's labelled cells then teach every class in the new lab's
  look. Off by default: on Chula's two folds +4 points and none, PBC -0.7
  to -0.9 points (docs/OTHER_LABS.md, "Colour and contrast").
* The OOD statistics are refitted so that the new lab is in distribution:
  the Gaussians see the replayed training cells plus the eight dihedral views
  of every new cell, and the threshold is set on the replay validation cells
  plus strongly augmented views of the new cells. Images of other labs stay far from both.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from wbc_batch import metrics, splits, storage
from wbc_batch.geometry import field_scale_for
from wbc_batch.training.augment import dihedral_views, preset
from wbc_batch.training.config import MATURE_CLASSES, TrainConfig, TrainingError, resolve_precision
from wbc_batch.training.data import list_labelled_files, read_labelled, read_split_rows
from wbc_batch.training.driver import _ensure_ray, fit_on_ray, provenance, source_revision
from wbc_batch.training.evaluation import calibration_from_val, predict_embeddings, predict_logits
from wbc_batch.training.labs import Lab, parse_lab
from wbc_batch.training.recipe import balanced_within_groups

log = logging.getLogger("wbc_batch.training")

NEW_LAB, REPLAY, REPLAY_IN_LAB_COLOURS = 1, 0, 2
REPLAY_LAB_BASE = 10  # the groups of a base's second, third ... replayed lab: 11, 12 ...
AUGMENTED_VIEWS_FOR_THRESHOLD = 4


@dataclass
class AdaptConfig:
    """Settings of one adaptation; see ``wbc-batch adapt --help`` for each."""

    data_uri: str
    model_out: str
    base: str | None = None
    replay: list[str] = field(default_factory=list)  # [NAME=]ROOT of each lab the base trained on
    replay_per_class: int = 150
    new_lab_share: float = 0.5
    epochs: int = 12
    learning_rate: float = 5e-4
    batch_size: int = 32
    weight_decay: float = 5e-4
    freeze_norm: bool = False
    rescale: bool = True  # show a lab whose cells are another size at the base's scale (geometry.field_scale_for)
    lab_colours: bool = False  # also train the replayed cells in the new lab's colours (colour.in_the_colours_of)
    replay_distill: float = 0.0  # share of the replayed cells' loss that is the base's own answers (0 = labels only)
    augment: str = "light"  # PBC kept 2.5 points better than with strong, Chula the same (MODEL_CARD)
    workers: int = 1
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared by the workers (at most 8 each)
    use_gpu: bool = False
    storage_path: str | None = None
    ray_address: str | None = None
    version: str | None = None
    lab: str | None = None
    seed: int = 1234
    precision: str = "auto"
    max_failures: int = 2
    allow_untrusted: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.new_lab_share < 1.0:
            raise ValueError(f"new-lab share must lie in (0, 1), got {self.new_lab_share}")
        if self.replay_per_class < 1:
            raise ValueError(f"replay per class must be >= 1, got {self.replay_per_class}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.replay_distill <= 1.0:
            raise ValueError(f"replay distillation must lie in [0, 1], got {self.replay_distill}")
        if self.replay_distill and not self.replay:
            raise ValueError("--replay-distill teaches the replayed cells the base's answers: it needs --replay")
        if self.lab_colours and not self.replay:
            raise ValueError("--lab-colours recolours the replayed cells: it needs --replay")
        if self.lab_colours and self.replay_distill:
            raise ValueError("--lab-colours and --replay-distill do not combine")
        preset(self.augment)  # an unknown preset fails here, not after the data are read

    def lab_name(self) -> str:
        """The lab's name in ``model.json`` (default: DATA's last folder)."""
        return self.lab or str(self.data_uri).rstrip("/").rsplit("/", 1)[-1] or "new-lab"

    def train_config(self, image_size: int, cluster_cpus: float, input_norm: str, base_uri: str) -> TrainConfig:
        """The :class:`TrainConfig` the shared Ray Train job runs with.

        Why the CPU default: adaptation is a short single-worker job, and a
        worker's CPUs are also its TensorFlow threads, so it takes the whole
        (small) cluster rather than one core.
        """
        cpus = self.cpus_per_worker or float(max(1, min(8, int(cluster_cpus) // max(1, self.workers))))
        return TrainConfig(
            data_uri=self.data_uri, model_out=self.model_out, workers=self.workers, epochs=self.epochs,
            image_size=image_size, batch_size=self.batch_size, learning_rate=self.learning_rate,
            weight_decay=self.weight_decay, cpus_per_worker=cpus, use_gpu=self.use_gpu,
            storage_path=self.storage_path, max_failures=self.max_failures, ray_address=self.ray_address,
            seed=self.seed, precision=self.precision, command=self.command, input_norm=input_norm,
            freeze_norm=self.freeze_norm, augment=self.augment,
            distill_from=base_uri if self.replay_distill else None,  # the base's logits come precomputed
            distill_weight=self.replay_distill or 0.5,
        )


def _stable_order(rel: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()


def choose_replay(rows: list[dict[str, str]], base_split: dict[str, str] | None, split: str, per_class: int,
                  seed: int) -> list[dict[str, str]]:
    """Up to ``per_class`` replay files of each class from the base's ``split`` (by the path in its split.csv).

    Without a split.csv every file counts as ``train`` (and none as ``val``).
    The pick is a keyed hash of the path: the same data gives the same pick.
    """
    by_class: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        side = base_split.get(row["rel"], "unknown") if base_split is not None else "train"
        if side == split:
            by_class.setdefault(row["label"], []).append(row)
    picked: list[dict[str, str]] = []
    for label in sorted(by_class):
        ranked = sorted(by_class[label], key=lambda r: _stable_order(r["rel"], seed))
        picked.extend(ranked[:per_class])
    return picked


def _new_lab_rows(config: AdaptConfig, classes: list[str], label_map: dict[str, str]) -> list[dict[str, str]]:
    rows = list_labelled_files(config.data_uri, label_map)
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise TrainingError(f"{config.data_uri} has class folders {unknown} that the base model does not know; "
                            f"its classes are {classes}")
    return rows


def augmented_views(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` random views of each image under the strong augmentation (uint8).

    Why strong whatever preset trained the network: these views stand for
    the new lab's cells on slides nobody labelled (other focus, stain batch,
    illumination). With the light preset's views the threshold sat so close
    to the ten labelled cells that 31% of the lab's other slides were flagged
    (Chula, 2026-12-02); with the strong ones about 1%.
    """
    import tensorflow as tf

    from wbc_batch.training.augment import AUGMENT, augment

    tf.random.set_seed(seed)
    out = [augment(tf, tf.constant(im, tf.float32), spec=AUGMENT).numpy() for _ in range(n) for im in images]
    if not out:
        return np.zeros((0, *images.shape[1:]), np.uint8)
    return np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)


def refit_ood(model: Any, embedding_layer: str, num_classes: int, new: dict[str, np.ndarray],
              replay_train: dict[str, np.ndarray], replay_val: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """OOD statistics in which the new lab is in distribution (see the module docstring)."""
    from wbc_batch.ood import fit_ood

    fit_x = np.concatenate([replay_train["image"], dihedral_views(new["image"])])
    fit_y = np.concatenate([replay_train["label_index"], np.tile(new["label_index"], 8)])
    val_x = np.concatenate([replay_val["image"], augmented_views(new["image"], AUGMENTED_VIEWS_FOR_THRESHOLD, seed)])
    if len(val_x) < 2:
        log.warning("OOD statistics not refitted: %d threshold images", len(val_x))
        return {}
    return fit_ood(predict_embeddings(model, embedding_layer, fit_x), fit_y, fit_x,
                   predict_embeddings(model, embedding_layer, val_x), val_x, num_classes=num_classes)


def check_same_graph(base_model: Any, num_classes: int, image_size: int) -> None:
    """Refuse a base built with another architecture: its weights would land in the wrong layers.

    Raises:
        TrainingError: the layer types or weight shapes differ from :func:`build_classifier`'s.
    """
    import keras

    from wbc_batch.architecture import build_classifier

    def signature(model: Any) -> list[tuple[str, tuple[tuple[int, ...], ...]]]:
        return [(type(layer).__name__, tuple(tuple(w.shape) for w in layer.weights)) for layer in model.layers]

    from wbc_batch.architecture import input_norm_of

    rebuilt = build_classifier(keras, num_classes, image_size=image_size, input_norm=input_norm_of(base_model))
    if signature(base_model) != signature(rebuilt):
        raise TrainingError("the base model was built with another architecture than this version's "
                            "(wbc_batch.architecture); adapt a model trained by this version")


def _counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    got = Counter(int(i) for i in labels)
    return {c: got[i] for i, c in enumerate(classes) if got[i]}


def replay_labs(given: list[str], base_labs: list[dict[str, Any]]) -> list[Lab]:
    """The labs ``adapt`` replays: every lab the base trained on, from ``--replay`` or the root the base records.

    Why every lab: a base trained on three labs forgets the two that are not
    replayed as surely as a one-lab base forgets its lab. A ``--replay
    NAME=ROOT`` names where a lab's images are here; a lab of the base that
    ``--replay`` leaves out is read from the root in its ``model.json`` when
    that root can be listed. A bare ``--replay ROOT`` of a one-lab base is
    that lab, whatever its folder is called.

    Raises:
        TrainingError: a lab of the base with no ``--replay`` and no readable recorded root.
    """
    parsed = [parse_lab(text) for text in given]
    if not parsed:
        return []
    recorded = [str(lab["name"]) for lab in base_labs]
    if len(recorded) <= 1 and len(parsed) == 1:
        return [Lab(recorded[0] if recorded else parsed[0][0], parsed[0][1])]
    labs = [Lab(name, root) for name, root in parsed]
    for lab in base_labs:
        if lab["name"] in {name for name, _ in parsed}:
            continue
        try:
            next(iter(storage.list_files(str(lab["uri"]))))
        except (OSError, StopIteration) as exc:
            raise TrainingError(f"the base trained on lab {lab['name']!r} ({lab['uri']}), which cannot be read "
                                f"here; give --replay {lab['name']}=ROOT") from exc
        labs.append(Lab(str(lab["name"]), str(lab["uri"])))
    return labs


def base_split_of(split_rows: list[dict[str, str]] | None, lab: str, only_lab: bool) -> dict[str, str] | None:
    """Path (relative to the lab's root) -> split of one lab's images in the base's split.csv.

    A split.csv without a ``lab`` column (a one-lab base) holds one lab's
    images, read as the replayed lab's when it is the only one.
    """
    if split_rows is None:
        return None
    if split_rows and "lab" not in split_rows[0]:
        return {r["uri"]: r["split"] for r in split_rows} if only_lab else {}
    return {r["uri"]: r["split"] for r in split_rows if r.get("lab") == lab}


def _replay_rows(config: AdaptConfig, base_uri: str, base_labs: list[dict[str, Any]], class_index: dict[str, int],
                 label_map: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The base's own train and val rows of every lab it trained on (its split.csv says which is which).

    Each row carries its ``lab``. Why rows and not images: with a field scale
    the same cells are decoded at two scales, and listing the replay data
    (thousands of keys on S3) and reading the split once serves every
    decode. Empty without ``--replay``.
    """
    labs = replay_labs(config.replay, base_labs)
    split_rows = read_split_rows(base_uri)
    out: dict[str, list[dict[str, str]]] = {"train": [], "val": []}
    for lab in labs:
        rows = [{**r, "lab": lab.name} for r in list_labelled_files(lab.uri, label_map) if r["label"] in class_index]
        split_of = base_split_of(split_rows, lab.name, len(labs) == 1)
        for split in out:
            out[split] += choose_replay(rows, split_of, split, config.replay_per_class, config.seed)
    return out


def replay_groups(replay: dict[str, np.ndarray], rows: list[dict[str, str]]) -> list[int]:
    """The class-balance group of each replayed image: one per lab (:data:`REPLAY` for the first)."""
    names = sorted({r["lab"] for r in rows})
    group_of_lab = {name: REPLAY if i == 0 else REPLAY_LAB_BASE + i for i, name in enumerate(names)}
    group_of_uri = {r["uri"]: group_of_lab[r["lab"]] for r in rows}
    return [group_of_uri[str(u)] for u in replay["uri"]]


def lab_scale(new: dict[str, np.ndarray], replay: dict[str, np.ndarray], classes: list[str]) -> dict[str, Any]:
    """The new lab's cell size against the replayed cells', overall and per class (None without replay)."""
    from wbc_batch.geometry import relative_cell_size

    if len(replay["label_index"]) == 0:
        return {"ratio": None, "per_class": {}}
    ratio, per_class = relative_cell_size(new["cell_fraction"], new["label_index"], replay["cell_fraction"],
                                          replay["label_index"])
    return {"ratio": None if ratio is None else round(ratio, 3),
            "per_class": {classes[k]: round(v, 3) for k, v in per_class.items()}}


def replay_in_lab_colours(new: dict[str, np.ndarray], replay: dict[str, np.ndarray], count: int,
                          seed: int) -> dict[str, np.ndarray]:
    """``count`` replayed cells drawn at random, each in the colours of one of the new lab's images.

    Why: ten cells per class show the new lab's look on too few cells to
    learn the classes in it; the first lab's hundreds of labelled cells,
    recoloured, show it on every class (:mod:`wbc_batch.colour`).
    """
    from wbc_batch.colour import in_the_colours_of

    pick = np.sort(np.random.default_rng(seed).permutation(len(replay["label_index"]))[:count])
    return {"image": in_the_colours_of(replay["image"][pick], new["image"], seed),
            "label_index": replay["label_index"][pick]}


def lab_look_counts(n_new: int, n_replay: int, share: float, lab_colours: bool) -> tuple[int, int]:
    """How often each new cell is repeated, and how many replayed cells are recoloured, per epoch.

    The new lab carries ``share`` of each epoch's images. With
    ``--lab-colours`` that share is split evenly between the new lab's
    cells and replayed cells in its colours, so the first lab's own cells
    keep their share and an epoch is as long as without.
    """
    if n_new == 0 or n_replay == 0:
        return 1, 0
    lab_images = share / (1.0 - share) * n_replay
    if not lab_colours:
        return max(1, round(lab_images / n_new)), 0
    return max(1, round(lab_images / 2 / n_new)), min(n_replay, round(lab_images / 2))


def _mixed_dataset(new: dict[str, np.ndarray], replay: dict[str, np.ndarray], repeats: int,
                   replay_teacher: np.ndarray | None = None,
                   recoloured: dict[str, np.ndarray] | None = None, replay_group: list[int] | None = None) -> Any:
    """Replay images plus each new cell ``repeats`` times, weighted so each group's classes are balanced.

    ``replay_group``: each replayed image's group (:func:`replay_groups`, one
    per lab of the base); default one group.

    With ``replay_teacher`` (the base's logits of the replayed images) every
    row also carries ``teacher_logits`` and ``distill_mask``: 1 on replayed
    rows, 0 on the new lab's (whose teacher logits are zeros, never read).
    With ``recoloured`` (:func:`replay_in_lab_colours`) those images are a
    third group, taught by their labels.
    """
    import ray

    extra = recoloured or {"image": replay["image"][:0], "label_index": replay["label_index"][:0]}
    x = np.concatenate([replay["image"], np.repeat(new["image"], repeats, axis=0), extra["image"]])
    y = np.concatenate([replay["label_index"], np.repeat(new["label_index"], repeats), extra["label_index"]])
    groups = (replay_group or [REPLAY] * len(replay["label_index"])) \
        + [NEW_LAB] * (len(new["label_index"]) * repeats) + [REPLAY_IN_LAB_COLOURS] * len(extra["label_index"])
    weights = np.asarray(balanced_within_groups([int(v) for v in y], groups), np.float32)
    rows: list[dict[str, Any]] = [{"image": im, "label_index": int(lab), "sample_weight": float(w)}
                                  for im, lab, w in zip(x, y, weights)]
    if replay_teacher is not None:
        n_new, k = len(y) - len(replay_teacher), replay_teacher.shape[1]
        teacher = np.concatenate([replay_teacher, np.zeros((n_new, k), np.float32)]).astype(np.float32)
        for row, logits, group in zip(rows, teacher, groups):
            row["teacher_logits"], row["distill_mask"] = logits, float(group not in (NEW_LAB, REPLAY_IN_LAB_COLOURS))
    return ray.data.from_items(rows).materialize()


def _calibrate_on_replay(model: Any, base: Any, replay_val: dict[str, np.ndarray],
                         base_val: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The adapted model's calibration entry, and the base's and its figures on the replay's val images.

    Ten cells per class cannot show which confident calls on the new lab
    are right: on Chula the cells above the base's threshold were 80-85%
    right, so every cell goes to review until the lab calibrates on
    verified cells (``wbc-batch calibrate``). The temperature is refitted
    on the base's validation images when ``--replay`` gives them.
    """
    meta = base.meta
    calibration: dict[str, Any] = {"temperature": meta.temperature, "review_threshold": metrics.ALWAYS_REVIEW,
                                   "source": "base model (no replay validation images)"}
    if not len(replay_val["label_index"]):
        return calibration, {}
    classes = list(meta.class_names)
    val_logits = predict_logits(model, replay_val["image"])
    refit = calibration_from_val(val_logits, replay_val["label_index"])
    calibration = {**calibration, "temperature": refit["temperature"], "val_n": refit["val_n"],
                   "source": "temperature on the base's validation images of the replay data"}
    subsets: dict[str, Sequence[str]] = {"wbc": meta.wbc_classes, "mature5": list(MATURE_CLASSES)}
    report = {
        "before": metrics.classification_report(
            predict_logits(base.model, base_val["image"]), base_val["label_index"], classes,
            meta.temperature, meta.review_threshold, subsets=subsets),
        "after": metrics.classification_report(
            val_logits, replay_val["label_index"], classes, calibration["temperature"],
            meta.review_threshold, subsets=subsets),
    }
    return calibration, report


def _adapted_metadata(meta: Any, config: AdaptConfig, version: str, adaptation: dict[str, Any],
                      replay_report: dict[str, Any], ood: dict[str, Any]) -> Any:
    """The base's metadata with the adaptation's version, calibration, record, lab entry and OOD statistics."""
    from wbc_batch.model import ModelMetadata

    lab, new_counts, calibration = adaptation["lab"], adaptation["new_lab_counts"], adaptation["calibration"]
    labs = dict(meta.metrics.get("labs", {}))
    labs[lab] = {"adapted_on": new_counts,
                 "figures": "none here: every labelled cell of this lab was used to adapt; "
                            "measure on other cells with wbc-batch evaluate"}
    new_meta = ModelMetadata.from_dict({
        **{k: v for k, v in asdict(meta).items() if k not in ("model_sha256", "parent_digest", "parent_version")},
        "version": version,
        "temperature": calibration["temperature"],
        "review_threshold": calibration["review_threshold"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "changelog": [*meta.changelog, f"{version}: adapted from {meta.version} to lab {lab!r} on "
                      f"{sum(new_counts.values())} labelled cells ({config.data_uri})"
                      + (f" with replay from {', '.join(config.replay)}" if config.replay else "")],
        "training": {**meta.training, "adaptation": adaptation},
        "metrics": {**meta.metrics, "labs": labs,
                    **({"replay_val_after_adaptation": replay_report["after"]} if replay_report else {})},
        "ood": ood,
    })
    new_meta.parent_digest = adaptation["base"]["digest"]
    new_meta.parent_version = meta.version
    return new_meta


def _run_name(config: AdaptConfig, fingerprint: str, base_sha256: str) -> str:
    """Checkpoints' name: the new cells' fingerprint and every setting, so a rerun resumes only itself."""
    settings = f"{config.epochs}-{config.learning_rate}-{config.batch_size}-{config.replay_per_class}-" \
               f"{config.new_lab_share}-{config.seed}-{config.freeze_norm}-{config.augment}-{base_sha256}" \
               + (f"-kd{config.replay_distill}" if config.replay_distill else "") \
               + ("" if config.rescale else "-keep-scale") + ("-lab-colours" if config.lab_colours else "")
    return f"wbc-adapt-{fingerprint[:12]}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def run_adaptation(config: AdaptConfig) -> dict[str, Any]:
    """Fine-tune the base model on a new lab's labelled class folders and write a new artifact.

    Returns:
        A summary: ``model_out``, ``version``, ``lab``, ``new_lab_counts``,
        ``replay_counts``, ``repeats``, ``cell_size``, ``field_scale``, ``calibration``, ``replay_val``
        (figures on the base's validation images of the replay data, before
        and after), ``train_seconds`` and ``total_seconds``.

    Raises:
        TrainingError: unknown class folders, no decodable images, or a base
            of another architecture.
    """
    import keras
    import ray

    from wbc_batch.architecture import build_classifier, input_norm_of
    from wbc_batch.model import load_artifact, save_artifact

    t_start, revision = time.time(), source_revision()
    _ensure_ray(config.ray_address)
    base = load_artifact(config.base, allow_untrusted=config.allow_untrusted)
    meta = base.meta
    classes, size = list(meta.class_names), int(meta.image_size)
    check_same_graph(base.model, len(classes), size)
    label_map = meta.training_data.get("label_map") or dict(splits.DEFAULT_LABEL_MAP)
    class_index = {c: i for i, c in enumerate(classes)}

    new_rows = _new_lab_rows(config, classes, label_map)
    new = read_labelled(new_rows, size, class_index)
    if len(new["label_index"]) == 0:
        raise TrainingError(f"no decodable images under {config.data_uri}")
    base_labs = list(meta.training_data.get("labs") or [])
    replay_rows = _replay_rows(config, base.uri, base_labs, class_index, label_map)
    replay_train = read_labelled(replay_rows["train"], size, class_index)
    scale = lab_scale(new, replay_train, classes)
    field_scale = field_scale_for(scale["ratio"]) if config.rescale else 1.0
    log.info("new lab's cells against the replayed cells: %s; field scale %s", scale, field_scale)
    if field_scale != 1.0:
        new = read_labelled(new_rows, size, class_index, field_scale=field_scale)
        # every image the model sees is magnified, the first lab's too: its replayed cells are trained so
        replay_train = read_labelled(replay_rows["train"], size, class_index, field_scale=field_scale)
    # The model shows every image at its field scale, the first lab's too: calibrate and report on them so.
    replay_val = read_labelled(replay_rows["val"], size, class_index, field_scale=field_scale)
    repeats, n_recoloured = lab_look_counts(len(new["label_index"]), len(replay_train["label_index"]),
                                            config.new_lab_share, config.lab_colours)
    replay_teacher = predict_logits(base.model, replay_train["image"]) if config.replay_distill else None
    recoloured = replay_in_lab_colours(new, replay_train, n_recoloured, config.seed) if n_recoloured else None
    train_ds = _mixed_dataset(new, replay_train, repeats, replay_teacher, recoloured,
                              replay_groups(replay_train, replay_rows["train"]))

    tc = config.train_config(size, ray.cluster_resources().get("CPU", 1.0), input_norm_of(base.model), str(base.uri))
    precision = resolve_precision(config.precision, config.use_gpu)
    fingerprint = hashlib.sha256("".join(sorted(new["sha256"])).encode()).hexdigest()
    fit = fit_on_ray(tc, train_ds, len(classes), [1.0] * len(classes),
                     [np.asarray(w) for w in base.model.get_weights()],
                     _run_name(config, fingerprint, meta.model_sha256), precision)

    model = build_classifier(keras, len(classes), image_size=size, input_norm=tc.input_norm)
    model.set_weights(fit.weights)
    base_val = replay_val if field_scale == 1.0 else read_labelled(replay_rows["val"], size, class_index)
    calibration, replay_report = _calibrate_on_replay(model, base, replay_val, base_val)
    ood = refit_ood(model, meta.embedding_layer, len(classes), new, replay_train, replay_val, config.seed)

    lab = config.lab_name()
    version = config.version or f"{meta.version}+{lab}.{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    new_counts = _counts(new["label_index"], classes)
    adaptation: dict[str, Any] = {
        "base": {"uri": str(base.uri), "version": meta.version, "digest": base.digest},
        "lab": lab,
        "data": str(config.data_uri),
        "data_fingerprint_sha256": fingerprint,
        "new_lab_counts": new_counts,
        "replay": {"labs": sorted({(r["lab"], r["uri"][: -len(r["rel"])].rstrip("/")) for r in replay_rows["train"]}),
                   "per_class": config.replay_per_class,
                   "train_counts": _counts(replay_train["label_index"], classes),
                   "val_counts": _counts(replay_val["label_index"], classes)} if config.replay else None,
        "repeats_per_new_cell": repeats,
        "cell_size": scale,
        "field_scale": field_scale,
        "new_lab_share": config.new_lab_share,
        "epochs": config.epochs,
        "optimizer": f"AdamW lr {config.learning_rate}, weight decay {config.weight_decay}, batch {config.batch_size}",
        "batch_norm": "frozen (inference mode)" if config.freeze_norm else "trained",
        "replay_distill": ({"weight": config.replay_distill, "temperature": tc.distill_temperature}
                           if config.replay_distill else None),
        "augmentation": config.augment,
        "replay_in_lab_colours": n_recoloured,  # replayed cells also trained in the new lab's colours
        "precision": precision,
        "train_seconds": round(fit.seconds, 1),
        "final_epoch": fit.final_state,
        "calibration": calibration,
        "provenance": provenance(tc, t_start, revision),
    }
    new_meta = _adapted_metadata(meta, config, version, adaptation, replay_report, ood)
    new_meta.preprocessing = with_field_scale(new_meta.preprocessing, field_scale, scale["ratio"])
    save_artifact(model, new_meta, config.model_out, split_csv=_split_csv(base.uri, new, lab))
    return {
        "model_out": config.model_out,
        "version": version,
        "lab": lab,
        "new_lab_counts": new_counts,
        "replay_counts": adaptation["replay"]["train_counts"] if adaptation["replay"] else {},
        "repeats": repeats,
        "cell_size": scale,
        "field_scale": field_scale,
        "calibration": calibration,
        "replay_val": replay_report,
        "ood_fitted": bool(ood),
        "train_seconds": fit.seconds,
        "total_seconds": time.time() - t_start,
        "final_epoch": fit.final_state,
        "checkpoint": fit.checkpoint_path,
    }


def with_field_scale(preprocessing: dict[str, Any], field_scale: float, ratio: float | None) -> dict[str, Any]:
    """The base's preprocessing record with the adapted model's field scale (the base's own is replaced)."""
    out = {k: v for k, v in preprocessing.items() if k not in ("field_scale", "field")}
    if field_scale != 1.0:
        out["field_scale"] = field_scale
        out["field"] = (f"every image magnified {field_scale}x before the resize (a crop around the segmented "
                        f"cell above 1, a padding with the border colour below 1): this lab's cells measured "
                        f"{ratio}x the replayed cells' size")
    return out


def _split_csv(base_uri: str, new: dict[str, np.ndarray], lab: str) -> str:
    """The base's split.csv (its held-out images stay held out) plus the new lab's cells as ``train``."""
    from wbc_batch.model import SPLIT_FILE

    try:
        text = storage.read_bytes(storage.join(base_uri, SPLIT_FILE)).decode("utf-8")
    except FileNotFoundError:
        text = "sha256,label,split,uri\n"
    if not text.endswith("\n"):
        text += "\n"
    with_labs = text.split("\n", 1)[0].strip().endswith(",lab,group")
    lines = [f"{sha},{label},train,{uri}" + (f",{lab},{str(uri).rsplit('/', 1)[-1]}" if with_labs else "") + "\n"
             for sha, label, uri in zip(new["sha256"], new["label"], new["uri"])]
    return text + "".join(lines)

