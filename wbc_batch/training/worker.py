"""The Ray Train worker loop: tf-keras under ``MultiWorkerMirroredStrategy``.

Why tf-keras: Ray 2.60's ``TensorflowTrainer`` sets ``TF_USE_LEGACY_KERAS=1``
and Keras 3 cannot run ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585).
The graph comes from :func:`wbc_batch.architecture.build_classifier`, so the
driver moves the trained weights into the Keras 3 graph classify loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from wbc_batch.training import recipe
from wbc_batch.training.augment import augment, preset
from wbc_batch.training.config import (
    AVERAGE_FILE,
    LEGACY_KERAS_ENV,
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    TrainingError,
)
from wbc_batch.training.labs import lacks_a_class
from wbc_batch.training.loss import cross_entropy, recipe_model


def weights_sha256(arrays: list[np.ndarray]) -> str:
    """SHA-256 over the bytes of a list of weight arrays, in order."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def _load_shard(shard: Any) -> dict[str, np.ndarray]:
    """This worker's shard as arrays: ``image``, ``label_index`` and, when present, ``lab_index``,
    ``cell_grid``, ``sample_weight``, ``teacher_logits`` and ``distill_mask``."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for key in ("image", "label_index", "lab_index", "cell_grid", "sample_weight", "teacher_logits",
                    "distill_mask"):
            if key in batch:
                parts.setdefault(key, []).append(batch[key])
    if not parts.get("image"):
        raise TrainingError("this worker received no training images")
    return {k: np.concatenate(v) for k, v in parts.items()}


def freeze_batch_norm(keras: Any, model: Any) -> None:
    """Run every BatchNormalization layer in inference mode, with its statistics fixed.

    Why: fine-tuning on a few cells of a new lab mixed with replayed cells
    would otherwise move the moving means and variances towards the mixture,
    and the first lab's cells would then be normalised with statistics that
    are no longer theirs (a documented cause of cross-lab failure). Keras
    runs a non-trainable BatchNormalization layer in inference mode.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Body of each Ray Train worker: tf-keras under ``MultiWorkerMirroredStrategy``.

    Each epoch ends with ``ray.train.report`` and a checkpoint folder
    ``epoch-NNNN`` holding the weights and optimizer state (rank 0) and one
    ``replica-<rank>.json`` per worker with the SHA-256 of its trainable weights.
    """
    os.environ.update(LEGACY_KERAS_ENV)
    import ray.train
    import tensorflow as tf
    import tf_keras

    from wbc_batch.architecture import build_classifier

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = max(1, int(cfg.get("cpus_per_worker", 1)))
    # intra-op only: collective all-reduce ops block an inter-op thread while they
    # wait for the peers, so a single inter-op thread deadlocks the strategy
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf_keras.utils.set_random_seed(int(cfg["seed"]))
    tf_keras.mixed_precision.set_global_policy(str(cfg.get("precision", "float32")))
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    shard = _load_shard(ray.train.get_dataset_shard("train"))
    on_cell = float(cfg.get("on_cell_weight", 0.0))
    if on_cell > 0 and shard.get("cell_grid") is None:
        raise TrainingError("the on-cell loss needs cell grids in the training data")
    distill = float(cfg.get("distill_weight", 0.0))
    if distill > 0 and shard.get("teacher_logits") is None:
        raise TrainingError("distillation needs the teacher's logits in the training data")
    steps, epochs = int(cfg["steps_per_epoch"]), int(cfg["epochs"])

    def dataset_fn_for(epoch: int) -> Any:
        return _augmented_dataset_fn(tf, shard, cfg, rank, threads, with_cells=on_cell > 0, epoch=epoch,
                                     with_teacher=distill > 0)

    with strategy.scope():
        model = build_classifier(tf_keras, int(cfg["num_classes"]), image_size=int(cfg["image_size"]),
                                 input_norm=str(cfg.get("input_norm", "rescale")))
        if cfg.get("freeze_norm"):
            freeze_batch_norm(tf_keras, model)
        optimizer = recipe.make_optimizer(
            tf_keras, float(cfg["learning_rate"]), float(cfg["weight_decay"]), epochs, steps
        )
        fitter = _compiled_fitter(tf_keras, model, optimizer, on_cell, float(cfg.get("label_smoothing", 0.0)),
                                  distill, float(cfg.get("distill_temperature", 1.0)),
                                  lacks_a_class(cfg.get("lab_class_mask")))
        optimizer.build(model.trainable_variables)
        if cfg.get("initial_weights") is not None:  # fine-tuning (--init-from); a checkpoint below overrides it
            model.set_weights(list(cfg["initial_weights"]))

    decay = float(cfg.get("weight_average", 0.0))
    average = recipe.WeightAverage(decay, model.get_weights()) if decay > 0 else None
    start_epoch = _restore_checkpoint(ray.train.get_checkpoint(), model, optimizer, average)
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        # fit() builds a new dataset from the creator on every call: one per epoch, with that epoch's order
        creator = tf_keras.utils.experimental.DatasetCreator(dataset_fn_for(epoch))
        callbacks = [] if average is None else [_averaging_callback(tf_keras, model, average, epoch * steps)]
        hist = fitter.fit(creator, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps, verbose=0,
                          callbacks=callbacks)
        # every rank must read the weights: BatchNormalization's moving statistics are
        # sync-on-read variables, and reading them is an all-reduce (the mean over workers)
        weights = model.get_weights()
        opt_state = [v.numpy() for v in optimizer.variables]
        digest = weights_sha256([v.numpy() for v in model.trainable_variables])
        epoch_metrics = {
            "epoch": epoch,
            "start_epoch": start_epoch,
            "loss": float(hist.history["loss"][-1]),
            "accuracy": float(hist.history["accuracy"][-1]),
            "epoch_seconds": time.time() - t0,
            "trainable_sha256": digest,
            "world_size": world,
        }
        if "outside" in hist.history:  # the on-cell term: share of the true class's evidence outside the cell
            epoch_metrics["outside_share"] = float(hist.history["outside"][-1])
        if "distill" in hist.history:  # the distillation term: divergence from the teacher, times T^2
            epoch_metrics["distill"] = float(hist.history["distill"][-1])
        if average is not None:
            epoch_metrics["average_sha256"] = weights_sha256(average.values)
        _report_epoch(epoch_metrics, rank, weights, opt_state, None if average is None else average.values)


def _averaging_callback(tf_keras: Any, model: Any, average: recipe.WeightAverage, steps_before: int) -> Any:
    """A callback that folds the weights after every optimizer step of this epoch into ``average``.

    Every rank keeps its own copy: the replicas hold identical weights, so the
    copies agree (each epoch's ``average_sha256`` shows it), and reading the
    weights is a collective every rank must join anyway.
    """
    def after_step(batch: int, logs: Any = None) -> None:
        average.update(model.get_weights(), steps_before + batch + 1)

    return tf_keras.callbacks.LambdaCallback(on_train_batch_end=after_step)


def shuffle_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one worker's shuffle in one epoch: a new order every epoch, the same one again on resume.

    Why the epoch is in it: ``fit`` rebuilds the dataset on each call, one
    call per epoch, so a seed of the run and rank alone replays the first
    epoch's order (the same batches, in the same sequence) in every epoch.
    """
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank)) % (2**31 - 1)


def _augmented_dataset_fn(tf: Any, shard: dict[str, np.ndarray], cfg: dict[str, Any], rank: int, threads: int,
                          with_cells: bool, epoch: int = 0, with_teacher: bool = False) -> Any:
    """The ``DatasetCreator`` function of one epoch: this worker's shard, shuffled, augmented and batched per replica.

    Per-image weights come from the driver when it sets them (adapt: lab
    share x class balance), else from the class rule. With the on-cell loss
    each element carries its cell grid, moved with the same geometry; with
    distillation, the teacher's logits of the un-augmented image (the
    augmentation changes neither the class nor, for a teacher trained on
    the same rotations and flips, its answer).
    """
    x, y = shard["image"], shard["label_index"].astype(np.int64)
    labs = lab_indices(shard)
    w = image_weights(shard, cfg)
    global_batch, seed = int(cfg["batch_size"]), int(cfg["seed"])
    spec = preset(str(cfg.get("augment", "strong")))
    masks = cfg.get("lab_class_mask")
    with_mask = lacks_a_class(masks)

    wrapped = with_cells or with_teacher or with_mask  # the recipe wrapper reads a dict of targets

    def view(im: Any, lab: Any, wt: Any, extra: dict[str, Any]) -> Any:
        if not wrapped:
            return augment(tf, tf.cast(im, tf.float32), spec=spec), lab, wt
        targets = {"label": lab}
        if with_cells:
            im, targets["cell_grid"] = augment(tf, tf.cast(im, tf.float32), mask=extra["cell_grid"], spec=spec)
        else:
            im = augment(tf, tf.cast(im, tf.float32), spec=spec)
        if with_teacher:
            targets["teacher_logits"] = extra["teacher_logits"]
            if "distill_mask" in extra:
                targets["distill_mask"] = extra["distill_mask"]
        if with_mask:
            targets["class_mask"] = extra["class_mask"]
        return im, targets, wt

    wanted = (("cell_grid", with_cells), ("teacher_logits", with_teacher), ("distill_mask", with_teacher))
    extra = {k: np.asarray(shard[k]) for k, on in wanted if on and shard.get(k) is not None}
    if with_mask:
        extra["class_mask"] = np.asarray(masks, dtype=np.float32)[labs]
    if not extra:
        extra = {"none": np.zeros(len(x), np.int8)}  # from_tensor_slices needs a non-empty structure

    def dataset_fn(input_context: Any) -> Any:
        per_replica = input_context.get_per_replica_batch_size(global_batch)
        ds = lab_balanced_stream(tf, (x, y, w, extra), labs, shuffle_seed(seed, rank, epoch))
        ds = ds.map(view, num_parallel_calls=threads)
        ds = ds.batch(per_replica, drop_remainder=True).prefetch(2)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options)

    return dataset_fn


def lab_indices(shard: dict[str, np.ndarray]) -> np.ndarray:
    """Each image's lab (0 for every image of a one-lab run)."""
    labs = shard.get("lab_index")
    return np.zeros(len(shard["label_index"]), np.int64) if labs is None else np.asarray(labs, np.int64)


def image_weights(shard: dict[str, np.ndarray], cfg: dict[str, Any]) -> np.ndarray:
    """Each image's loss weight: the driver's ``sample_weight`` when it set one (adapt), else its lab's weight of
    its class (:func:`wbc_batch.training.labs.lab_class_weights`), else the run's class weight."""
    if shard.get("sample_weight") is not None:
        return np.asarray(shard["sample_weight"], dtype=np.float32)
    y = shard["label_index"].astype(np.int64)
    if cfg.get("lab_class_weights") is not None:
        return np.asarray(cfg["lab_class_weights"], dtype=np.float32)[lab_indices(shard), y]
    return np.asarray(cfg["class_weights"], dtype=np.float32)[y]


def lab_balanced_stream(tf: Any, columns: Any, labs: np.ndarray, seed: int) -> Any:
    """An endless shuffled stream of ``columns``' rows in which every lab has an equal share.

    Why sampling rather than weights: a lab of 360 training cells beside one
    of 7,000 would need weights of about 20 on its cells to count as much,
    and a handful of heavily weighted cells make noisy gradients; drawing
    each element from a lab chosen uniformly shows the small lab's cells
    more often instead (:func:`wbc_batch.training.labs.lab_shares`). One
    lab: the plain shuffle.
    """
    present = sorted(set(int(v) for v in labs))

    def shuffled(rows: Any, n: int, salt: int) -> Any:
        ds = tf.data.Dataset.from_tensor_slices(rows)
        return ds.shuffle(n, seed=(seed + salt) % (2**31 - 1), reshuffle_each_iteration=True).repeat()

    if len(present) <= 1:
        return shuffled(columns, len(labs), 0)
    streams = []
    for lab in present:
        keep = np.flatnonzero(labs == lab)
        rows = tf.nest.map_structure(lambda a, k=keep: np.asarray(a)[k], columns)
        streams.append(shuffled(rows, len(keep), 7_919 * (lab + 1)))
    return tf.data.Dataset.sample_from_datasets(streams, weights=[1.0 / len(present)] * len(present), seed=seed)


def _compiled_fitter(tf_keras: Any, model: Any, optimizer: Any, on_cell: float, smoothing: float = 0.0,
                     distill: float = 0.0, temperature: float = 1.0, masked: bool = False) -> Any:
    """What ``fit`` runs: the recipe's loss wrapper (on-cell term, distillation, a lab's class set), or the
    model with weighted cross-entropy alone."""
    if on_cell > 0 or distill > 0 or masked:
        from wbc_batch.architecture import CAM_LAYER, LOGITS_LAYER

        fitter = recipe_model(tf_keras, model, CAM_LAYER, LOGITS_LAYER, on_cell, label_smoothing=smoothing,
                              distill_weight=distill, distill_temperature=temperature)
        fitter.compile(optimizer=optimizer)
        return fitter
    import tensorflow as tf

    model.compile(
        optimizer=optimizer,
        loss=lambda labels, logits: cross_entropy(tf, labels, logits, smoothing),
        weighted_metrics=["accuracy"],
    )
    return model


def _restore_checkpoint(checkpoint: Any, model: Any, optimizer: Any,
                        average: recipe.WeightAverage | None = None) -> int:
    """Weights, optimizer state and weight average from Ray Train's latest checkpoint; the epoch to start from
    (0 without one)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        model.set_weights(load_arrays(Path(d, WEIGHTS_FILE)))
        for var, value in zip(optimizer.variables, load_arrays(Path(d, OPTIMIZER_FILE))):
            var.assign(value)
        if average is not None:
            average.values = load_arrays(Path(d, AVERAGE_FILE))
    return int(state["epoch"]) + 1


def load_arrays(path: Path) -> list[np.ndarray]:
    """The arrays of a checkpoint ``.npz`` (weights, optimizer state or average), in the order they were saved."""
    saved = np.load(path)
    return [saved[k] for k in sorted(saved.files)]


def _save_arrays(path: Path, arrays: list[Any]) -> None:
    """Numbered so that :func:`load_arrays` gives them back in order."""
    np.savez(path, **{f"w{i:04d}": a for i, a in enumerate(arrays)})


def _report_epoch(epoch_metrics: dict[str, Any], rank: int, weights: list[Any],
                  opt_state: list[Any], average: list[np.ndarray] | None = None) -> None:
    """``ray.train.report`` with checkpoint ``epoch-NNNN``: the replica digest (every rank), the state (rank 0)."""
    import ray.train

    epoch = int(epoch_metrics["epoch"])
    with tempfile.TemporaryDirectory() as d:
        replica = {"rank": rank, "epoch": epoch, "trainable_sha256": epoch_metrics["trainable_sha256"]}
        if "average_sha256" in epoch_metrics:
            replica["average_sha256"] = epoch_metrics["average_sha256"]
        Path(d, f"replica-{rank}.json").write_text(json.dumps(replica))
        if rank == 0:
            _save_arrays(Path(d, WEIGHTS_FILE), weights)
            _save_arrays(Path(d, OPTIMIZER_FILE), opt_state)
            if average is not None:
                _save_arrays(Path(d, AVERAGE_FILE), average)
            Path(d, STATE_FILE).write_text(json.dumps(epoch_metrics))
        ray.train.report(
            epoch_metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"epoch-{epoch:04d}",
        )
