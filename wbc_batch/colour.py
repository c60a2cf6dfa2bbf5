"""Colour transfer between images in CIELAB (Reinhard et al., 2001): one lab's cells in another lab's colours.

Why it matters: the shipped model reads 400 of PBC's validation cells at
97.8%, and the same cells with each image's CIELAB mean and standard
deviation moved to those of a random Chula image at 12.5% (Chula itself:
8.9%; ``tools/measure_colour_sensitivity.py``). A
lab's colour and contrast, not its cells' shapes, is most of what the
network misreads. ``adapt --lab-colours`` therefore also trains replayed
cells of the first lab in the new lab's colours (:func:`in_the_colours_of`),
so its many labelled cells teach the classes in the look of the new one
(docs/OTHER_LABS.md, "Colour and contrast").
"""

from __future__ import annotations

import cv2
import numpy as np

STD_FLOOR = 1e-3  # a flat image has no spread to scale; the floor keeps the division finite


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)


def _statistics(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = lab.reshape(-1, 3)
    return flat.mean(0), flat.std(0) + STD_FLOOR


def lab_statistics(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of an (H, W, 3) uint8 RGB image in OpenCV's 8-bit CIELAB."""
    return _statistics(_to_lab(rgb))


def transfer_colour(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``rgb`` with its CIELAB mean and standard deviation moved to ``mean`` and ``std`` (uint8 RGB)."""
    lab = _to_lab(rgb)
    own_mean, own_std = _statistics(lab)
    moved = (lab - own_mean) / own_std * std + mean
    return cv2.cvtColor(np.clip(np.rint(moved), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def in_the_colours_of(images: np.ndarray, references: np.ndarray, seed: int) -> np.ndarray:
    """Each of ``images`` (N, S, S, 3 uint8) in the colours of a reference image drawn at random.

    Why one random reference per image and not the references' average:
    a lab's images differ among themselves (Chula's casts run from pink to
    grey to blue), and each drawn look is one the lab really shows.
    """
    if len(references) == 0:
        raise ValueError("no reference images to take colours from")
    stats = [lab_statistics(ref) for ref in references]
    picks = np.random.default_rng(seed).integers(len(stats), size=len(images))
    out = [transfer_colour(im, *stats[k]) for im, k in zip(images, picks)]
    return np.stack(out) if out else np.zeros_like(images)
