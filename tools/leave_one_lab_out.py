"""Leave one lab out: train the recipe on every lab but one, then evaluate on all of the one left out.

The honest figure for "a lab the model never saw" (docs/OTHER_LABS.md): the
network, its temperature, threshold and OOD statistics never met any image
of the lab it is judged on. The train and evaluate steps are the product's
own commands, so the figures are what a lab would get from the same recipe.

Usage::

    python tools/leave_one_lab_out.py OUT_DIR --leave-out chula \\
        pbc=../shared/data/pbc chula=../shared/data/chula lisc=../shared/data/lisc \\
        --split-by chula=prefix --split-by lisc=prefix [-- extra wbc-batch train options]

Writes OUT_DIR/model (the artifact), OUT_DIR/evaluation.json (every image of
the left-out lab, balanced accuracy with its 95% interval, per-class figures,
OOD-flagged share) and OUT_DIR/summary.json (the commands and headline
figures); re-running resumes the training from its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from wbc_batch.training.labs import parse_lab


def wbc(*args: str) -> list[str]:
    """The ``wbc-batch`` command line with this interpreter's package."""
    return [sys.executable, "-m", "wbc_batch.cli", *args]


def train_command(out: Path, labs: list[str], left_out: str, split_by: list[str], extra: list[str]) -> list[str]:
    """``wbc-batch train`` on every lab but ``left_out`` (with the split rules of the labs kept)."""
    kept = [text for text in labs if parse_lab(text)[0] != left_out]
    rules = [f"--split-by={rule}" for rule in split_by if rule.partition("=")[0] != left_out]
    return wbc("train", *kept, str(out / "model"), *rules, "--storage-path", str(out / "checkpoints"), *extra)


def main(argv: list[str] | None = None) -> int:
    """Train without the lab, evaluate on all of it, write the summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the model, checkpoints and figures")
    parser.add_argument("labs", nargs="+", metavar="NAME=ROOT", help="every lab of the recipe")
    parser.add_argument("--leave-out", required=True, help="the lab trained without and evaluated on")
    parser.add_argument("--split-by", action="append", default=[], metavar="LAB=RULE",
                        help="as wbc-batch train's (a rule of the left-out lab is dropped)")
    args = parser.parse_args(argv)
    roots = dict(parse_lab(text) for text in args.labs)
    if args.leave_out not in roots or len(roots) < 2:
        parser.error(f"--leave-out must name one of the labs {sorted(roots)} and one must remain")
    args.out.mkdir(parents=True, exist_ok=True)
    train = train_command(args.out, args.labs, args.leave_out, args.split_by, extra)
    subprocess.run(train, check=True)
    evaluation = args.out / "evaluation.json"
    evaluate = wbc("evaluate", str(args.out / "model"), roots[args.leave_out], "--split", "all",
                   "--out", str(evaluation))
    subprocess.run(evaluate, check=True)
    result = json.loads(evaluation.read_text())
    m = result["metrics"]
    summary = {
        "left_out": args.leave_out,
        "train_command": shlex.join(["wbc-batch", *train[3:]]),
        "evaluate_command": shlex.join(["wbc-batch", *evaluate[3:]]),
        "n_images": result["n_images"],
        "balanced_accuracy": m["balanced_accuracy"],
        "balanced_accuracy_ci95": m.get("balanced_accuracy_ci95"),
        "accuracy": m["accuracy"],
        "recall": m["recall"],
        "ood_flagged_share": m.get("ood_flagged", {}).get("share"),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
