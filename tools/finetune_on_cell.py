"""Fine-tune a classifier so that its class evidence lies on the white cell.

Why: the shipped model's Grad-CAM maps fall around the cell rather than on
it (mean ``cam_in_cell`` 0.45 against a cell share of 0.11 and an ideal
16x16 map's 0.88, ``docs/EXPLANATIONS.md``): the network draws evidence from
the cell's rim and surroundings. With global average pooling before one
dense layer, the class-``c`` map on the last stage, ``A @ w_c``, is exactly
how much each location adds to the logit of ``c`` (Grad-CAM equals CAM
there). So the evidence itself, not just its picture, can be asked to come
from the cell: besides the cross-entropy, the loss charges the share of the
true class's positive map that lies outside the segmented cell ("right for
the right reasons", Ross et al. 2017). The segmentation only supervises
training; classify never masks a map.

Inputs: a 128 px cache (``X`` uint8 model inputs, ``y``, ``s`` split names,
``classes``; as ``tools/pack_pbc.py`` or ``tools/measure_explanations.py``
use it) and the matching cell masks averaged to the map's grid (computed
from the model inputs with classify's segmentation on first use, and cached;
1.1.0 was made with masks of the tile downscaled by two, the segmentation of
that time). Augmentation is the part
of the training policy that maps masks exactly: 90-degree rotations, flips,
brightness/contrast and per-channel gain.

Usage:
    python tools/finetune_on_cell.py OUT_DIR [--cache /tmp/pbc128.npz]
        [--epochs 6] [--lr 3e-4] [--outside-weight 1.0] [--non-wbc-weight 2.0]

Writes ``OUT_DIR/epoch-NN.keras`` and ``OUT_DIR/history.json`` with the
validation figures of every epoch; pick the epoch on validation only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wbc_batch.model import load_artifact  # noqa: E402
from wbc_batch.training import cell_grid, outside_share  # noqa: E402


def load_masks(model_inputs: np.ndarray, grid: int, cache: Path) -> np.ndarray:
    """(N, grid, grid) float32 cell shares of the model inputs (split.csv order), computed once and cached."""
    if cache.is_file():
        masks = np.load(cache)["masks"]
        if masks.shape == (len(model_inputs), grid, grid):
            return masks
    with ThreadPoolExecutor(2) as pool:
        masks = np.stack(list(pool.map(lambda x: cell_grid(x, grid), model_inputs)))
    np.savez(cache, masks=masks)
    return masks


def augment(x: np.ndarray, m: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same dihedral view of an image and its mask, plus photometric jitter of the image."""
    k = int(rng.integers(4))
    x, m = np.rot90(x, k), np.rot90(m, k)
    if rng.random() < 0.5:
        x, m = x[:, ::-1], m[:, ::-1]
    x = x.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.9, 1.1) + mean * rng.uniform(0.9, 1.1)
    x = x * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    return np.clip(x, 0, 255), np.ascontiguousarray(m)


def build_step(model, cam_layer: str, logits_layer: str, optimizer, outside_weight: float):
    """A compiled train step and an evaluation function sharing one two-output view of the model."""
    import keras
    import tensorflow as tf

    view = keras.Model(model.inputs, [model.get_layer(cam_layer).output, model.output])
    dense = model.get_layer(logits_layer)

    @tf.function(reduce_retracing=True)
    def train_step(x, y, w, m):
        with tf.GradientTape() as tape:
            feats, logits = view(x, training=True)
            ce = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            ce = tf.reduce_sum(ce * w) / tf.reduce_sum(w)
            out = tf.reduce_mean(outside_share(tf, feats, dense.kernel, y, m))
            loss = ce + outside_weight * out
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return ce, out

    @tf.function(reduce_retracing=True)
    def eval_step(x, m):
        feats, logits = view(x, training=False)
        pred = tf.argmax(logits, axis=1, output_type=tf.int32)
        return logits, 1.0 - outside_share(tf, feats, dense.kernel, pred, m)

    return train_step, eval_step


def evaluate(eval_step, x: np.ndarray, y: np.ndarray, m: np.ndarray, non_wbc: int | None) -> dict:
    logits, inside = [], []
    for i in range(0, len(x), 256):
        lg, ins = eval_step(x[i:i + 256].astype(np.float32), m[i:i + 256])
        logits.append(lg.numpy())
        inside.append(ins.numpy())
    logits, inside = np.concatenate(logits), np.concatenate(inside)
    pred = logits.argmax(1)
    out = {"accuracy": float((pred == y).mean()), "cam_in_cell_grid": float(inside.mean())}
    if non_wbc is not None:
        wbc = y != non_wbc
        out["wbc_accuracy"] = float((pred[wbc] == y[wbc]).mean())
        out["non_wbc_recall"] = float((pred[~wbc] == non_wbc).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for epoch checkpoints and history.json")
    ap.add_argument("--cache", default="/tmp/pbc128.npz", help="128 px model inputs in split.csv order")
    ap.add_argument("--masks", default="/tmp/pbc-input-masks16.npz", help="cache of the grid masks")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--outside-weight", type=float, default=1.0, help="weight of the outside-the-cell share")
    ap.add_argument("--non-wbc-weight", type=float, default=2.0, help="extra factor on the balanced non_wbc weight")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import keras

    keras.utils.set_random_seed(args.seed)
    art = load_artifact()
    meta, model = art.meta, art.model
    cache = np.load(args.cache)
    if [str(c) for c in cache["classes"]] != meta.class_names:
        raise SystemExit("cache classes differ from the model's")
    x_all, y_all, s_all = cache["X"], cache["y"].astype(np.int32), cache["s"].astype(str)
    grid = model.get_layer(meta.gradcam_layer).output.shape[1]
    t0 = time.time()
    masks = load_masks(x_all, int(grid), Path(args.masks))
    print(f"masks {masks.shape} in {time.time() - t0:.0f} s", flush=True)
    tr, va = s_all == "train", s_all == "val"
    xtr, ytr, mtr = x_all[tr], y_all[tr], masks[tr]
    xva, yva, mva = x_all[va], y_all[va], masks[va]
    n_cls = len(meta.class_names)
    counts = np.bincount(ytr, minlength=n_cls)
    cw = (len(ytr) / (n_cls * np.maximum(counts, 1))).astype(np.float32)
    non_wbc = meta.class_names.index("non_wbc") if "non_wbc" in meta.class_names else None
    if non_wbc is not None:
        cw[non_wbc] *= args.non_wbc_weight
    steps = len(xtr) // args.batch_size
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=steps * args.epochs, alpha=0.05)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=5e-4, global_clipnorm=5.0)
    train_step, eval_step = build_step(model, meta.gradcam_layer, "logits", optimizer, args.outside_weight)
    os.makedirs(args.out, exist_ok=True)
    history = [{"epoch": 0, **evaluate(eval_step, xva, yva, mva, non_wbc)}]
    print(json.dumps(history[-1]), flush=True)
    rng = np.random.default_rng(args.seed)
    for epoch in range(1, args.epochs + 1):
        te = time.time()
        order = rng.permutation(len(xtr))
        ce_sum = out_sum = 0.0
        for step in range(steps):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            pairs = [augment(xtr[j], mtr[j], rng) for j in idx]
            xb = np.stack([p[0] for p in pairs])
            mb = np.stack([p[1] for p in pairs]).astype(np.float32)
            ce, out = train_step(xb, ytr[idx], cw[ytr[idx]], mb)
            ce_sum += float(ce)
            out_sum += float(out)
        record = {"epoch": epoch, "train_ce": ce_sum / steps, "train_outside": out_sum / steps,
                  "seconds": round(time.time() - te, 1), **evaluate(eval_step, xva, yva, mva, non_wbc)}
        history.append(record)
        print(json.dumps(record), flush=True)
        model.save(os.path.join(args.out, f"epoch-{epoch:02d}.keras"))
        Path(args.out, "history.json").write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
    if not math.isfinite(history[-1]["accuracy"]):
        raise SystemExit("training diverged")


if __name__ == "__main__":
    main()
