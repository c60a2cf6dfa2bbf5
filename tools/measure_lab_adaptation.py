"""Measure a model on a lab it never saw, zero-shot and after `wbc-batch adapt`, split by slide.

The protocol of MODEL_CARD.md, "Other labs":

1. Slides (the file-name prefix before the first ``_``, e.g. ``B-30``) are
   dealt into two folds, greedily so that each class has cells on both sides.
   The same cell photographed twice never falls on both sides.
2. For each fold: 10 cells of every class with at least 20 cells on the adapt
   side (picked by a keyed hash) form ADAPT_DIR; `wbc-batch adapt ADAPT_DIR OUT
   --replay PBC` runs with the settings given; the adapted model is evaluated
   on *every* cell of the other fold's slides (never on the adapt cells), and
   on the base's held-out PBC test split.
3. Zero-shot: the base model on every cell of the lab.

Usage::

    python tools/measure_lab_adaptation.py ../shared/data/chula ../shared/data/pbc OUT_DIR [--base MODEL]
        [--folds 0,1] [-- extra wbc-batch adapt options]

Writes OUT_DIR/summary.json and prints one line per figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

from wbc_batch import imaging, splits

PER_CLASS = 10
MIN_CLASS = 20


def slide_of(name: str) -> str:
    """The slide id of a crop file name: everything before the first underscore."""
    return name.split("_", 1)[0]


def list_lab(root: Path) -> list[tuple[str, Path]]:
    """(class, file) of every image in a class-folder layout."""
    return [(splits.label_for_folder(d.name), f) for d in sorted(root.iterdir()) if d.is_dir()
            for f in sorted(d.iterdir()) if imaging.is_image_name(f.name)]


def deal_slides(cells: list[tuple[str, Path]]) -> dict[str, int]:
    """Slide -> fold 0/1, largest slides first, each to the fold with fewer cells of its main class."""
    by_slide: dict[str, Counter[str]] = defaultdict(Counter)
    for label, path in cells:
        by_slide[slide_of(path.name)][label] += 1
    fold_counts = [Counter(), Counter()]
    fold_of: dict[str, int] = {}
    for slide in sorted(by_slide, key=lambda s: (-sum(by_slide[s].values()), s)):
        main = by_slide[slide].most_common(1)[0][0]
        fold = 0 if fold_counts[0][main] <= fold_counts[1][main] else 1
        fold_of[slide] = fold
        fold_counts[fold].update(by_slide[slide])
    return fold_of


def pick_adapt_cells(cells: list[tuple[str, Path]], seed: str = "adapt") -> list[tuple[str, Path]]:
    """10 cells of every class with at least 20, by a keyed hash of the file name."""
    by_class: dict[str, list[Path]] = defaultdict(list)
    for label, path in cells:
        by_class[label].append(path)
    chosen = []
    for label, paths in sorted(by_class.items()):
        if len(paths) < MIN_CLASS:
            continue
        ranked = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}:{p.name}".encode()).hexdigest())
        chosen += [(label, p) for p in ranked[:PER_CLASS]]
    return chosen


def copy_cells(cells: list[tuple[str, Path]], dest: Path) -> None:
    for label, path in cells:
        (dest / label).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / label / path.name)


def wbc(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "wbc-batch"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(model: str, data: Path, out: Path, split: str = "test") -> dict:
    wbc("evaluate", model, str(data), "--split", split, "--out", str(out))
    return json.loads(out.read_text())["metrics"]


def headline(m: dict) -> dict:
    return {k: m.get(k) for k in ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "balanced_accuracy_ci95",
                                  "macro_f1", "recall", "ood_flagged", "review")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab", type=Path)
    parser.add_argument("replay", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", default="shipped")
    parser.add_argument("--folds", default="0,1")
    parser.add_argument("--skip-zero-shot", action="store_true")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # everything after `--` goes to `wbc-batch adapt`
    args = parser.parse_args(argv[:cut])
    extra = argv[cut + 1 :]
    args.out.mkdir(parents=True, exist_ok=True)
    cells = list_lab(args.lab)
    fold_of = deal_slides(cells)
    summary: dict = {"lab": str(args.lab), "base": args.base, "adapt_options": extra,
                     "slides": {str(f): sorted(s for s, g in fold_of.items() if g == f) for f in (0, 1)}}
    if not args.skip_zero_shot:
        summary["zero_shot"] = headline(evaluate(args.base, args.lab, args.out / "zero-shot.json"))
        print("zero-shot:", json.dumps(summary["zero_shot"]))
    for fold in (int(f) for f in args.folds.split(",")):
        work = args.out / f"fold{fold}"
        shutil.rmtree(work, ignore_errors=True)
        adapt_side = [c for c in cells if fold_of[slide_of(c[1].name)] == fold]
        test_side = [c for c in cells if fold_of[slide_of(c[1].name)] != fold]
        copy_cells(pick_adapt_cells(adapt_side), work / "adapt")
        copy_cells(test_side, work / "test")
        base = [] if args.base == "shipped" else ["--base", args.base]
        wbc("adapt", str(work / "adapt"), str(work / "model"), "--replay", str(args.replay),
            "--storage-path", str(work / "checkpoints"), *base, *extra)
        result = {
            "adapt_counts": dict(Counter(label for label, _ in pick_adapt_cells(adapt_side))),
            "test_counts": dict(Counter(label for label, _ in test_side)),
            "zero_shot_on_test_slides": headline(evaluate(args.base, work / "test", work / "zero-shot-test.json")),
            "adapted_on_test_slides": headline(evaluate(str(work / "model"), work / "test", work / "adapted.json")),
            "adapted_on_replay_test": headline(evaluate(str(work / "model"), args.replay, work / "replay-test.json")),
        }
        summary[f"fold{fold}"] = result
        for key in ("zero_shot_on_test_slides", "adapted_on_test_slides", "adapted_on_replay_test"):
            m = result[key]
            flagged = m["ood_flagged"]["share"] if m.get("ood_flagged") else float("nan")
            print(f"fold {fold} {key}: n {m['n']} accuracy {m['accuracy']:.2%} balanced {m['balanced_accuracy']:.2%} "
                  f"flagged {flagged:.1%}", flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
