"""Ray Train job, artifact, evaluation and promotion on the bundled samples (real Ray, real files)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wbc_batch import training
from wbc_batch.cli import main
from wbc_batch.geometry import model_inputs
from wbc_batch.model import SPLIT_FILE, ModelArtifactError, ModelMetadata, load_artifact, read_metadata, save_artifact
from wbc_batch.ood import OodScorer
from wbc_batch.splits import LabelledImage, assign_splits, sha256_hex

CLASSES = ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil", "non_wbc"]


@pytest.fixture(scope="module")
def data_with_junk(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The samples plus what the real dataset has: a '.jpg' that is not an image, and a non-image name."""
    root = tmp_path_factory.mktemp("data") / "pbc"
    shutil.copytree(samples_dir, root)
    (root / "neutrophil" / ".DS_169665.jpg").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    (root / "neutrophil" / "notes.txt").write_text("not an image")
    return root


def _loop_whose_last_worker_dies_after_epoch_0(cfg: dict[str, Any]) -> None:
    """The real worker loop, except that on the first attempt the last worker dies right after epoch 0's report.

    Test code only: it wraps ``ray.train.report`` inside the worker process, so
    the production loop carries no fault-injection switch.
    """
    import os
    import time

    import ray.train

    from wbc_batch.training.worker import train_loop_per_worker

    ctx = ray.train.get_context()
    last = ctx.get_world_rank() == ctx.get_world_size() - 1
    first_attempt = ray.train.get_checkpoint() is None
    real_report = ray.train.report

    def report(metrics: dict[str, Any], **kwargs: Any) -> None:
        real_report(metrics, **kwargs)
        if last and first_attempt and metrics["epoch"] == 0:
            time.sleep(5)  # let the controller register this epoch's checkpoint first
            os._exit(1)  # a real worker death: FailureConfig restarts the group from the checkpoint

    ray.train.report = report
    try:
        train_loop_per_worker(cfg)
    finally:
        ray.train.report = real_report


@pytest.fixture(scope="module")
def trained(ray_local: None, data_with_junk: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two CPU workers, 2 epochs at 32 px with the on-cell loss and a weight average; the last worker dies after
    epoch 0 and the run resumes."""
    out = tmp_path_factory.mktemp("train")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("wbc_batch.training").addHandler(handler)
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import the tests
    try:
        summary = training.run_training(
            training.TrainConfig(
                data_uri=str(data_with_junk), model_out=str(out / "candidate"), workers=2, epochs=2, image_size=32,
                batch_size=16, storage_path=str(out / "checkpoints"), version="0.0.1-test", on_cell_weight=1.0,
                weight_average=0.5,
            ),
            train_loop=_loop_whose_last_worker_dies_after_epoch_0,
        )
    finally:
        logging.getLogger("wbc_batch.training").removeHandler(handler)
    summary["warnings"] = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    return summary


def test_two_workers_stay_in_sync_and_resume_after_a_worker_dies(trained: dict[str, Any]) -> None:
    last = trained["final_epoch"]
    assert last["world_size"] == 2 and last["epoch"] == 1
    # the worker died after epoch 0; the restarted group loaded that checkpoint and ran only epoch 1
    assert last["start_epoch"] == 1
    digests = trained["replica_trainable_sha256"]
    assert sorted(digests) == ["0", "1"]
    # different data shards on each worker: identical weights only if the gradients were all-reduced
    assert digests["0"] == digests["1"] == last["trainable_sha256"]
    averages = trained["replica_average_sha256"]  # each rank keeps its own average, restored on resume
    assert averages["0"] == averages["1"] == last["average_sha256"] != last["trainable_sha256"]
    assert 0.0 <= last["outside_share"] <= 1.0  # the on-cell term was in the loss


def test_augment_without_zoom_or_colour_turns_the_cell_grid_exactly_with_the_image() -> None:
    import tensorflow as tf

    geometry_only = training.AugmentSpec(
        zoom=(1.0, 1.0), rotate_degrees=0.0, shift=0.0, hue=0.0, saturation=(1.0, 1.0), gamma=(1.0, 1.0),
        contrast=(1.0, 1.0), brightness=(1.0, 1.0), channel_gain=(1.0, 1.0), blur_probability=0.0,
        noise_probability=0.0, jpeg_probability=0.0, vignette_probability=0.0,
    )
    image = np.zeros((32, 32, 3), np.float32)
    image[:8, :16] = 255.0  # bright where the "cell" is: top row of the 4x4 grid, two left cells
    mask = np.zeros((4, 4), np.float32)
    mask[0, :2] = 1.0
    tf.random.set_seed(0)
    for _ in range(12):
        out, cells = training.augment(tf, tf.constant(image), mask=tf.constant(mask), spec=geometry_only)
        bright = out.numpy().mean(axis=2).reshape(4, 8, 4, 8).mean(axis=(1, 3)) > 100
        np.testing.assert_array_equal(bright, cells.numpy() > 0.5)


def test_augment_moves_the_cell_mask_with_zoom_rotation_and_shift(samples_dir: Path) -> None:
    """Under the full policy the mask still covers the cell: segment the augmented view and compare."""
    import tensorflow as tf

    from wbc_batch import imaging
    from wbc_batch.localisation import model_input_mask

    photometry_off = training.AugmentSpec(
        hue=0.0, saturation=(1.0, 1.0), gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=(1.0, 1.0),
        channel_gain=(1.0, 1.0), blur_probability=0.0, noise_probability=0.0, jpeg_probability=0.0,
        vignette_probability=0.0,
    )
    tf.random.set_seed(1)
    agreements = []
    for path in sorted((samples_dir / "lymphocyte").iterdir())[:4]:
        image = imaging.resize_for_model(imaging.decode_image(path.read_bytes()), 64)
        grid = training.cell_grid(model_input_mask(image), 8)
        out, moved = training.augment(tf, tf.constant(image, tf.float32), mask=tf.constant(grid), spec=photometry_off)
        seen = training.cell_grid(model_input_mask(np.clip(out.numpy(), 0, 255).astype(np.uint8)), 8)
        agreements.append(float(np.mean((moved.numpy() > 0.5) == (seen > 0.5))))
        assert model_input_mask(image).any()
    assert min(agreements) >= 0.85, agreements


def test_augment_keeps_shape_range_and_changes_colour() -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (32, 32, 3)).astype(np.float32)
    tf.random.set_seed(2)
    views = [training.augment(tf, tf.constant(image)).numpy() for _ in range(8)]
    for v in views:
        assert v.shape == (32, 32, 3) and v.dtype == np.float32 and 0.0 <= v.min() and v.max() <= 255.0
    means = np.array([v.reshape(-1, 3).mean(axis=0) for v in views])
    assert means.std(axis=0).max() > 2.0  # the stain terms really vary the colour


def test_each_epoch_visits_the_images_in_a_new_order_and_a_resumed_epoch_in_the_same() -> None:
    """``fit`` rebuilds the dataset every epoch: the order must come from the epoch, not from the run alone."""
    import tensorflow as tf

    from wbc_batch.training.worker import _augmented_dataset_fn

    n = 64
    shard = {"image": np.zeros((n, 16, 16, 3), np.uint8), "label_index": np.arange(n)}  # the label names the image
    cfg = {"batch_size": n, "seed": 1234, "augment": "light", "class_weights": [1.0] * n}

    def visit_order(epoch: int) -> list[int]:
        dataset_fn = _augmented_dataset_fn(tf, shard, cfg, rank=0, threads=1, with_cells=False, epoch=epoch)
        _, labels, _ = next(iter(dataset_fn(tf.distribute.InputContext())))
        return [int(v) for v in labels.numpy()]

    epoch0, epoch1 = visit_order(0), visit_order(1)
    assert sorted(epoch0) == list(range(n))  # one batch of n is one pass over every image
    assert epoch0 != epoch1
    assert visit_order(1) == epoch1  # a resumed run replays the epoch it restarts


def test_label_smoothing_puts_its_share_of_the_target_on_every_class() -> None:
    """The smoothed loss is the cross-entropy against (1 - s) one-hot + s/K; s = 0 is the plain loss."""
    import tensorflow as tf

    from wbc_batch.training.loss import cross_entropy

    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
    labels = np.array([0, 1])
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    for s in (0.0, 0.1):
        target = (1 - s) * np.eye(3)[labels] + s / 3
        expected = -(target * logp).sum(axis=1)
        np.testing.assert_allclose(cross_entropy(tf, labels, logits, s).numpy(), expected, rtol=1e-5)
    plain = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy()
    np.testing.assert_allclose(cross_entropy(tf, labels, logits).numpy(), plain, rtol=1e-5)
    # a confident right answer costs more with smoothing: the loss stops rewarding ever larger margins
    sure = np.array([[20.0, 0.0, 0.0]], np.float32)
    assert cross_entropy(tf, [0], sure, 0.1).numpy()[0] > cross_entropy(tf, [0], sure, 0.0).numpy()[0] + 0.5
    with pytest.raises(ValueError, match="label smoothing"):
        training.TrainConfig(data_uri="d", model_out="m", label_smoothing=1.0)


def test_distillation_is_the_softened_divergence_from_the_teacher_times_t_squared() -> None:
    import tensorflow as tf

    from wbc_batch.training.loss import distillation

    teacher = np.array([[4.0, 1.0, -2.0], [0.0, 3.0, 0.5]], np.float32)
    student = np.array([[1.0, 2.0, 0.0], [0.0, 3.0, 0.5]], np.float32)

    def softened(z: np.ndarray, t: float) -> np.ndarray:
        e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    for t in (1.0, 4.0):
        p, q = softened(teacher, t), softened(student, t)
        expected = (p * np.log(p / q)).sum(axis=1) * t * t
        np.testing.assert_allclose(distillation(tf, teacher, student, t).numpy(), expected, rtol=1e-5, atol=1e-7)
    # the second student agrees with its teacher: nothing to learn there
    assert distillation(tf, teacher, student, 4.0).numpy()[1] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="distillation weight"):
        training.TrainConfig(data_uri="d", model_out="m", distill_weight=0.0)


def test_a_student_that_answers_as_its_teacher_gets_no_gradient_from_pure_distillation() -> None:
    """distill_weight 1: the loss is the divergence alone, so logits equal to the teacher's leave the weights be,
    and other teacher logits move them."""
    import tf_keras

    from wbc_batch.architecture import CAM_LAYER, LOGITS_LAYER, build_classifier

    tf_keras.utils.set_random_seed(0)
    model = build_classifier(tf_keras, 3, image_size=32, dropout=0.0)  # training mode then equals inference mode
    fitter = training.recipe_model(tf_keras, model, CAM_LAYER, LOGITS_LAYER, on_cell_weight=0.0,
                                   distill_weight=1.0, distill_temperature=4.0)
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    own = model.predict_on_batch(images)  # inference mode, as the teacher's logits are computed
    for layer in model.layers:  # so that training mode gives the same logits: BatchNorm on its moving statistics
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            layer.trainable = False
    fitter.compile(optimizer=tf_keras.optimizers.SGD(0.1))
    before = [w.copy() for w in model.get_weights()]
    targets = {"label": np.zeros(8, np.int64), "teacher_logits": own}
    logs = fitter.train_on_batch(images, targets, sample_weight=np.ones(8, np.float32), return_dict=True)
    assert logs["distill"] == pytest.approx(0.0, abs=1e-5)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    other = {"label": np.zeros(8, np.int64), "teacher_logits": np.tile(np.float32([[5.0, -5.0, 0.0]]), (8, 1))}
    logs = fitter.train_on_batch(images, other, sample_weight=np.ones(8, np.float32), return_dict=True)
    assert logs["distill"] > 0.1
    assert not np.allclose(before[-2], model.get_weights()[-2])  # the logits layer moved towards the teacher
    # a zero mask (adapt's new-lab rows): the teacher's logits are not taught, the label alone is
    import tensorflow as tf

    from wbc_batch.training.loss import cross_entropy

    labels = np.arange(8) % 3
    plain = float(tf.reduce_mean(cross_entropy(tf, labels, model.predict_on_batch(images))))
    masked = {**other, "label": labels, "distill_mask": np.zeros(8, np.float32)}
    logs = fitter.train_on_batch(images, masked, sample_weight=np.ones(8, np.float32), return_dict=True)
    assert logs["loss"] == pytest.approx(plain, rel=1e-4)
    assert logs["distill"] == 0.0  # and the reported term counts only the images taught the teacher's answer


def test_weight_average_follows_the_network_early_and_averages_its_last_steps_late() -> None:
    from wbc_batch.training.recipe import WeightAverage, average_decay

    assert average_decay(0.998, 1) == pytest.approx(2 / 11)  # the random start fades at once
    assert average_decay(0.998, 10_000) == 0.998
    avg = WeightAverage(0.9, [np.zeros(3, np.float32), np.ones((2, 2), np.float32)])
    avg.update([np.full(3, 10.0), np.zeros((2, 2))], step=1)
    np.testing.assert_allclose(avg.values[0], np.full(3, 10 * (1 - 2 / 11)), rtol=1e-6)
    avg.values = [np.zeros(3, np.float32)]
    for step in range(1000, 1100):  # late in a run: a constant signal is reached geometrically at the decay
        avg.update([np.ones(3)], step=step)
    np.testing.assert_allclose(avg.values[0], 1 - 0.9**100, rtol=1e-5)
    with pytest.raises(ValueError, match="weight average"):
        training.TrainConfig(data_uri="d", model_out="m", weight_average=1.0)


def test_auto_precision_is_bfloat16_only_where_it_is_faster() -> None:
    assert training.resolve_precision("auto", use_gpu=True) == "mixed_bfloat16"
    amx = "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    no_amx = "flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n"
    assert training.resolve_precision("auto", use_gpu=False, cpu_flags=amx) == "mixed_bfloat16"
    assert training.resolve_precision("auto", use_gpu=False, cpu_flags=no_amx) == "float32"
    assert training.resolve_precision("float32", use_gpu=True) == "float32"


def test_light_preset_keeps_the_stain_and_the_cli_offers_every_preset() -> None:
    """``light`` changes geometry and tint only: hue, saturation and sharpness of a cell stay as they are."""
    import tensorflow as tf

    from wbc_batch.cli import build_parser

    rng = np.random.default_rng(3)
    image = rng.uniform(60, 200, (32, 32, 3)).astype(np.float32)
    tf.random.set_seed(3)
    light = [training.augment(tf, tf.constant(image), spec=training.preset("light")).numpy() for _ in range(8)]
    strong = [training.augment(tf, tf.constant(image), spec=training.preset("strong")).numpy() for _ in range(8)]

    def channel_ratio_spread(views: list[np.ndarray]) -> float:
        """How far the red/blue balance of the views varies: light only scales each channel by 0.95-1.05."""
        ratios = [v[..., 0].mean() / v[..., 2].mean() for v in views]
        return float(np.std(ratios))

    assert channel_ratio_spread(light) < 0.05 < channel_ratio_spread(strong)
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if a.dest == "augment")
    assert sorted(train.choices) == sorted(training.AUGMENT_PRESETS)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        training.preset("none")
    with pytest.raises(ValueError, match="augmentation must be one of"):
        training.TrainConfig(data_uri="d", model_out="m", augment="none")


def test_train_with_no_options_runs_the_recipe_and_a_class_weight_replaces_its_factors() -> None:
    from wbc_batch.cli import build_parser
    from wbc_batch.training import recipe

    plain = training.TrainConfig.from_args(build_parser().parse_args(["train", "DATA", "OUT"]))
    assert (plain.epochs, plain.batch_size, plain.augment, plain.on_cell_weight) == (75, 128, "light", 1.0)
    assert plain.class_weight_factors == recipe.RECIPE_CLASS_WEIGHT_FACTORS == {"non_wbc": 2.0}
    plain.class_weight_factors["non_wbc"] = 9.0  # a run's copy: the recipe itself stays as it is
    assert recipe.RECIPE_CLASS_WEIGHT_FACTORS == {"non_wbc": 2.0}
    given = build_parser().parse_args(["train", "DATA", "OUT", "--class-weight", "ig=1.5", "--augment", "strong"])
    config = training.TrainConfig.from_args(given)
    assert config.class_weight_factors == {"ig": 1.5} and config.augment == "strong"


def test_non_images_are_skipped_with_a_warning(trained: dict[str, Any]) -> None:
    joined = "\n".join(trained["warnings"])
    assert ".DS_169665.jpg: not an image" in joined
    assert "notes.txt: not an image file name" in joined
    assert sum(trained["split_counts"].values()) == 64


def test_artifact_holds_the_trained_weights_split_and_calibration(trained: dict[str, Any]) -> None:
    art = load_artifact(trained["model_out"])
    meta = art.meta
    assert meta.class_names == CLASSES and meta.image_size == 32 and meta.version == "0.0.1-test"
    assert meta.gradcam_layer == "cam_features" and meta.non_wbc_classes == ["non_wbc"]
    assert meta.temperature > 0 and 0 < meta.review_threshold <= 1.0 + 1e-9
    assert meta.training_data["split_counts"] == trained["split_counts"]
    assert len(meta.training_data["fingerprint_sha256"]) == 64
    assert meta.metrics["split"] == "test" and len(meta.metrics["confusion_matrix"]) == 7
    # the job fits the OOD statistics classify needs for this very network
    assert meta.ood["num_classes"] == 7 and meta.ood["fitted_on"]["n_train"] == trained["split_counts"]["train"]
    scorer = OodScorer.from_metadata(meta)
    images = np.full((2, 32, 32, 3), 200, np.uint8)
    scores, flags = scorer.score(np.zeros((2, scorer.embedding_dim), np.float32), images)
    assert scores.shape == (2,) and np.isfinite(scores).all() and flags.dtype == bool
    # the run kept a weight average: that is the model, not the last step's weights
    assert meta.training["weight_average"] == 0.5
    average = np.load(Path(trained["checkpoint"]) / training.AVERAGE_FILE)
    for saved, loaded in zip((average[k] for k in sorted(average.files)), art.model.get_weights()):
        np.testing.assert_array_equal(saved, loaded)
    last = np.load(Path(trained["checkpoint"]) / training.WEIGHTS_FILE)
    assert any(not np.array_equal(last[k], average[k]) for k in last.files)
    rows = (Path(trained["model_out"]) / SPLIT_FILE).read_text().splitlines()
    assert rows[0] == "sha256,label,split,uri,lab,group" and len(rows) == 65
    one_lab = [r.split(",") for r in rows[1:]]
    assert len({r[4] for r in one_lab}) == 1 and one_lab[0][4]  # one lab, named after its folder
    assert all(r[5] == r[3].rsplit("/", 1)[-1] for r in one_lab)  # split by file: each file its own group
    assert {r.split(",")[2] for r in rows[1:]} == {"train", "val", "test"}
    repo = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo).stdout.strip()
    recorded = meta.training["provenance"]
    assert recorded["git_commit"] == (head or None)  # read when the run started; a tarball has none
    assert isinstance(recorded["git_dirty"], bool) or not head


def test_keras3_artifact_computes_the_logits_of_the_trained_tf_keras_network(
    trained: dict[str, Any], samples_dir: Path
) -> None:
    """The workers train tf-keras; classify loads Keras 3: the same graph must give the same logits."""
    import tf_keras

    from wbc_batch import imaging
    from wbc_batch.architecture import build_classifier

    ckpt = np.load(Path(trained["checkpoint"]) / training.AVERAGE_FILE)
    trained_net = build_classifier(tf_keras, 7, image_size=32)
    trained_net.set_weights([ckpt[k] for k in sorted(ckpt.files)])
    paths = [sorted((samples_dir / c).iterdir())[0] for c in ("basophil", "monocyte", "platelet")]
    batch = model_inputs([imaging.decode_image(p.read_bytes()) for p in paths], 32)[0]
    expected = np.asarray(trained_net(batch, training=False))
    got = np.asarray(load_artifact(trained["model_out"]).model.predict_on_batch(batch))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 0  # not a trivially empty network


def test_fine_tuning_keeps_the_earlier_models_held_out_images_out_of_training() -> None:
    fresh = {"a": "train", "b": "train", "c": "val", "d": "test", "e": "train"}
    earlier = {"a": "val", "b": "train", "c": "train", "d": "test", "gone": "test"}
    # a was validation for the earlier model: it stays there; c may move to val, never the other way to train
    assert training.keep_earlier_split(fresh, earlier) == {"a": "val", "b": "train", "c": "val", "d": "test",
                                                          "e": "train"}
    assert training.keep_earlier_split(fresh, None) == fresh


def _one_epoch_at_32px(data: Path, model_out: Path, **settings: Any) -> dict[str, Any]:
    """One worker, one epoch of a 32 px network on ``data``: a run that differs from the fixture's by ``settings``."""
    return training.run_training(training.TrainConfig(
        data_uri=str(data), model_out=str(model_out), workers=1, epochs=1, image_size=32, batch_size=16,
        storage_path=str(model_out.parent / f"{model_out.name}-checkpoints"), **settings,
    ))


def test_fine_tuning_starts_from_the_given_model(
    trained: dict[str, Any], data_with_junk: Path, tmp_path: Path
) -> None:
    """--init-from loads the artifact's weights: at learning rate 0 the trainable weights come out unchanged."""
    summary = _one_epoch_at_32px(data_with_junk, tmp_path / "tuned", version="0.0.2-test", learning_rate=0.0,
                                 init_from=trained["model_out"], class_weight_factors={"non_wbc": 2.0})
    before, after = load_artifact(trained["model_out"]), load_artifact(summary["model_out"])
    for a, b in zip(before.model.trainable_weights, after.model.trainable_weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    info = after.meta.training
    assert info["init_from"]["version"] == "0.0.1-test" and info["init_from"]["model_sha256"] == before.meta.model_sha256
    weights, balanced = info["class_weights"], before.meta.training["class_weights"]
    assert weights["non_wbc"] == pytest.approx(2 * balanced["non_wbc"], abs=1e-3)
    assert weights["ig"] == pytest.approx(balanced["ig"], abs=1e-4)
    assert "fine-tuned from 0.0.1-test" in after.meta.changelog[0]
    assert (Path(summary["model_out"]) / SPLIT_FILE).read_text() == (Path(trained["model_out"]) / SPLIT_FILE).read_text()


def test_teacher_logits_are_the_teachers_answer_for_each_training_image(trained: dict[str, Any]) -> None:
    import ray

    from wbc_batch.training.evaluation import predict_logits
    from wbc_batch.training.teacher import TEACHER_COLUMN, load_teacher, with_teacher_logits

    images = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    ds = ray.data.from_items([{"image": im, "label_index": i % 7} for i, im in enumerate(images)])
    rows = with_teacher_logits(ds, trained["model_out"], CLASSES, 32).take_all()
    teacher = load_artifact(trained["model_out"]).model
    got = np.stack([r[TEACHER_COLUMN] for r in rows])
    want = predict_logits(teacher, np.stack([r["image"] for r in rows]))
    assert got.shape == (40, 7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(training.TrainingError, match="--distill-from model has classes"):  # the driver's check
        load_teacher(trained["model_out"], CLASSES[:6], 32)
    with pytest.raises(training.TrainingError, match="takes 32 px images, this run 64 px"):
        load_teacher(trained["model_out"], CLASSES, 64)


def test_training_with_a_teacher_records_it_and_its_term(
    trained: dict[str, Any], data_with_junk: Path, tmp_path: Path
) -> None:
    summary = _one_epoch_at_32px(data_with_junk, tmp_path / "student", version="0.0.3-test", augment="light",
                                 distill_from=trained["model_out"], distill_weight=0.7, distill_temperature=3.0)
    teacher, student = load_artifact(trained["model_out"]), load_artifact(summary["model_out"])
    kd = student.meta.training["distillation"]
    assert kd["digest"] == teacher.digest and kd["version"] == "0.0.1-test"
    assert (kd["weight"], kd["temperature"]) == (0.7, 3.0)
    assert np.isfinite(summary["final_epoch"]["distill"]) and summary["final_epoch"]["distill"] >= 0
    assert "kd" not in trained["run_name"] and summary["run_name"] != trained["run_name"]


def test_fine_tuning_refuses_a_model_of_other_classes_or_size(trained: dict[str, Any], data_with_junk: Path) -> None:
    config = training.TrainConfig(data_uri=str(data_with_junk), model_out="unused", image_size=32,
                                  init_from=trained["model_out"])
    with pytest.raises(training.TrainingError, match="classes"):
        training.initial_weights(config, CLASSES[:6])
    config.image_size = 64
    with pytest.raises(training.TrainingError, match="takes 32 px images, this run 64 px"):
        training.initial_weights(config, CLASSES)
    with pytest.raises(training.TrainingError, match="not classes of the data"):
        training.scaled_class_weights(CLASSES, [1.0] * 7, {"platelet": 2.0})


def test_evaluate_uses_the_models_test_split(trained: dict[str, Any], data_with_junk: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = training.evaluate(trained["model_out"], str(data_with_junk), out_json=str(out))
    assert result["split"] == "test" and result["n_images"] == trained["split_counts"]["test"]
    m = result["metrics"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "precision", "recall", "confusion_matrix",
                "ece_raw", "ece_calibrated", "coverage_at_99_5", "review", "wbc", "mature5"):
        assert key in m, key
    assert m["wbc"]["classes"] == CLASSES[:6] and m["mature5"]["n"] == 5
    assert json.loads(out.read_text())["n_images"] == result["n_images"]
    everything = training.evaluate(trained["model_out"], str(data_with_junk), split="all")
    assert everything["n_images"] == 64 and any(".DS_" in s["uri"] for s in everything["skipped"])


def test_test_time_augmentation_does_not_depend_on_which_way_up_the_cell_lies(shipped: Any) -> None:
    from wbc_batch.training.evaluation import dihedral_mean_logits, predict_logits

    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (3, 128, 128, 3)).astype(np.uint8)
    turned = np.ascontiguousarray(np.rot90(batch, 1, axes=(1, 2))[:, ::-1])
    mean = dihedral_mean_logits(shipped.model, batch)
    np.testing.assert_allclose(mean, dihedral_mean_logits(shipped.model, turned), atol=1e-3)
    assert not np.allclose(mean, predict_logits(shipped.model, batch), atol=1e-3)
    own = predict_logits(shipped.model, batch)  # evaluate passes the logits it has: 7 more views, same mean
    np.testing.assert_allclose(dihedral_mean_logits(shipped.model, batch, identity_logits=own), mean, atol=1e-4)


def test_cli_evaluate_prints_and_refuses_a_tampered_model(
    trained: dict[str, Any], data_with_junk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", trained["model_out"], str(data_with_junk), "--out", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "5 mature classes" in printed and (tmp_path / "e.json").is_file()
    tampered = tmp_path / "tampered"
    shutil.copytree(trained["model_out"], tampered)
    with open(tampered / "model.keras", "ab") as fh:
        fh.write(b"\x00")
    assert main(["evaluate", str(tampered), str(data_with_junk)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match model.json" in err[0]


# --- promotion and 5-class models, with hand-made models (no training needed) ----------------


def _split_csv(data: Path) -> str:
    rows = training.list_labelled_files(str(data))
    items = [LabelledImage(r["rel"], sha256_hex(Path(r["uri"]).read_bytes()), r["label"], r["folder"]) for r in rows
             if not Path(r["uri"]).name.startswith(".")]
    return training.split_csv_text(items, assign_splits(items))


def _constant_model(tmp: Path, name: str, classes: list[str], always: str, split_csv: str) -> str:
    """An artifact whose logits ignore the image and always favour one class."""
    import keras

    from wbc_batch.architecture import build_classifier

    model = build_classifier(keras, len(classes), image_size=32)
    dense = model.get_layer("logits")
    kernel, bias = dense.get_weights()
    bias[:] = 0.0
    bias[classes.index(always)] = 5.0
    dense.set_weights([np.zeros_like(kernel), bias])
    meta = ModelMetadata(version=name, class_names=classes, image_size=32, gradcam_layer="cam_features",
                         non_wbc_classes=[c for c in classes if c == "non_wbc"])
    uri = str(tmp / name)
    save_artifact(model, meta, uri, split_csv=split_csv)
    return uri


def test_publish_promotes_only_a_better_model_and_keeps_the_previous(data_with_junk: Path, tmp_path: Path) -> None:
    split = _split_csv(data_with_junk)
    # test split of the samples: 1 image per white-cell class, 3 non_wbc (erythroblast + platelet)
    worse = _constant_model(tmp_path, "always-basophil", CLASSES, "basophil", split)
    better = _constant_model(tmp_path, "always-non-wbc", CLASSES, "non_wbc", split)
    loc = tmp_path / "published"

    first = training.publish(worse, str(loc), str(data_with_junk))
    assert first["promoted"] and first["reason"] == "no current model"
    assert read_metadata(str(loc / "current")).version == "always-basophil"

    second = training.publish(better, str(loc), str(data_with_junk))
    assert second["promoted"], second["reason"]
    assert second["candidate"]["split"] == "test"
    assert read_metadata(str(loc / "current")).version == "always-non-wbc"
    assert read_metadata(str(loc / "versions" / "always-basophil")).version == "always-basophil"
    load_artifact(str(loc / "current"))  # sha256 still matches after the copy

    third = training.publish(worse, str(loc), str(data_with_junk))
    assert not third["promoted"] and "does not beat" in third["reason"]
    assert read_metadata(str(loc / "current")).version == "always-non-wbc"


def test_five_class_model_evaluates_and_is_not_published_over_a_seven_class_one(
    data_with_junk: Path, tmp_path: Path
) -> None:
    split = _split_csv(data_with_junk)
    mature = list(training.MATURE_CLASSES)
    five = _constant_model(tmp_path, "five", mature, "neutrophil", split)
    result = training.evaluate(five, str(data_with_junk), split="test")
    # only images of the model's own classes are scored; ig and non_wbc images are reported as skipped
    assert result["n_images"] == 5 and result["metrics"]["accuracy"] == pytest.approx(1 / 5)
    assert result["metrics"]["mature5"]["n"] == 5 and "wbc" in result["metrics"]
    skipped = {Path(s["uri"]).parent.name for s in result["skipped"]}
    assert "ig" in skipped and skipped <= {"ig", "erythroblast", "platelet", "neutrophil"}
    # the one neutrophil skipped is the junk file (not in split.csv, so never trained on: it counts as test)
    assert [Path(s["uri"]).name for s in result["skipped"] if "neutrophil" in s["uri"]] == [".DS_169665.jpg"]
    loc = tmp_path / "published"
    training.publish(_constant_model(tmp_path, "seven", CLASSES, "non_wbc", split), str(loc), str(data_with_junk))
    refused = training.publish(five, str(loc), str(data_with_junk))
    assert not refused["promoted"] and "class lists differ" in refused["reason"]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["train", "DATA", "OUT", "--workers", "0"], 2, "invalid input: workers must be >= 1, got 0"),
        (["train", "DATA", "OUT", "--image-size", "8"], 2, "invalid input: image size must be >= 16, got 8"),
        (["train", "DATA", "OUT", "--workers", "4", "--batch-size", "2"], 2,
         "batch size (2) must be at least the number of workers (4)"),
        (["evaluate", "shipped", "/nonexistent/data"], 2, "not found"),
        (["evaluate", "/nonexistent/model", "DATA"], 4, "model error: model artifact not found"),
    ],
)
def test_cli_failures_are_one_line(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_copy_artifact_copies_every_file_and_checks_the_digest(data_with_junk: Path, tmp_path: Path) -> None:
    from wbc_batch.model import artifact_digest
    from wbc_batch.training.publishing import _copy_artifact

    src = Path(_constant_model(tmp_path, "src", CLASSES, "non_wbc", _split_csv(data_with_junk)))
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("any file of the folder is part of the artifact\n")
    dst = tmp_path / "dst"
    (dst / "old").mkdir(parents=True)
    (dst / "old" / "stale.bin").write_bytes(b"from an earlier model")
    assert _copy_artifact(str(src), str(dst)) == artifact_digest(str(src)) == artifact_digest(str(dst))
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "extra/notes.txt", "model.json", "model.keras", "split.csv"]
    # a link out of the folder: the digest reads through it, the listing skips it, so the copy differs
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    (src / "linked.txt").symlink_to(outside)
    with pytest.raises(ModelArtifactError, match="not the source's"):
        _copy_artifact(str(src), str(tmp_path / "dst2"))


def test_publish_compares_digests_and_never_overwrites_a_published_version(
    data_with_junk: Path, tmp_path: Path
) -> None:
    from wbc_batch.model import artifact_digest

    split = _split_csv(data_with_junk)
    worse = _constant_model(tmp_path, "always-basophil", CLASSES, "basophil", split)
    better = _constant_model(tmp_path, "always-non-wbc", CLASSES, "non_wbc", split)
    loc = tmp_path / "published"
    training.publish(worse, str(loc), str(data_with_junk))
    promoted = training.publish(better, str(loc), str(data_with_junk))
    assert promoted["promoted"] and promoted["candidate"]["digest"] == artifact_digest(better)
    archived = artifact_digest(str(loc / "versions" / "always-basophil"))
    assert promoted["previous"]["digest"] == artifact_digest(worse) == archived
    assert training.evaluate(better, str(data_with_junk))["model"]["digest"] == artifact_digest(better)

    same = training.publish(better, str(loc), str(data_with_junk))
    assert not same["promoted"] and "nothing to do" in same["reason"] and same["candidate"]["score"] is None

    # another artifact under a version already published: refused before anything is written
    current_before = artifact_digest(str(loc / "current"))
    for version, always in (("always-basophil", "eosinophil"), ("always-non-wbc", "ig")):
        (tmp_path / always).mkdir()
        other = _constant_model(tmp_path / always, version, CLASSES, always, split)
        with pytest.raises(ModelArtifactError, match="give the candidate a new version"):
            training.publish(other, str(loc), str(data_with_junk))
        assert artifact_digest(str(loc / "current")) == current_before
    assert artifact_digest(str(loc / "versions" / "always-basophil")) == artifact_digest(worse)


def test_freezing_batch_norm_keeps_its_statistics_while_the_rest_learns() -> None:
    import tf_keras

    from wbc_batch.architecture import build_classifier
    from wbc_batch.training.worker import freeze_batch_norm

    model = build_classifier(tf_keras, 3, image_size=32)
    freeze_batch_norm(tf_keras, model)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2),
                  loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    norms = [layer for layer in model.layers if isinstance(layer, tf_keras.layers.BatchNormalization)]
    stats_before = [w.copy() for layer in norms for w in layer.get_weights()]
    kernel_before = model.get_layer("stem_conv").get_weights()[0].copy()
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32"), rng.integers(0, 3, 16), epochs=2, verbose=0)
    for before, after in zip(stats_before, [w for layer in norms for w in layer.get_weights()]):
        np.testing.assert_array_equal(before, after)
    assert not np.allclose(kernel_before, model.get_layer("stem_conv").get_weights()[0])
