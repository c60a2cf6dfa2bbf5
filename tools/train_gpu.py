"""Train the shipped classifier with Keras 3 on one accelerator (any backend).

Why this exists beside the Ray Train job: a lent GPU machine has JAX and
PyTorch but no TensorFlow, and Keras 3 runs on either; the `.keras` file it
saves is backend-neutral and loads in TensorFlow for classify. It builds the
same architecture (``wbc_batch.architecture``) and uses the same augmentation
policy as ``wbc_batch.training``: dihedral flips/rotations, small
scale/shift, small brightness/contrast/colour jitter, balanced class weights,
AdamW with warm-up and cosine decay.

Usage: KERAS_BACKEND=jax python tools/train_gpu.py PACK.npz OUT_DIR [--epochs N] [--budget-s S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras  # noqa: E402

from wbc_batch.architecture import build_classifier  # noqa: E402


def load_pack(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    z = np.load(path)
    jpeg, off = z["jpeg"], z["offsets"]

    def dec(i: int) -> np.ndarray:
        bgr = cv2.imdecode(jpeg[off[i] : off[i + 1]], cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    with ThreadPoolExecutor(16) as pool:
        images = np.stack(list(pool.map(dec, range(len(off) - 1))))
    return images, z["labels"], z["is_val"], [str(c) for c in z["classes"]]


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random view of a cell seen from above (same policy as training.py)."""
    k = int(rng.integers(4))
    out = np.rot90(img, k)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    s = img.shape[0]
    scale = rng.uniform(0.9, 1.1)
    angle = rng.uniform(-15, 15)
    m = cv2.getRotationMatrix2D((s / 2, s / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.05, 0.05, size=2) * s
    out = cv2.warpAffine(np.ascontiguousarray(out), m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    x = out.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.9, 1.1) + mean * rng.uniform(0.9, 1.1)
    x = x * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    return np.clip(x, 0, 255)


class AugmentedBatches(keras.utils.PyDataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, w: np.ndarray, batch: int, seed: int, **kw):
        super().__init__(**kw)
        self.x, self.y, self.w, self.batch = x, y, w, batch
        self.seed = seed
        self.epoch = 0
        self.order = np.random.default_rng(seed).permutation(len(x))

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def __getitem__(self, i: int):
        idx = self.order[i * self.batch : (i + 1) * self.batch]
        rng = np.random.default_rng((self.seed, self.epoch, i))
        xb = np.stack([augment(self.x[j], rng) for j in idx])
        return xb, self.y[idx], self.w[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.x))


class CosineWithBudget(keras.callbacks.Callback):
    """Warm-up then cosine decay over a number of epochs fitted to a time budget."""

    def __init__(self, peak: float, steps: int, max_epochs: int, budget_s: float, warmup_epochs: int = 3):
        super().__init__()
        self.peak, self.steps, self.max_epochs, self.budget_s = peak, steps, max_epochs, budget_s
        self.warm = warmup_epochs * steps
        self.planned = max_epochs
        self.step = 0
        self.t0 = time.time()
        self.epoch_times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        total = self.planned * self.steps
        if self.step < self.warm:
            lr = self.peak * (self.step + 1) / self.warm
        else:
            p = min(1.0, (self.step - self.warm) / max(1, total - self.warm))
            lr = 0.5 * self.peak * (1 + math.cos(math.pi * p)) + 1e-6
        self.model.optimizer.learning_rate = lr
        self.step += 1

    def on_epoch_begin(self, epoch, logs=None):
        self.te = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_times.append(time.time() - self.te)
        if epoch == 2:
            per = float(np.median(self.epoch_times[1:]))
            left = self.budget_s - (time.time() - self.t0)
            self.planned = int(min(self.max_epochs, 3 + left // per))
            print(f"epoch time {per:.2f}s: planning {self.planned} epochs", flush=True)
        if epoch + 1 >= self.planned:
            self.model.stop_training = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("pack")
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--budget-s", type=float, default=360)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--limit", type=int, default=0, help="use only N images (smoke test)")
    args = ap.parse_args()
    t0 = time.time()
    keras.utils.set_random_seed(1234)
    x, y, is_val, classes = load_pack(args.pack)
    if args.limit:
        sel = np.random.default_rng(0).permutation(len(x))[: args.limit]
        x, y, is_val = x[sel], y[sel], is_val[sel]
    xtr, ytr = x[~is_val], y[~is_val]
    xva, yva = x[is_val].astype(np.float32), y[is_val]
    counts = np.bincount(ytr, minlength=len(classes))
    cw = (len(ytr) / (len(classes) * np.maximum(counts, 1))).astype(np.float32)
    print(f"loaded {len(x)} images in {time.time() - t0:.1f}s; train {len(xtr)} val {len(xva)}; weights {cw.round(2)}", flush=True)
    ds = AugmentedBatches(xtr, ytr, cw[ytr], args.batch_size, seed=7, workers=12, use_multiprocessing=False, max_queue_size=16)
    model = build_classifier(keras, len(classes), image_size=x.shape[1])
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=args.lr, weight_decay=5e-4, global_clipnorm=5.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    sched = CosineWithBudget(args.lr, len(ds), args.epochs, args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    ckpt = keras.callbacks.ModelCheckpoint(os.path.join(args.out, "best.keras"), monitor="val_accuracy", save_best_only=True)
    hist = model.fit(ds, validation_data=(xva, yva), epochs=args.epochs, callbacks=[sched, ckpt], verbose=2)
    model.save(os.path.join(args.out, "model.keras"))
    train_s = time.time() - t0
    logits = model.predict(xva, batch_size=256, verbose=0)
    acc = float((logits.argmax(1) == yva).mean())
    meta = {
        "classes": classes,
        "epochs_run": len(hist.history["loss"]),
        "train_seconds": train_s,
        "val_accuracy_final": acc,
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "history": {k: [float(v) for v in vs] for k, vs in hist.history.items()},
        "epoch_seconds": sched.epoch_times,
    }
    json.dump(meta, open(os.path.join(args.out, "train_meta.json"), "w"), indent=1)
    print(f"done in {train_s:.0f}s, val acc {acc:.4f}")


if __name__ == "__main__":
    main()
