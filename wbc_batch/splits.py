"""Finding labelled images and splitting them by content hash.

The split is decided by the SHA-256 of each file's bytes, stratified by
class: identical files always land in the same split, and re-running on a
grown dataset moves as few files as possible between splits.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

WBC_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil")
NON_WBC = "non_wbc"
DEFAULT_LABEL_MAP: dict[str, str] = {"erythroblast": NON_WBC, "platelet": NON_WBC}
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class LabelledImage:
    """One labelled file: where it is (relative to its lab's root), its content hash, its class, its lab and
    the group its lab's split keeps together (:mod:`wbc_batch.training.labs`)."""

    uri: str
    sha256: str
    label: str
    folder: str
    lab: str = ""
    group: str = ""


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def label_for_folder(folder: str, label_map: dict[str, str] | None = None) -> str:
    """Map a class folder name (PBC/Kaggle layout, any case) to a model class name."""
    mapping = DEFAULT_LABEL_MAP if label_map is None else label_map
    name = folder.strip().lower()
    return mapping.get(name, name)


def assign_splits(
    items: list[LabelledImage], fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
) -> dict[str, str]:
    """Assign every content hash to train, val or test, stratified by class.

    Within each class the distinct hashes are ordered by a keyed hash and cut
    at the given fractions. A hash seen under several classes goes with the
    alphabetically first one, so duplicates never straddle splits.

    Returns:
        sha256 -> split name.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    owner: dict[str, str] = {}
    for item in sorted(items, key=lambda i: i.label):
        owner.setdefault(item.sha256, item.label)
    by_class: dict[str, list[str]] = defaultdict(list)
    for sha, label in owner.items():
        by_class[label].append(sha)
    result: dict[str, str] = {}
    for label, hashes in by_class.items():
        ordered = sorted(hashes, key=lambda h: hashlib.sha256(("wbc-split:" + h).encode()).hexdigest())
        n = len(ordered)
        n_train = round(n * fractions[0])
        n_val = round(n * fractions[1])
        for rank, sha in enumerate(ordered):
            result[sha] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return result
