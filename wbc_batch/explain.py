"""Grad-CAM computed in the same pass as the prediction, and drawing it.

Choices (checked against tf-explain's per-image static methods in the tests):
- the target is the **pre-softmax logit** of each image's own predicted class
  (or a given class), so one batch holds images with different targets;
- plain gradients: no "guided" filtering of positive activations/gradients
  (tf-explain's default filters them; we pass ``use_guided_grads=False`` to
  the oracle);
- channel weights are the spatial mean of the gradients; the map is the
  weighted sum of the target layer's channels, then ReLU;
- normalisation divides by the per-image maximum plus an epsilon, so a flat
  map is zeros, never NaN.

Computing a map (:class:`GradCam`) and drawing it (:func:`overlay_heatmap`)
are separate, as in pytorch-grad-cam and MONAI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

EPSILON = 1e-7


@dataclass
class CamBatch:
    """One batch's forward and Grad-CAM results.

    Attributes:
        logits: (B, K) float32, pre-softmax.
        embeddings: (B, D) float32, the pooled features before the classifier.
        cams: (B, h, w) float32, ReLU'd Grad-CAM before normalisation.
        targets: (B,) int32, the class each map explains.
    """

    logits: np.ndarray
    embeddings: np.ndarray
    cams: np.ndarray
    targets: np.ndarray


class GradCam:
    """Batched Grad-CAM over a Keras Functional model, one forward and one backward pass.

    Keras' own Grad-CAM example builds a second model that exposes the
    target layer's activations beside the logits; the served model is left
    untouched.
    """

    def __init__(self, model: Any, layer_name: str, embedding_layer: str | None = None,
                 choice_offsets: np.ndarray | None = None) -> None:
        """``choice_offsets`` (K,): added to the logits when the predicted class is chosen (0 for a class a lab
        declared, a large negative for one it did not: :func:`wbc_batch.metrics.declared_class_logits`), so the
        map explains the class the lab is told; the returned logits stay the model's own."""
        import keras
        import tensorflow as tf

        try:
            target = model.get_layer(layer_name)
        except ValueError:
            raise ValueError(f"model has no layer {layer_name!r} for Grad-CAM") from None
        outputs = [target.output, model.output]
        if embedding_layer is not None:
            outputs.append(model.get_layer(embedding_layer).output)
        self._has_embedding = embedding_layer is not None
        self._grad_model = keras.Model(model.inputs, outputs)
        self.input_shape = tuple(int(d) for d in model.input_shape[1:])
        self.num_classes = int(model.output_shape[-1])
        self.cam_shape = tuple(int(d) for d in target.output.shape[1:3])
        offsets = np.zeros(self.num_classes, np.float32) if choice_offsets is None else choice_offsets
        self._offsets = tf.constant(np.asarray(offsets, np.float32).reshape(1, self.num_classes))
        signature = [
            tf.TensorSpec((None, *self.input_shape), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ]
        self._fn = tf.function(self._compute, input_signature=signature, reduce_retracing=True)

    def _compute(self, images: Any, classes: Any) -> tuple[Any, Any, Any, Any]:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outs = self._grad_model(images, training=False)
            feats, logits = outs[0], outs[1]
            embeddings = outs[2] if self._has_embedding else tf.zeros((tf.shape(images)[0], 0))
            tape.watch(feats)
            predicted = tf.argmax(tf.cast(logits, tf.float32) + self._offsets, axis=1, output_type=tf.int32)
            targets = tf.where(classes >= 0, classes, predicted)
            # Images are independent in inference mode, so the gradient of the
            # sum w.r.t. image i's features is the gradient of its own logit.
            score = tf.reduce_sum(tf.gather(logits, targets, axis=1, batch_dims=1))
        grads = tape.gradient(score, feats)
        weights = tf.reduce_mean(grads, axis=(1, 2))
        cams = tf.nn.relu(tf.einsum("bhwc,bc->bhw", feats, weights))
        return logits, embeddings, cams, targets

    def __call__(self, images: np.ndarray, classes: np.ndarray | None = None) -> CamBatch:
        """Predict and explain a batch.

        Args:
            images: (B, S, S, 3) float32 or uint8 in [0, 255], the model input.
            classes: (B,) int class to explain per image; -1 or None means
                the predicted class.

        Returns:
            A :class:`CamBatch`.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images (B, {', '.join(map(str, self.input_shape))}), got {images.shape}")
        if classes is None:
            classes = np.full(len(images), -1, dtype=np.int32)
        classes = np.asarray(classes, dtype=np.int32)
        if classes.shape != (len(images),):
            raise ValueError(f"expected classes of shape ({len(images)},), got {classes.shape}")
        if np.any(classes >= self.num_classes) or np.any(classes < -1):
            # -2 and below used to be explained as the predicted class silently.
            raise ValueError(
                f"class index out of range: got {classes.min()}..{classes.max()}, "
                f"expected -1 (predicted) or 0..{self.num_classes - 1}"
            )
        logits, emb, cams, targets = self._fn(images.astype(np.float32, copy=False), classes)
        return CamBatch(logits.numpy(), emb.numpy(), cams.numpy(), targets.numpy())


def normalise_cams(cams: np.ndarray) -> np.ndarray:
    """Scale each map to [0, 1] by its maximum; a flat map stays all zeros.

    Args:
        cams: (B, h, w) or (h, w) float, non-negative.
    """
    cams = np.asarray(cams, dtype=np.float32)
    peak = cams.max(axis=(-2, -1), keepdims=True)
    return cams / (peak + EPSILON)


def upsample_cam(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize one (h, w) map to (height, width) with bicubic interpolation, clipped to >= 0."""
    return np.clip(cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC), 0.0, None)


def overlay_heatmap(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a Grad-CAM map over an image.

    Args:
        rgb: (H, W, 3) uint8, the original image.
        cam: (h, w) float map at any resolution (normalised here).
        alpha: weight of the colour map.

    Returns:
        (H, W, 3) uint8 RGB, the JET colour map blended over the image.
    """
    h, w = rgb.shape[:2]
    up = normalise_cams(upsample_cam(cam, w, h))
    colour = cv2.applyColorMap((up * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(rgb, 1.0 - alpha, colour, alpha, 0.0)
