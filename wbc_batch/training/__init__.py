"""Retraining on Ray Train, adaptation to a new lab, calibration, evaluation and promotion.

One module per concern:

* :mod:`~wbc_batch.training.config`: a run's settings and shared constants;
* :mod:`~wbc_batch.training.data`: listing, split, decode, the Ray Data read;
* :mod:`~wbc_batch.training.augment`: the one augmentation policy;
* :mod:`~wbc_batch.training.recipe`: the one class-weight rule and schedule;
* :mod:`~wbc_batch.training.loss`: the on-cell loss term;
* :mod:`~wbc_batch.training.worker`: the Ray Train worker loop;
* :mod:`~wbc_batch.training.driver`: ``run_training``;
* :mod:`~wbc_batch.training.adapt`: ``run_adaptation`` (fine-tune to a new lab);
* :mod:`~wbc_batch.training.evaluation`: calibration, OOD statistics, evaluation;
* :mod:`~wbc_batch.training.publishing`: the registry and its promotion gate.
"""

from __future__ import annotations

from wbc_batch.training.augment import AUGMENT, AUGMENT_PRESETS, LIGHT, AugmentSpec, augment, preset
from wbc_batch.training.config import (
    AVERAGE_FILE,
    MATURE_CLASSES,
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    TrainConfig,
    TrainingError,
    resolve_precision,
)
from wbc_batch.training.data import (
    cell_grid,
    data_fingerprint,
    keep_earlier_split,
    list_labelled_files,
    read_split_csv,
    split_csv_text,
)
from wbc_batch.training.driver import initial_weights, run_training
from wbc_batch.training.evaluation import (
    calibrate,
    calibration_from_val,
    collect_logits,
    evaluate,
    fit_ood_statistics,
    format_summary,
    predict_embeddings,
    predict_logits,
)
from wbc_batch.training.loss import distillation, outside_share, recipe_model
from wbc_batch.training.publishing import publish
from wbc_batch.training.recipe import balanced_class_weights, scaled_class_weights
from wbc_batch.training.worker import train_loop_per_worker, weights_sha256

__all__ = [
    "AUGMENT", "AUGMENT_PRESETS", "AVERAGE_FILE", "AugmentSpec", "LIGHT", "MATURE_CLASSES", "OPTIMIZER_FILE", "STATE_FILE",
    "TrainConfig", "TrainingError", "WEIGHTS_FILE", "augment", "balanced_class_weights", "calibrate",
    "calibration_from_val", "cell_grid", "collect_logits", "data_fingerprint", "distillation", "evaluate", "fit_ood_statistics",
    "format_summary", "initial_weights", "keep_earlier_split", "list_labelled_files",
    "outside_share", "predict_embeddings", "predict_logits", "preset", "publish", "read_split_csv", "recipe_model",
    "resolve_precision", "run_training", "scaled_class_weights", "split_csv_text", "train_loop_per_worker",
    "weights_sha256",
]
