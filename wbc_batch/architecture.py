"""The CNN architecture, written once for Keras 3 and for tf-keras.

Why a module of its own: the shipped model is trained with Keras 3 and the
multi-worker Ray Train job with tf-keras (Keras 3 cannot run
``MultiWorkerMirroredStrategy``). Both build the *same* graph from this
function, so weights move between them by ``get_weights``/``set_weights``.

Design for accuracy per CPU millisecond: a small pre-activation-free ResNet
at 128 px whose last stage keeps a 16x16 grid (total stride 8). Grad-CAM
uses that last stage (``cam_features``), which gives heatmaps fine enough to
fall on the cell instead of on a 4x4 or 6x6 block.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

CAM_LAYER = "cam_features"
EMBEDDING_LAYER = "embedding"
LOGITS_LAYER = "logits"
INPUT_NAME = "image"
STAIN_NORM_LAYER = "stain_norm"
INPUT_NORMS: tuple[str, ...] = ("rescale", "stain")
# variance floor in (0..255)^2 units: a flat image (std < 4 grey levels) is not blown up into noise
STAIN_NORM_EPSILON = 16.0

# (filters, blocks, stride of the first block) per stage, after a stride-2 stem.
STAGES: tuple[tuple[int, int, int], ...] = ((32, 1, 1), (64, 2, 2), (128, 2, 2), (192, 1, 1))


def cam_grid_size(image_size: int) -> int:
    """Side of the ``cam_features`` grid for an input side: three stride-2 steps with "same" padding."""
    side = image_size
    for _ in range(3):  # the stem, stage 2 and stage 3
        side = -(-side // 2)
    return side


def _conv_bn(keras: ModuleType, x: Any, filters: int, stride: int, name: str, relu: bool = True) -> Any:
    layers = keras.layers
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_bn")(x)
    if relu:
        x = layers.Activation("relu", name=f"{name}_relu")(x)
    return x


def _residual_block(keras: ModuleType, x: Any, filters: int, stride: int, name: str, out_name: str | None = None) -> Any:
    layers = keras.layers
    shortcut = x
    if stride != 1 or int(x.shape[-1]) != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj_conv")(x)
        shortcut = layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_proj_bn")(shortcut)
    y = _conv_bn(keras, x, filters, stride, f"{name}_a")
    y = _conv_bn(keras, y, filters, 1, f"{name}_b", relu=False)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=out_name or f"{name}_out")(y)


def build_classifier(
    keras: ModuleType,
    num_classes: int,
    image_size: int = 128,
    dropout: float = 0.2,
    width: float = 1.0,
    input_norm: str = "rescale",
) -> Any:
    """Build the WBC classifier as a Functional model.

    Args:
        keras: the Keras module to build with (``keras`` or ``tf_keras``).
        num_classes: number of output classes (7 for the shipped model).
        image_size: square input side in pixels.
        dropout: dropout rate before the classifier head.
        width: channel multiplier for all stages.
        input_norm: the first layer: ``rescale`` (divide by 255, the shipped
            model's) or ``stain`` (standardise each channel of each image).

    Returns:
        A model mapping ``image`` (B, S, S, 3) float32 RGB in [0, 255] to
        ``logits`` (B, num_classes) float32, pre-softmax; the last layer
        computes in float32 whatever the global dtype policy.
    """
    if num_classes < 2:
        raise ValueError(f"expected at least 2 classes, got {num_classes}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    layers = keras.layers
    inputs = keras.Input(shape=(image_size, image_size, 3), name=INPUT_NAME)
    if input_norm == "stain":
        # Per-image, per-channel standardisation: a lab's stain, illumination and camera
        # gain shift and scale each channel of the whole image; dividing that out inside the
        # graph makes training and classify see the same normalised pixels with no code of
        # their own. float32 so that it stays exact under a mixed-precision policy.
        x = layers.LayerNormalization(
            axis=(1, 2), center=False, scale=False, epsilon=STAIN_NORM_EPSILON, dtype="float32",
            name=STAIN_NORM_LAYER,
        )(inputs)
    else:
        x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _conv_bn(keras, x, int(32 * width), 2, "stem")
    last_stage = len(STAGES) - 1
    for s, (filters, blocks, stride) in enumerate(STAGES):
        for b in range(blocks):
            is_last = s == last_stage and b == blocks - 1
            x = _residual_block(
                keras,
                x,
                int(filters * width),
                stride if b == 0 else 1,
                f"s{s + 1}b{b + 1}",
                out_name=CAM_LAYER if is_last else None,
            )
    x = layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name=LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name="wbc_resnet")


def input_norm_of(model: Any) -> str:
    """Which first layer an existing model has (``stain`` or ``rescale``), so a fine-tune rebuilds the same graph."""
    names = {layer.name for layer in model.layers}
    return "stain" if STAIN_NORM_LAYER in names else "rescale"
