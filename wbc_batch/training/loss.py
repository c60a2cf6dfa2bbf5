"""The training loss: cross-entropy (optionally smoothed), the on-cell term and distillation from a teacher.

The on-cell term makes class evidence outside the segmented cell cost; the
distillation term pulls the network's softened class probabilities towards a
teacher's, precomputed for each training image.
"""

from __future__ import annotations

from typing import Any


def outside_share(tf: Any, feats: Any, kernel: Any, labels: Any, cells: Any) -> Any:
    """(B,) share of each image's true-class map ``relu(A @ w_label)`` that lies outside its cell grid.

    Args:
        tf: the TensorFlow module.
        feats: (B, g, g, C) last-stage features; kernel: (C, K) logits weights.
        labels: (B,) int class per image; cells: (B, g, g) cell share per grid cell.
    """
    w = tf.gather(tf.transpose(tf.cast(kernel, tf.float32)), tf.cast(labels, tf.int32))
    cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", tf.cast(feats, tf.float32), w))
    return tf.reduce_sum(cam * (1.0 - cells), axis=(1, 2)) / (tf.reduce_sum(cam, axis=(1, 2)) + 1e-6)


def cross_entropy(tf: Any, labels: Any, logits: Any, smoothing: float = 0.0, class_mask: Any = None) -> Any:
    """(B,) cross-entropy of integer ``labels`` under ``logits``, with the target smoothed towards uniform.

    Why smoothing: the target puts ``1 - smoothing`` on the true class and
    spreads ``smoothing`` evenly over all classes, so the network stops pushing
    logits apart once a cell is clearly placed; on classes that shade into
    each other (ig against neutrophil, lymphocyte against monocyte) that keeps
    it from memorising the training cells. ``smoothing=0`` is the plain loss.

    ``class_mask`` (B, K), 1 for the classes the image's lab has: the softmax
    runs over those alone, so a class the lab lacks gets no gradient from its
    cells (:func:`wbc_batch.training.labs.class_masks`); None: every class.
    """
    logits = tf.cast(logits, tf.float32)
    if class_mask is not None:
        mask = tf.cast(class_mask, tf.float32)
        logits = logits - (1.0 - mask) * 1e9
    logp = tf.nn.log_softmax(logits)
    nll = -tf.gather(logp, tf.reshape(tf.cast(labels, tf.int32), [-1]), batch_dims=1)
    if not smoothing:
        return nll
    if class_mask is None:
        return (1.0 - smoothing) * nll - smoothing * tf.reduce_mean(logp, axis=-1)
    spread = tf.reduce_sum(logp * mask, axis=-1) / tf.maximum(tf.reduce_sum(mask, axis=-1), 1.0)
    return (1.0 - smoothing) * nll - smoothing * spread


def distillation(tf: Any, teacher_logits: Any, logits: Any, temperature: float) -> Any:
    """(B,) Kullback-Leibler divergence of the student's softened probabilities from the teacher's, times T^2.

    Why softened: at ``temperature`` T > 1 the teacher's probabilities of the
    wrong classes (how much an ig looks like a neutrophil, a large lymphocyte
    like a monocyte) become large enough to learn from; that is what a hard
    label cannot say. The T^2 factor keeps the term's gradients on the scale
    of the cross-entropy's whatever T is (Hinton et al., 2015).
    """
    t = float(temperature)
    teacher = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / t)
    student = tf.nn.log_softmax(tf.cast(logits, tf.float32) / t)
    return tf.reduce_sum(tf.exp(teacher) * (teacher - student), axis=-1) * (t * t)


def recipe_model(tf_keras: Any, classifier: Any, cam_layer: str, logits_layer: str, on_cell_weight: float,
                 label_smoothing: float = 0.0, distill_weight: float = 0.0, distill_temperature: float = 1.0) -> Any:
    """Wrap a classifier so ``fit`` trains it on the recipe's loss.

    Per image: ``(1 - distill_weight) * cross_entropy + distill_weight *
    distillation``, weighted by the image's sample weight, plus
    ``on_cell_weight`` times the batch's mean on-cell share.

    Why the on-cell term: with global average pooling before one dense layer,
    the map ``relu(A @ w_c)`` on the last stage is exactly each location's
    contribution to the logit of ``c`` (what Grad-CAM shows). The term is the
    share of the true class's map outside the segmented cell, so the network
    learns to take its evidence from the cell rather than its surroundings
    (docs/EXPLANATIONS.md; the shipped model trains with it at weight 1.0).

    The wrapper shares the classifier's variables; data are ``(image, targets,
    sample_weight)`` with ``targets`` a dict: ``label`` always, ``cell_grid``
    when ``on_cell_weight > 0``, ``teacher_logits`` when ``distill_weight > 0``,
    ``class_mask`` when the run has a lab that lacks a class (:func:`cross_entropy`),
    and optionally ``distill_mask`` (1 where the teacher's answer is taught, 0
    where only the label is: ``adapt`` distils the base's answers on the
    replayed cells, not on the new lab's, where the base is wrong).
    """
    import tensorflow as tf

    view = tf_keras.Model(classifier.inputs, [classifier.get_layer(cam_layer).output, classifier.output])
    dense = classifier.get_layer(logits_layer)

    class RecipeModel(tf_keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = classifier
            self.loss_tracker = tf_keras.metrics.Mean(name="loss")
            self.outside_tracker = tf_keras.metrics.Mean(name="outside")
            self.distill_tracker = tf_keras.metrics.Mean(name="distill")
            self.acc = tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")

        def call(self, inputs: Any, training: bool = False) -> Any:
            return self.classifier(inputs, training=training)

        @property
        def metrics(self) -> list[Any]:
            tracked = [self.loss_tracker, self.acc]
            tracked += [self.outside_tracker] if on_cell_weight > 0 else []
            return tracked + ([self.distill_tracker] if distill_weight > 0 else [])

        def train_step(self, data: Any) -> dict[str, Any]:
            images, targets, weights = data
            labels = targets["label"]
            with tf.GradientTape() as tape:
                feats, logits = view(images, training=True)
                per_image = cross_entropy(tf, labels, logits, label_smoothing, targets.get("class_mask"))
                if distill_weight > 0:
                    kd = distillation(tf, targets["teacher_logits"], logits, distill_temperature)
                    taught = tf.cast(targets.get("distill_mask", tf.ones_like(kd)), tf.float32)
                    per_image = (1.0 - distill_weight * taught) * per_image + distill_weight * taught * kd
                loss = tf.reduce_sum(per_image * weights) / tf.maximum(tf.reduce_sum(weights), 1e-6)
                if on_cell_weight > 0:
                    outside = tf.reduce_mean(outside_share(tf, feats, dense.kernel, labels, targets["cell_grid"]))
                    loss = loss + on_cell_weight * outside
                # MirroredStrategy sums gradients over replicas: scale as Keras does for its own losses
                scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
            grads = tape.gradient(scaled, classifier.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, classifier.trainable_variables))
            self.loss_tracker.update_state(loss)
            self.acc.update_state(labels, logits)
            if on_cell_weight > 0:
                self.outside_tracker.update_state(outside)
            if distill_weight > 0:
                # the mean over the images taught the teacher's answer: a masked row's teacher logits mean nothing
                self.distill_tracker.update_state(kd, sample_weight=taught)
            return {m.name: m.result() for m in self.metrics}

    return RecipeModel()
