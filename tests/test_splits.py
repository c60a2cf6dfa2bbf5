"""Content-hash splits (wbc_batch/splits.py): deterministic, stratified, proportional, stable as data grows."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from wbc_batch.splits import (
    DEFAULT_LABEL_MAP,
    NON_WBC,
    SPLITS,
    LabelledImage,
    assign_splits,
    label_for_folder,
    sha256_hex,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "pbc"


def _items(label: str, n: int, start: int = 0) -> list[LabelledImage]:
    """``n`` distinct files of one class, hashed from their (made-up) bytes."""
    return [LabelledImage(f"/data/{label}/{i:04d}.jpg", sha256_hex(f"{label}-{i}".encode()), label, label)
            for i in range(start, start + n)]


def _bundled() -> list[LabelledImage]:
    """The bundled PBC samples as labelled images, hashed from their real bytes."""
    return [LabelledImage(str(p), sha256_hex(p.read_bytes()), label_for_folder(p.parent.name), p.parent.name)
            for p in sorted(SAMPLES.glob("*/*.jpg"))]


def test_sha256_hex_is_the_hex_digest() -> None:
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_folder_names_map_to_model_classes() -> None:
    assert label_for_folder("Neutrophil ") == "neutrophil"
    assert {label_for_folder(f) for f in DEFAULT_LABEL_MAP} == {NON_WBC}
    assert label_for_folder("PLATELET") == NON_WBC
    assert label_for_folder("platelet", {}) == "platelet"  # an explicit empty map maps nothing
    assert label_for_folder("Band", {"band": "neutrophil"}) == "neutrophil"


def test_every_hash_gets_one_split_and_the_result_is_deterministic() -> None:
    items = _bundled()
    first = assign_splits(items)
    assert set(first) == {i.sha256 for i in items}
    assert set(first.values()) <= set(SPLITS)
    shuffled = items[:]
    random.Random(7).shuffle(shuffled)
    assert assign_splits(shuffled) == first, "the input order must not matter"
    renamed = [LabelledImage(f"s3://elsewhere/{k}.jpg", i.sha256, i.label, i.folder) for k, i in enumerate(items)]
    assert assign_splits(renamed) == first, "only the bytes decide, not where a file is"


@pytest.mark.parametrize("n", [20, 100, 1000])
def test_proportions_per_class(n: int) -> None:
    items = _items("lymphocyte", n) + _items("basophil", n // 2)
    result = assign_splits(items)
    for label, size in (("lymphocyte", n), ("basophil", n // 2)):
        counts = Counter(result[i.sha256] for i in items if i.label == label)
        assert counts["train"] == round(size * 0.70) and counts["val"] == round(size * 0.15)
        assert sum(counts.values()) == size
    custom = Counter(assign_splits(_items("monocyte", n), fractions=(0.5, 0.25, 0.25)).values())
    assert custom["train"] == n // 2 and custom["val"] == round(n * 0.25)


def test_fractions_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(_items("ig", 5), fractions=(0.7, 0.2, 0.2))


def test_identical_files_never_straddle_splits() -> None:
    items = _items("eosinophil", 40)
    copies = [LabelledImage(f"/copy/{i.uri}", i.sha256, i.label, i.folder) for i in items[:10]]
    relabelled = [LabelledImage(f"/other/{i.uri}", i.sha256, "neutrophil", "neutrophil") for i in items[10:20]]
    result = assign_splits(items + copies + relabelled + _items("neutrophil", 30))
    assert len(result) == 40 + 30, "one entry per distinct content"
    # a hash seen under two classes is owned by the alphabetically first (eosinophil < neutrophil)
    assert result == {**assign_splits(items), **assign_splits(_items("neutrophil", 30))}


def test_adding_files_moves_few_existing_ones_and_other_classes_none() -> None:
    base = _items("neutrophil", 200) + _items("monocyte", 60)
    before = assign_splits(base)
    for k in (1, 5, 20):
        after = assign_splits(base + _items("neutrophil", k, start=1000))
        moved = [h for h in before if after[h] != before[h]]
        # ranks shift by at most k at each of the two cuts, which themselves move by at most k (+ rounding)
        assert len(moved) <= 2 * (k + 1), (k, len(moved))
        assert not [i for i in base if i.label == "monocyte" and after[i.sha256] != before[i.sha256]], (
            "adding to one class must not move another class's files")
    grown = assign_splits(base + _items("basophil", 50))
    assert all(grown[h] == before[h] for h in before), "a new class moves nothing"
