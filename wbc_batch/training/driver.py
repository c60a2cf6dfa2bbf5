"""``run_training``: prepare data, run the Ray Train job, calibrate, evaluate and write the artifact.

Why it is built this way:

* Every epoch writes a checkpoint to the run's storage (local or S3). A
  worker failure restarts the group (``FailureConfig``) and the loop resumes
  from the latest checkpoint; re-running the same command resumes too (the run
  name is derived from the data fingerprint and settings).
* Each replica writes the SHA-256 of its trainable weights into the epoch's
  checkpoint, so anyone can verify that the gradients were synchronised.
* Temperature and review threshold are fitted on the validation split only;
  the test split is only ever reported.
* ``model.json`` records the command, commit, package versions, hardware and
  data fingerprint, so anyone with the images can rebuild the artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wbc_batch import metrics, splits, storage
from wbc_batch.errors import WbcError
from wbc_batch.model import ModelMetadata
from wbc_batch.training import recipe
from wbc_batch.training.augment import preset
from wbc_batch.training.config import (
    AVERAGE_FILE,
    LEGACY_KERAS_ENV,
    MATURE_CLASSES,
    STATE_FILE,
    WEIGHTS_FILE,
    TrainConfig,
    resolve_precision,
)
from wbc_batch.training.data import (
    dataset_arrays,
    only_split,
    prepare_data,
    read_split_csv,
    split_arrays,
    split_columns,
    split_csv_text,
)
from wbc_batch.training.evaluation import calibration_from_val, fit_ood_statistics, predict_logits
from wbc_batch.training.publishing import publish
from wbc_batch.training.recipe import balanced_class_weights, scaled_class_weights
from wbc_batch.training.teacher import load_parent, load_teacher, with_teacher_logits
from wbc_batch.training.worker import load_arrays, train_loop_per_worker

log = logging.getLogger("wbc_batch.training")


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
            callbacks = super()._create_default_callbacks()  # type: ignore[misc]  # Ray 2.60 private hook
            if _dashboard_running():
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return WbcTensorflowTrainer


def _ensure_ray(address: str | None) -> None:
    """Join the cluster the person meant, as classify does (``wbc_batch.cluster``): never hang on a dead head."""
    from wbc_batch import cluster

    cluster.connect(address)


def initial_weights(config: TrainConfig, classes: list[str]) -> tuple[list[np.ndarray] | None, dict[str, Any]]:
    """Weights and provenance of ``--init-from`` (fine-tuning), or ``(None, {})`` to start from scratch.

    The artifact is loaded and verified like any model (sha256, ``safe_mode``);
    it must have the data's classes, in order, and the run's input size.
    """
    if not config.init_from:
        return None, {}
    from wbc_batch.architecture import input_norm_of

    artifact, origin = load_parent(config.init_from, "--init-from", classes, config.image_size)
    config.input_norm = input_norm_of(artifact.model)  # a fine-tune keeps its parent's first layer
    return [np.asarray(w) for w in artifact.model.get_weights()], origin


def held_out_by_parents(config: TrainConfig) -> dict[str, str] | None:
    """The splits of the models this run learns from (``--init-from``, ``--distill-from``); held out wins.

    Why the teacher's too: the student is compared with its teacher on the
    teacher's validation and test images, so it must not train on them
    either; when the splits agree (one dataset, hashed the same way) this
    changes nothing.
    """
    merged: dict[str, str] = {}
    for parent in (config.init_from, config.distill_from):
        for sha, split in ((read_split_csv(parent) or {}) if parent else {}).items():
            if merged.get(sha) not in ("val", "test"):
                merged[sha] = split
    return merged or None


def _run_name(config: TrainConfig, fingerprint: str) -> str:
    """Same data and settings give the same name, so re-running a killed job resumes it."""
    c = config
    settings = "-".join(
        str(v)
        for v in (c.image_size, c.epochs, c.batch_size, c.learning_rate, c.workers, c.seed, c.on_cell_weight,
                  sorted(c.class_weight_factors.items()), c.init_from, c.weight_decay, c.precision, c.input_norm, c.augment)
        + ((c.label_smoothing,) if c.label_smoothing else ())  # runs without these keep their names (resume)
        + ((f"avg{c.weight_average}",) if c.weight_average else ())
        + ((f"kd{c.distill_from}:{c.distill_weight}:{c.distill_temperature}",) if c.distill_from else ())
        + ((";".join(f"{lab.name}={lab.split_rule}" for lab in c.labs),) if len(c.labs) > 1 else ())
    )
    return config.run_name or f"wbc-train-{fingerprint[:12]}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def source_revision() -> dict[str, Any]:
    """The git commit of this package's checkout and whether its tree had uncommitted changes.

    Why read at the start of a run: a run takes hours, and a commit made while
    it trains must not be recorded as the code that trained it.
    """
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def provenance(config: TrainConfig, t_start: float, revision: dict[str, Any]) -> dict[str, Any]:
    """What anyone needs to rebuild an artifact: command, commit, package versions, hardware, wall time.

    ``revision`` is :func:`source_revision` taken when the run started.
    """
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {
        "command": config.command or None,
        **revision,
        "packages": {n: package(n) for n in ("wbc-batch", "tensorflow", "tf-keras", "keras", "ray", "numpy",
                                              "opencv-python-headless")},
        "python": platform.python_version(),
        "hardware": {"cpu": cpu, "cpu_count": os.cpu_count(), "workers": config.workers,
                     "cpus_per_worker": config.cpus_per_worker, "use_gpu": config.use_gpu},
        "wall_seconds_to_artifact": round(time.time() - t_start, 1),
        "argv": list(sys.argv),
    }


def _read_replica_digests(checkpoint_dir: Path, key: str = "trainable_sha256") -> dict[str, str]:
    """Each rank's digest ``key`` from the checkpoint's ``replica-<rank>.json`` files (ranks without it left out)."""
    replicas = [json.loads(p.read_text()) for p in sorted(checkpoint_dir.glob("replica-*.json"))]
    return {str(r["rank"]): r[key] for r in replicas if key in r}


@dataclass
class FitResult:
    """What a Ray Train run leaves: the final weights and the evidence of how they were made."""

    weights: list[np.ndarray]  # the running average where the run kept one, else the last step's
    final_state: dict[str, Any]
    replica_digests: dict[str, str]
    replica_average_digests: dict[str, str]
    checkpoint_path: str
    seconds: float


def _storage_kwargs(root: str) -> dict[str, Any]:
    if storage.is_remote(root):
        fs, path = storage.arrow_filesystem(root)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(Path(root).resolve())}


def fit_on_ray(
    config: TrainConfig,
    train_ds: Any,
    num_classes: int,
    class_weights: list[float],
    init_weights: list[np.ndarray] | None,
    run_name: str,
    precision: str,
    train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    lab_weights: dict[str, np.ndarray] | None = None,
) -> FitResult:
    """Run the Ray Train job over ``train_ds`` (columns ``image``, ``label_index``, optional
    ``lab_index``, ``cell_grid``, ``sample_weight`` and ``teacher_logits``) and read back its last checkpoint.

    ``lab_weights`` (a run of several labs): ``lab_class_weights`` and
    ``lab_class_mask``, (labs, classes) each (:mod:`wbc_batch.training.labs`).
    ``train_loop`` is the worker body; callers other than the tests keep the default.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    steps = max(1, train_ds.count() // config.batch_size)
    trainer = _trainer_class()(
        train_loop_per_worker=train_loop,
        train_loop_config={
            "num_classes": num_classes,
            "image_size": config.image_size,
            "epochs": config.epochs,
            "steps_per_epoch": steps,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay,
            "class_weights": class_weights,
            "seed": config.seed,
            "cpus_per_worker": config.cpus_per_worker,
            "on_cell_weight": config.on_cell_weight,
            "label_smoothing": config.label_smoothing,
            "weight_average": config.weight_average,
            "distill_weight": config.distill_weight if config.distill_from else 0.0,
            "distill_temperature": config.distill_temperature,
            "initial_weights": init_weights,
            "precision": precision,
            "input_norm": config.input_norm,
            "augment": config.augment,
            "freeze_norm": config.freeze_norm,
            **{k: np.asarray(v).tolist() for k, v in (lab_weights or {}).items()},
        },
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        run_config=RunConfig(  # type: ignore[call-arg]  # Train v2 RunConfig has worker_runtime_env
            name=run_name,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": dict(LEGACY_KERAS_ENV)},
            **_storage_kwargs(config.checkpoint_root()),
        ),
        datasets={"train": train_ds},
    )
    t0 = time.time()
    result = trainer.fit()
    seconds = time.time() - t0
    if result.checkpoint is None:
        raise WbcError(f"training run {run_name} ended without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        return FitResult(
            weights=load_arrays(Path(d, AVERAGE_FILE if config.weight_average else WEIGHTS_FILE)),
            final_state=json.loads(Path(d, STATE_FILE).read_text()),
            replica_digests=_read_replica_digests(Path(d)),
            replica_average_digests=_read_replica_digests(Path(d), "average_sha256"),
            checkpoint_path=result.checkpoint.path,
            seconds=seconds,
        )


def run_training(
    config: TrainConfig, train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker
) -> dict[str, Any]:
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

    from wbc_batch.architecture import EMBEDDING_LAYER, build_classifier
    from wbc_batch.model import save_artifact

    t_start, revision = time.time(), source_revision()
    _ensure_ray(config.ray_address)
    data = prepare_data(config, held_out_by_parents(config))
    classes: list[str] = data["classes"]
    init_weights, init_origin = initial_weights(config, classes)
    train_ds = data["labelled"].map_batches(only_split, fn_kwargs={"split": "train"}, batch_format="numpy")
    train_ds = train_ds.materialize()
    distill_origin: dict[str, Any] = {}
    if config.distill_from:
        distill_origin = {**load_teacher(config.distill_from, classes, config.image_size)[1],
                          "weight": config.distill_weight, "temperature": config.distill_temperature}
        train_ds = with_teacher_logits(train_ds, config.distill_from, classes, config.image_size)
    class_weights = scaled_class_weights(
        classes, balanced_class_weights([data["train_label_counts"][c] for c in classes]), config.class_weight_factors
    )
    run_name = _run_name(config, data["fingerprint"])
    precision = resolve_precision(config.precision, config.use_gpu)
    lab_weights = ({"lab_class_weights": data["lab_class_weights"], "lab_class_mask": data["lab_class_mask"]}
                   if len(config.labs) > 1 else None)
    fit = fit_on_ray(config, train_ds, len(classes), class_weights, init_weights, run_name, precision, train_loop,
                     lab_weights)
    weights, final_state, train_seconds = fit.weights, fit.final_state, fit.seconds

    model = build_classifier(keras, len(classes), image_size=config.image_size, input_norm=config.input_norm)
    model.set_weights(weights)
    x_val, y_val = split_arrays(data["labelled"], "val")
    calibration = calibration_from_val(predict_logits(model, x_val), y_val)
    x_train, y_train = dataset_arrays(train_ds)  # materialised above for the trainer
    ood_stats = fit_ood_statistics(model, EMBEDDING_LAYER, x_train, y_train, x_val, len(classes))
    del x_train
    version = config.version or f"{datetime.now(timezone.utc):%Y%m%d.%H%M%S}-{data['fingerprint'][:8]}"
    meta = _trained_metadata(config, version, data, calibration, ood_stats, {
        "trainer": "wbc_batch.training (Ray Train TensorflowTrainer, tf-keras, MultiWorkerMirroredStrategy)",
        "workers": config.workers,
        "epochs": config.epochs,
        "train_seconds": round(train_seconds, 1),
        "optimizer": recipe.describe(config.learning_rate, config.weight_decay, config.batch_size),
        "augmentation": {"preset": config.augment, **preset(config.augment).describe()},
        "precision": precision,
        "provenance": provenance(config, t_start, revision),
        "class_weights": {c: round(w, 4) for c, w in zip(classes, class_weights)},
        **({"lab_sampling": _lab_sampling(config, classes, data)} if len(config.labs) > 1 else {}),
        "run_name": run_name,
        "final_epoch": final_state,
        "on_cell_weight": config.on_cell_weight,
        "label_smoothing": config.label_smoothing,
        "weight_average": config.weight_average,
        **({"init_from": init_origin} if init_origin else {}),
        **({"distillation": distill_origin} if distill_origin else {}),
    }, init_origin)
    test_report = _test_report(model, data, meta, config.labs)
    meta.metrics = {"split": "test", **test_report, "calibration": calibration} if test_report else {
        "calibration": calibration}
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
        "replica_trainable_sha256": fit.replica_digests,
        "replica_average_sha256": fit.replica_average_digests,
        "checkpoint": fit.checkpoint_path,
        "run_name": run_name,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t_start,
    }
    if config.publish:
        summary["publish"] = publish(config.model_out, config.publish, config.data_uri)
    return summary


def _lab_sampling(config: TrainConfig, classes: list[str], data: dict[str, Any]) -> dict[str, Any]:
    """How a run of several labs drew and weighed its images, for ``model.json``."""
    from wbc_batch.training.labs import lab_shares

    return {
        "rule": "each lab an equal share of every epoch's images (sampled); inside a lab every class it has "
                "weighs the same, times --class-weight; a lab's cells are scored over its own classes only",
        "shares": {lab.name: share for lab, share in zip(config.labs, lab_shares(config.labs))},
        "class_weights": {lab.name: {c: round(float(w), 4) for c, w in zip(classes, row) if w}
                          for lab, row in zip(config.labs, data["lab_class_weights"])},
        "classes": {lab.name: [c for c, m in zip(classes, row) if m]
                    for lab, row in zip(config.labs, data["lab_class_mask"])},
    }


def _test_report(model: Any, data: dict[str, Any], meta: ModelMetadata, labs: list[Any]) -> dict[str, Any]:
    """Figures on the test split (empty without test images), also re-weighted to PBC's natural class mix;
    with several labs, each lab's own figures under ``per_lab``.

    The white-cell classes, temperature and threshold are the artifact's own,
    as ``wbc-batch evaluate`` reads them.
    """
    test = split_columns(data["labelled"], "test")
    if not len(test["label_index"]):
        return {}
    test_logits = predict_logits(model, test["image"])
    report = _report_of(test_logits, test["label_index"], meta)
    if len(labs) > 1:
        report["per_lab"] = {lab.name: _report_of(test_logits[test["lab_index"] == i],
                                                  test["label_index"][test["lab_index"] == i], meta)
                             for i, lab in enumerate(labs) if np.any(test["lab_index"] == i)}
    return report


def _report_of(logits: np.ndarray, labels: np.ndarray, meta: ModelMetadata) -> dict[str, Any]:
    report = metrics.classification_report(
        logits, labels, meta.class_names, meta.temperature, meta.review_threshold,
        subsets={"wbc": meta.wbc_classes, "mature5": list(MATURE_CLASSES)},
    )
    natural = metrics.natural_mix_report(logits, labels, meta.class_names, meta.temperature,
                                         meta.review_threshold, white_cells=meta.wbc_classes)
    if natural:
        report["natural_mix"] = natural
    return report


def _trained_metadata(config: TrainConfig, version: str, data: dict[str, Any], calibration: dict[str, Any],
                      ood_stats: dict[str, Any], training: dict[str, Any],
                      init_origin: dict[str, Any] | None) -> ModelMetadata:
    """The ``model.json`` of a trained artifact, test figures still to come; a fine-tuned one names its parent."""
    from wbc_batch.architecture import CAM_LAYER, EMBEDDING_LAYER

    classes: list[str] = data["classes"]
    sources = ", ".join(f"{lab.name}={lab.uri}" if len(config.labs) > 1 else lab.uri for lab in config.labs)
    meta = ModelMetadata(
        version=version,
        class_names=classes,
        image_size=config.image_size,
        gradcam_layer=CAM_LAYER,
        embedding_layer=EMBEDDING_LAYER,
        temperature=calibration["temperature"],
        review_threshold=calibration["review_threshold"],
        non_wbc_classes=[c for c in classes if c == splits.NON_WBC],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        changelog=[
            f"{version}: trained by wbc_batch.training on {sources}"
            + (f", fine-tuned from {init_origin['version']} ({init_origin['uri']})" if init_origin else "")
        ],
        training_data={
            "source": sources,
            "fingerprint_sha256": data["fingerprint"],
            "n_images": len(data["items"]),
            "split_counts": data["split_counts"],
            "label_map": config.label_map,
            "labs": data["labs"],
        },
        training=training,
        ood=ood_stats,
    )
    if init_origin:
        meta.parent_digest, meta.parent_version = init_origin["digest"], init_origin["version"]
    return meta
