"""The ``wbc-batch`` command line: declares options and dispatches, nothing else.

Every command has ``--help``. A failure is one clear line on stderr and a
non-zero exit code, never a traceback (set ``WBC_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from wbc_batch import console
from wbc_batch.errors import EXIT_CLUSTER, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, WbcError  # noqa: F401 (EXIT_CLUSTER: tests)

if TYPE_CHECKING:
    from wbc_batch.results import RunManifest


class CliError(WbcError):
    """A failure the command line itself finds (options that do not go together), printed as given."""

    prefix = ""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message, exit_code=code)


# --- classify -------------------------------------------------------------


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify images and write Parquet rows plus Grad-CAM heatmaps",
                       description="Classify every image under INPUT and write results under OUTPUT.")
    p.add_argument("input", metavar="INPUT", help="local folder, s3://bucket/prefix, or manifest (.txt/.csv/.parquet)")
    p.add_argument("output", metavar="OUTPUT", help="local folder or s3://bucket/prefix for results")
    _add_run_options(p)
    p.set_defaults(func=_cmd_classify)


def _trust_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-model", action="store_true", help="allow a model from a remote location not listed as trusted")


def _ray_address_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address, or 'local' to start a private local Ray whatever runs on this machine "
                        "(default: RAY_ADDRESS, else a head from `ray start` on this machine that answers, else a "
                        "new local Ray). A head that does not answer or refuses the connection (token "
                        "authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or ~/.ray/auth_token) is exit 5")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by classify and nightly."""
    p.add_argument("--model", default=None, help="model artifact folder or s3:// URI (default: the shipped model)")
    _trust_model_option(p)
    p.add_argument("--model-digest", metavar="SHA256", default=None,
                   help="refuse any model artifact whose digest over all its files differs (default: "
                        "WBC_MODEL_DIGEST if set; a run manifest records the digest as model.digest)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per batch in every stage (default 64); a run of fewer than 4 batches is cut into 4, "
                        "at least 8 images each, so that its read, model and render stages overlap")
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
    _ray_address_option(p)
    from wbc_batch.runner import IN_PROCESS_MAX_IMAGES, RUNNERS

    p.add_argument("--runner", choices=RUNNERS, default="auto",
                   help="where the read, model and render stages run: 'ray' (tasks and model actors on a Ray cluster; "
                        "a killed actor is restarted), 'in-process' (this process, without Ray's start: about 9 s "
                        f"less on 2 cores), or 'auto' (default): in-process for a run of at most {IN_PROCESS_MAX_IMAGES} "
                        "images when no cluster is given or running and no --workers/--gpus-per-worker/"
                        "--cpus-per-worker is set, else Ray; the manifest's resources.runner and runner_reason say "
                        "which and why")
    p.add_argument("--faithfulness-sample", type=int, default=None,
                   help="N images spread over the run's listing get the deletion/insertion and pixel-retention "
                        "checks, measured in the model actors (0: off; default: one image per 256 of the run, at "
                        "least 1, at most 8; the manifest's faithfulness.sample_size and sample_rule say which)")


def _cmd_classify(args: argparse.Namespace) -> int:
    from wbc_batch.pipeline import ClassifyConfig, run_classify
    from wbc_batch.results import RunManifest

    config = ClassifyConfig.from_args(args)
    manifest = RunManifest.from_json(run_classify(config))
    _print_summary(manifest)
    return 0


def _print_summary(manifest: RunManifest) -> None:
    counts = manifest.counts
    print(
        f"run {manifest.run_id}: {counts.total} images, {counts.ok} ok, {counts.error} errors, "
        f"{counts.needs_review} need review ({console.percent(counts.needs_review, counts.total)}); "
        f"{manifest.timings.images_per_second:.1f} images/s, {console.human_duration(manifest.timings.seconds)}"
    )
    per_class = ", ".join(f"{k} {v}" for k, v in sorted(counts.per_class.items()))
    if per_class:
        print(f"classes: {per_class}")
    if manifest.resources.get("runner"):
        print(f"ran {manifest.resources['runner']}: {manifest.resources.get('runner_reason', '')}")
    print(f"results: {manifest.output}/predictions  heatmaps: {manifest.output}/heatmaps  "
          f"manifest: {manifest.output}/runs/{manifest.run_id}.json")


# --- nightly --------------------------------------------------------------


def _add_nightly(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nightly", help="classify only new or changed images since the last committed runs (exactly once)",
        description="Classify what OUTPUT holds no committed row for yet (same URI and content hash), under a lease "
                    "so that two runs cannot both commit. Safe to re-run after a kill. Only images new or changed in the "
                    "listing (size and ETag or mtime) are read. The run id defaults to nightly-YYYYMMDD (UTC), then "
                    "-2, -3, ... for later runs that date; a run with nothing to process commits nothing.")
    p.add_argument("input", metavar="INPUT", help="local folder, s3://bucket/prefix, or manifest (.txt/.csv/.parquet)")
    p.add_argument("output", metavar="OUTPUT", help="local folder or s3://bucket/prefix holding earlier results")
    _add_run_options(p)
    for action in p._actions:  # same option, nightly's own default
        if action.dest == "run_id":
            action.help = ("run identifier (default: nightly-YYYYMMDD of the UTC date; a later run on the same date "
                           "that has new images gets nightly-YYYYMMDD-2, -3, ...)")
    p.add_argument("--retry-errors", action="store_true",
                   help="also retry images whose row is a permanent error (transient errors are always retried)")
    p.add_argument("--reprocess-on-model-change", action="store_true",
                   help="process every image without a row of the current model artifact (by digest) "
                        "(default: a new model processes only images no model has seen)")
    p.add_argument("--rehash", action="store_true",
                   help="read and hash every listed image (default: only images whose size and ETag, or size and "
                        "mtime, differ from what their committed row recorded)")
    p.add_argument("--lease-seconds", type=float, default=900.0,
                   help="lease expiry, renewed while running; a killed run blocks the next one this long (default 900)")
    p.set_defaults(func=_cmd_nightly)


def _cmd_nightly(args: argparse.Namespace) -> int:
    """Run one night; a held lease is exit code 75 (EX_TEMPFAIL) with the holder named."""
    from wbc_batch.nightly import NightlyOptions, run_nightly
    from wbc_batch.pipeline import ClassifyConfig

    config = ClassifyConfig.from_args(args)
    options = NightlyOptions(retry_errors=args.retry_errors, reprocess_on_model_change=args.reprocess_on_model_change,
                             lease_seconds=args.lease_seconds, rehash=args.rehash)
    result = run_nightly(config, options)  # a held lease is a LeaseHeldError: exit 75 with the holder named
    n = result["nightly"]["counts"]
    if result.get("status") == "nothing_new":
        reads = result["nightly"]["listing"]
        print(f"nightly: nothing new ({reads['entries']} listed, {reads['unchanged_in_listing']} unchanged in the "
              f"listing, {reads['read_and_hashed']} read; {n['skipped_done']} already done, "
              f"{n['skipped_permanent']} permanent errors skipped); nothing committed")
        return 0
    if result.get("status") != "succeeded":
        print(f"run {result['run_id']}: {result['status'].replace('_', ' ')}; nothing to do")
        return 0
    print(f"nightly {result['run_id']}: {n['new']} new, {n['changed']} changed, {n['retried']} retried, "
          f"{n['skipped_done']} already done, {n['skipped_permanent']} permanent errors skipped")
    from wbc_batch.results import RunManifest

    manifest = RunManifest.from_json(result)
    if manifest.counts.total:
        _print_summary(manifest)
    return 0


# --- query ----------------------------------------------------------------


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query", help="read-only SQL and canned queries (differential, review queue, runs, drift) over committed results",
        description="Run one read-only SQL statement over the views predictions (latest row per image), "
                    "predictions_raw (every committed row) and runs (manifests), or a canned query. "
                    "Statements that write, and reads of any other file, are refused.")
    p.add_argument("output", metavar="OUTPUT", help="local folder or s3://bucket/prefix holding results")
    p.add_argument("sql", metavar="SQL", nargs="?", default=None,
                   help="one SELECT/WITH/SHOW/DESCRIBE/EXPLAIN statement (omit when using a canned query)")
    p.add_argument("--format", dest="fmt", choices=["table", "csv", "json"], default="table",
                   help="output format (default: an aligned table)")
    canned = p.add_mutually_exclusive_group()
    canned.add_argument("--differential", dest="canned", action="store_const", const="differential",
                        help="white-cell differential per sample with 95%% intervals, reference flags and warnings")
    canned.add_argument("--review-queue", dest="canned", action="store_const", const="review-queue",
                        help="cells that need review, least confident first, with heatmap and image URIs")
    canned.add_argument("--runs", dest="canned", action="store_const", const="runs", help="run history from the manifests")
    canned.add_argument("--drift", dest="canned", action="store_const", const="drift",
                        help="class mix and mean confidence per day and model version")
    canned.add_argument("--agreement", dest="canned", action="store_const", const="agreement",
                        help="model against reviewers' verdicts per run and predicted class: agreement %%, "
                             "sensitivity %% and the confusion row")
    p.add_argument("--run-date", dest="run_dates", action="append", default=None, metavar="YYYY-MM-DD",
                   help="only rows of this night (repeatable); other nights' part files are not opened, and "
                        "'latest row per image' is taken among these nights' rows. --runs is not affected")
    p.add_argument("--sample", default=None, help="with --differential: only this sample id")
    p.add_argument("--min-cells", type=int, default=None, help="with --differential: warn below this many white cells (default 100)")
    p.add_argument("--ood-share", type=float, default=None,
                   help="with --differential: mark a sample unreliable above this out-of-distribution share (default 0.2)")
    p.set_defaults(func=_cmd_query)


def _cmd_query(args: argparse.Namespace) -> int:
    """Print the rows of one read-only query."""
    from wbc_batch.query import run_query

    if args.sql is not None and args.canned is not None:
        raise CliError("give either SQL or a canned query (--differential, --review-queue, --runs, --drift, "
                       "--agreement), not both", EXIT_USAGE)
    if args.sql is None and args.canned is None:
        raise CliError("expected SQL or one of --differential, --review-queue, --runs, --drift, --agreement", EXIT_USAGE)
    if args.canned != "differential" and (args.sample or args.min_cells is not None or args.ood_share is not None):
        raise CliError("--sample, --min-cells and --ood-share go with --differential", EXIT_USAGE)
    options: dict = {}
    if args.min_cells is not None:
        options["min_cells"] = args.min_cells
    if args.ood_share is not None:
        options["ood_share_limit"] = args.ood_share
    sys.stdout.write(run_query(args.output, args.sql, fmt=args.fmt, canned=args.canned, sample=args.sample,
                               run_dates=args.run_dates, **options))
    return 0


# --- report ---------------------------------------------------------------


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of a run",
                       description="Write one HTML file (images embedded) with the run summary, the differential per "
                                   "sample, charts and a gallery of cells that need review.")
    p.add_argument("output", metavar="OUTPUT", help="local folder or s3://bucket/prefix holding results")
    p.add_argument("--run-id", default=None, help="run to report (default: the latest succeeded run)")
    p.add_argument("--out", dest="out_file", default=None,
                   help="HTML file to write, local or s3:// (default: OUTPUT/reports/<run_id>.html)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    """Write the report and print where it went."""
    from wbc_batch.report import write_report

    print(write_report(args.output, run_id=args.run_id, out_file=args.out_file))
    return 0


# --- review -----------------------------------------------------------------


def _add_review(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="web app to verify cells, reclassify them and sign samples off",
                       description="Serve the review app over the committed results in OUTPUT. Every request needs "
                                   "the token: WBC_REVIEW_TOKEN, else one generated and printed here. Verdicts are "
                                   "appended under OUTPUT/reviews/; results are never modified.")
    p.add_argument("output", metavar="OUTPUT", help="local folder or s3://bucket/prefix holding results")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    p.set_defaults(func=_cmd_review)


def _cmd_review(args: argparse.Namespace) -> int:
    """Serve the review app until interrupted."""
    from wbc_batch.review.app import resolve_token, serve

    token, generated = resolve_token(dict(os.environ))
    serve(args.output, host=args.host, port=args.port, token=token, generated=generated)
    return 0


def _add_import_verdicts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-verdicts", help="record verdicts from a CSV or Parquet file (e.g. another system's)",
                       description="Record the verdicts in FILE (columns image_uri or image_sha256, verified_class, "
                                   "optional reason) as REVIEWER's, as the review app records them. The whole file is "
                                   "refused when an entry names no committed cell or an unknown class.")
    p.add_argument("output", metavar="OUTPUT", help="local folder or s3://bucket/prefix holding results")
    p.add_argument("file", metavar="FILE", help="a .csv or .parquet file, local or s3://")
    p.add_argument("--reviewer", required=True, help="name the verdicts are recorded under")
    p.set_defaults(func=_cmd_import_verdicts)


def _cmd_import_verdicts(args: argparse.Namespace) -> int:
    """Import and print how many records were written."""
    from wbc_batch.review.labels import import_verdicts

    print(f"{import_verdicts(args.output, args.file, args.reviewer)} verdicts recorded under {args.output}/reviews")
    return 0


def _add_export_labels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-labels", help="copy every verified cell into DEST/<verified_class>/ for training",
                       description="Copy every cell with a verdict, byte for byte, to DEST/<verified_class>/"
                                   "<sha256><ext> (the layout wbc-batch train reads), with DEST/labels.csv listing them.")
    p.add_argument("output", metavar="OUTPUT", help="local folder or s3://bucket/prefix holding results")
    p.add_argument("dest", metavar="DEST", help="local folder or s3:// prefix for the labelled images")
    p.add_argument("--signed-only", action="store_true", help="only cells of signed-off samples")
    p.set_defaults(func=_cmd_export_labels)


def _cmd_export_labels(args: argparse.Namespace) -> int:
    """Export and print a one-line summary."""
    from wbc_batch.review.labels import export_labels

    print(export_labels(args.output, args.dest, signed_only=args.signed_only).line(args.dest))
    return 0


# --- explain --------------------------------------------------------------


def _add_explain(sub: argparse._SubParsersAction) -> None:
    from wbc_batch.attribution import METHODS

    p = sub.add_parser("explain", help="write attribution maps (overlay + raw .npy) for chosen images",
                       description="Explain chosen cells (for example from the review queue) with one attribution "
                                   "method; writes <sha256>-<method>-<class>.jpg and .npy per image and prints JSON.")
    p.add_argument("inputs", metavar="IMAGE_OR_URI", nargs="+", help="image files or s3:// URIs")
    p.add_argument("--method", choices=METHODS, default="gradcam", help="attribution method (default gradcam)")
    p.add_argument("--class", dest="class_name", metavar="C", default=None,
                   help="class to explain, by name or index (default: each image's predicted class)")
    p.add_argument("--out", default="explanations", help="local folder or s3:// prefix (default ./explanations)")
    p.add_argument("--model", default=None, help="model artifact folder or s3:// URI (default: the shipped model)")
    _trust_model_option(p)
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    """Explain the images and print what was written, as JSON."""
    from wbc_batch.attribution import explain_images

    print_json(explain_images(args.inputs, args.out, method=args.method, class_name=args.class_name,
                              model_uri=args.model, allow_untrusted=args.trust_model))
    return 0


# --- train ----------------------------------------------------------------


def _augment_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--augment``: the named presets of ``wbc_batch.training.augment`` (a test keeps the lists equal)."""
    p.add_argument("--augment", choices=["light", "strong", "colour"], default=default,
                   help=f"augmentation preset: strong (stain, blur, noise, JPEG, zoom 0.65-1.35), light (1.0.0's "
                        f"rotations, flips, small zoom and tint) or colour (light's geometry, contrast down to "
                        f"0.25, colour casts, blur, noise); default {default}; see MODEL_CARD.md")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from wbc_batch.training import recipe

    p = sub.add_parser("train", help="train a classifier on Ray Train and write a model artifact",
                       description="Train on one or more labs, each a class-folder layout (DATA/<class>/<image>), "
                                   "calibrate on the validation split, evaluate on the test split and write the "
                                   "artifact to MODEL_OUT. With several labs, each is split by its own rule "
                                   "(--split-by) and has an equal share of every epoch; a lab's cells are scored "
                                   "over the classes that lab has. The defaults are the job's best recipe from "
                                   "scratch so far (docs/TRAINING_RUNS.md).")
    p.add_argument("data", metavar="DATA", nargs="+",
                   help="a lab: [NAME=]ROOT, ROOT a local folder or s3://bucket/prefix with one folder per class "
                        "(NAME defaults to ROOT's last folder); repeat for several labs, e.g. pbc=data/pbc "
                        "chula=data/chula")
    p.add_argument("model_out", metavar="MODEL_OUT", help="local folder or s3:// prefix for the candidate artifact")
    p.add_argument("--workers", type=int, default=2, help="data-parallel training workers (default 2)")
    p.add_argument("--epochs", type=int, default=recipe.RECIPE_EPOCHS,
                   help=f"training epochs (default {recipe.RECIPE_EPOCHS})")
    p.add_argument("--image-size", type=int, default=128, help="model input side in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=recipe.RECIPE_BATCH_SIZE,
                   help=f"global batch size over all workers (default {recipe.RECIPE_BATCH_SIZE})")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--on-cell-weight", type=float, default=recipe.RECIPE_ON_CELL_WEIGHT,
                   help="weight of the loss term that charges class evidence outside the segmented cell "
                        f"(0 = off; default {recipe.RECIPE_ON_CELL_WEIGHT:g})")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="share of the target spread evenly over all classes (0 = off, the default; see MODEL_CARD.md)")
    p.add_argument("--weight-average", metavar="DECAY", type=float, default=0.0,
                   help="keep an exponential moving average of the weights (decay per step) and write it as the "
                        "model: 0 = off, the default; 0.998 averages over about the last 500 steps")
    p.add_argument("--distill-from", metavar="TEACHER", default=None,
                   help="also learn from this artifact's answers (same classes and image size): its logits of each "
                        "training image, softened, join the loss; default: none")
    p.add_argument("--distill-weight", metavar="W", type=float, default=0.5,
                   help="share of the loss that is distillation, with --distill-from (default 0.5)")
    p.add_argument("--distill-temperature", metavar="T", type=float, default=4.0,
                   help="temperature that softens teacher and student alike, with --distill-from (default 4)")
    p.add_argument("--init-from", metavar="MODEL", default=None,
                   help="start from this artifact's weights (fine-tuning; same classes and image size); images it "
                        "held out for validation or test stay held out")
    p.add_argument("--class-weight", metavar="CLASS=FACTOR", type=_class_weight, action="append", default=None,
                   help="multiply the balanced weight of CLASS by FACTOR (repeatable; given at all, it replaces the "
                        "default " + " ".join(f"{c}={f:g}" for c, f in recipe.RECIPE_CLASS_WEIGHT_FACTORS.items()) + ")")
    p.add_argument("--split-by", metavar="LAB=RULE", type=_split_rule, action="append", default=None,
                   help="how LAB is split into train/val/test (repeatable): file (by content hash, the default) "
                        "or prefix (by the file name up to its first '_': a slide or a cell's group, never on "
                        "both sides)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay (default 5e-4)")
    p.add_argument("--input-norm", choices=["rescale", "stain"], default="rescale",
                   help="first layer: rescale (divide by 255, as the shipped model) or stain (standardise each "
                        "channel of each image); --init-from keeps its model's")
    _augment_option(p, recipe.RECIPE_AUGMENT)
    p.add_argument("--seed", type=int, default=1234, help="random seed of initialisation and augmentation")
    _ray_train_options(p, cpus_default=1.0, cpus_help="(default 1)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (default 2)")
    p.add_argument("--version", default=None, help="model version string (default: UTC time plus data fingerprint)")
    p.add_argument("--publish", metavar="LOCATION", default=None,
                   help="make the candidate LOCATION/current if it beats the current model there")
    _ray_address_option(p)
    p.set_defaults(func=_cmd_train)


def _class_weight(text: str) -> tuple[str, float]:
    """Parse ``CLASS=FACTOR`` for ``--class-weight``."""
    name, sep, factor = text.partition("=")
    try:
        value = float(factor)
    except ValueError:
        value = float("nan")
    if not sep or not name or not value > 0:
        raise argparse.ArgumentTypeError(f"expected CLASS=FACTOR with FACTOR > 0, got {text!r}")
    return name, value


def _split_rule(text: str) -> tuple[str, str]:
    """Parse ``LAB=RULE`` for ``--split-by``."""
    from wbc_batch.training.labs import SPLIT_RULES

    name, sep, rule = text.partition("=")
    if not sep or not name or rule not in SPLIT_RULES:
        raise argparse.ArgumentTypeError(f"expected LAB=RULE with RULE one of {sorted(SPLIT_RULES)}, got {text!r}")
    return name, rule


def _cmd_train(args: argparse.Namespace) -> int:
    """Train, write the artifact and print a summary."""
    from wbc_batch.training import TrainConfig, run_training

    args.command_line = _command_line()
    summary = run_training(TrainConfig.from_args(args))
    m = summary["metrics"]
    print(f"model {summary['version']} written to {summary['model_out']} "
          f"(train {summary['train_seconds']:.0f}s, splits {summary['split_counts']})")
    if m:
        print(f"test accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
              f"ECE calibrated {m['ece_calibrated']:.4f}  temperature {summary['calibration']['temperature']:.3f}")
    if "publish" in summary:
        pub = summary["publish"]
        print(f"publish: {'promoted' if pub['promoted'] else 'not promoted'} ({pub['reason']})")
    return 0


# --- adapt ----------------------------------------------------------------


def _ray_train_options(p: argparse.ArgumentParser, cpus_default: float | None, cpus_help: str) -> None:
    """The Ray Train settings ``train`` and ``adapt`` share (one job runs both)."""
    p.add_argument("--precision", choices=["auto", "float32", "mixed_bfloat16"], default="auto",
                   help="training dtype policy; auto: mixed_bfloat16 on GPUs and on CPUs with AMX (about 2x "
                        "faster there), else float32 (weights are float32 either way)")
    p.add_argument("--cpus-per-worker", type=float, default=cpus_default,
                   help=f"CPUs per training worker, also its TensorFlow threads {cpus_help}")
    p.add_argument("--use-gpu", action="store_true", help="give each training worker a GPU")
    p.add_argument("--storage-path", default=None,
                   help="local folder or s3:// prefix for checkpoints (default: MODEL_OUT-checkpoints)")


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="fine-tune a model to a new lab from a few labelled cells per class",
                       description="Fine-tune BASE (default: the shipped model) on a new lab's labelled class folders "
                                   "(DATA/<class>/<image>, any subset of the model's classes, folder names in any "
                                   "case) on Ray Train, refit the temperature and the OOD statistics so the lab's "
                                   "cells are in distribution, and write a new artifact to MODEL_OUT. Ten cells per "
                                   "class are enough; use --replay with the base's training data so the first lab "
                                   "is not forgotten.")
    p.add_argument("data", metavar="DATA", help="the new lab's labelled cells: local folder or s3:// prefix")
    p.add_argument("model_out", metavar="MODEL_OUT", help="new artifact folder or s3:// prefix (must be new)")
    p.add_argument("--base", metavar="MODEL", default=None, help="artifact to adapt (default: the shipped model)")
    p.add_argument("--replay", metavar="[LAB=]DATA", action="append", default=[],
                   help="the base's own training data (class folders); cells of its training split are mixed in, "
                        "its validation cells refit the temperature. Repeat for a base of several labs (LAB as "
                        "its model.json names them); a lab left out is read from the root the base records")
    p.add_argument("--replay-per-class", type=int, default=150, help="replayed cells per class (default 150)")
    p.add_argument("--new-lab-share", type=float, default=0.5,
                   help="share of each epoch's images that are the new lab's (repeated, augmented; default 0.5)")
    p.add_argument("--epochs", type=int, default=12, help="epochs (default 12, chosen on a held-out lab)")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (default 32)")
    p.add_argument("--freeze-norm", action="store_true",
                   help="keep the base's BatchNormalization statistics (layers in inference mode)")
    p.add_argument("--keep-scale", action="store_true",
                   help="do not rescale: by default, when the new lab's cells measure more than 25%% larger or "
                        "smaller than the replayed ones, the adapted model magnifies every image to bring them "
                        "to the base's scale (a crop around the cell, or a padding)")
    p.add_argument("--replay-distill", metavar="W", type=float, default=0.0,
                   help="with --replay: share W of the replayed cells' loss is the base's own answers (its "
                        "softened logits) instead of their labels, so the first lab keeps the base's view of "
                        "them; 0 = off, the default (on Chula 0.5 kept 0.15 points more of PBC and cost the "
                        "new lab 4-6 points; MODEL_CARD.md)")
    p.add_argument("--lab-colours", action="store_true",
                   help="with --replay: give half of the new lab's share of each epoch to replayed cells shown in "
                        "the colours of the new lab's images (CIELAB mean and spread), so the first lab's cells "
                        "teach the classes in the new lab's look; off by default (on Chula +4 points on one fold, "
                        "none on the other, PBC -0.7 to -0.9; MODEL_CARD.md)")
    _augment_option(p, "light")
    p.add_argument("--lab", default=None, help="the lab's name in model.json (default: DATA's folder name)")
    p.add_argument("--version", default=None, help="version of the new artifact (default: BASE+LAB.timestamp)")
    p.add_argument("--workers", type=int, default=1, help="data-parallel training workers (default 1)")
    _ray_train_options(p, cpus_default=None, cpus_help="(default: the cluster's CPUs divided among the workers, "
                                                       "at most 8)")
    _trust_model_option(p)
    _ray_address_option(p)
    p.set_defaults(func=_cmd_adapt)


def _cmd_adapt(args: argparse.Namespace) -> int:
    """Adapt, write the artifact and print what was done."""
    from wbc_batch.training.adapt import AdaptConfig, run_adaptation

    summary = run_adaptation(AdaptConfig(
        data_uri=args.data, model_out=args.model_out, base=args.base, replay=args.replay,
        replay_per_class=args.replay_per_class, new_lab_share=args.new_lab_share, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size, freeze_norm=args.freeze_norm,
        replay_distill=args.replay_distill, rescale=not args.keep_scale, lab_colours=args.lab_colours,
        augment=args.augment, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, use_gpu=args.use_gpu, storage_path=args.storage_path,
        ray_address=args.ray_address, version=args.version, lab=args.lab, precision=args.precision,
        allow_untrusted=args.trust_model, command=_command_line(),
    ))
    counts = ", ".join(f"{c} {n}" for c, n in summary["new_lab_counts"].items())
    print(f"model {summary['version']} written to {summary['model_out']} "
          f"(adapted to {summary['lab']!r} on {counts}; train {summary['train_seconds']:.0f}s)")
    if summary["field_scale"] != 1.0:
        print(f"the lab's cells measured {summary['cell_size']['ratio']}x the replayed cells' size: the model "
              f"magnifies every image {summary['field_scale']}x first")
    after = summary["replay_val"].get("after")
    if after:
        before = summary["replay_val"]["before"]
        print(f"replay validation cells ({after['n']}, never trained on): accuracy {before['accuracy']:.2%} before, "
              f"{after['accuracy']:.2%} after")
    if not summary["ood_fitted"]:
        print("warning: OOD statistics were not refitted (too few images); classify will not score OOD",
              file=sys.stderr)
    return 0


def _command_line() -> str:
    """The command as typed, for the artifact's provenance (empty when not run as wbc-batch)."""
    return " ".join(["wbc-batch", *sys.argv[1:]]) if sys.argv and "wbc" in sys.argv[0] else ""


# --- evaluate -------------------------------------------------------------


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a model on labelled images and write JSON",
                       description="Evaluate MODEL on the labelled images of DATA (class-folder layout), by default "
                                   "on the test split recorded in the model's split.csv.")
    p.add_argument("model", metavar="MODEL", help="model artifact folder or s3:// URI ('shipped' for the default model)")
    p.add_argument("data", metavar="DATA", nargs="+",
                   help="local folder or s3://bucket/prefix with one folder per class (any subset of the model's "
                        "classes); several DATA are reported one lab at a time")
    p.add_argument("--split", choices=["train", "val", "test", "all"], default="test",
                   help="which images, by the model's split.csv (default test; every image of a DATA the model "
                        "never saw, since none of it is in the split.csv)")
    p.add_argument("--out", default=None,
                   help="write the full JSON here (local path or s3:// URI; a list with one entry per DATA)")
    p.add_argument("--tta", action="store_true",
                   help="average the logits over the 8 rotations and flips of each image (8x the network's cost)")
    p.add_argument("--classes", metavar="C1,C2,...", type=_class_list, default=None,
                   help="the lab's declared class set: the model chooses among these classes only (a lab whose "
                        "exports never hold ig or non_wbc cells, say); default every class of the model")
    _trust_model_option(p)
    p.set_defaults(func=_cmd_evaluate)


def _class_list(text: str) -> list[str]:
    """Parse ``C1,C2,...`` for ``--classes``."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"expected at least two comma-separated classes, got {text!r}")
    return names


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate and print the headline figures."""
    from wbc_batch import storage
    from wbc_batch.training import evaluate, format_summary

    model = None if args.model == "shipped" else args.model
    results = []
    for i, data in enumerate(args.data):
        result = evaluate(model, data, split=args.split, allow_untrusted=args.trust_model, tta=args.tta,
                          classes=args.classes)
        results.append(result)
        print(("\n" if i else "") + format_summary(result))
    if args.out:
        payload = results[0] if len(results) == 1 else results
        storage.write_bytes(args.out, json.dumps(payload, indent=2, allow_nan=False).encode())
        print(f"full results: {args.out}")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="set a model's temperature and review threshold from labelled cells",
                       description="Refit MODEL's temperature and review threshold on labelled images it never "
                                   "trained on and write them as a new artifact version to MODEL_OUT (MODEL is "
                                   "never changed). The threshold is the lowest whose accepted cells reach 99.5% "
                                   "accuracy with 95% confidence. After `adapt` every cell of the new lab needs "
                                   "review; calibrate the adapted model on the lab's verified cells "
                                   "(`wbc-batch export-labels`) to let confident cells through.")
    p.add_argument("model", metavar="MODEL", help="model artifact folder or s3:// URI ('shipped' for the default model)")
    p.add_argument("data", metavar="DATA", help="class-folder layout of labelled cells (local or s3://)")
    p.add_argument("model_out", metavar="MODEL_OUT", help="new, empty folder or s3:// prefix for the new version")
    p.add_argument("--split", choices=["unseen", "val"], default="unseen",
                   help="unseen: DATA's images the model's split.csv does not list, such as a lab's verified "
                        "cells (default); val: the model's own validation split of DATA")
    p.add_argument("--version", default=None, help="version of the new artifact (default: MODEL's version+recal)")
    _trust_model_option(p)
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate, write the new version and say what it will auto-accept."""
    from wbc_batch.training import calibrate

    model = None if args.model == "shipped" else args.model
    result = calibrate(model, args.data, args.model_out, version=args.version, split=args.split,
                       allow_untrusted=args.trust_model)
    written = result["written"]
    print(f"model {written['version']} written to {written['uri']} (digest {written['digest'][:12]}): "
          f"temperature {result['temperature']:.3f}, on {result['val_n']} cells")
    if result["val_coverage"] > 0:
        print(f"review threshold {result['review_threshold']:.4f}: {result['val_coverage']:.1%} of these cells "
              f"would be auto-accepted")
    else:
        print(f"no threshold reaches 99.5% accuracy with 95% confidence on {result['val_n']} cells: every cell "
              f"still needs review (it takes at least 598 accepted cells without an error)")
    return 0


# --- registry -------------------------------------------------------------
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_adapt, _add_calibrate, _add_classify, _add_evaluate, _add_explain, _add_export_labels, _add_import_verdicts, _add_nightly, _add_query,
    _add_report, _add_review, _add_train,
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="wbc-batch", description="Batch white-blood-cell classification with Grad-CAM on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO and let TensorFlow, Ray and Ray Data print as they would (progress bars "
                             "included); default: their warnings and errors only, and our own progress line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def _root_cause(exc: BaseException) -> BaseException:
    """The first :class:`~wbc_batch.errors.WbcError` inside Ray's wrappers (RayTaskError.cause, UserCodeException.__cause__)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, WbcError):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return exc


def _error_message(exc: BaseException) -> tuple[str, int]:
    """Turn a failure into one line and an exit code: a WbcError carries both (wbc_batch/errors.py)."""
    exc = _root_cause(exc)
    if isinstance(exc, WbcError):
        return exc.message, exc.exit_code
    if isinstance(exc, FileNotFoundError):
        return f"not found: {exc.filename or exc}", EXIT_USAGE
    if isinstance(exc, ValueError):  # guard clauses of library functions (ImageDecodeError is one too)
        return f"invalid input: {exc}", EXIT_USAGE
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"failed: {type(exc).__name__}: {first}", EXIT_FAILED


# commands that run the network in this process, so import TensorFlow (and its absl lines) anyway; classify
# and nightly load the model only in their Ray actors, and in the driver only to explain a failed run
NETWORK_COMMANDS = frozenset({"adapt", "calibrate", "evaluate", "explain", "train"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wbc-batch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console.configure(args.verbose)  # our lines, not the libraries' chatter, unless -v (wbc_batch/console.py)
    if args.command in NETWORK_COMMANDS and console.quiet():
        console.import_tensorflow_quietly()  # before any thread writes to stderr
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("wbc-batch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        if os.environ.get("WBC_DEBUG"):
            raise
        message, code = _error_message(exc)
        message = (message.splitlines() or [""])[0]  # one line, whatever the exception held
        print(f"wbc-batch {args.command}: {message}", file=sys.stderr)
        return code


def print_json(data: object) -> None:
    """Print JSON for machine-readable command output."""
    print(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
