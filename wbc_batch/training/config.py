"""Settings of a training run and the constants every training module shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wbc_batch import imaging, splits
from wbc_batch.errors import InvalidInputError
from wbc_batch.training.augment import preset
from wbc_batch.training.labs import Lab, default_lab_name, labs_from

MATURE_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


LEGACY_KERAS_ENV = {"TF_USE_LEGACY_KERAS": "1"}


WEIGHTS_FILE = "weights.npz"


OPTIMIZER_FILE = "optimizer.npz"


STATE_FILE = "state.json"


AVERAGE_FILE = "average.npz"  # the running average of the weights, in a run that keeps one (--weight-average)


PRECISIONS: tuple[str, ...] = ("auto", "float32", "mixed_bfloat16")


def resolve_precision(requested: str, use_gpu: bool, cpu_flags: str | None = None) -> str:
    """The Keras dtype policy a run trains under.

    Why ``auto`` picks bfloat16 only on GPUs and on CPUs with AMX: there mixed
    bfloat16 trains this network about twice as fast as float32 (145 against
    72 images/s measured on 2 AMX cores); weights stay float32, so the artifact
    and classify are unchanged. On CPUs with AVX512-BF16 but no AMX, oneDNN's
    bfloat16 convolutions are slower than float32 (a training step of this
    network at 128 px on 2 such cores: 36 against 56 images/s, 2026-12-02), and
    elsewhere bfloat16 is emulated, so ``auto`` keeps float32.

    Args:
        cpu_flags: the text of ``/proc/cpuinfo`` (read when omitted).
    """
    if requested != "auto":
        return requested
    if use_gpu:
        return "mixed_bfloat16"
    if cpu_flags is None:
        try:
            cpu_flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "float32"
    return "mixed_bfloat16" if "amx_bf16" in cpu_flags.split() else "float32"


class TrainingError(InvalidInputError):
    """Training data or settings a run cannot use (no images, too few classes, unknown class folders): exit 2."""


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
    label_smoothing: float = 0.0
    weight_average: float = 0.0
    init_from: str | None = None
    distill_from: str | None = None  # a teacher artifact whose logits of each training image join the loss
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    precision: str = "auto"
    input_norm: str = "rescale"
    augment: str = "strong"
    freeze_norm: bool = False  # BatchNormalization in inference mode: fine-tuning keeps the base's statistics
    command: str = ""
    class_weight_factors: dict[str, float] = field(default_factory=dict)
    decode_batch_size: int = 32
    label_map: dict[str, str] = field(default_factory=lambda: dict(splits.DEFAULT_LABEL_MAP))
    labs: list[Lab] = field(default_factory=list)  # empty: DATA_URI is the one lab, split by file

    def __post_init__(self) -> None:
        if not self.labs:
            self.labs = [Lab(default_lab_name(self.data_uri), self.data_uri)]
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
        preset(self.augment)  # ValueError naming the presets
        if self.on_cell_weight < 0:
            raise ValueError(f"on-cell weight must be >= 0, got {self.on_cell_weight}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.weight_average < 1:
            raise ValueError(f"weight average decay must be in [0, 1), got {self.weight_average}")
        if not 0 < self.distill_weight <= 1:
            raise ValueError(f"distillation weight must be in (0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.distill_temperature}")
        for name, factor in self.class_weight_factors.items():
            if factor <= 0:
                raise ValueError(f"class weight factor of {name} must be > 0, got {factor}")

    @classmethod
    def from_args(cls, args: Any) -> TrainConfig:
        """Build from the ``wbc-batch train`` namespace."""
        from wbc_batch.training.recipe import RECIPE_CLASS_WEIGHT_FACTORS  # recipe imports this module

        labs = labs_from(list(args.data), dict(args.split_by or []))
        return cls(
            data_uri=labs[0].uri,
            labs=labs,
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
            label_smoothing=args.label_smoothing,
            weight_average=args.weight_average,
            init_from=args.init_from,
            distill_from=args.distill_from,
            distill_weight=args.distill_weight,
            distill_temperature=args.distill_temperature,
            precision=args.precision,
            input_norm=args.input_norm,
            augment=args.augment,
            command=getattr(args, "command_line", ""),
            weight_decay=args.weight_decay,
            seed=args.seed,
            # no --class-weight at all: the recipe's factors; any given replace them
            class_weight_factors=dict(RECIPE_CLASS_WEIGHT_FACTORS if args.class_weight is None else args.class_weight),
        )

    def checkpoint_root(self) -> str:
        """Where Ray Train keeps this run's checkpoints (beside MODEL_OUT unless set)."""
        return self.storage_path or f"{str(self.model_out).rstrip('/')}-checkpoints"
