"""The one class-weight rule, learning-rate schedule and optimizer of every training path.

``wbc-batch train`` and ``wbc-batch adapt`` (and the tests) call these, so a
lab that retrains or adapts gets the recipe the shipped model was made with.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from wbc_batch.training.config import TrainingError

WARMUP_EPOCHS = 3
FINAL_LR_FRACTION = 1e-3

# The defaults of ``wbc-batch train``: the job's best recipe from scratch so far (docs/TRAINING_RUNS.md, the
# sixth run: 97.1% on PBC validation, 98.1% on test). Those not here (learning rate, weight decay, image size)
# are the job's plain defaults, the same in that run.
RECIPE_EPOCHS = 75
RECIPE_BATCH_SIZE = 128
RECIPE_AUGMENT = "light"
RECIPE_ON_CELL_WEIGHT = 1.0
RECIPE_CLASS_WEIGHT_FACTORS: dict[str, float] = {"non_wbc": 2.0}


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


def learning_rate_schedule(keras: ModuleType, peak: float, epochs: int, steps_per_epoch: int) -> Any:
    """Linear warm-up to ``peak`` over up to 3 epochs (at most a tenth of the run), then cosine to peak/1000."""
    total = max(1, epochs * steps_per_epoch)
    warm = min(WARMUP_EPOCHS * steps_per_epoch, max(1, total // 10))
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total - warm), alpha=FINAL_LR_FRACTION, warmup_target=float(peak), warmup_steps=warm,
    )


def make_optimizer(keras: ModuleType, peak: float, weight_decay: float, epochs: int, steps_per_epoch: int) -> Any:
    """AdamW on :func:`learning_rate_schedule` (decoupled weight decay)."""
    schedule = learning_rate_schedule(keras, peak, epochs, steps_per_epoch)
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=float(weight_decay))


def average_decay(decay: float, step: int) -> float:
    """How much of the running average of the weights survives optimizer step ``step`` (1-based).

    ``decay`` itself, but at most (1 + step) / (10 + step): the average starts
    from the first weights (random ones in a run from scratch), and at a
    constant 0.998 they would still weigh 4% after 1,600 steps; the ramp
    lets the early average follow the network instead.
    """
    return min(float(decay), (1.0 + step) / (10.0 + step))


class WeightAverage:
    """An exponential moving average of a network's weights (all of them, BatchNorm statistics too).

    Why: the weights after the last step are one noisy point of the optimizer's
    path; the average over its last few hundred steps usually generalises
    better at no cost in ``classify`` (the artifact simply holds the average).
    """

    def __init__(self, decay: float, weights: list[Any]) -> None:
        if not 0 < decay < 1:
            raise TrainingError(f"weight average decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.values = [np.array(w, dtype=np.float32, copy=True) for w in weights]

    def update(self, weights: list[Any], step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1-based, counted over the whole run)."""
        d = average_decay(self.decay, step)
        for avg, w in zip(self.values, weights):
            avg *= d
            avg += (1.0 - d) * np.asarray(w, dtype=np.float32)


def describe(peak: float, weight_decay: float, global_batch: int) -> str:
    """The optimizer and schedule in words, for ``model.json``."""
    return (f"AdamW lr {peak} ({WARMUP_EPOCHS}-epoch warm-up, cosine to x{FINAL_LR_FRACTION}), "
            f"weight decay {weight_decay}, global batch {global_batch}")


def balanced_within_groups(labels: list[int], groups: list[int]) -> list[float]:
    """Per-image weights: within each group (a lab) every class weighs the same; the mean weight is 1.

    Why: when a new lab's cells are mixed with replayed cells of the first lab,
    each lab's class mix is its own accident of sampling; balancing classes
    inside each lab keeps a rare class of one lab from being drowned out.
    """
    from collections import Counter

    if len(labels) != len(groups):
        raise TrainingError(f"expected one group per label, got {len(groups)} groups for {len(labels)} labels")
    if not labels:
        return []
    per_group = Counter(groups)
    per_class = Counter(zip(groups, labels))
    classes_in = Counter(g for g, _ in per_class)
    raw = [per_group[g] / (classes_in[g] * per_class[(g, c)]) for c, g in zip(labels, groups)]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]
