"""The one augmentation policy of the project, as TensorFlow ops for ``tf.data``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


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

LIGHT = AugmentSpec(
    zoom=(0.9, 1.1), rotate_degrees=15.0, shift=0.05, hue=0.0, saturation=(1.0, 1.0), gamma=(1.0, 1.0),
    contrast=(0.9, 1.1), brightness=(0.9, 1.1), channel_gain=(0.95, 1.05), blur_probability=0.0,
    noise_probability=0.0, jpeg_probability=0.0, vignette_probability=0.0,
)
"""The geometry and mild photometry of the 1.0.0 recipe: a cell's up, small zoom and tint, no stain change.

Why a second preset: on PBC alone, :data:`AUGMENT`'s stain, blur and zoom
ranges cost 2-3 points of accuracy at this network size and CPU budget
(MODEL_CARD, "The training job"). It is also the default of ``wbc-batch
adapt``: there it adapted to Chula as well as :data:`AUGMENT` and kept 2.5
points more of PBC (MODEL_CARD, "Other labs").
"""

COLOUR = AugmentSpec(
    zoom=(0.9, 1.1), rotate_degrees=15.0, shift=0.05, hue=0.05, saturation=(0.5, 1.4), gamma=(0.8, 1.25),
    contrast=(0.25, 1.1), brightness=(0.8, 1.15), channel_gain=(0.85, 1.15), blur_probability=0.3,
    blur_sigma=(0.3, 1.5), noise_probability=0.3, noise_std=(1.0, 5.0), jpeg_probability=0.2,
    jpeg_quality=(50, 95), vignette_probability=0.3, vignette_strength=(0.1, 0.35),
)
"""The light preset's geometry with wide colour and contrast ranges, for fine-tuning a model to other labs' looks.

Why contrast down to 0.25: the shipped model reads PBC's validation cells
at 88% with their contrast scaled by 0.6, 5.5% at 0.45 and 0% at 0.3, and a
Chula image's CIELAB lightness spread is a third of a PBC image's
(docs/OTHER_LABS.md). Scale stays light: :mod:`wbc_batch.geometry` handles it.
Five epochs of it from 1.1.0 made a network that ignores contrast (94% at
0.3) but lost 1.65 points on PBC and read Chula at 18.1% (docs/TRAINING_RUNS.md,
twelfth run): not shipped, kept for the next run from scratch.
"""

AUGMENT_PRESETS: dict[str, AugmentSpec] = {"strong": AUGMENT, "light": LIGHT, "colour": COLOUR}


def preset(name: str) -> AugmentSpec:
    """The named augmentation preset (``strong`` or ``light``).

    Raises:
        ValueError: an unknown name.
    """
    try:
        return AUGMENT_PRESETS[name]
    except KeyError:
        raise ValueError(f"augmentation must be one of {sorted(AUGMENT_PRESETS)}, got {name!r}") from None


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
    if spec.hue:  # terms a preset turns off cost nothing
        x = tf.image.adjust_hue(x, _uniform(tf, (-spec.hue, spec.hue)))
    if spec.saturation != (1.0, 1.0):
        x = tf.image.adjust_saturation(x, _uniform(tf, spec.saturation))
    if spec.gamma != (1.0, 1.0):
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


def dihedral_views(images: np.ndarray) -> np.ndarray:
    """The 8 rotations and flips of each (N, S, S, 3) image, as (8N, S, S, 3), view-major.

    Why these 8: a smear has no up, so every one of them is the same cell;
    test-time augmentation and the OOD refit of ``adapt`` both use them.
    """
    views = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    views += [v[:, :, ::-1] for v in views]
    return np.ascontiguousarray(np.concatenate(views))
