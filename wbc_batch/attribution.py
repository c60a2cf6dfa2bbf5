"""Attribution maps by several methods, for chosen cells (``wbc-batch explain``).

Grad-CAM is our batched :class:`wbc_batch.explain.GradCam` (the one classify
uses, checked against tf-explain). The other methods use tf-explain 0.3.1's
own classes, through their static methods because its ``explain`` entry
points take one class for a whole batch and return a drawn grid, not maps:

============================ =====================================================
method                       tf-explain call, and what we do around it
============================ =====================================================
``vanilla_gradients``        ``VanillaGradients.compute_gradients`` on the logits
                             (the shipped model outputs logits, so no softmax to
                             strip); map = sum over RGB of ``|grad|``.
``smoothgrad``               ``SmoothGrad.generate_noisy_images`` and
                             ``get_averaged_gradients``; its loss is a categorical
                             cross-entropy on *probabilities*, so it gets the
                             model with a softmax on top. Noise std 10 % of the
                             0..255 range (tf-explain's default 1.0 is invisible
                             on that range), 16 samples, seeded.
``integrated_gradients``     ``IntegratedGradients.generate_interpolations`` (black
                             baseline) and ``get_integrated_gradients`` on the
                             logits, 20 steps. tf-explain returns the *path-mean
                             gradient*; we multiply by ``(image - baseline)`` as
                             the method defines, then sum ``|.|`` over RGB.
``occlusion``                ``OcclusionSensitivity.get_sensitivity_map`` with 8 px
                             grey patches; it returns ``1 - score(occluded)``; we
                             give it the *logits* and store ``logit - logit(occluded)``,
                             the logit drop (signed: negative where occluding
                             *raises* it), and draw its positive part. On
                             probabilities a confident cell (p ~ 1) barely moves
                             under one patch (measured: a drop of 2e-6 at most
                             on a sample monocyte), so the map would be empty.
``gradcam``                  ours; (16, 16) ReLU'd map before normalisation.
============================ =====================================================

Groups of images with the same target class go through tf-explain together,
so a batch with mixed targets stays batched per class.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from wbc_batch import imaging, metrics, storage
from wbc_batch.explain import GradCam, overlay_heatmap
from wbc_batch.geometry import model_inputs, view_at

METHODS: tuple[str, ...] = ("gradcam", "smoothgrad", "integrated_gradients", "occlusion", "vanilla_gradients")
SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_NOISE = 0.10 * 255.0
IG_STEPS = 20
OCCLUSION_PATCH = 8


@dataclass
class Attribution:
    """Maps for one batch.

    Attributes:
        maps: (B, h, w) float32; (16, 16) for gradcam, (S, S) for the others.
        targets: (B,) int32, the class each map explains.
        logits: (B, K) float32, pre-softmax.
        method: one of :data:`METHODS`.
    """

    maps: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    method: str


class _Predictor:
    """Gives tf-explain's occlusion a silent, compiled ``predict`` (Keras' prints a progress bar per call)."""

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self._fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        step = batch_size or 64
        return np.concatenate([np.asarray(self._fn(np.asarray(x[i:i + step], np.float32))) for i in range(0, len(x), step)])


class Explainer:
    """Computes attribution maps with any of :data:`METHODS` for one model."""

    def __init__(self, model: Any, gradcam_layer: str, seed: int = 0, occlusion_patch: int = OCCLUSION_PATCH) -> None:
        import keras

        self.model = model
        self.occlusion_patch = occlusion_patch
        self.gradcam_layer = gradcam_layer
        self.seed = seed
        self.num_classes = int(model.output_shape[-1])
        # tf-explain's smoothgrad loss expects probabilities at the output.
        self._softmax_model = keras.Model(model.inputs, keras.layers.Softmax(name="probabilities")(model.output))
        self._predictor = _Predictor(model)  # logits; compiled once, reused by every call
        self._gradcam: GradCam | None = None

    def _targets(self, images: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        logits = self._predictor.predict(images)
        predicted = logits.argmax(axis=1).astype(np.int32)
        if classes is None:
            return predicted, logits
        classes = np.asarray(classes, np.int32)
        if classes.shape != (len(images),):
            raise ValueError(f"expected classes of shape ({len(images)},), got {classes.shape}")
        if np.any(classes >= self.num_classes) or np.any(classes < -1):
            raise ValueError(f"class index out of range: expected -1 or 0..{self.num_classes - 1}")
        return np.where(classes >= 0, classes, predicted).astype(np.int32), logits

    def __call__(self, images: np.ndarray, method: str, classes: np.ndarray | None = None) -> Attribution:
        """Explain a batch.

        Args:
            images: (B, S, S, 3) float32 in [0, 255], the model input.
            method: one of :data:`METHODS`.
            classes: (B,) int class per image; -1 or None means the predicted class.

        Raises:
            ValueError: unknown method, bad shapes or class indices.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}, expected one of {', '.join(METHODS)}")
        images = np.asarray(images, np.float32)
        expected = tuple(int(d) for d in self.model.input_shape[1:])
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected images (B, {', '.join(map(str, expected))}), got {images.shape}")
        targets, logits = self._targets(images, classes)
        if method == "gradcam":
            if self._gradcam is None:
                self._gradcam = GradCam(self.model, self.gradcam_layer)
            maps = self._gradcam(images, targets).cams
        else:
            compute = getattr(self, f"_{method}")
            maps = np.zeros((len(images), *images.shape[1:3]), np.float32)
            for c in np.unique(targets):
                idx = np.flatnonzero(targets == c)
                maps[idx] = compute(images[idx], int(c), logits[idx, c])
        return Attribution(maps.astype(np.float32), targets, np.asarray(logits, np.float32), method)

    def _vanilla_gradients(self, images: np.ndarray, c: int, _p: np.ndarray) -> np.ndarray:
        from tf_explain.core.vanilla_gradients import VanillaGradients

        grads = VanillaGradients.compute_gradients(images, self.model, c)
        return np.abs(np.asarray(grads)).sum(axis=-1)

    def _smoothgrad(self, images: np.ndarray, c: int, _p: np.ndarray) -> np.ndarray:
        from tf_explain.core.smoothgrad import SmoothGrad

        state = np.random.get_state()  # tf-explain draws from numpy's global generator
        try:
            np.random.seed(self.seed)
            noisy = SmoothGrad.generate_noisy_images(images, SMOOTHGRAD_SAMPLES, SMOOTHGRAD_NOISE)
        finally:
            np.random.set_state(state)
        grads = SmoothGrad.get_averaged_gradients(noisy, self._softmax_model, c, SMOOTHGRAD_SAMPLES)
        return np.abs(np.asarray(grads)).sum(axis=-1)

    def _integrated_gradients(self, images: np.ndarray, c: int, _p: np.ndarray) -> np.ndarray:
        from tf_explain.core.integrated_gradients import IntegratedGradients

        path = IntegratedGradients.generate_interpolations(images, IG_STEPS).astype(np.float32)
        mean_grads = np.asarray(IntegratedGradients.get_integrated_gradients(path, self.model, c, IG_STEPS))
        return np.abs(((images - 0.0) * mean_grads).sum(axis=-1))  # baseline is black (zeros)

    def _occlusion(self, images: np.ndarray, c: int, logit: np.ndarray) -> np.ndarray:
        from tf_explain.core.occlusion_sensitivity import OcclusionSensitivity

        occ = OcclusionSensitivity(batch_size=64)
        # tf-explain gives 1 - logit(occluded); minus (1 - logit) leaves the drop.
        return np.stack([
            occ.get_sensitivity_map(self._predictor, image, c, self.occlusion_patch) - (1.0 - float(z))
            for image, z in zip(images, logit)
        ])


def display_map(attribution_map: np.ndarray) -> np.ndarray:
    """The map as drawn: negative part dropped, pixel-level maps clipped at their 99.5th percentile.

    Gradient maps have a few extreme pixels that would otherwise make the
    rest of the overlay invisible; the saved ``.npy`` is never clipped.
    """
    m = np.clip(attribution_map, 0.0, None)
    if m.shape[0] > 32 and m.max() > 0:
        m = np.minimum(m, np.percentile(m, 99.5))
    return m


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def explain_images(
    uris: list[str], out: str, method: str = "gradcam", class_name: str | None = None,
    model_uri: str | None = None, allow_untrusted: bool = False, batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Explain chosen images and write an overlay and the raw map per image.

    Files are named from the image content, ``<sha256>-<method>-<class>.jpg``
    (overlay on the original image) and ``.npy`` (the raw map as computed,
    float32), so re-explaining the same cell overwrites rather than piles up.

    Args:
        uris: local paths or ``s3://`` URIs of images.
        out: local folder or ``s3://`` prefix.
        method: one of :data:`METHODS`.
        class_name: class to explain (name or index); None: each image's predicted class.
        model_uri: model artifact; None: the shipped model.
        allow_untrusted: allow a remote model outside the trusted prefixes.

    Returns:
        One dict per input: input, sha256, predicted_class, probability
        (calibrated with the model's temperature, as classify reports it),
        explained_class, method, overlay, map.

    Raises:
        ValueError: unknown method or class, an undecodable image (named).
        FileNotFoundError: an input that does not exist.
    """
    from wbc_batch.model import load_artifact

    if not uris:
        raise ValueError("expected at least one image")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}, expected one of {', '.join(METHODS)}")
    art = load_artifact(model_uri, allow_untrusted=allow_untrusted)
    names = art.meta.class_names
    target = -1
    if class_name is not None:
        if class_name in names:
            target = names.index(class_name)
        elif class_name.isdigit() and int(class_name) < len(names):
            target = int(class_name)
        else:
            raise ValueError(f"unknown class {class_name!r}, expected one of {', '.join(names)}")
    explainer = Explainer(art.model, art.meta.gradcam_layer)
    results: list[dict[str, Any]] = []
    for start in range(0, len(uris), batch_size):
        chunk = uris[start:start + batch_size]
        raws = [storage.read_bytes(u) for u in chunk]
        rgbs = []
        for uri, raw in zip(chunk, raws):
            try:
                rgbs.append(imaging.decode_image(raw))
            except imaging.ImageDecodeError as exc:
                raise imaging.ImageDecodeError(f"{uri}: {exc}") from None
        batch, zooms = model_inputs(rgbs, art.meta.image_size, art.meta.field_scale)
        attr = explainer(batch, method, np.full(len(chunk), target, np.int32))
        calibrated = metrics.softmax(attr.logits, art.meta.temperature)
        for i, (uri, raw, rgb) in enumerate(zip(chunk, raws, rgbs)):
            sha = hashlib.sha256(raw).hexdigest()
            explained = names[int(attr.targets[i])]
            stem = storage.join(out, f"{sha}-{method}-{explained}")
            storage.write_bytes(f"{stem}.npy", _npy_bytes(attr.maps[i]))
            storage.write_bytes(f"{stem}.jpg", imaging.encode_jpeg(overlay_heatmap(view_at(rgb, float(zooms[i]), art.meta.field_scale, art.meta.image_size), display_map(attr.maps[i]))))
            predicted = int(calibrated[i].argmax())
            results.append({
                "input": uri,
                "sha256": sha,
                "predicted_class": names[predicted],
                "probability": round(float(calibrated[i, predicted]), 4),
                "explained_class": explained,
                "method": method,
                "overlay": f"{stem}.jpg",
                "map": f"{stem}.npy",
            })
    return results
