"""Is the heatmap faithful to the model? Deletion, insertion and pixel retention.

A map is faithful when the pixels it ranks highest are the ones the model
needs. Three figures, each computed for the real map *and* for a random map
of the same resolution (upsampled the same way, so it has the same blocky
spatial structure and only the ranking differs):

- **Deletion AUC** (Petsiuk et al., RISE, 2018): replace the most salient
  pixels of the 128x128 model input with a baseline, in ``steps`` equal
  steps from 0 to 100 %, and integrate the explained class's probability
  over the removed fraction. Lower is better: a faithful map destroys the
  evidence first.
- **Insertion AUC**: start from a baseline image and reveal the most
  salient pixels first. Higher is better.
- **Pixel retention** (the original notebook's curve): keep only the top
  75, 50, 25, 20, 10, 5 % of pixels, set the rest to the baseline, and
  report how often the explained class stays the top class ("accuracy",
  against the explained class) and its mean probability.

Choices and why:
- *Baselines*, as RISE: deletion and retention replace pixels with the
  image's mean colour (removes colour and texture, the evidence of a stained
  cell); insertion starts from a strong Gaussian blur of the image (a
  constant canvas is far out of distribution and would make every early
  step score alike).
- *Score*: the softmax of ``logits / temperature``, i.e. the calibrated
  probability the pipeline reports (``temperature=1`` gives raw softmax).
- Pixels are ranked on the map upsampled bicubically to the input size (as
  drawn); ties (the ReLU's zeros) are broken at random with the seed.
- Every step of every image is one row of a batched forward pass.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from wbc_batch import metrics
from wbc_batch.explain import upsample_cam

DEFAULT_STEPS = 16
RETENTION_PERCENTS: tuple[int, ...] = (75, 50, 25, 20, 10, 5)
BLUR_SIGMA = 8.0  # pixels of the 128 px input: cell outline kept, nucleus texture gone
FORWARD_BATCH = 256


def _check(images: np.ndarray, cams: np.ndarray, targets: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected images (N, S, S, 3), got {images.shape}")
    n = len(images)
    if n == 0:
        raise ValueError("expected at least one image, got 0")
    if cams.ndim != 3 or len(cams) != n:
        raise ValueError(f"expected cams ({n}, h, w), got {cams.shape}")
    if targets.shape != (n,):
        raise ValueError(f"expected targets ({n},), got {targets.shape}")


def _as_arrays(images: Any, cams: Any, targets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs as float32 images and maps and int64 targets, shape-checked."""
    images = np.asarray(images, np.float32)
    cams = np.asarray(cams, np.float32)
    targets = np.asarray(targets, np.int64)
    _check(images, cams, targets)
    return images, cams, targets


def _forward(model: Any) -> Any:
    """A compiled inference function returning logits as numpy, called in fixed chunks."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.asarray(fn(tf.constant(x[i:i + FORWARD_BATCH], tf.float32))) for i in range(0, len(x), FORWARD_BATCH)]
        )

    return run


def pixel_ranks(cams: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Rank of every input pixel by saliency, 0 = most salient.

    Args:
        cams: (N, h, w) non-negative maps.
        size: the model input side S.
        rng: breaks ties (flat regions) at random.

    Returns:
        (N, S, S) int32 ranks.
    """
    ranks = np.empty((len(cams), size, size), dtype=np.int32)
    for i, cam in enumerate(cams):
        up = upsample_cam(np.asarray(cam, np.float32), size, size).ravel()
        order = np.lexsort((rng.random(up.size), -up))  # primary: saliency desc; ties random
        r = np.empty(up.size, dtype=np.int32)
        r[order] = np.arange(up.size, dtype=np.int32)
        ranks[i] = r.reshape(size, size)
    return ranks


def mean_colour_baseline(images: np.ndarray) -> np.ndarray:
    """Each image replaced by its own mean colour, (N, S, S, 3) float32."""
    return np.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape).astype(np.float32)


def blur_baseline(images: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Each image strongly blurred, (N, S, S, 3) float32."""
    return np.stack([cv2.GaussianBlur(im.astype(np.float32), (0, 0), sigma) for im in images])


def _scores_at(
    run: Any, images: np.ndarray, source: np.ndarray, ranks: np.ndarray, keep_counts: list[int],
    targets: np.ndarray, temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Probability of the target and whether it stays top, for images showing ``source`` on the top-k pixels.

    For each k in ``keep_counts``, pixel p of image i comes from ``source[i]``
    where ``ranks[i, p] < k`` and from ``images[i]`` elsewhere.

    Returns:
        (N, len(keep_counts)) probability and (N, len(keep_counts)) bool top-1 == target.
    """
    n, steps = len(images), len(keep_counts)
    batch = np.empty((n, steps, *images.shape[1:]), dtype=np.float32)
    for j, k in enumerate(keep_counts):
        sel = (ranks < k)[..., None]
        batch[:, j] = np.where(sel, source, images)
    logits = run(batch.reshape(n * steps, *images.shape[1:])).reshape(n, steps, -1)
    probs = metrics.softmax(logits.reshape(n * steps, -1), temperature).reshape(logits.shape)
    rows = np.arange(n)[:, None]
    return probs[rows, np.arange(steps)[None, :], targets[:, None]], logits.argmax(-1) == targets[:, None]


def _auc(curve: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row of ``curve`` over ``fractions`` (0..1)."""
    return ((curve[:, 1:] + curve[:, :-1]) / 2 * np.diff(fractions)[None, :]).sum(axis=1)


def deletion_insertion(
    model: Any, images: np.ndarray, cams: np.ndarray, targets: np.ndarray, temperature: float = 1.0,
    steps: int = DEFAULT_STEPS, seed: int = 0, run: Any = None,
) -> dict[str, np.ndarray]:
    """Deletion and insertion curves for one set of maps.

    Args:
        model: Keras model mapping (B, S, S, 3) float32 in [0, 255] to logits.
        images: (N, S, S, 3) float32 model inputs.
        cams: (N, h, w) non-negative maps (any resolution).
        targets: (N,) int class each map explains.
        temperature: calibration temperature for the probabilities.
        steps: number of equal steps from 0 to 100 % of the pixels.
        seed: tie-breaking seed.

    Returns:
        ``fractions`` (steps+1,), ``deletion`` and ``insertion`` (N, steps+1)
        probability curves, ``deletion_auc`` and ``insertion_auc`` (N,).
    """
    images, cams, targets = _as_arrays(images, cams, targets)
    run = run or _forward(model)
    size = images.shape[1]
    ranks = pixel_ranks(cams, size, np.random.default_rng(seed))
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = [int(round(f * size * size)) for f in fractions]
    deletion, _ = _scores_at(run, images, mean_colour_baseline(images), ranks, counts, targets, temperature)
    # Insertion: the blurred image shows the real pixels on the top-k: swap roles.
    blurred = blur_baseline(images)
    insertion, _ = _scores_at(run, blurred, images, ranks, counts, targets, temperature)
    return {
        "fractions": fractions,
        "deletion": deletion,
        "insertion": insertion,
        "deletion_auc": _auc(deletion, fractions),
        "insertion_auc": _auc(insertion, fractions),
    }


def pixel_retention(
    model: Any, images: np.ndarray, cams: np.ndarray, targets: np.ndarray, temperature: float = 1.0,
    percents: tuple[int, ...] = RETENTION_PERCENTS, seed: int = 0, run: Any = None,
) -> dict[str, np.ndarray]:
    """Keep only the top ``percents`` % most salient pixels, the rest at the mean colour.

    Returns:
        ``percents``, ``probability`` (N, P) of the explained class and
        ``kept`` (N, P) bool: the explained class is still the top class.
    """
    images, cams, targets = _as_arrays(images, cams, targets)
    run = run or _forward(model)
    size = images.shape[1]
    ranks = pixel_ranks(cams, size, np.random.default_rng(seed))
    counts = [int(round(p / 100 * size * size)) for p in percents]
    # Mean colour everywhere, real pixels on the top-k.
    probability, kept = _scores_at(run, mean_colour_baseline(images), images, ranks, counts, targets, temperature)
    return {"percents": np.array(percents), "probability": probability, "kept": kept}


def random_maps(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Uniform random maps at the heatmap's own resolution (upsampled like the real ones later)."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _r(x: float) -> float:
    return round(float(x), 4)


def faithfulness_summary(
    model: Any, images: np.ndarray, cams: np.ndarray, targets: np.ndarray, temperature: float, seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> dict[str, Any]:
    """Deletion/insertion AUC and pixel retention for the maps and for random maps.

    Called once per run on a sample of images; the result goes into the run
    manifest under ``"faithfulness"``.

    Args:
        model: Keras model, (B, S, S, 3) float32 in [0, 255] -> logits.
        images: (N, S, S, 3) float32 model inputs.
        cams: (N, h, w) non-negative Grad-CAM maps (before or after normalisation).
        targets: (N,) int class each map explains.
        temperature: calibration temperature (> 0).
        seed: seed of the random maps and tie-breaking.
        steps: deletion/insertion steps.

    Returns:
        A JSON-serialisable dict: ``n_images``, settings, ``deletion_auc`` and
        ``insertion_auc`` ({"gradcam", "random"} means and the share of images
        where the real map beats the random one), the mean curves and the
        retention table.

    Raises:
        ValueError: mismatched shapes, no images, or a non-positive temperature.
    """
    images, cams, targets = _as_arrays(images, cams, targets)
    if not temperature > 0:
        raise ValueError(f"expected a positive temperature, got {temperature}")
    run = _forward(model)
    rand = random_maps(cams.shape, seed + 1)
    di = {
        "gradcam": deletion_insertion(model, images, cams, targets, temperature, steps, seed, run),
        "random": deletion_insertion(model, images, rand, targets, temperature, steps, seed, run),
    }
    ret = {
        "gradcam": pixel_retention(model, images, cams, targets, temperature, seed=seed, run=run),
        "random": pixel_retention(model, images, rand, targets, temperature, seed=seed, run=run),
    }
    out: dict[str, Any] = {
        "n_images": len(images),
        "steps": steps,
        "temperature": _r(temperature),
        "seed": seed,
        "score": "softmax(logits / temperature) of the explained class",
        "deletion_baseline": "image mean colour",
        "insertion_baseline": f"gaussian blur, sigma {BLUR_SIGMA} px of the {images.shape[1]} px input",
        "random_map": f"uniform random at the map's resolution {list(cams.shape[1:])}, upsampled as the real map",
        "fractions": [_r(f) for f in di["gradcam"]["fractions"]],
    }
    for key, better in (("deletion", np.less), ("insertion", np.greater)):
        real, rnd = di["gradcam"][f"{key}_auc"], di["random"][f"{key}_auc"]
        out[f"{key}_auc"] = {
            "gradcam": _r(real.mean()),
            "random": _r(rnd.mean()),
            "gradcam_beats_random_share": _r(better(real, rnd).mean()),
        }
        out[f"{key}_curve"] = {name: [_r(v) for v in di[name][key].mean(axis=0)] for name in di}
    out["retention"] = {
        "keep_percent": [int(p) for p in RETENTION_PERCENTS],
        "baseline": "image mean colour",
        **{
            name: {
                "accuracy": [_r(v) for v in r["kept"].mean(axis=0)],
                "probability": [_r(v) for v in r["probability"].mean(axis=0)],
            }
            for name, r in ret.items()
        },
    }
    return out
