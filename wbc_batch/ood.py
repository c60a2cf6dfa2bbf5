"""Out-of-distribution scores: does this image look like what the model was trained on?

A model trained on one lab's CellaVision images is confidently wrong on
another lab's, so confidence alone cannot gate a result. Each image gets one
``ood_score`` (higher = more unusual) from two components, chosen by
measurement on the PBC test split and simulated shifts (``docs/OOD.md``):

1. **Embedding**: relative Mahalanobis distance (Ren et al. 2021) of the
   pooled ``embedding`` (the same tensor Grad-CAM already returns) to
   class-conditional Gaussians with one shared, Ledoit-Wolf-shrunk
   covariance, minus the distance to one background Gaussian of all training
   embeddings. The subtraction removes the directions every image varies in,
   which flagged more shifted images at the same false-positive rate than
   the plain distance; the energy score and max-logit were much weaker
   (8-56% of colour-shifted images flagged), so logits are not used.
2. **Image quality** on the model input: focus (log variance of the
   Laplacian), colour (mean and std of L, a, b), chroma detail relative to
   luma detail (low-quality JPEG smears the colour channels first) and the
   segmented cell's log area share (the apparent size, i.e. the zoom). One
   Mahalanobis distance with a shared covariance to the mean of the class the
   embedding is nearest to: cell size and colour depend on the cell type, so
   class-conditional means catch a changed zoom far better than one mean.

Each component ``s`` becomes ``z = (log max(s, floor) - median) / (q97.5 - median)``
with the median and 97.5th percentile taken on the validation split; the
score is ``sqrt(sum(max(z, 0)^2))`` (an image unusual in both components
scores higher than one unusual in either), and the threshold is the
validation quantile at the stated false-positive rate. Everything lives in
``model.json["ood"]``: large arrays as base64 float32 so the JSON stays
small and readable.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from wbc_batch.localisation import model_input_mask

if TYPE_CHECKING:
    from wbc_batch.results import RunManifest

log = logging.getLogger(__name__)

OOD_FORMAT = "wbc-batch-ood/2"  # /2: the cell area feature comes from model_input_mask (kernels scaled)
DEFAULT_FPR = 0.03
DEFAULT_MAX_SHARE = 0.20
DEFAULT_MIN_OOD = 2
SCORE_FLOOR = 1e-6
QUALITY_FEATURES: tuple[str, ...] = (
    "log_laplacian_var",
    "lab_l_mean",
    "lab_a_mean",
    "lab_b_mean",
    "lab_l_std",
    "lab_a_std",
    "lab_b_std",
    "log_cell_area_share",
    "log_chroma_a_detail",
    "log_chroma_b_detail",
)
COMPONENTS: tuple[str, ...] = ("embedding", "quality")


# --------------------------------------------------------------------------- features


def quality_features(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """Cheap image-quality signals of model inputs, one row per image.

    Computed on the resized model input, so they describe exactly what the
    model sees, at about a millisecond per 128 px image plus the cell mask.

    Args:
        images: (B, S, S, 3) uint8 RGB (float input is clipped and cast).
        masks: (B, S, S) bool :func:`~wbc_batch.localisation.model_input_mask`
            of each image when already computed (classify segments once per
            row for this and for localisation); computed here otherwise.

    Returns:
        (B, len(QUALITY_FEATURES)) float64, in the order of ``QUALITY_FEATURES``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images (B, S, S, 3), got {images.shape}")
    if images.dtype != np.uint8:
        images = np.clip(images, 0, 255).astype(np.uint8)
    out = np.empty((len(images), len(QUALITY_FEATURES)), dtype=np.float64)
    for i, rgb in enumerate(images):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
        flat = lab.reshape(-1, 3)
        detail = [float(np.mean((lab[..., c] - cv2.GaussianBlur(lab[..., c], (0, 0), 1.0)) ** 2)) for c in range(3)]
        out[i, 0] = np.log(float(cv2.Laplacian(gray, cv2.CV_32F, ksize=3).var()) + 1e-3)
        out[i, 1:4] = flat.mean(axis=0)
        out[i, 4:7] = flat.std(axis=0)
        mask = model_input_mask(rgb) if masks is None else masks[i]
        out[i, 7] = np.log(float(mask.mean()) + 1e-3)
        out[i, 8] = np.log(detail[1] + 1e-3) - np.log(detail[0] + 1e-3)
        out[i, 9] = np.log(detail[2] + 1e-3) - np.log(detail[0] + 1e-3)
    return out


# --------------------------------------------------------------------------- statistics


def shrunk_covariance(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf covariance of already-centred rows.

    Shrinking towards a scaled identity keeps the precision matrix well
    conditioned when a class has few images or the embedding has dead
    (always-zero) ReLU channels, which a plain inverse would blow up.

    Args:
        centred: (N, D) float, rows minus their (class) means.

    Returns:
        The (D, D) shrunk covariance and the shrinkage weight in [0, 1].
    """
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"expected at least 2 rows to estimate a covariance, got {n}")
    emp = x.T @ x / n
    mu = float(np.trace(emp)) / d
    target = mu * np.eye(d)
    delta = float(np.sum((emp - target) ** 2))
    sq = x**2
    # sum_i ||x_i x_i^T - S||_F^2 / n^2, expanded so no (N, D, D) array is formed.
    beta = float(np.sum(sq.T @ sq) / n - np.sum(emp**2)) / n
    shrink = 1.0 if delta <= 0 else min(max(beta / delta, 0.0), 1.0)
    cov = (1.0 - shrink) * emp + shrink * target
    if mu <= 0:  # all rows identical: any positive scale keeps the inverse finite
        cov = cov + np.eye(d)
    return cov, shrink


def _encode(a: np.ndarray) -> dict[str, Any]:
    """A float32 array as JSON: a 192x192 matrix as numbers-per-line JSON is ~1 MB and 37k lines."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(obj: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`_encode`, checking the stored shape."""
    if obj.get("dtype") != "float32":
        raise ValueError(f"expected a float32 array, got dtype {obj.get('dtype')!r}")
    raw = np.frombuffer(base64.b64decode(obj["base64"]), dtype="<f4")
    shape = tuple(int(s) for s in obj["shape"])
    if raw.size != int(np.prod(shape)):
        raise ValueError(f"stored array holds {raw.size} values, shape {shape} needs {int(np.prod(shape))}")
    return raw.reshape(shape).astype(np.float64)


def _given(images: np.ndarray | None) -> np.ndarray:
    """``images`` after the caller checked that features were not given instead."""
    if images is None:
        raise ValueError("expected images or precomputed quality features")
    return images


def _class_means(x: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class means; a class without rows gets the overall mean (tiny fits, rare classes)."""
    overall = x.mean(axis=0)
    return np.stack([x[labels == k].mean(axis=0) if np.any(labels == k) else overall for k in range(num_classes)])


def _squared_distances(x: np.ndarray, centres: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(B, C) squared Mahalanobis distances of rows of ``x`` to each centre under one precision."""
    diff = x[:, None, :] - centres[None, :, :]
    return np.einsum("bcd,bcd->bc", diff @ precision, diff)


# --------------------------------------------------------------------------- scorer


class OodScorer:
    """Scores a batch from the embeddings and model inputs of one forward pass.

    Built once per model actor from ``model.json["ood"]``; ``score`` is pure
    numpy/OpenCV, a few milliseconds per image.
    """

    def __init__(self, stats: Mapping[str, Any]) -> None:
        if stats.get("format") != OOD_FORMAT:
            raise ValueError(f"expected OOD statistics format {OOD_FORMAT!r}, got {stats.get('format')!r}")
        emb = stats["embedding"]
        self.class_means = _decode(emb["class_means"])
        self.precision = _decode(emb["precision"])
        self.background_mean = _decode(emb["background_mean"])
        self.background_precision = _decode(emb["background_precision"])
        qual = stats["quality"]
        if list(qual["features"]) != list(QUALITY_FEATURES):
            raise ValueError(f"expected quality features {list(QUALITY_FEATURES)}, got {qual['features']}")
        self.quality_means = np.asarray(qual["class_means"], dtype=np.float64)
        self.quality_precision = np.asarray(qual["precision"], dtype=np.float64)
        norm = stats["normalisation"]
        self.normalisation = {c: (float(norm[c]["median"]), float(norm[c]["scale"])) for c in COMPONENTS}
        self.threshold = float(stats["threshold"])
        self.stats = dict(stats)
        k, d = self.class_means.shape
        if self.precision.shape != (d, d) or self.quality_means.shape != (k, len(QUALITY_FEATURES)):
            raise ValueError(
                f"inconsistent OOD statistics: class means {self.class_means.shape}, precision {self.precision.shape}, "
                f"quality means {self.quality_means.shape}"
            )

    @property
    def embedding_dim(self) -> int:
        """D, the embedding width the statistics were fitted on."""
        return int(self.class_means.shape[1])

    @classmethod
    def from_metadata(cls, meta: Any) -> OodScorer | None:
        """The scorer for a model, or None when its ``model.json`` has no OOD statistics.

        Older models and models trained without the statistics still run;
        their rows carry a null ``ood_score``.
        """
        stats = getattr(meta, "ood", None) or {}
        if stats and stats.get("format") != OOD_FORMAT and str(stats.get("format", "")).startswith("wbc-batch-ood/"):
            log.warning("OOD statistics of model %s are format %s, this version reads %s: OOD scoring is off "
                        "until they are refitted (tools/fit_ood.py)", getattr(meta, "version", "?"),
                        stats.get("format"), OOD_FORMAT)
            return None
        return cls(stats) if stats else None

    def _check(self, embeddings: np.ndarray, images: np.ndarray) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"expected embeddings (B, {self.embedding_dim}), got {embeddings.shape}")
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(embeddings):
            raise ValueError(f"expected {len(embeddings)} images (B, S, S, 3), got {images.shape}")

    def components(self, embeddings: np.ndarray, images: np.ndarray) -> dict[str, np.ndarray]:
        """The raw component distances and the class each image is nearest to.

        Args:
            embeddings: (B, D) float, the pooled embedding.
            images: (B, S, S, 3) uint8 RGB model input.

        Returns:
            ``embedding`` and ``quality`` (B,) float64 distances, ``nearest_class`` (B,) int.
        """
        self._check(embeddings, images)
        return self.components_from_features(embeddings, quality_features(images))

    def components_from_features(self, embeddings: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`components` from precomputed :func:`quality_features` (fitting and evaluation reuse them)."""
        embeddings = np.asarray(embeddings, dtype=np.float64)
        to_class = _squared_distances(embeddings, self.class_means, self.precision)
        to_background = _squared_distances(embeddings, self.background_mean[None, :], self.background_precision)[:, 0]
        nearest = np.argmin(to_class, axis=1)
        diff = np.asarray(features, dtype=np.float64) - self.quality_means[nearest]
        return {
            "embedding": to_class[np.arange(len(nearest)), nearest] - to_background,
            "quality": np.einsum("bd,bd->b", diff @ self.quality_precision, diff),
            "nearest_class": nearest,
        }

    def score(self, embeddings: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score a batch.

        Args:
            embeddings: (B, D) float32 from :class:`wbc_batch.explain.GradCam`.
            images: (B, S, S, 3) uint8 model input (RGB, already resized); the
                float32 batch of :func:`wbc_batch.geometry.model_inputs` holds
                the same whole numbers and is accepted too.

        Returns:
            ``ood_score`` (B,) float32, higher = more unusual, and
            ``out_of_distribution`` (B,) bool (score above the stored threshold).

        Raises:
            ValueError: embeddings of another width than the statistics, or a
                batch size mismatch.
        """
        if len(embeddings) == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
        self._check(embeddings, images)
        return self.score_features(embeddings, quality_features(images))

    def score_features(self, embeddings: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score` from precomputed :func:`quality_features` (evaluation reuses them)."""
        comps = self.components_from_features(embeddings, features)
        scores = _fuse({c: comps[c] for c in COMPONENTS}, self.normalisation)
        return scores.astype(np.float32), scores > self.threshold


def _normalise(values: np.ndarray, median: float, scale: float) -> np.ndarray:
    return (np.log(np.maximum(values, SCORE_FLOOR)) - median) / scale


def _fuse(components: Mapping[str, np.ndarray], normalisation: Mapping[str, tuple[float, float]]) -> np.ndarray:
    """Root of the sum of squared positive z-scores: 0 for typical images, grows with each unusual component."""
    z = np.stack([_normalise(components[c], *normalisation[c]) for c in COMPONENTS])
    return np.sqrt(np.sum(np.maximum(z, 0.0) ** 2, axis=0))


# --------------------------------------------------------------------------- fitting


def fit_ood(
    embeddings_train: np.ndarray,
    labels_train: np.ndarray,
    images_train: np.ndarray | None,
    embeddings_val: np.ndarray,
    images_val: np.ndarray | None,
    fpr: float = DEFAULT_FPR,
    num_classes: int | None = None,
    features_train: np.ndarray | None = None,
    features_val: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fit the OOD statistics on the train split and the threshold on the val split.

    The Gaussians come from the train split; the per-component
    normalisation and the threshold from the validation split, because a
    network's own training images sit closer to its class means than any
    new image does, so a train-set threshold would flag far too much.

    Args:
        embeddings_train: (N, D) float, pooled embeddings of the train split.
        labels_train: (N,) int class indices.
        images_train: (N, S, S, 3) uint8 model inputs; may be None when ``features_train`` is given.
        embeddings_val: (M, D) float.
        images_val: (M, S, S, 3) uint8; may be None when ``features_val`` is given.
        fpr: share of validation images to flag, e.g. 0.025.
        num_classes: K; defaults to ``max(labels_train) + 1``.
        features_train, features_val: precomputed :func:`quality_features`.

    Returns:
        The JSON-serialisable dict to store as ``model.json["ood"]``.
    """
    e_tr = np.asarray(embeddings_train, dtype=np.float64)
    e_va = np.asarray(embeddings_val, dtype=np.float64)
    labels = np.asarray(labels_train, dtype=np.int64)
    k = _check_fit_inputs(e_tr, labels, e_va, fpr, num_classes)
    if (images_train is None and features_train is None) or (images_val is None and features_val is None):
        raise ValueError("expected images or precomputed quality features for both the train and the val split")
    f_tr = np.asarray(features_train if features_train is not None else quality_features(_given(images_train)),
                      np.float64)
    f_va = np.asarray(features_val if features_val is not None else quality_features(_given(images_val)), np.float64)
    if len(f_tr) != len(e_tr) or len(f_va) != len(e_va):
        raise ValueError(
            f"expected one image per embedding, got {len(f_tr)}/{len(e_tr)} train and {len(f_va)}/{len(e_va)} val"
        )
    stats: dict[str, Any] = {
        "format": OOD_FORMAT,
        "method": (
            "sqrt(sum of squared positive z) of two log distances: relative Mahalanobis of the embedding "
            "(class-conditional Gaussians, shared Ledoit-Wolf covariance, minus a background Gaussian) and "
            "Mahalanobis of image-quality features to the nearest class's mean; threshold at the val quantile 1-fpr"
        ),
        "num_classes": k,
        "embedding_dim": int(e_tr.shape[1]),
        "embedding": _embedding_gaussians(e_tr, labels, k),
        "quality": _quality_gaussians(f_tr, labels, k),
        "normalisation": {c: {"median": 0.0, "scale": 1.0} for c in COMPONENTS},
        "threshold": 0.0,
        "fpr_target": float(fpr),
        "fitted_on": {"n_train": int(len(e_tr)), "n_val": int(len(e_va))},
    }
    _set_threshold_on_val(stats, e_va, f_va, fpr)
    return stats


def _check_fit_inputs(e_tr: np.ndarray, labels: np.ndarray, e_va: np.ndarray, fpr: float,
                      num_classes: int | None) -> int:
    """Guard clauses of :func:`fit_ood`; the number of classes K."""
    if not 0.0 < fpr < 0.5:
        raise ValueError(f"expected a false-positive rate in (0, 0.5), got {fpr}")
    if e_tr.ndim != 2 or e_va.ndim != 2 or e_tr.shape[1] != e_va.shape[1]:
        raise ValueError(f"expected train and val embeddings (N, D) of one width, got {e_tr.shape} and {e_va.shape}")
    if labels.shape != (len(e_tr),):
        raise ValueError(f"expected {len(e_tr)} train labels, got {labels.shape}")
    if len(e_va) < 2:
        raise ValueError(f"expected at least 2 validation images to set a threshold, got {len(e_va)}")
    k = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
    return k


def _embedding_gaussians(e_tr: np.ndarray, labels: np.ndarray, k: int) -> dict[str, Any]:
    """Class-conditional means with one shared shrunk covariance, and one background Gaussian."""
    means = _class_means(e_tr, labels, k)
    cov, shrink = shrunk_covariance(e_tr - means[labels])
    bg_mean = e_tr.mean(axis=0)
    bg_cov, bg_shrink = shrunk_covariance(e_tr - bg_mean)
    return {
        "class_means": _encode(means),
        "precision": _encode(np.linalg.inv(cov)),
        "background_mean": _encode(bg_mean),
        "background_precision": _encode(np.linalg.inv(bg_cov)),
        "shrinkage": round(shrink, 6),
        "background_shrinkage": round(bg_shrink, 6),
    }


def _quality_gaussians(f_tr: np.ndarray, labels: np.ndarray, k: int) -> dict[str, Any]:
    """Class means and one shared precision of the image-quality features."""
    q_means = _class_means(f_tr, labels, k)
    q_resid = f_tr - q_means[labels]
    # A tiny ridge keeps a degenerate feature (e.g. constant test images) invertible.
    q_cov = np.atleast_2d(np.cov(q_resid.T)) + 1e-6 * np.eye(len(QUALITY_FEATURES))
    return {
        "features": list(QUALITY_FEATURES),
        "class_means": np.round(q_means, 6).tolist(),
        "precision": np.round(np.linalg.inv(q_cov), 6).tolist(),
    }


def _set_threshold_on_val(stats: dict[str, Any], e_va: np.ndarray, f_va: np.ndarray, fpr: float) -> None:
    """Each component's normalisation, then the fused threshold that flags ``fpr`` of val, into ``stats``.

    Val is scored with the stored (float32-rounded) statistics, exactly as at inference.
    """
    raw = OodScorer(stats).components_from_features(e_va, f_va)
    for c in COMPONENTS:
        logs = np.log(np.maximum(raw[c], SCORE_FLOOR))
        median = float(np.median(logs))
        scale = float(np.quantile(logs, 0.975) - median)
        stats["normalisation"][c] = {"median": median, "scale": scale if scale > 1e-6 else 1.0}
    scorer = OodScorer(stats)
    fused = _fuse({c: raw[c] for c in COMPONENTS}, scorer.normalisation)
    threshold = float(np.quantile(fused, 1.0 - fpr))
    stats["threshold"] = threshold
    stats["val_flagged_share"] = float(np.mean(fused > threshold))


# --------------------------------------------------------------------------- per sample / run


@dataclass(frozen=True)
class ShiftRule:
    """When a sample (or a run) is unreliable: the thresholds of :func:`sample_shifted`.

    They belong to the model, whose OOD threshold sets the per-image false
    alarm rate: ``model.json["ood"]["max_share"]`` and ``["min_ood"]``,
    defaults :data:`DEFAULT_MAX_SHARE` and :data:`DEFAULT_MIN_OOD` for
    artifacts that do not state them. A run manifest records the rule it
    used under ``domain_shift``, so readers of committed results apply the
    same one (:meth:`from_manifest`).
    """

    max_share: float = DEFAULT_MAX_SHARE
    min_ood: int = DEFAULT_MIN_OOD

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_share <= 1.0:
            raise ValueError(f"expected max_share in [0, 1], got {self.max_share}")
        if self.min_ood < 1:
            raise ValueError(f"expected min_ood >= 1, got {self.min_ood}")

    @classmethod
    def from_ood_stats(cls, stats: Mapping[str, Any] | None) -> ShiftRule:
        """The rule of a model, from its ``model.json["ood"]`` (defaults for keys it lacks)."""
        stats = stats or {}
        return cls(max_share=float(stats.get("max_share", DEFAULT_MAX_SHARE)),
                   min_ood=int(stats.get("min_ood", DEFAULT_MIN_OOD)))

    @classmethod
    def from_manifest(cls, manifest: RunManifest) -> ShiftRule:
        """The rule a committed run applied, from its manifest's ``domain_shift`` (defaults for older manifests)."""
        return cls.from_ood_stats(manifest.domain_shift)

    @classmethod
    def strictest(cls, rules: Iterable[ShiftRule]) -> ShiftRule:
        """One rule that flags whatever any of ``rules`` flags (rows of several runs in one sample)."""
        rules = list(rules)
        if not rules:
            return cls()
        return cls(max_share=min(r.max_share for r in rules), min_ood=min(r.min_ood for r in rules))

    def describe(self) -> str:
        """The rule in words, for warnings and evidence."""
        return f"more than {self.max_share:.0%} and at least {self.min_ood}"


def sample_shifted(n_images: int, n_ood: int, rule: ShiftRule | None = None) -> bool:
    """The one rule for an unreliable sample (or run), used by every reader.

    A sample is shifted, i.e. its differential must not be reported, when
    more than ``rule.max_share`` of its scored images are out of
    distribution *and* at least ``rule.min_ood`` are: with a 3% per-image
    false alarm rate, a one-image sample would otherwise raise the alarm one
    time in thirty by chance. The run manifest's ``domain_shift``, ``query
    --differential``, the report and the review app all decide with this.

    Args:
        n_images: scored images (status ok) of the sample.
        n_ood: of those, flagged out of distribution.
        rule: the model's thresholds (default :class:`ShiftRule`).
    """
    rule = rule or ShiftRule()
    if n_ood < 0 or n_ood > n_images:
        raise ValueError(f"expected 0 <= n_ood <= n_images, got {n_ood} of {n_images}")
    return n_images > 0 and n_ood >= rule.min_ood and n_ood / n_images > rule.max_share


def domain_shift_summary(
    n_images: int,
    n_ood: int,
    per_sample: Mapping[str, tuple[int, int]],
    max_share: float = DEFAULT_MAX_SHARE,
    min_ood: int = DEFAULT_MIN_OOD,
    *,
    rule: ShiftRule | None = None,
) -> dict[str, Any]:
    """Decide whether a run (or any of its samples) looks like another domain, by :func:`sample_shifted`.

    Args:
        n_images: images scored in the run (error rows excluded).
        n_ood: of those, flagged out of distribution.
        per_sample: sample_id -> (n_images, n_ood).
        max_share: the share above which a sample or the run is shifted.
        min_ood: the fewest flagged images that can make a sample or run shifted.
        rule: both thresholds at once (the model's :class:`ShiftRule`); overrides the two above.

    Returns:
        ``{"detected", "ood_share", "max_share", "min_ood", "samples": {id: {"n", "ood", "share", "shifted"}},
        "evidence"}``.
    """
    rule = rule or ShiftRule(max_share=max_share, min_ood=min_ood)
    if n_ood < 0 or n_ood > n_images:
        raise ValueError(f"expected 0 <= n_ood <= n_images, got {n_ood} of {n_images}")

    samples: dict[str, dict[str, Any]] = {}
    for sample_id, (n, ood) in sorted(per_sample.items()):
        if ood < 0 or ood > n:
            raise ValueError(f"sample {sample_id!r}: expected 0 <= ood <= n, got {ood} of {n}")
        share_i = round(ood / n, 4) if n else 0.0
        samples[sample_id] = {"n": int(n), "ood": int(ood), "share": share_i, "shifted": sample_shifted(n, ood, rule)}
    share = n_ood / n_images if n_images else 0.0
    run_shifted = sample_shifted(n_images, n_ood, rule)
    bad = [s for s, v in samples.items() if v["shifted"]]
    detected = run_shifted or bool(bad)
    parts = [
        f"{n_ood} of {n_images} images ({share:.1%}) out of distribution; "
        f"limit {rule.describe()} images per sample and run"
    ]
    if bad:
        listed = ", ".join(f"{s} ({samples[s]['ood']}/{samples[s]['n']})" for s in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        parts.append(f"samples above the limit: {listed}{more}")
    if not detected:
        parts.append("no sample above the limit")
    return {
        "detected": detected,
        "ood_share": round(share, 4),
        "max_share": float(rule.max_share),
        "min_ood": int(rule.min_ood),
        "samples": samples,
        "evidence": "; ".join(parts),
    }


# --------------------------------------------------------------------------- simulated shifts


def _hue_rotate(rgb: np.ndarray, degrees: int) -> np.ndarray:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + degrees // 2) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _zoom(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Magnify (factor > 1: centre crop and enlarge) or shrink (< 1: reflect-pad the border)."""
    h, w = rgb.shape[:2]
    if factor >= 1.0:
        ch, cw = int(round(h / factor)), int(round(w / factor))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return cv2.resize(rgb[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    small = cv2.resize(rgb, (int(round(w * factor)), int(round(h * factor))), interpolation=cv2.INTER_AREA)
    top, left = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    return cv2.copyMakeBorder(
        small, top, h - small.shape[0] - top, left, w - small.shape[1] - left, cv2.BORDER_REFLECT_101
    )


def _cast(rgb: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) * np.asarray(gains, np.float32), 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError("JPEG decoding failed")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "blur": lambda rgb: cv2.GaussianBlur(rgb, (0, 0), 5.0),
    "hue_rotation": lambda rgb: _hue_rotate(rgb, 60),
    "zoom_in": lambda rgb: _zoom(rgb, 1.5),
    "zoom_out": lambda rgb: _zoom(rgb, 0.6),
    "colour_cast": lambda rgb: _cast(rgb, (1.0, 0.75, 1.0)),
    "jpeg_low_quality": lambda rgb: _jpeg(rgb, 7),
    "stain_swap": lambda rgb: np.ascontiguousarray(rgb[..., ::-1]),
}
"""Simulated acquisition shifts of an original (full-resolution) RGB image.

Used by ``tools/fit_ood.py`` for the reported figures and by the tests, so
both measure the same thing: blur with sigma 5 px (of a 360 px image), hue
rotated by 60 degrees, 1.5x and 0.6x magnification, green channel at 75%,
JPEG quality 7, and red/blue swapped (a stain of another colour).
"""


def simulate_shift(rgb: np.ndarray, kind: str) -> np.ndarray:
    """Apply one of :data:`SHIFTS` to an (H, W, 3) uint8 RGB image before resizing."""
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}, expected one of {sorted(SHIFTS)}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    return SHIFTS[kind](rgb)
