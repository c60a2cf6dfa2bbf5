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


def compiled_forward(model: Any) -> Any:
    """A compiled inference function returning logits as numpy, called in fixed chunks.

    Build it once per model and pass it as ``run``: each build is a new
    ``tf.function`` that traces on its first call. With the model's input
    shape known it is traced once for every batch size (an image's
    deletion and insertion steps and its retention levels come in batches
    of different sizes, which otherwise traced it twice, about a second of
    CPU in a model actor).
    """
    import tensorflow as tf

    shape = tuple(getattr(model, "input_shape", ()) or ())
    if len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
        spec = tf.TensorSpec((None, *shape[1:]), tf.float32)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    else:
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
    run = run or compiled_forward(model)
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
    run = run or compiled_forward(model)
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


def faithfulness_records(
    model: Any, images: np.ndarray, cams: np.ndarray, targets: np.ndarray, temperature: float,
    seeds: Any, steps: int = DEFAULT_STEPS, run: Any = None,
) -> list[dict[str, Any]]:
    """Per-image deletion, insertion and retention figures, for the real map and a random one.

    Each image is measured with its own seed (``seeds[i]`` breaks its ties and
    draws its random map), so an image's record does not depend on which
    images share its batch: classify measures its sample inside the model
    actors, a few images per batch, and :func:`summarise_faithfulness` joins
    the records in the driver.

    Returns:
        One JSON-serialisable dict per image: ``image_size``, ``cam_shape``, ``deletion_auc`` and
        ``insertion_auc`` ({"gradcam", "random"} floats), ``deletion_curve``
        and ``insertion_curve`` ({"gradcam", "random"} lists of ``steps`` + 1
        points) and ``retention``
        ({"gradcam", "random"}: ``probability`` and ``kept`` per
        :data:`RETENTION_PERCENTS`).

    Raises:
        ValueError: mismatched shapes, no images, or a non-positive temperature.
    """
    images, cams, targets = _as_arrays(images, cams, targets)
    if not temperature > 0:
        raise ValueError(f"expected a positive temperature, got {temperature}")
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(images):
        raise ValueError(f"expected one seed per image ({len(images)}), got {len(seeds)}")
    run = run or compiled_forward(model)
    records = []
    for i, seed in enumerate(seeds):
        one = (images[i:i + 1], targets[i:i + 1])
        maps = {"gradcam": cams[i:i + 1], "random": random_maps(cams[i:i + 1].shape, seed + 1)}
        di = {name: deletion_insertion(model, one[0], m, one[1], temperature, steps, seed, run)
              for name, m in maps.items()}
        ret = {name: pixel_retention(model, one[0], m, one[1], temperature, seed=seed, run=run)
               for name, m in maps.items()}
        record: dict[str, Any] = {"image_size": int(images.shape[1]), "cam_shape": [int(d) for d in cams.shape[1:]]}
        for key in ("deletion", "insertion"):
            record[f"{key}_auc"] = {name: float(di[name][f"{key}_auc"][0]) for name in maps}
            record[f"{key}_curve"] = {name: [float(v) for v in di[name][key][0]] for name in maps}
        record["retention"] = {name: {"probability": [float(v) for v in r["probability"][0]],
                                      "kept": [bool(v) for v in r["kept"][0]]} for name, r in ret.items()}
        records.append(record)
    return records


def summarise_faithfulness(records: list[dict[str, Any]], temperature: float, seed: int, steps: int) -> dict[str, Any]:
    """The summary of :func:`faithfulness_records`: means, shares and mean curves (:func:`faithfulness_summary`).

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("expected at least one faithfulness record, got 0")
    fractions = np.linspace(0.0, 1.0, steps + 1)
    image_size, cam_shape = records[0]["image_size"], records[0]["cam_shape"]
    out: dict[str, Any] = {
        "n_images": len(records),
        "steps": steps,
        "temperature": _r(temperature),
        "seed": seed,
        "score": "softmax(logits / temperature) of the explained class",
        "deletion_baseline": "image mean colour",
        "insertion_baseline": f"gaussian blur, sigma {BLUR_SIGMA} px of the {image_size} px input",
        "random_map": f"uniform random at the map's resolution {list(cam_shape)}, upsampled as the real map",
        "fractions": [_r(f) for f in fractions],
    }
    for key, better in (("deletion", np.less), ("insertion", np.greater)):
        real = np.array([r[f"{key}_auc"]["gradcam"] for r in records])
        rnd = np.array([r[f"{key}_auc"]["random"] for r in records])
        out[f"{key}_auc"] = {
            "gradcam": _r(real.mean()),
            "random": _r(rnd.mean()),
            "gradcam_beats_random_share": _r(better(real, rnd).mean()),
        }
        out[f"{key}_curve"] = {name: [_r(v) for v in np.mean([r[f"{key}_curve"][name] for r in records], axis=0)]
                               for name in ("gradcam", "random")}
    out["retention"] = {
        "keep_percent": [int(p) for p in RETENTION_PERCENTS],
        "baseline": "image mean colour",
        **{
            name: {
                "accuracy": [_r(v) for v in np.mean([r["retention"][name]["kept"] for r in records], axis=0)],
                "probability": [_r(v) for v in np.mean([r["retention"][name]["probability"] for r in records],
                                                       axis=0)],
            }
            for name in ("gradcam", "random")
        },
    }
    return out


def faithfulness_summary(
    model: Any, images: np.ndarray, cams: np.ndarray, targets: np.ndarray, temperature: float, seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> dict[str, Any]:
    """Deletion/insertion AUC and pixel retention for the maps and for random maps, summarised.

    :func:`faithfulness_records` with image ``i`` seeded ``seed + i``, then
    :func:`summarise_faithfulness`; the explanation measurements of a model
    (``tools/measure_explanations.py``) use it on one array of images.

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
    records = faithfulness_records(model, images, cams, targets, temperature,
                                   [seed + i for i in range(len(images))], steps)
    return summarise_faithfulness(records, temperature, seed, steps)
