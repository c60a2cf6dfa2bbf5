"""Classification quality figures as plain numpy functions.

Why a module of its own: training (temperature fit, review threshold),
evaluation (``wbc-batch evaluate``) and promotion (candidate vs current) must
compute the *same* numbers, and numpy-only code is testable with hand-made
arrays in milliseconds, without Keras or Ray.

Conventions: ``labels`` and ``preds`` are (N,) int class indices, ``logits``
is (N, C) float, ``conf`` is (N,) float max probability and ``correct`` is
(N,) bool. A class absent from both labels and predictions gets precision and
recall ``nan`` and is left out of macro averages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ECE_BINS = 15
REVIEW_TARGET_ACCURACY = 0.995
REVIEW_CONFIDENCE = 0.95  # one-sided confidence that accepted cells reach the target
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _check_pair(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    preds = np.asarray(preds).astype(np.int64).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"labels and predictions differ in length: {labels.shape[0]} vs {preds.shape[0]}")
    return labels, preds


def _check_logits(logits: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (N, C), got {logits.shape}")
    if labels is not None and len(labels) != logits.shape[0]:
        raise ValueError(f"expected {logits.shape[0]} labels for the logits, got {len(labels)}")
    return logits


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities from logits divided by a temperature.

    Args:
        logits: (N, C) float.
        temperature: > 0; above 1 softens, below 1 sharpens.

    Returns:
        (N, C) float64 rows summing to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _check_logits(logits) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels (natural log)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    z = _check_logits(logits, labels) / float(temperature)
    if len(labels) == 0:
        raise ValueError("cannot compute NLL of zero samples")
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))).ravel()
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, tol: float = 1e-7
) -> float:
    """The temperature that minimises NLL on held-out data (temperature scaling).

    NLL is convex in the inverse temperature, so a golden-section search over
    1/T within ``bounds`` finds the minimum without a gradient or SciPy.

    Args:
        logits: (N, C) validation logits.
        labels: (N,) int true classes.
        bounds: smallest and largest temperature allowed.

    Returns:
        The fitted temperature T (> 0).
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    logits = _check_logits(logits, labels)
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0

    def f(beta: float) -> float:
        return nll(logits, labels, 1.0 / beta)

    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return float(1.0 / ((a + b) / 2.0))


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    labels, preds = _check_pair(labels, preds)
    if len(labels) and (min(labels.min(), preds.min()) < 0 or max(labels.max(), preds.max()) >= num_classes):
        low, high = min(labels.min(), preds.min()), max(labels.max(), preds.max())
        raise ValueError(f"class indices must lie in [0, {num_classes}), got {low}..{high}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Share of correct predictions (nan for no samples)."""
    labels, preds = _check_pair(labels, preds)
    return float(np.mean(labels == preds)) if len(labels) else float("nan")


def precision_recall(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall from a confusion matrix.

    Returns:
        (C,) precision and (C,) recall, ``nan`` where undefined (no predictions
        of / no samples of that class).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / cm.sum(axis=0)
        recall = tp / cm.sum(axis=1)
    return precision, recall


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes that have samples."""
    _, recall = precision_recall(confusion_matrix(labels, preds, num_classes))
    present = ~np.isnan(recall)
    return float(recall[present].mean()) if present.any() else float("nan")


def f1_scores(cm: np.ndarray) -> np.ndarray:
    """Per-class F1 (0 when a class has samples but no correct prediction, nan when absent)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * tp / denom, np.nan)


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Unweighted mean F1 over the classes that occur in labels or predictions."""
    f1 = f1_scores(confusion_matrix(labels, preds, num_classes))
    present = ~np.isnan(f1)
    return float(f1[present].mean()) if present.any() else float("nan")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: sample-weighted gap between confidence and accuracy over equal-width bins.

    Args:
        probs: (N, C) probabilities.
        labels: (N,) int true classes.
        n_bins: number of confidence bins on (0, 1].
    """
    probs = _check_logits(probs, np.asarray(labels).ravel())
    labels = np.asarray(labels).astype(np.int64).ravel()
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds conf in (edges[i], edges[i+1]]; conf == 0 cannot happen for a softmax
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def _ranked_cells(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 confidences and bool outcomes of equal, non-zero length (for threshold choices)."""
    conf = np.asarray(conf, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if conf.shape != correct.shape:
        raise ValueError(f"conf and correct differ in length: {conf.shape[0]} vs {correct.shape[0]}")
    if len(conf) == 0:
        raise ValueError("cannot choose a threshold from zero cells")
    return conf, correct


def coverage_at_accuracy(
    conf: np.ndarray, correct: np.ndarray, target: float = REVIEW_TARGET_ACCURACY
) -> tuple[float, float]:
    """The lowest confidence threshold whose accepted cells reach a target accuracy.

    Cells with ``conf >= threshold`` are accepted, the rest go to a person.
    Only thresholds at observed confidence values are considered, so tied
    cells are accepted or rejected together.

    Args:
        conf: (N,) confidence per cell.
        correct: (N,) bool, prediction was right.
        target: accuracy the accepted cells must reach.

    Returns:
        (threshold, coverage). When no threshold reaches the target the
        threshold is just above the highest confidence and coverage is 0.
    """
    conf, correct = _ranked_cells(conf, correct)
    order = np.argsort(-conf, kind="stable")
    c_sorted, ok_sorted = conf[order], correct[order]
    cum_acc = np.cumsum(ok_sorted) / np.arange(1, len(conf) + 1)
    # a cut after position k is only valid where the next confidence is strictly lower
    valid = np.append(c_sorted[1:] < c_sorted[:-1], True)
    good = np.flatnonzero(valid & (cum_acc >= target))
    if len(good) == 0:
        return float(np.nextafter(c_sorted[0], np.inf)), 0.0
    k = int(good[-1])
    return float(c_sorted[k]), float((k + 1) / len(conf))


def binomial_accuracy_lower_bound(n: int, errors: int, confidence: float = REVIEW_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound on an accuracy seen as ``n - errors`` of ``n``.

    Why: a threshold picked where the validation accuracy *just* reaches
    99.5% reaches it on new data only about half the time; requiring the
    lower bound to reach it leaves a margin sized by how many cells back it.

    Returns:
        The accuracy ``a`` with ``P(errors or fewer | accuracy a) = 1 - confidence``
        (0.0 for ``n == 0``).
    """
    if not 0 <= errors <= n:
        raise ValueError(f"expected 0 <= errors <= n, got errors={errors}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n == 0:
        return 0.0
    alpha = 1.0 - confidence
    log_choose = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(errors + 1)]

    def p_at_most_errors(acc: float) -> float:
        if acc >= 1.0:
            return 1.0
        q = 1.0 - acc
        return sum(math.exp(lc + i * math.log(q) + (n - i) * math.log(acc)) for i, lc in enumerate(log_choose)) if acc > 0 else 0.0

    lo, hi = 0.0, 1.0  # p_at_most_errors rises with acc: bisect for alpha
    for _ in range(60):
        mid = (lo + hi) / 2
        if p_at_most_errors(mid) > alpha:
            hi = mid
        else:
            lo = mid
    return lo


ALWAYS_REVIEW = float(np.nextafter(1.0, 2.0))
"""A review threshold above any confidence: every cell needs review.

Used where nothing shows which confident calls are right: too few cells to
calibrate on, or a model adapted to a lab from ten cells per class.
"""


def review_threshold_with_margin(
    conf: np.ndarray,
    correct: np.ndarray,
    target: float = REVIEW_TARGET_ACCURACY,
    confidence: float = REVIEW_CONFIDENCE,
) -> tuple[float, float]:
    """The lowest threshold whose accepted cells reach ``target`` with ``confidence``.

    Like :func:`coverage_at_accuracy`, but a cut is valid only where the
    Clopper-Pearson lower bound of the accepted cells' accuracy reaches the
    target, so the threshold chosen on validation still holds on new cells.

    Returns:
        (threshold, coverage on the given cells); (:data:`ALWAYS_REVIEW`,
        0.0) when no cut qualifies: nothing has shown that any confidence is
        safe, so none is accepted, not even one above every confidence seen.
    """
    conf, correct = _ranked_cells(conf, correct)
    order = np.argsort(-conf, kind="stable")
    c_sorted, errors = conf[order], np.cumsum(~correct[order])
    valid = np.append(c_sorted[1:] < c_sorted[:-1], True)
    best = -1
    for k in np.flatnonzero(valid & (1.0 - errors / np.arange(1, len(conf) + 1) >= target)):
        if binomial_accuracy_lower_bound(int(k) + 1, int(errors[k]), confidence) >= target:
            best = int(k)
    if best < 0:
        return ALWAYS_REVIEW, 0.0
    return float(c_sorted[best]), float((best + 1) / len(conf))


def accuracy_above(conf: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[float, float]:
    """Accuracy and share of the cells with ``conf >= threshold`` (a fixed review rule).

    Returns:
        (accuracy of accepted cells, nan if none; coverage).
    """
    conf = np.asarray(conf, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    accepted = conf >= threshold
    acc = float(correct[accepted].mean()) if accepted.any() else float("nan")
    return acc, float(accepted.mean()) if len(conf) else float("nan")


def subset_metrics(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str], subset: Sequence[str]
) -> dict[str, Any]:
    """Figures over the images whose true class is in ``subset``.

    Predictions stay the argmax over *all* outputs, so a mature cell called
    ``ig`` or ``non_wbc`` counts as an error: this is what a person reading
    the differential of those classes would see.

    Returns:
        ``{"classes", "n", "accuracy", "balanced_accuracy", "macro_f1", "recall"}``;
        macro-F1 averages the subset's classes only, with precision counted
        among the subset's images.
    """
    names = list(class_names)
    missing = [c for c in subset if c not in names]
    if missing:
        raise ValueError(f"subset classes not among the model's classes: {', '.join(missing)}")
    labels, preds = _check_pair(labels, preds)
    idx = [names.index(c) for c in subset]
    sel = np.isin(labels, idx)
    cm = confusion_matrix(labels[sel], preds[sel], len(names))
    f1 = f1_scores(cm)[idx]
    _, recall = precision_recall(cm)
    rec = recall[idx]
    return {
        "classes": list(subset),
        "n": int(sel.sum()),
        "accuracy": accuracy(labels[sel], preds[sel]),
        "balanced_accuracy": float(np.nanmean(rec)) if (~np.isnan(rec)).any() else float("nan"),
        "macro_f1": float(np.nanmean(f1)) if (~np.isnan(f1)).any() else float("nan"),
        "recall": {c: _num(r) for c, r in zip(subset, rec)},
    }


def _num(x: float) -> float | None:
    """JSON-safe float (nan becomes None)."""
    return None if x is None or np.isnan(x) else float(x)


RESTRICTED_OFFSET = 1e4
"""How far below its own value a class a lab declared absent is pushed: its softmax share becomes 0."""


def declared_class_logits(logits: np.ndarray, class_names: Sequence[str], declared: Sequence[str] | None) -> np.ndarray:
    """Logits in which the classes outside a lab's declared class set can never win.

    Why: a lab whose exports never hold IGs, erythroblasts or platelets knows
    that a cell called one of them is wrong; choosing among the classes left
    turns those calls into the next best class. The model is unchanged, so
    the same artifact serves labs with every class. A finite offset (not
    -inf) keeps every downstream figure finite.

    Raises:
        ValueError: a declared class the model lacks, or fewer than two.
    """
    if not declared:
        return logits
    names = list(class_names)
    unknown = sorted(set(declared) - set(names))
    if unknown:
        raise ValueError(f"declared classes {unknown} are not classes of the model {names}")
    if len(set(declared)) < 2:
        raise ValueError(f"a lab must declare at least two classes, got {sorted(set(declared))}")
    absent = np.array([c not in set(declared) for c in names])
    return np.where(absent[None, :], np.asarray(logits, np.float32) - RESTRICTED_OFFSET, logits).astype(np.float32)


def classification_report(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    temperature: float = 1.0,
    review_threshold: float | None = None,
    subsets: dict[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Every figure ``wbc-batch evaluate`` reports, raw and calibrated.

    Args:
        logits: (N, C) model outputs.
        labels: (N,) int true classes.
        class_names: C names in model order.
        temperature: calibration temperature for the calibrated figures.
        review_threshold: calibrated confidence under which a cell goes to a
            person; reported as accuracy and coverage of the accepted cells.
        subsets: name -> class list for restricted figures (classes the model
            lacks are skipped, so a 5-class model still reports).

    Returns:
        A JSON-ready dict.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    logits = _check_logits(logits, labels)
    names = list(class_names)
    if logits.shape[1] != len(names):
        raise ValueError(f"expected {len(names)} logit columns for the classes, got {logits.shape[1]}")
    if len(labels) == 0:
        raise ValueError("cannot evaluate zero images")
    n_classes = len(names)
    preds = logits.argmax(axis=1)
    cm = confusion_matrix(labels, preds, n_classes)
    precision, recall = precision_recall(cm)
    raw = softmax(logits, 1.0)
    cal = softmax(logits, temperature)
    correct = preds == labels
    conf = cal.max(axis=1)
    cov_thr, cov = coverage_at_accuracy(conf, correct, REVIEW_TARGET_ACCURACY)
    out: dict[str, Any] = {
        "n": int(len(labels)),
        "class_names": names,
        "support": {c: int(s) for c, s in zip(names, cm.sum(axis=1))},
        "accuracy": accuracy(labels, preds),
        "balanced_accuracy": balanced_accuracy(labels, preds, n_classes),
        "macro_f1": macro_f1(labels, preds, n_classes),
        "precision": {c: _num(p) for c, p in zip(names, precision)},
        "recall": {c: _num(r) for c, r in zip(names, recall)},
        "confusion_matrix": cm.tolist(),
        "nll_raw": nll(logits, labels, 1.0),
        "nll_calibrated": nll(logits, labels, temperature),
        "temperature": float(temperature),
        "ece_raw": expected_calibration_error(raw, labels),
        "ece_calibrated": expected_calibration_error(cal, labels),
        "coverage_at_99_5": {"threshold": cov_thr, "coverage": cov, "note": "threshold chosen on this data (oracle)"},
    }
    if review_threshold is not None:
        acc_above, share = accuracy_above(conf, correct, review_threshold)
        out["review"] = {"threshold": float(review_threshold), "accuracy_above": _num(acc_above), "coverage": share}
    for key, subset in (subsets or {}).items():
        present = [c for c in subset if c in names]
        if present:
            out[key] = subset_metrics(labels, preds, names, present)
    return out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Two-sided 95% Wilson score interval of a proportion (sensible at 0, 1 and small n)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def balanced_accuracy_interval(labels: np.ndarray, preds: np.ndarray, num_classes: int, n_boot: int = 1000,
                               seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the balanced accuracy, resampling within each class.

    Why stratified: a lab's set has a fixed number of cells per class, and
    resampling across classes would change the class mix the figure averages over.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    preds = np.asarray(preds).astype(np.int64).ravel()
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    by_class = [idx for idx in by_class if len(idx)]
    if not by_class:
        return float("nan"), float("nan")
    correct = preds == labels
    draws = np.empty(n_boot)
    for b in range(n_boot):
        draws[b] = np.mean([correct[rng.choice(idx, len(idx))].mean() for idx in by_class])
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(low), float(high)


def with_intervals(report: dict[str, Any], labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    """Add 95% intervals of accuracy (Wilson) and balanced accuracy (bootstrap) to a report."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    preds = np.asarray(preds).astype(np.int64).ravel()
    k = len(report["class_names"])
    return {
        **report,
        "accuracy_ci95": list(wilson_interval(int((labels == preds).sum()), len(labels))),
        "balanced_accuracy_ci95": list(balanced_accuracy_interval(labels, preds, k)),
    }


# Cells per class in the whole published PBC dataset (Acevedo et al. 2020): the class mix
# of a real smear series, where the copy used for training is capped per class.
PBC_NATURAL_COUNTS: dict[str, int] = {
    "basophil": 1218, "eosinophil": 3117, "ig": 2895, "lymphocyte": 1214, "monocyte": 1420,
    "neutrophil": 3329, "non_wbc": 1551 + 2348,
}


def natural_mix_report(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], temperature: float,
                       review_threshold: float, natural_counts: Mapping[str, int] = PBC_NATURAL_COUNTS,
                       white_cells: Sequence[str] | None = None) -> dict[str, Any]:
    """Headline figures with each image weighted so the classes stand in ``natural_counts`` proportions.

    Why: a test split capped per class under-weights the common classes
    (neutrophil, eosinophil, ig); a lab sees them in their natural mix. Each
    image of class c weighs ``natural_counts[c] / n_c``.

    Returns:
        ``{"wbc_accuracy", "f1" {class}, "non_wbc_recall", "ece_calibrated",
        "review" {"coverage", "accuracy_above"}}`` (weighted), or ``{}`` when a
        class of ``natural_counts`` has no image here.
    """
    names = list(class_names)
    labels = np.asarray(labels).astype(np.int64).ravel()
    logits = _check_logits(logits, labels)
    counts = np.bincount(labels, minlength=len(names))
    if any(c not in names or counts[names.index(c)] == 0 for c in natural_counts):
        return {}
    w = np.zeros(len(names))
    for c, n in natural_counts.items():
        w[names.index(c)] = n / counts[names.index(c)]
    weight = w[labels]
    probs = softmax(logits, temperature)
    preds, conf = probs.argmax(axis=1), probs.max(axis=1)
    correct = preds == labels
    cm = np.zeros((len(names), len(names)))
    np.add.at(cm, (labels, preds), weight)
    f1 = f1_scores(cm)
    wbc = [names.index(c) for c in (white_cells or [c for c in names if c != "non_wbc"])]
    in_wbc = np.isin(labels, wbc)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, ECE_BINS - 1)
    ece = sum(abs(np.average(correct[idx == b], weights=weight[idx == b]) - np.average(conf[idx == b],
              weights=weight[idx == b])) * weight[idx == b].sum() for b in range(ECE_BINS) if (idx == b).any())
    accepted = conf >= review_threshold
    out: dict[str, Any] = {
        "weights_from": dict(natural_counts),
        "wbc_accuracy": float(np.average(correct[in_wbc], weights=weight[in_wbc])),
        "f1": {c: _num(f) for c, f in zip(names, f1)},
        "ece_calibrated": float(ece / weight.sum()),
        "review": {
            "threshold": float(review_threshold),
            "coverage": float(weight[accepted].sum() / weight.sum()),
            "accuracy_above": _num(float(np.average(correct[accepted], weights=weight[accepted])))
            if accepted.any() else None,
        },
    }
    if "non_wbc" in names:
        k = names.index("non_wbc")
        out["non_wbc_recall"] = _num(float(cm[k, k] / cm[k].sum()))
    return out
