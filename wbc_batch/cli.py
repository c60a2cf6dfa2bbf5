"""The ``wbc-batch`` command line: declares options and dispatches, nothing else.

Every command has ``--help``. A failure is one clear line on stderr and a
non-zero exit code, never a traceback (set ``WBC_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """An error to report as one line with a given exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# --- classify -------------------------------------------------------------


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify images and write Parquet rows plus Grad-CAM heatmaps",
                       description="Classify every image under INPUT and write results under OUTPUT.")
    p.add_argument("input", metavar="INPUT", help="local folder, s3://bucket/prefix, or manifest (.txt/.csv/.parquet)")
    p.add_argument("output", metavar="OUTPUT", help="local folder or s3://bucket/prefix for results")
    _add_run_options(p)
    p.set_defaults(func=_cmd_classify)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by classify and nightly."""
    p.add_argument("--model", default=None, help="model artifact folder or s3:// URI (default: the shipped model)")
    p.add_argument("--trust-model", action="store_true", help="allow a model from a remote location not listed as trusted")
    p.add_argument("--batch-size", type=int, default=32, help="images per model batch (default 32)")
    p.add_argument("--workers", type=int, default=None, help="model actors (default: GPUs if any, else 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per model actor (default 1 when the Ray cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs reserved per model actor")
    p.add_argument("--run-id", default=None, help="run identifier (default: UTC time plus a random suffix)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip writing heatmap images")
    p.add_argument("--review-threshold", type=float, default=None,
                   help="confidence under which a cell needs review (default: the model's)")
    p.add_argument("--sample-id-regex", default=None,
                   help="regex with a named group 'sample' applied to the URI (default: parent folder name)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: connect or start a local one)")


def _cmd_classify(args: argparse.Namespace) -> int:
    from wbc_batch.pipeline import ClassifyConfig, run_classify

    config = ClassifyConfig.from_args(args)
    manifest = run_classify(config)
    _print_summary(manifest)
    return 0


def _print_summary(manifest: dict) -> None:
    counts = manifest["counts"]
    print(
        f"run {manifest['run_id']}: {counts['total']} images, {counts['ok']} ok, {counts['error']} errors, "
        f"{counts['needs_review']} need review; {manifest['timings']['images_per_second']:.1f} images/s"
    )
    per_class = ", ".join(f"{k} {v}" for k, v in sorted(counts.get("per_class", {}).items()))
    if per_class:
        print(f"classes: {per_class}")
    print(f"results: {manifest['output']}/predictions  heatmaps: {manifest['output']}/heatmaps  "
          f"manifest: {manifest['output']}/runs/{manifest['run_id']}.json")


# --- registry -------------------------------------------------------------
# Each command adds itself here: (name, function that declares its parser).
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_classify]


def _optional_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Commands declared in their own small sections below."""
    helpers = {"_add_run_options"}
    return [f for name, f in sorted(globals().items())
            if name.startswith("_add_") and name not in helpers and f not in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="wbc-batch", description="Batch white-blood-cell classification with Grad-CAM on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS + _optional_commands():
        add(sub)
    return parser


def _error_message(exc: BaseException) -> tuple[str, int]:
    """Turn a known failure into one line and an exit code."""
    from wbc_batch.imaging import ImageDecodeError
    from wbc_batch.model import ModelArtifactError
    from wbc_batch.storage import StorageError

    if isinstance(exc, CliError):
        return str(exc), exc.code
    if isinstance(exc, ModelArtifactError):
        return f"model error: {exc}", 4
    if isinstance(exc, StorageError):
        return f"storage error: {exc}", 3
    if isinstance(exc, FileNotFoundError):
        return f"not found: {exc.filename or exc}", EXIT_USAGE
    if isinstance(exc, (ValueError, ImageDecodeError)):
        return f"invalid input: {exc}", EXIT_USAGE
    return f"failed: {type(exc).__name__}: {exc}", EXIT_FAILED


def _quiet_libraries() -> None:
    """Keep Ray's and TensorFlow's progress chatter out of a normal run's output."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wbc-batch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("wbc-batch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        if os.environ.get("WBC_DEBUG"):
            raise
        message, code = _error_message(exc)
        print(f"wbc-batch {args.command}: {message}", file=sys.stderr)
        return code


def print_json(data: object) -> None:
    """Print JSON for machine-readable command output."""
    print(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
