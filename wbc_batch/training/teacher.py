"""Distillation's teacher: a model artifact whose logits of every training image join the loss.

Why the logits are computed once, before training, and not at every step:
a second network's forward pass at every step would make each epoch about a
quarter slower, and the recipe already fills the 2-hour budget of a 2-core
machine. The teacher sees each image as classify feeds it; the student sees
augmented views of it. With the ``light`` augmentation (rotations, flips,
small zoom and tint, which the teacher was trained on) the teacher's answer
does not depend on the view, so one answer per image stands for all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wbc_batch.training.config import TrainingError

TEACHER_COLUMN = "teacher_logits"


def load_parent(uri: str, option: str, classes: list[str], image_size: int) -> tuple[Any, dict[str, Any]]:
    """A model a run learns from (``--init-from``, ``--distill-from``), verified, and its provenance.

    Raises:
        TrainingError: the model has other classes (or another order) or
            another input size than the run.
    """
    from wbc_batch.model import load_artifact

    artifact = load_artifact(uri, allow_untrusted=True)
    meta = artifact.meta
    if list(meta.class_names) != list(classes):
        raise TrainingError(f"{option} model has classes {meta.class_names}, the data has {classes}")
    if int(meta.image_size) != image_size:
        raise TrainingError(f"{option} model takes {meta.image_size} px images, this run {image_size} px")
    origin = {"uri": str(uri), "version": meta.version, "model_sha256": meta.model_sha256, "digest": artifact.digest}
    return artifact, origin


def load_teacher(uri: str, classes: list[str], image_size: int) -> tuple[Any, dict[str, Any]]:
    """The verified ``--distill-from`` artifact and its provenance for ``model.json``."""
    return load_parent(uri, "--distill-from", classes, image_size)


class TeacherLogits:
    """Ray Data ``map_batches`` class: adds the teacher's logits of each image as ``teacher_logits`` (B, K).

    One instance per actor loads the teacher once (Keras 3, as classify does).
    """

    def __init__(self, uri: str, classes: list[str], image_size: int) -> None:
        self.model = load_teacher(uri, classes, image_size)[0].model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from wbc_batch.training.evaluation import predict_logits

        logits = predict_logits(self.model, batch["image"]).astype(np.float32)
        return {**batch, TEACHER_COLUMN: logits}


def with_teacher_logits(train_ds: Any, uri: str, classes: list[str], image_size: int) -> Any:
    """``train_ds`` with the teacher's logits of every image, materialised so they are computed once.

    The actor takes one CPU, so on a 2-CPU machine the read tasks keep the other.
    """
    import ray

    return train_ds.map_batches(
        TeacherLogits,
        fn_constructor_kwargs={"uri": uri, "classes": list(classes), "image_size": image_size},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
        batch_size=256,
        batch_format="numpy",
    ).materialize()
