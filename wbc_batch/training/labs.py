"""Several labs in one training run: naming them, splitting each by its own groups, balancing them.

Why labs are a concept of their own: a network trained on one lab learns that
lab's optics and stain (docs/OTHER_LABS.md). Training on several labs is the
lever past that, and it only works when

* each lab is split by the unit that repeats inside it (PBC: the file, by
  content hash; Chula: the slide, the file-name prefix; LISC: the cell's
  group, the ``gNNN_`` prefix), so that no slide or cell falls on both sides;
* each lab carries an equal share of every epoch, and inside a lab every
  class it has weighs the same, so that 500 Chula cells count as a lab and
  not as 5% of PBC;
* a lab that lacks a class (Chula and LISC have no ig, erythroblast or
  platelet) is neither rewarded nor punished for it: its cells' loss is the
  cross-entropy over the classes that lab has (:func:`class_masks`).

This module holds those rules; :mod:`~wbc_batch.training.data` applies them
while reading, :mod:`~wbc_batch.training.worker` while sampling.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wbc_batch import splits

SPLIT_RULES: dict[str, str] = {
    "file": "by file, on the SHA-256 of its bytes (identical files on one side)",
    "prefix": "by the file name up to its first '_' (a slide or a cell's group): no group on both sides",
}
"""How a lab is split into train, validation and test; the key is what ``--split-by`` takes."""

_LAB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Lab:
    """One labelled root of a training run: its name, where its class folders are, how it is split."""

    name: str
    uri: str
    split_rule: str = "file"

    def describe(self) -> dict[str, str]:
        """The lab as ``model.json`` records it, the rule spelt out."""
        return {**asdict(self), "split_rule_text": SPLIT_RULES[self.split_rule]}


def default_lab_name(uri: str) -> str:
    """A lab's name when the command gives none: the last folder of its root (``../data/pbc`` -> ``pbc``)."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1] or "lab"


def parse_lab(text: str) -> tuple[str, str]:
    """``NAME=ROOT`` or a bare ``ROOT`` -> (name, root).

    A prefix counts as a name only when it looks like one (a letter, then
    letters, digits, ``_ . -``), so a root whose path holds an ``=`` after a
    ``/`` or ``:`` is still read as a root.

    Raises:
        ValueError: an empty name or root.
    """
    name, sep, root = text.partition("=")
    if sep and _LAB_NAME.match(name):
        if not root:
            raise ValueError(f"lab {name!r} names no folder: expected NAME=ROOT, got {text!r}")
        return name, root
    if not text:
        raise ValueError("an empty DATA")
    return default_lab_name(text), text


def labs_from(data: list[str], split_by: dict[str, str] | None = None) -> list[Lab]:
    """The run's labs from its DATA arguments and ``--split-by NAME=RULE`` options.

    Raises:
        ValueError: two labs with one name, an unknown rule, or a rule for a lab that is not in DATA.
    """
    rules = dict(split_by or {})
    parsed = [parse_lab(d) for d in data]
    names = [n for n, _ in parsed]
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise ValueError(f"lab names must differ, got {twice} more than once (name them: NAME=ROOT)")
    unknown_labs = sorted(set(rules) - set(names))
    if unknown_labs:
        raise ValueError(f"--split-by names {unknown_labs}, which are not labs of this run {names}")
    bad = sorted(r for r in rules.values() if r not in SPLIT_RULES)
    if bad:
        raise ValueError(f"unknown split rule {bad}: choose from {sorted(SPLIT_RULES)}")
    return [Lab(name, root, rules.get(name, "file")) for name, root in parsed]


def group_of(file_name: str, rule: str) -> str:
    """The unit a lab's split keeps together: the file itself (``file``) or its name's prefix (``prefix``)."""
    if rule == "prefix":
        return file_name.split("_", 1)[0]
    return file_name


def _keyed(text: str) -> str:
    return hashlib.sha256(("wbc-group-split:" + text).encode()).hexdigest()


def assign_group_splits(
    items: list[splits.LabelledImage], fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
) -> dict[str, str]:
    """Assign whole groups to train, val or test, class by class; every file of a group gets its group's split.

    Within each class (a group's most common label), the largest groups are
    placed first, each on the side that lacks the largest share of its target
    (ties: train, then val, then test; groups of one size in keyed-hash
    order). So a class with groups of 70, 24 and 8 cells puts one on each side
    with the largest in train, and a class of one group trains on it. Chula's
    classes come from 3-10 slides each, which a hash cut by count would leave
    without a validation slide.

    Returns:
        sha256 -> split name (a file seen in several groups follows the first).
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    members: dict[str, list[splits.LabelledImage]] = defaultdict(list)
    for item in items:
        members[item.group].append(item)
    by_class: dict[str, list[str]] = defaultdict(list)
    for group, files in members.items():
        by_class[Counter(f.label for f in files).most_common(1)[0][0]].append(group)
    split_of_group: dict[str, str] = {}
    for groups in by_class.values():
        total = sum(len(members[g]) for g in groups)
        targets = [total * f for f in fractions]
        placed = [0.0, 0.0, 0.0]
        for group in sorted(groups, key=lambda g: (-len(members[g]), _keyed(g))):
            shortfall = [(t - p) / t if t > 0 else -1.0 for t, p in zip(targets, placed)]
            side = max(range(3), key=lambda i: (shortfall[i], -i))
            split_of_group[group] = splits.SPLITS[side]
            placed[side] += len(members[group])
    result: dict[str, str] = {}
    for item in sorted(items, key=lambda i: i.uri):
        result.setdefault(item.sha256, split_of_group[item.group])
    return result


def split_by_lab(items: list[splits.LabelledImage], labs: list[Lab]) -> dict[str, str]:
    """Each lab's files split by that lab's rule; sha256 -> split over all labs.

    A lab split ``by file`` gets :func:`wbc_batch.splits.assign_splits` over its
    own files alone, so PBC keeps the split it had when it was the only lab.
    """
    result: dict[str, str] = {}
    for lab in labs:
        mine = [i for i in items if i.lab == lab.name]
        chosen = splits.assign_splits(mine) if lab.split_rule == "file" else assign_group_splits(mine)
        for sha, split in chosen.items():
            result.setdefault(sha, split)
    return result


def class_masks(items: list[splits.LabelledImage], labs: list[Lab], classes: list[str]) -> np.ndarray:
    """(labs, classes) 1 where the lab has cells of that class, else 0.

    Why: a Chula cell's loss is the cross-entropy over Chula's five classes.
    Over all seven, every Chula cell would also teach "not ig, not
    ``non_wbc``", a lesson about a class the lab never shows (rewarded for
    absence); masked, its absent classes get no gradient from its cells.
    """
    has = {(i.lab, i.label) for i in items}
    return np.array([[1.0 if (lab.name, c) in has else 0.0 for c in classes] for lab in labs], dtype=np.float32)


def lacks_a_class(masks: Any) -> bool:
    """Whether some lab of a :func:`class_masks` matrix (None: one lab with every class) lacks a class."""
    return masks is not None and float(np.min(masks)) < 1.0


def lab_class_weights(items: list[splits.LabelledImage], split_of: dict[str, str], labs: list[Lab],
                      classes: list[str], factors: dict[str, float]) -> np.ndarray:
    """(labs, classes) loss weight of a training image of each lab and class.

    Inside a lab, every class it has weighs the same (n / (C * n_c) over its
    training images, mean 1), times the ``--class-weight`` factor of the
    class; a class a lab lacks weighs 0. Labs are balanced by sampling
    (:func:`lab_shares`), not by weight, so no lab's images carry weights
    twenty times another's.
    """
    from wbc_batch.training.recipe import balanced_class_weights  # recipe -> config -> this module

    out = np.zeros((len(labs), len(classes)), dtype=np.float32)
    for row, lab in enumerate(labs):
        counts = Counter(i.label for i in items if i.lab == lab.name and split_of.get(i.sha256) == "train")
        present = [c for c in classes if counts.get(c)]
        for c, weight in zip(present, balanced_class_weights([counts[c] for c in present])):
            out[row, classes.index(c)] = weight * float(factors.get(c, 1.0))
    return out


def lab_shares(labs: list[Lab]) -> list[float]:
    """Each lab's share of an epoch's images: equal (a lab is a lab, whatever its size)."""
    return [1.0 / len(labs)] * len(labs)


def lab_counts(items: list[splits.LabelledImage], split_of: dict[str, str], lab: Lab) -> dict[str, Any]:
    """One lab's record for ``model.json``: rule, file digest, images per split and per split and class."""
    mine = [i for i in items if i.lab == lab.name]
    per_split: dict[str, Counter[str]] = {s: Counter() for s in splits.SPLITS}
    for item in mine:
        per_split[split_of[item.sha256]][item.label] += 1
    return {
        **lab.describe(),
        "fingerprint_sha256": fingerprint(mine),
        "n_images": len(mine),
        "n_groups": len({i.group for i in mine}),
        "split_counts": {s: sum(c.values()) for s, c in per_split.items()},
        "class_counts": {s: dict(sorted(c.items())) for s, c in per_split.items()},
    }


def fingerprint(items: list[splits.LabelledImage]) -> str:
    """SHA-256 over the sorted ``sha256,label`` pairs: the same images and labels give the same value."""
    lines = sorted(f"{i.sha256},{i.label}\n" for i in items)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def groups_on_both_sides(items: list[splits.LabelledImage], split_of: dict[str, str]) -> list[str]:
    """``lab/group`` of every group whose files fall on more than one side (none, for a sound split)."""
    sides: dict[tuple[str, str], set[str]] = defaultdict(set)
    for item in items:
        sides[(item.lab, item.group)].add(split_of[item.sha256])
    return sorted(f"{lab}/{group}" for (lab, group), s in sides.items() if len(s) > 1)
