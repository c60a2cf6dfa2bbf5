"""Metrics against numbers worked out by hand (see the comments)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from wbc_batch import metrics

# labels 0 0 1 1 2 2, predictions 0 1 1 1 2 0
#   confusion rows (true) [1 1 0] [0 2 0] [1 0 1]
#   recall 1/2, 1, 1/2   precision 1/2, 2/3, 1   F1 1/2, 4/5, 2/3
LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDS = np.array([0, 1, 1, 1, 2, 0])


def test_confusion_accuracy_balanced_accuracy_macro_f1() -> None:
    cm = metrics.confusion_matrix(LABELS, PREDS, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics.accuracy(LABELS, PREDS) == pytest.approx(4 / 6)
    assert metrics.balanced_accuracy(LABELS, PREDS, 3) == pytest.approx((0.5 + 1 + 0.5) / 3)
    precision, recall = metrics.precision_recall(cm)
    np.testing.assert_allclose(precision, [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(recall, [1 / 2, 1.0, 1 / 2])
    assert metrics.macro_f1(LABELS, PREDS, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_absent_class_is_left_out_of_macro_averages() -> None:
    # class 3 exists in the model but has no samples and no predictions
    assert metrics.macro_f1(LABELS, PREDS, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics.balanced_accuracy(LABELS, PREDS, 4) == pytest.approx(2 / 3)


def test_confusion_matrix_refuses_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\)"):
        metrics.confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)


def test_ece_two_bins() -> None:
    # conf 0.9, 0.9 (one right, one wrong): gap |0.5 - 0.9| = 0.4 on half the samples
    # conf 0.7, 0.7 (both right):          gap |1.0 - 0.7| = 0.3 on the other half
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3]])
    labels = np.array([0, 1, 1, 0])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)


def test_softmax_and_temperature() -> None:
    p = metrics.softmax(np.array([[math.log(3.0), 0.0]]))
    np.testing.assert_allclose(p, [[0.75, 0.25]])
    # T = 2 halves the log-odds: softmax([ln3/2, 0]) = sqrt3 / (sqrt3 + 1)
    p2 = metrics.softmax(np.array([[math.log(3.0), 0.0]]), temperature=2.0)
    assert p2[0, 0] == pytest.approx(math.sqrt(3) / (math.sqrt(3) + 1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        metrics.softmax(np.zeros((1, 2)), temperature=0.0)


def test_fit_temperature_matches_closed_form() -> None:
    # every image has logits [4, 0]; 3 of 4 are class 0. NLL is minimal when
    # sigmoid(4 / T) = 3/4, i.e. T = 4 / ln 3 = 3.6410
    logits = np.array([[4.0, 0.0]] * 4)
    labels = np.array([0, 0, 0, 1])
    t = metrics.fit_temperature(logits, labels)
    assert t == pytest.approx(4 / math.log(3), rel=1e-4)
    assert metrics.nll(logits, labels, t) < metrics.nll(logits, labels, 1.0)


def test_fit_temperature_respects_bounds() -> None:
    # all correct with a margin: NLL keeps falling as T shrinks, so T hits the lower bound
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    assert metrics.fit_temperature(logits, np.array([0, 1]), bounds=(0.5, 5.0)) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize(
    ("target", "threshold", "coverage"),
    [
        (0.995, 0.95, 0.4),  # top two are right, the third is wrong
        (0.75, 0.70, 1.0),  # 4 of 5 right = 0.8 >= 0.75 over all cells
        (0.80, 0.70, 1.0),
        (0.81, 0.95, 0.4),  # 3/4 = 0.75 and 4/5 = 0.8 both miss
    ],
)
def test_coverage_at_accuracy(target: float, threshold: float, coverage: float) -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7])
    correct = np.array([True, True, False, True, True])
    thr, cov = metrics.coverage_at_accuracy(conf, correct, target)
    assert thr == pytest.approx(threshold)
    assert cov == pytest.approx(coverage)


def test_coverage_keeps_ties_together() -> None:
    # the two 0.9 cells (one wrong) cannot be split, so nothing reaches 99%
    thr, cov = metrics.coverage_at_accuracy(np.array([0.9, 0.9, 0.8]), np.array([True, False, True]), 0.99)
    assert cov == 0.0
    assert thr > 0.9


@pytest.mark.parametrize("n", [1, 10, 598, 2000])
def test_lower_bound_without_errors_matches_closed_form(n: int) -> None:
    # with no errors, P(0 errors | accuracy a) = a**n = alpha  =>  a = alpha**(1/n)
    assert metrics.binomial_accuracy_lower_bound(n, 0, 0.95) == pytest.approx(0.05 ** (1 / n), abs=1e-9)


def test_lower_bound_grows_with_evidence_and_falls_with_errors() -> None:
    lb = metrics.binomial_accuracy_lower_bound
    assert lb(100, 1) < lb(1000, 10) < 0.99  # same 99% observed, more cells, tighter
    assert lb(1000, 2) < lb(1000, 1) < lb(1000, 0)
    assert lb(0, 0) == 0.0
    with pytest.raises(ValueError):
        lb(10, 11)


def test_review_threshold_with_margin_is_stricter_than_the_oracle_cut() -> None:
    rng = np.random.default_rng(0)
    conf = np.sort(rng.uniform(0.5, 1.0, 3000))[::-1]
    correct = rng.uniform(size=3000) > 0.03 * (1.0 - conf)  # errors concentrate at low confidence
    oracle_thr, oracle_cov = metrics.coverage_at_accuracy(conf, correct, 0.995)
    thr, cov = metrics.review_threshold_with_margin(conf, correct, 0.995, 0.95)
    assert thr > oracle_thr and 0 < cov < oracle_cov
    accepted = conf >= thr
    n, errors = int(accepted.sum()), int((~correct[accepted]).sum())
    assert metrics.binomial_accuracy_lower_bound(n, errors, 0.95) >= 0.995


def test_review_threshold_with_margin_needs_enough_cells() -> None:
    # 50 right answers prove at most 0.05**(1/50) = 94.2% with 95% confidence
    thr, cov = metrics.review_threshold_with_margin(np.linspace(1.0, 0.9, 50), np.ones(50, bool), 0.995, 0.95)
    assert cov == 0.0 and thr == metrics.ALWAYS_REVIEW > 1.0
    # nor does a cell above every confidence seen get through
    thr, cov = metrics.review_threshold_with_margin(np.linspace(0.8, 0.7, 50), np.ones(50, bool), 0.995, 0.95)
    assert cov == 0.0 and thr == metrics.ALWAYS_REVIEW


def test_accuracy_above_fixed_threshold() -> None:
    acc, cov = metrics.accuracy_above(np.array([0.99, 0.95, 0.9, 0.8]), np.array([True, True, False, True]), 0.9)
    assert acc == pytest.approx(2 / 3)
    assert cov == pytest.approx(3 / 4)


def test_subset_metrics_count_predictions_outside_the_subset_as_errors() -> None:
    # true a, a, b, c -> predicted a, c, b, a; restricted to {a, b}: a->a, a->c, b->b
    out = metrics.subset_metrics(np.array([0, 0, 1, 2]), np.array([0, 2, 1, 0]), ["a", "b", "c"], ["a", "b"])
    assert out["n"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["recall"] == {"a": 0.5, "b": 1.0}
    # F1 a = 2*1/(1 pred + 2 true) = 2/3, F1 b = 1
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    with pytest.raises(ValueError, match="not among the model's classes: z"):
        metrics.subset_metrics(np.array([0]), np.array([0]), ["a", "b"], ["z"])


def test_classification_report_is_json_ready_and_skips_missing_subset_classes() -> None:
    import json

    logits = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 2, 2])
    out = metrics.classification_report(
        logits, labels, ["a", "b", "c"], temperature=1.5, review_threshold=0.5,
        subsets={"ab": ["a", "b", "x"], "none": ["x"]},
    )
    json.dumps(out, allow_nan=False)
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["ab"]["classes"] == ["a", "b"] and out["ab"]["accuracy"] == 1.0
    assert "none" not in out
    # calibrated confidences (T = 1.5): image 0 e^2/(e^2+2) = 0.787, image 1 e^(4/3)/(e^(4/3)+2) = 0.582,
    # images 2 and 3 e^(2/3)/(e^(2/3)+2) = 0.494; so images 0 and 1 (both right) are above 0.5
    assert out["review"]["coverage"] == pytest.approx(2 / 4)
    assert out["review"]["accuracy_above"] == 1.0


def test_natural_mix_weights_each_class_to_its_natural_count() -> None:
    from wbc_batch.metrics import natural_mix_report

    names = ["a", "b", "non_wbc"]
    # class a: 10 images, all right; class b: 2 images, one wrong (called a); non_wbc: 4 right
    labels = np.array([0] * 10 + [1] * 2 + [2] * 4)
    preds = labels.copy()
    preds[10] = 0
    logits = np.eye(3)[preds] * 10.0
    report = natural_mix_report(logits, labels, names, 1.0, 0.5, natural_counts={"a": 1, "b": 1, "non_wbc": 2},
                                white_cells=["a", "b"])
    # a and b weigh the same in the natural mix: white-cell accuracy (1 + 0.5) / 2, not 11 / 12
    assert report["wbc_accuracy"] == pytest.approx(0.75)
    assert report["non_wbc_recall"] == pytest.approx(1.0)
    assert report["review"]["coverage"] == pytest.approx(1.0)
    assert natural_mix_report(logits, labels, names, 1.0, 0.5, natural_counts={"a": 1, "c": 1}) == {}


def test_intervals_hold_the_estimate_and_narrow_with_n() -> None:
    from wbc_batch.metrics import balanced_accuracy_interval, wilson_interval

    low, high = wilson_interval(90, 100)
    assert low < 0.9 < high and high - low > wilson_interval(900, 1000)[1] - wilson_interval(900, 1000)[0]
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    labels = np.repeat([0, 1], 50)
    preds = labels.copy()
    preds[:10] = 1  # class 0 recall 0.8, class 1 recall 1.0: balanced 0.9
    low, high = balanced_accuracy_interval(labels, preds, 2)
    assert low <= 0.9 <= high and high <= 1.0


def test_a_declared_class_set_turns_calls_of_absent_classes_into_the_next_best() -> None:
    from wbc_batch.metrics import declared_class_logits

    names = ["basophil", "ig", "lymphocyte", "non_wbc"]
    logits = np.array([[0.0, 5.0, 3.0, 1.0], [4.0, 1.0, 0.0, 6.0]], np.float32)
    got = declared_class_logits(logits, names, ["basophil", "lymphocyte"])
    assert [names[i] for i in got.argmax(axis=1)] == ["lymphocyte", "basophil"]
    assert np.isfinite(got).all() and np.array_equal(got[:, [0, 2]], logits[:, [0, 2]])
    assert declared_class_logits(logits, names, None) is logits
    with pytest.raises(ValueError, match=r"declared classes \['monocyte'\] are not classes"):
        declared_class_logits(logits, names, ["basophil", "monocyte"])
    with pytest.raises(ValueError, match="at least two classes"):
        declared_class_logits(logits, names, ["basophil"])


def test_cli_evaluate_with_a_declared_class_set_never_answers_an_absent_class(
    samples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from wbc_batch.cli import main

    five = "basophil,eosinophil,lymphocyte,monocyte,neutrophil"
    out = tmp_path / "eval.json"
    lab = tmp_path / "lab"
    for c in five.split(","):
        shutil.copytree(samples_dir / c, lab / c)
    assert main(["evaluate", "shipped", str(lab), "--split", "all", "--classes", five, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["declared_classes"] == sorted(five.split(","))
    confusion = np.array(result["metrics"]["confusion_matrix"])
    names = result["metrics"]["class_names"]
    assert confusion[:, [names.index("ig"), names.index("non_wbc")]].sum() == 0
    capsys.readouterr()
