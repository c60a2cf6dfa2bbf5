"""The classify pipeline: read, decode, classify + Grad-CAM, render, write.

On Ray Data it reads top to bottom::

    from_items(uris) -> map_batches(load_images)              tasks: fetch bytes, hash, decode, resize, quality
                     -> map_batches(BatchClassifier, actors)  one forward + one backward per batch,
                                                              faithfulness of the run's sample images
                     -> map_batches(render_explanations)      tasks: localisation, heatmap JPEGs
                     -> iter_batches -> PartWriter            driver: Parquet parts, then manifest

Decoding and heatmap rendering run in tasks so that the model actors (a GPU
each when the cluster has GPUs) do nothing but the model. Every input URI
yields exactly one row: a failure to read or decode becomes an error row.
On Ray the driver never loads the Keras model (nor imports TensorFlow) on a
run that succeeds: it checks the artifact without Keras, and only a failed
run loads it there, to say why the actors could not.

A small run with no cluster runs the same three stages in the driver's own
process instead, without Ray's start (``runner.py`` says when and why;
:func:`stage_functions` is the one recipe both runners use).

Each run records where its time went (``timings.phases`` in the manifest,
:class:`RunClock`, one INFO line with ``-v``): the driver's own steps, the
model actor's start (process, TensorFlow import, model load, reported with
its first batch) and the faithfulness sample, on the run's clock.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from wbc_batch import cluster, console, metrics, results, storage
from wbc_batch.imaging import ImageDecodeError, decode_image, encode_jpeg
from wbc_batch.model import load_artifact, pinned_digest, verify_artifact
from wbc_batch.runner import RunnerChoice, check_runner, choose_runner, stream_in_process

log = logging.getLogger(__name__)

DEFAULT_SUSPECT_BELOW = 0.5
FAITHFULNESS_SEED = 0  # image i of the run's sample is measured with seed FAITHFULNESS_SEED + i
# One faithfulness image per this many images of the run (at least one, at most --faithfulness-sample): an image
# of the sample costs about 80 forward passes, more than a batch of 64 images, so 8 of them were 10x the work
# of a 64-image run (BENCHMARKS.md, "Small runs").
MIN_STAGE_BATCHES = 4  # a small run is cut into this many batches so that its stages overlap (stage_batch_size)
MIN_SMALL_BATCH = 8
FAITHFULNESS_IMAGES_PER_SAMPLE = 256
FAITHFULNESS_DEFAULT_MAX = 8
FAITHFULNESS_RULE = (f"default: one image per {FAITHFULNESS_IMAGES_PER_SAMPLE} of the run, at least 1, at most "
                     f"{FAITHFULNESS_DEFAULT_MAX} (min({FAITHFULNESS_DEFAULT_MAX}, max(1, ceil(images / "
                     f"{FAITHFULNESS_IMAGES_PER_SAMPLE}))))")


@dataclass
class ClassifyConfig:
    """Everything a classify run needs; built from CLI arguments or by callers such as nightly."""

    input_uri: str
    output_uri: str
    model_uri: str | None = None
    allow_untrusted_model: bool = False
    model_digest: str | None = None  # refuse any artifact whose digest differs (--model-digest, WBC_MODEL_DIGEST)
    batch_size: int = 64  # 64 vs 32: +13% images/s on 2 CPUs (BENCHMARKS.md); 128 no better
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    run_id: str | None = None
    write_heatmaps: bool = True
    review_threshold: float | None = None
    sample_id_regex: str | None = None
    ray_address: str | None = None
    uris: list[str] | None = None
    listing: Any = None  # storage.list_entries of the input (pyarrow Table): the rows' source_* columns
    manifest_extra: dict[str, Any] | None = None
    before_commit: Any = None  # callable(manifest) run right before the commit; raising aborts it (nightly's lease check)
    faithfulness_sample: int | None = None  # images; None: sized to the run (faithfulness_sample_size)
    quiet: bool = False  # keep Ray Data's progress bars and per-dataset INFO lines off the console
    runner: str = "auto"  # "auto", "ray" or "in-process" (runner.py)

    @classmethod
    def from_args(cls, args: Any) -> ClassifyConfig:
        """Build from parsed ``classify``/``nightly`` arguments."""
        return cls(
            input_uri=args.input,
            output_uri=args.output.rstrip("/") if storage.is_remote(args.output) else args.output,
            model_uri=args.model,
            allow_untrusted_model=args.trust_model,
            model_digest=pinned_digest(getattr(args, "model_digest", None)),
            batch_size=args.batch_size,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            run_id=args.run_id,
            write_heatmaps=not args.no_heatmaps,
            review_threshold=args.review_threshold,
            sample_id_regex=args.sample_id_regex,
            ray_address=args.ray_address,
            faithfulness_sample=getattr(args, "faithfulness_sample", None),
            quiet=not getattr(args, "verbose", True),
            runner=getattr(args, "runner", "auto"),
        )

    def validate(self) -> None:
        """Guard clauses for values the CLI cannot check by type alone."""
        check_runner(self.runner)
        if self.faithfulness_sample is not None and self.faithfulness_sample < 0:
            raise ValueError(f"--faithfulness-sample must be >= 0, got {self.faithfulness_sample}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.review_threshold is not None and not 0.0 <= self.review_threshold <= 1.0:
            raise ValueError(f"--review-threshold must be within [0, 1], got {self.review_threshold}")
        if self.sample_id_regex is not None:
            try:
                pattern = re.compile(self.sample_id_regex)
            except re.error as exc:
                raise ValueError(f"--sample-id-regex is not a valid regex: {exc}") from None
            if "sample" not in pattern.groupindex:
                raise ValueError("--sample-id-regex needs a named group (?P<sample>...)")
        if self.run_id is not None:
            results.validate_run_id(self.run_id)


def new_run_id() -> str:
    """UTC time plus a random suffix: sortable and unique."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def sample_id_for(uri: str, regex: str | None = None) -> str:
    """The slide/sample an image belongs to: a regex group, else its parent folder name."""
    if regex:
        match = re.search(regex, uri)
        if match and match.group("sample"):
            return match.group("sample")
    path = uri[len("s3://") :].split("/", 1)[-1] if storage.is_remote(uri) else uri.replace(os.sep, "/")
    parent = PurePosixPath(path).parent.name
    return parent or "unknown"


# --- stage 1: tasks -------------------------------------------------------


def load_images(batch: dict[str, np.ndarray], image_size: int, with_quality: bool = False,
                field_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Fetch, hash, decode, resize and segment each image; failures become error rows.

    The cell is segmented once per row, on the model input
    (:func:`~wbc_batch.geometry.model_input`, which also zooms out an image
    whose cell fills it), here in parallel tasks: the render stage measures
    where the heatmap falls on that mask, and the OOD size feature reads it.

    Args:
        batch: ``image_uri`` and ``sample_id`` columns.
        image_size: the model's input side S.
        with_quality: also compute the OOD image-quality features of the
            model input here, in parallel tasks, rather than in the model
            actor, where they would cost more CPU than the CNN itself.
        field_scale: the model's (:attr:`~wbc_batch.model.ModelMetadata.field_scale`).

    Returns:
        The batch plus ``image_bytes``, ``image_sha256``, ``image_width``,
        ``image_height``, ``model_input`` (B, S, S, 3) uint8, ``cell_mask``
        (B, S, S) bool, ``input_zoom`` (B,) float32, ``status``, ``error`` and ``error_kind``; with
        ``with_quality`` also ``quality_features`` (B, F) float64 (zeros on
        error rows).
    """
    import hashlib

    from wbc_batch.geometry import model_input

    uris = batch["image_uri"]
    n = len(uris)
    out = dict(batch)
    out["model_input"] = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    out["cell_mask"] = np.zeros((n, image_size, image_size), dtype=bool)
    out["input_zoom"] = np.ones(n, dtype=np.float32)
    data_col = np.empty(n, dtype=object)
    # Empty strings, not None, for "no value": an all-None object column would
    # be typed differently from block to block. The writer turns "" into null.
    sha = np.full(n, "", dtype=object)
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, "", dtype=object)
    kind = np.full(n, "", dtype=object)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    for i, uri in enumerate(uris):
        try:
            data = storage.read_bytes(str(uri))
        except FileNotFoundError:
            status[i], error[i], kind[i] = "error", "not found", "permanent"
            data_col[i] = b""
            continue
        except (storage.StorageError, OSError) as exc:
            status[i], error[i], kind[i] = "error", f"read failed: {exc}", "transient"
            data_col[i] = b""
            continue
        sha[i] = hashlib.sha256(data).hexdigest()
        data_col[i] = data
        try:
            rgb = decode_image(data)
        except ImageDecodeError as exc:
            status[i], error[i], kind[i] = "error", str(exc), "permanent"
            continue
        height[i], width[i] = rgb.shape[:2]
        seen = model_input(rgb, image_size, field_scale)
        out["model_input"][i], out["cell_mask"][i], out["input_zoom"][i] = seen.image, seen.cell_mask, seen.zoom
    out.update(image_bytes=data_col, image_sha256=sha, status=status, error=error, error_kind=kind,
               image_width=width, image_height=height)
    if with_quality:
        from wbc_batch.ood import QUALITY_FEATURES, quality_features

        ok = status == "ok"
        features = np.zeros((n, len(QUALITY_FEATURES)), dtype=np.float64)
        if ok.any():
            features[ok] = quality_features(out["model_input"][ok], out["cell_mask"][ok])
        out["quality_features"] = features
    return out


# --- stage 2: model actors ------------------------------------------------


class BatchClassifier:
    """A Ray Data callable class: loads the model once, then classifies and explains batches."""

    def __init__(self, model_uri: str | None, allow_untrusted: bool, review_threshold: float | None,
                 run_id: str, intra_op_threads: int | None = None, expected_digest: str | None = None,
                 faithfulness_sample: dict[str, int] | None = None) -> None:
        started = time.time()  # wall clock: the driver places the actor's start on the run's timeline
        t0 = time.perf_counter()
        process_age = process_age_s()  # a worker Ray started for this actor, or one it had started before
        import tensorflow as tf

        if intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        from wbc_batch.explain import GradCam

        t_tf = time.perf_counter()
        # the driver passes the digest it loaded, so every row of a run comes from the artifact its manifest names
        artifact = load_artifact(model_uri, allow_untrusted=allow_untrusted, expected_digest=expected_digest)
        self.meta = artifact.meta
        self.digest = artifact.digest
        self.model = artifact.model
        self.sample = dict(faithfulness_sample or {})  # URI -> its place in the run's faithfulness sample
        self.forward: Any = None  # faithfulness' compiled forward pass, built at the first sample image
        self.cam = GradCam(artifact.model, self.meta.gradcam_layer, self.meta.embedding_layer)
        self.classes = np.array(self.meta.class_names, dtype=object)
        self.threshold = self.meta.review_threshold if review_threshold is None else review_threshold
        self.run_id = run_id
        self.ood = None
        if self.meta.ood:
            from wbc_batch.ood import OodScorer

            self.ood = OodScorer.from_metadata(self.meta)
        t_ready = time.perf_counter()
        # sent with the actor's first batch (the ``actor_timing`` column), then per batch its own seconds
        self.timing: dict[str, Any] = {"actor": f"{os.getpid()}-{uuid.uuid4().hex[:6]}", "started": started,
                                       "process_age_s": process_age,
                                       "tensorflow_import_s": t_tf - t0, "model_load_s": t_ready - t_tf,
                                       "ready": started + (t_ready - t0)}
        self.faithfulness_s = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add probabilities, the predicted class, OOD flags and the raw Grad-CAM map to a batch."""
        t0 = time.perf_counter()
        self.faithfulness_s = 0.0
        n = len(batch["image_uri"])
        ok = batch["status"] == "ok"
        k = len(self.classes)
        probs = np.full((n, k), np.nan, dtype=np.float32)
        cam_shape = self.cam.cam_shape
        cams = np.zeros((n, *cam_shape), dtype=np.float32)
        ood_score = np.full(n, np.nan, dtype=np.float32)
        ood_flag = np.zeros(n, dtype=bool)
        records = np.full(n, "", dtype=object)
        if ok.any():
            images = batch["model_input"][ok]
            result = self.cam(images.astype(np.float32))
            records[ok] = self._faithfulness_records(batch["image_uri"][ok], images, result)
            probs[ok] = metrics.softmax(result.logits, self.meta.temperature)
            cams[ok] = result.cams
            if self.ood is not None:
                if "quality_features" in batch:
                    s, f = self.ood.score_features(result.embeddings, batch["quality_features"][ok])
                else:
                    s, f = self.ood.score(result.embeddings, images)
                ood_score[ok], ood_flag[ok] = s, f
        pred = np.where(ok, self.classes[np.nan_to_num(probs, nan=0.0).argmax(axis=1)], "")
        conf = np.nanmax(np.where(ok[:, None], probs, 0.0), axis=1).astype(np.float32)
        out = {k_: v for k_, v in batch.items() if k_ not in ("model_input", "quality_features")}
        out.update(
            predicted_class=pred,
            confidence=np.where(ok, conf, np.nan).astype(np.float32),
            cam=cams,
            ood_score=ood_score,
            out_of_distribution=ood_flag,
            low_confidence=ok & (conf < self.threshold),
            model_version=np.full(n, self.meta.version, dtype=object),
            model_sha256=np.full(n, self.meta.model_sha256, dtype=object),
            model_digest=np.full(n, self.digest, dtype=object),
            run_id=np.full(n, self.run_id, dtype=object),
            processed_at=np.full(n, np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "us")),
            faithfulness_record=records,
        )
        for j, name in enumerate(self.meta.class_names):
            out[f"p_{name}"] = probs[:, j]
        out["actor_timing"] = self._timing_column(n, time.perf_counter() - t0)
        return out

    def _timing_column(self, n: int, seconds: float) -> np.ndarray:
        """The batch's ``actor_timing``: JSON on its first row ("" on the others), read by :class:`RunClock`.

        Every batch: the actor, its seconds on the batch and the faithfulness
        part of them, and when it finished (wall clock). The actor's first
        batch also carries its start: when the constructor began, its
        TensorFlow import and model load.
        """
        column = np.full(n, "", dtype=object)
        if n:
            record = {**self.timing, "batch_s": seconds, "faithfulness_s": self.faithfulness_s, "n": n,
                      "done": time.time()}
            column[0] = json.dumps(record)
            self.timing = {"actor": self.timing["actor"]}  # the start goes with the first batch only
        return column

    def _faithfulness_records(self, uris: np.ndarray, images: np.ndarray, result: Any) -> np.ndarray:
        """For the batch's images in the run's sample, their faithfulness record as JSON ("" for the rest).

        Why here: the actor holds the model, the maps and the inputs already;
        measuring in the driver made every run import TensorFlow and load the
        model a second time (about 3 s of CPU before the first row).
        """
        out = np.full(len(uris), "", dtype=object)
        picked = [i for i, u in enumerate(uris) if u in self.sample]
        if not picked:
            return out
        t0 = time.perf_counter()
        from wbc_batch.faithfulness import compiled_forward, faithfulness_records

        if self.forward is None:  # once per actor, not once per batch: each build traces again
            self.forward = compiled_forward(self.model)
        seeds = [FAITHFULNESS_SEED + self.sample[uris[i]] for i in picked]
        records = faithfulness_records(self.model, images[picked].astype(np.float32), result.cams[picked],
                                       result.targets[picked], self.meta.temperature, seeds, run=self.forward)
        for i, record in zip(picked, records):
            out[i] = json.dumps(record)
        self.faithfulness_s += time.perf_counter() - t0
        return out


# --- stage 3: tasks -------------------------------------------------------


def render_explanations(batch: dict[str, np.ndarray], output_uri: str, write_heatmaps: bool,
                        suspect_below: float, field_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Measure where each map falls on the row's cell mask and write the heatmap overlays.

    Only the overlay needs the full-size image, so it is decoded only when
    heatmaps are written. A heatmap that cannot be written (storage down
    after retries, disk full) turns its row into a ``transient`` error row,
    so the run still ends and a later run (nightly) retries that image.
    """
    from wbc_batch.explain import overlay_heatmap
    from wbc_batch.geometry import view_at
    from wbc_batch.localisation import cam_on_mask

    n = len(batch["image_uri"])
    status = np.array(batch["status"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    kind = np.array(batch["error_kind"], dtype=object)
    in_cell = np.full(n, np.nan, dtype=np.float32)
    peak_in = np.zeros(n, dtype=bool)
    area = np.full(n, np.nan, dtype=np.float32)
    uris = np.full(n, "", dtype=object)
    for i in range(n):
        if batch["status"][i] != "ok":
            continue
        cam = batch["cam"][i]
        m = cam_on_mask(cam, batch["cell_mask"][i])
        in_cell[i], peak_in[i], area[i] = m["cam_in_cell"], m["cam_peak_in_cell"], m["cell_area_share"]
        if write_heatmaps:
            rgb = view_at(decode_image(batch["image_bytes"][i]), float(batch["input_zoom"][i]), field_scale,
                          batch["cell_mask"][i].shape[0])
            uri = results.heatmap_uri(output_uri, batch["image_sha256"][i], batch["model_version"][i])
            try:
                storage.write_bytes(uri, encode_jpeg(overlay_heatmap(rgb, cam), quality=85))
            except storage.StorageError as exc:
                status[i], error[i], kind[i] = "error", f"heatmap write failed: {exc}", "transient"
                continue
            uris[i] = uri
    ok = status == "ok"
    suspect = ok & (np.nan_to_num(in_cell, nan=0.0) < suspect_below)
    out = {k: v for k, v in batch.items() if k not in ("image_bytes", "cam", "cell_mask")}
    out.update(
        status=status,
        error=error,
        error_kind=kind,
        cam_in_cell=in_cell,
        cam_peak_in_cell=peak_in,
        cell_area_share=area,
        explanation_suspect=suspect,
        heatmap_uri=uris,
        needs_review=ok & (batch["low_confidence"] | suspect | batch["out_of_distribution"]),
    )
    return out


# --- the run --------------------------------------------------------------


def _quiet_ray_data(quiet: bool) -> None:
    """In a quiet run (the CLI without -v), keep Ray Data's per-dataset INFO lines and progress bars off the console."""
    if quiet:
        console.quiet_ray_data()


def _plan_resources(config: ClassifyConfig) -> tuple[int, float, float]:
    """Actors, GPUs and CPUs per actor from the cluster and the options.

    GPUs: one actor per GPU by default. CPU only: one actor that leaves room
    for the read and render tasks (a pool taking every CPU stalls the stream).
    An actor runs on one node, so it is sized to fit the largest node, not the
    cluster's total: Ray Data waits forever for an actor no node can hold
    (3 nodes of 1 CPU once asked for 2.5 CPUs and hung). Options asking for
    more than any node has fail here (exit 2).
    """
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0.0))
    cpus = float(res.get("CPU", 1.0))
    nodes = cluster.node_resources() or [(cpus, gpus)]
    node_cpus = max(c for c, _ in nodes)
    gpus_per = config.gpus_per_worker if config.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    if gpus_per > 0 and gpus < gpus_per:
        raise ValueError(f"--gpus-per-worker {gpus_per} but the Ray cluster has {gpus:g} GPUs")
    if config.workers is not None:
        workers = config.workers
    elif gpus_per > 0:
        workers = max(1, sum(int(g // gpus_per) for _, g in nodes))
    else:
        workers = 1
    if config.cpus_per_worker is not None:
        cpus_per = config.cpus_per_worker
    elif gpus_per > 0:
        cpus_per = 1.0
    else:
        cpus_per = max(0.5, min(cpus - 0.5, cpus / workers - 0.5, node_cpus - 0.5))
    if not any(c >= cpus_per and g >= gpus_per for c, g in nodes):
        raise ValueError(f"a model actor needs {cpus_per:g} CPUs and {gpus_per:g} GPUs but no node of the Ray cluster "
                         f"has that much (nodes: {', '.join(f'{c:g} CPUs/{g:g} GPUs' for c, g in nodes)}); "
                         "lower --cpus-per-worker or --gpus-per-worker")
    return workers, gpus_per, cpus_per


def _domain_shift(meta: Any, counts: results.RunCounts) -> dict[str, Any]:
    """The run's and each sample's out-of-distribution share; ``detected`` raises the alarm."""
    if not meta.ood:
        return {"detected": False, "evaluated": False, "reason": "the model carries no OOD statistics"}
    from wbc_batch.ood import ShiftRule, domain_shift_summary

    per_sample = {k: (v[0], v[1]) for k, v in counts.per_sample.items()}
    summary = domain_shift_summary(counts.ok, counts.out_of_distribution, per_sample,
                                   rule=ShiftRule.from_ood_stats(meta.ood))
    return {"evaluated": True, **summary}


def faithfulness_sample_size(n_images: int, requested: int | None) -> tuple[int, str]:
    """How many images of a run of ``n_images`` get the faithfulness checks, and the rule that said so.

    ``requested`` (``--faithfulness-sample``) is honoured up to the run's
    size; left out (None) the sample is sized to the run: one image per
    :data:`FAITHFULNESS_IMAGES_PER_SAMPLE`, at least one, at most
    :data:`FAITHFULNESS_DEFAULT_MAX` (from 1,793 images on, the 8 every run
    measured before).
    """
    if requested is not None:
        return min(requested, n_images), f"--faithfulness-sample {requested}"
    if n_images <= 0:
        return 0, FAITHFULNESS_RULE
    return min(FAITHFULNESS_DEFAULT_MAX, max(1, math.ceil(n_images / FAITHFULNESS_IMAGES_PER_SAMPLE))), FAITHFULNESS_RULE


def stage_batch_size(n_images: int, batch_size: int) -> int:
    """The batch size of a run's stages: ``batch_size``, or smaller for a run of fewer than
    :data:`MIN_STAGE_BATCHES` batches, so that its read, model and render stages overlap.

    A 64-image run at 64 was one batch: read, then the model, then render,
    each waiting for the whole run, and the first row came with the last.
    Cut into 4 (at least :data:`MIN_SMALL_BATCH` images each), the first
    batch is rendered while the next ones are classified. From
    ``4 * batch_size`` images on, the batch size is the one asked for.
    """
    if n_images >= batch_size * MIN_STAGE_BATCHES:
        return batch_size
    return max(1, min(batch_size, max(MIN_SMALL_BATCH, math.ceil(n_images / MIN_STAGE_BATCHES))))


def spread_sample(uris: list[str], size: int) -> list[str]:
    """``size`` URIs evenly spaced over the run's listing (the middle of each of ``size`` equal stretches).

    Why spread: a listing is sorted, so its first images are one slide (or
    one class); and the first batch, which would carry them, is the one the
    time to the first row waits for (about 0.4 s of CPU per image measured).
    """
    n = len(uris)
    if n <= size:
        return list(dict.fromkeys(uris))
    return list(dict.fromkeys(uris[int((i + 0.5) * n / size)] for i in range(size)))


class FaithfulnessSample:
    """The run's faithfulness sample, measured by the model actors.

    Which images: :func:`spread_sample` of the run's listing, so the sample
    does not depend on which block reaches the driver first; those that do
    not decode are left out, and ``n_images`` in the summary says how many
    were measured. The actors send one record per sample image with its row
    (:meth:`BatchClassifier._faithfulness_records`); :meth:`summary` joins
    them in the listing's order. ``rule`` says how the size was chosen
    (:func:`faithfulness_sample_size`); the summary carries both.
    """

    def __init__(self, uris: list[str], size: int, rule: str = "") -> None:
        self.positions = {u: i for i, u in enumerate(spread_sample(uris, size))}
        self.size = len(self.positions)
        self.rule = rule
        self.records: dict[int, dict[str, Any]] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Keep the records a result batch carries (rows outside the sample carry "")."""
        for uri, record in zip(batch["image_uri"], batch.get("faithfulness_record", ())):
            if record and uri in self.positions:
                self.records[self.positions[uri]] = json.loads(record)

    def summary(self, temperature: float) -> dict[str, Any] | None:
        """The manifest's ``faithfulness`` (None when no sample image was measured).

        ``sample_size`` is the number of images chosen, ``n_images`` of those
        measured (an image that does not decode is left out), ``sample_rule``
        how the size was chosen.
        """
        if not self.records:
            return None
        from wbc_batch.faithfulness import DEFAULT_STEPS, summarise_faithfulness

        order = sorted(self.records)
        summary = summarise_faithfulness([self.records[i] for i in order], temperature, FAITHFULNESS_SEED,
                                         DEFAULT_STEPS)
        by_position = {i: u for u, i in self.positions.items()}
        summary["image_uris"] = [by_position[i] for i in order]
        summary["sample_size"] = self.size
        if self.rule:
            summary["sample_rule"] = self.rule
        return summary


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None where that cannot be read.

    In a command-line run this is the Python imports before :func:`run_classify`.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class RunClock:
    """Where a run's time goes: ``timings.phases`` of the manifest, in seconds.

    Driver steps are timed where they run. A run in-process (runner.py) has
    no ``ray_connect_s``, ``plan_s`` nor ``actor_process_s``: its "actor" is
    the model loaded in the driver. The model actors report theirs
    with their batches (the ``actor_timing`` column, :meth:`BatchClassifier._timing_column`):
    wall-clock times, placed on the run's clock against the driver's own
    (one machine's clock, or a cluster's synchronised ones). :attr:`PHASES`
    says what each phase is; those ending in ``_s`` after ``plan_s`` that
    name a moment (``actor_start_s``, ``actor_ready_s``,
    ``first_model_batch_s``) are seconds from the run's start, the others
    durations.
    """

    PHASES = {
        "before_run_s": "process start to run_classify (the Python imports of a command-line run)",
        "verify_model_s": "the model artifact checked without Keras (driver)",
        "listing_s": "INPUT listed and OUTPUT's write probe",
        "ray_connect_s": "Ray started or joined",
        "plan_s": "Ray Data imported, actors sized, the dataset planned",
        "actor_process_s": "run start to the start of the first model actor's worker process (negative: "
                           "a worker Ray had started before the run's Ray Data plan asked for it)",
        "actor_start_s": "run start to the first model actor's constructor (its class imported; in-process: "
                         "the model's constructor in the driver)",
        "tensorflow_import_s": "TensorFlow's import in that actor",
        "model_load_s": "the model loaded in that actor (Keras, Grad-CAM, OOD scorer)",
        "actor_ready_s": "run start to that actor ready for batches",
        "first_model_batch_s": "run start to the first batch out of a model actor",
        "model_s": "seconds the model actors spent on batches, all of them (faithfulness included)",
        "faithfulness_s": "of which the faithfulness sample",
        "stream_s": "execution start to the last rows at the driver",
        "commit_s": "Parquet parts closed and the manifest's summaries (its own write excluded)",
    }

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.phases: dict[str, float] = {}
        age = process_age_s()
        if age is not None:
            self.phases["before_run_s"] = age
        self._actors: dict[str, dict[str, Any]] = {}
        self._first_done: float | None = None
        self._model_s = 0.0
        self._faithfulness_s = 0.0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Read the actors' timings a result batch carries (called by the thread that streams the rows)."""
        for text in batch.get("actor_timing", ()):
            if not text:
                continue
            record = json.loads(text)
            self._model_s += float(record.get("batch_s", 0.0))
            self._faithfulness_s += float(record.get("faithfulness_s", 0.0))
            done = float(record.get("done", 0.0)) - self.wall0
            self._first_done = done if self._first_done is None else min(self._first_done, done)
            if "started" in record:
                self._actors.setdefault(str(record["actor"]), record)

    def to_json(self) -> dict[str, float]:
        """The phases measured so far, rounded to the millisecond; the actor's are the first ready actor's."""
        phases = dict(self.phases)
        if self._actors:
            first = min(self._actors.values(), key=lambda r: float(r["ready"]))
            if first.get("process_age_s") is not None:  # when the actor's worker process started
                phases["actor_process_s"] = float(first["started"]) - float(first["process_age_s"]) - self.wall0
            phases.update(actor_start_s=float(first["started"]) - self.wall0,
                          tensorflow_import_s=float(first["tensorflow_import_s"]),
                          model_load_s=float(first["model_load_s"]),
                          actor_ready_s=float(first["ready"]) - self.wall0)
        if self._first_done is not None:
            phases["first_model_batch_s"] = self._first_done
            phases["model_s"] = self._model_s
            phases["faithfulness_s"] = self._faithfulness_s
        order = list(self.PHASES)
        ranked = sorted(phases.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        # durations and times after the start are >= 0 (another node's clock may be a little off); the
        # actor's process may have started before the run
        return {k: round(v if k == "actor_process_s" else max(0.0, v), 3) for k, v in ranked}


def _import_tensorflow(config: ClassifyConfig) -> None:
    """Import TensorFlow in the driver; quietly in a quiet run (TF's absl lines at import ignore
    TF_CPP_MIN_LOG_LEVEL, console.py), else the model load imports it as it is."""
    if config.quiet:
        console.import_tensorflow_quietly()


def _model_error(config: ClassifyConfig, digest: str | None) -> Exception | None:
    """Load the model in the driver to learn why it failed in the actors; None when it loads.

    Only a failed run pays for this: a model Keras refuses (``safe_mode``,
    output count) reaches the driver from a dead actor as Ray's
    ``ActorDiedError`` with the reason as text only, and the person should
    read the model error (exit 4) instead.
    """
    _import_tensorflow(config)
    try:
        load_artifact(config.model_uri, allow_untrusted=config.allow_untrusted_model, expected_digest=digest)
    except Exception as exc:  # noqa: BLE001 - returned to be raised in place of the run's own error
        return exc
    return None


def _write_batch(batch: dict[str, np.ndarray], schema: Any, listing: Any, position: dict[str, int],
                 counts: results.RunCounts, writer: results.PartWriter, sample: FaithfulnessSample,
                 clock: RunClock) -> None:
    """One block from the stream: rows to the part writer and the counts, faithfulness records to the sample,
    the actors' timings to the run's clock."""
    table = results.batch_to_table(batch, schema)
    if listing is not None:
        table = results.attach_source(table, listing, position)
    counts.add(table)
    writer.add(table)
    sample.add(batch)
    clock.add(batch)


def _list_input(config: ClassifyConfig) -> tuple[Any, list[str], dict[str, int]]:
    """The run's image URIs, INPUT's listing (None for a caller's URI list) and each URI's row in it.

    Raises ValueError when INPUT holds no image, so that an empty folder is
    a clear error, not an empty run; a caller's empty URI list (nightly's
    night with nothing new) is a valid run of zero rows.
    """
    listing = config.listing
    if config.uris is None:
        listing = storage.list_entries(config.input_uri)
        uris = listing.column("image_uri").to_pylist()
    else:
        uris = list(config.uris)
    position = {u: i for i, u in enumerate(listing.column("image_uri").to_pylist())} if listing is not None else {}
    if not uris and config.uris is None:
        raise ValueError(f"no images found under {config.input_uri} (looked for .jpg .jpeg .png .tif .tiff .bmp)")
    return listing, uris, position


class _Preload:
    """Import Ray Data in a thread while the driver starts or joins Ray, and wait for it before planning.

    ``import ray.data`` takes about a second of the driver's CPU (more on a
    loaded machine), and ``ray.init`` spends most of its time waiting for the
    processes it starts; done one after the other they were both on the way
    to the first row. An import error is raised by :meth:`wait`.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="wbc-preload-ray-data", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            import ray.data  # noqa: F401 - the import is the work
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by wait()
            self.error = exc

    def wait(self) -> None:
        """Block until the import is done; raise what it raised."""
        self.thread.join()
        if self.error is not None:
            raise self.error


def _connect_cluster(config: ClassifyConfig, uris: list[str], runner: RunnerChoice) -> list[str]:
    """Join the cluster before anything is written; the warnings the manifest records.

    A cluster that does not answer fails the run in seconds (cluster.py); a
    cluster of several nodes with local INPUT or OUTPUT paths gets a warning
    that those paths must be shared.
    """
    cluster.connect(config.ray_address, chosen=runner.cluster)
    shared = cluster.local_paths_warning(config.input_uri, config.output_uri, uris)
    if not shared:
        return []
    log.warning("%s", shared)
    return [shared]


@dataclass(frozen=True)
class StageFunctions:
    """The run's three stages as both runners call them: ``load`` (a function of a batch), the model
    (:class:`BatchClassifier` built from ``classifier_kwargs``, once per actor or once in-process) and
    ``render`` (a function of a batch)."""

    load: Any
    classifier_kwargs: dict[str, Any]
    render: Any


def stage_functions(config: ClassifyConfig, meta: Any, run_id: str, model_digest: str,
                    sample: FaithfulnessSample, intra_op_threads: int | None) -> StageFunctions:
    """The one recipe of a run's stages, with the run's options bound (Ray Data plan or in-process loop)."""
    suspect_below = float(meta.metrics.get("explanation_suspect_below", DEFAULT_SUSPECT_BELOW))
    return StageFunctions(
        load=partial(load_images, image_size=meta.image_size, with_quality=bool(meta.ood),
                     field_scale=meta.field_scale),
        classifier_kwargs={
            "model_uri": config.model_uri,
            "allow_untrusted": config.allow_untrusted_model,
            "review_threshold": config.review_threshold,
            "run_id": run_id,
            "intra_op_threads": intra_op_threads,
            "expected_digest": model_digest,
            "faithfulness_sample": sample.positions,
        },
        render=partial(render_explanations, output_uri=config.output_uri, write_heatmaps=config.write_heatmaps,
                       field_scale=meta.field_scale, suspect_below=suspect_below),
    )


def _run_items(config: ClassifyConfig, uris: list[str]) -> list[dict[str, str]]:
    """The rows the stages start from: each image's URI and sample."""
    return [{"image_uri": u, "sample_id": sample_id_for(u, config.sample_id_regex)} for u in uris]


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows as the column batch Ray Data hands a stage (object arrays of strings)."""
    return {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}


def _classify_dataset(config: ClassifyConfig, stages: StageFunctions, uris: list[str],
                      plan: tuple[int, float, float]) -> Any:
    """The Ray Data plan of a run: read tasks -> model actors -> render tasks (the module docstring)."""
    import ray.data

    workers, gpus_per, cpus_per = plan
    items = _run_items(config, uris)
    batch_size = stage_batch_size(len(items), config.batch_size)
    blocks = max(1, min(math.ceil(len(items) / batch_size), 512))  # a block per batch
    ds: Any = ray.data.from_items(items, override_num_blocks=blocks)
    # Ray Data's per-operator reservations split the CPUs the model actors leave over between the read and
    # render stages; on 2 cores that held the render tasks back until the actors had nearly finished, so rows
    # reached the driver near the end of the run. Without them the first row of a 2,500-image run came 2-75 s
    # earlier in each of four A/B pairs; the run's total time did not move beyond the noise (BENCHMARKS.md,
    # "Per-run fixed costs"). Set on this plan's copy of the context only.
    ds.context.op_resource_reservation_enabled = False
    ds = ds.map_batches(stages.load, batch_size=batch_size, num_cpus=0.5)
    ds = ds.map_batches(
        BatchClassifier,
        fn_constructor_kwargs=stages.classifier_kwargs,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per,
        num_gpus=gpus_per,
        # Fault tolerance is Ray Data's default for actor pools (max_restarts=-1, max_task_retries=-1):
        # a killed actor is restarted and its batch retried; tests/test_hardening.py kills one mid-run.
        # Passing them here would go through the deprecated ray_remote_args (Ray 2.60).
    )
    return ds.map_batches(stages.render, batch_size=batch_size, num_cpus=0.5)


def _stream_rows(ds: Any, on_batch: Any, total: int, quiet: bool) -> float | None:
    """Feed every block of ``ds`` to ``on_batch`` as it comes; the ``perf_counter`` of the first one.

    Whole blocks as they come (the writer buffers rows into parts), so the
    first rows reach the driver after one batch rather than after 1024 rows.
    """
    progress = console.Progress(total) if quiet else None  # -v: Ray Data's own bars instead
    first: float | None = None
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if first is None:
                first = time.perf_counter()
            on_batch(batch)
            if progress is not None:
                progress.update(len(batch["image_uri"]))
    finally:
        if progress is not None:
            progress.close()
    return first


def _recorded_options(config: ClassifyConfig, n_uris: int) -> dict[str, Any]:
    """The run's options as its manifest records them: the config minus what is not an option."""
    options: dict[str, Any] = {f.name: getattr(config, f.name) for f in fields(config)
                               if f.name not in ("uris", "listing", "manifest_extra", "before_commit", "quiet")}
    options["n_uris"] = n_uris
    return options


def _model_ref(config: ClassifyConfig, meta: Any, model_digest: str) -> results.ModelRef:
    """Which model made the rows, as the manifest names it."""
    return results.ModelRef(uri=config.model_uri or "shipped", name=meta.name, version=meta.version,
                            sha256=meta.model_sha256, digest=model_digest, class_names=list(meta.class_names),
                            non_wbc_classes=list(meta.non_wbc_classes), review_threshold=meta.review_threshold)


def _actor_sizing(config: ClassifyConfig) -> dict[str, Any]:
    """The Ray actor options as given (None: left out); the runner's choice reads them."""
    return {"workers": config.workers, "gpus_per_worker": config.gpus_per_worker,
            "cpus_per_worker": config.cpus_per_worker}


def _stream_on_ray(config: ClassifyConfig, stages: Any, uris: list[str], on_batch: Any, preload: _Preload,
                   phases: dict[str, float], model_digest: str) -> tuple[float | None, dict[str, Any]]:
    """Plan the Ray Data run and stream its rows to ``on_batch``; the first row's ``perf_counter`` and the
    actors' resources."""
    t_plan = time.perf_counter()
    preload.wait()
    _quiet_ray_data(config.quiet)
    workers, gpus_per, cpus_per = _plan_resources(config)
    intra_op = None if gpus_per > 0 else max(1, math.ceil(cpus_per) + 1)
    ds = _classify_dataset(config, stages(intra_op), uris, (workers, gpus_per, cpus_per))
    t_stream = time.perf_counter()
    phases["plan_s"] = t_stream - t_plan
    try:
        first = _stream_rows(ds, on_batch, len(uris), config.quiet)
    except Exception as exc:
        # the actors died on the model: the driver's own load says why (exit 4), not Ray's wrapper
        model_error = _model_error(config, model_digest)
        if model_error is None:
            raise
        raise model_error from exc
    phases["stream_s"] = time.perf_counter() - t_stream
    return first, {"workers": workers, "gpus_per_worker": gpus_per, "cpus_per_worker": cpus_per}


def _stream_in_process(config: ClassifyConfig, stages: Any, uris: list[str], on_batch: Any,
                       phases: dict[str, float]) -> tuple[float | None, dict[str, Any]]:
    """Run the stages in this process (runner.py) and stream their rows to ``on_batch``; the first row's
    ``perf_counter`` and what the model ran on.

    The model is loaded here, by the same :class:`BatchClassifier` an actor
    builds (its start is reported with its first batch, as an actor's is);
    TensorFlow uses every core, with one thread reading ahead and one rendering.
    """
    t_stream, started = time.perf_counter(), time.time()
    _import_tensorflow(config)
    imported = time.perf_counter() - t_stream
    bound = stages(None)
    model = BatchClassifier(**bound.classifier_kwargs)
    # the model's start in the driver, TensorFlow's import included; the driver's own process was not started
    # for the run (no actor_process_s)
    model.timing.update(started=started, process_age_s=None,
                        tensorflow_import_s=model.timing["tensorflow_import_s"] + imported)
    first = stream_in_process(_run_items(config, uris), stage_batch_size(len(uris), config.batch_size),
                              bound.load, model, bound.render, _columns, on_batch, config.quiet)
    phases["stream_s"] = time.perf_counter() - t_stream
    import tensorflow as tf

    gpus = len(tf.config.list_logical_devices("GPU"))
    return first, {"workers": 1, "gpus_per_worker": float(min(gpus, 1)), "cpus_per_worker": float(os.cpu_count() or 1)}


def run_classify(config: ClassifyConfig) -> dict[str, Any]:
    """Classify every image of a run and commit it; returns the run manifest.

    Raises:
        ValueError: bad options or no images.
        FileNotFoundError: INPUT does not exist.
        storage.StorageError: INPUT or OUTPUT unreachable or not writable.
        ModelArtifactError: the model is missing, tampered with or untrusted.
    """
    config.validate()
    started = datetime.now(timezone.utc)
    clock = RunClock()
    t0 = clock.t0
    phases = clock.phases
    run_id = config.run_id or new_run_id()
    # The driver needs the model's metadata and digest, not the Keras model: the actors load it and
    # measure the faithfulness sample (BENCHMARKS.md, "Per-run fixed costs").
    checked = verify_artifact(config.model_uri, allow_untrusted=config.allow_untrusted_model,
                              expected_digest=config.model_digest)
    meta, model_digest = checked.meta, checked.digest
    phases["verify_model_s"] = time.perf_counter() - t0
    warnings: list[str] = []
    runner: RunnerChoice | None = None
    preload: _Preload | None = None
    try:
        listing, uris, position = _list_input(config)
        storage.check_writable(config.output_uri)
        phases["listing_s"] = time.perf_counter() - t0 - phases["verify_model_s"]
        if uris:
            runner = choose_runner(config.runner, config.ray_address, _actor_sizing(config), len(uris))
        if runner is not None and runner.name == "ray":
            t_connect = time.perf_counter()
            preload = _Preload()
            warnings = _connect_cluster(config, uris, runner)
            phases["ray_connect_s"] = time.perf_counter() - t_connect
    except Exception:
        model_error = _model_error(config, model_digest)  # a model Keras refuses is reported before input errors
        if model_error is not None:
            raise model_error from None
        raise
    results.discard_previous_attempt(config.output_uri, run_id)
    schema = results.prediction_schema(meta.class_names)
    run_date = started.strftime("%Y-%m-%d")
    writer = results.PartWriter(config.output_uri, run_date, run_id, schema)
    counts = results.RunCounts()
    resources: dict[str, Any] = {"workers": 0, "gpus_per_worker": 0.0, "cpus_per_worker": 0.0}
    faithfulness_sample = FaithfulnessSample(uris, *faithfulness_sample_size(len(uris), config.faithfulness_sample))
    first_row: float | None = None
    if runner is not None:
        on_batch = partial(_write_batch, schema=schema, listing=listing, position=position, counts=counts,
                           writer=writer, sample=faithfulness_sample, clock=clock)
        stages = partial(stage_functions, config, meta, run_id, model_digest, faithfulness_sample)
        if preload is not None:
            first, resources = _stream_on_ray(config, stages, uris, on_batch, preload, phases, model_digest)
        else:
            first, resources = _stream_in_process(config, stages, uris, on_batch, phases)
        resources.update(runner=runner.name, runner_reason=runner.reason)
        first_row = None if first is None else first - t0
    t_commit = time.perf_counter()
    files = writer.close()
    elapsed = time.perf_counter() - t0
    faithfulness = faithfulness_sample.summary(meta.temperature)
    run_counts, domain_shift = counts.summary(), _domain_shift(meta, counts)
    phases["commit_s"] = time.perf_counter() - t_commit
    timings = results.RunTimings(seconds=round(elapsed, 3),
                                 images_per_second=round(counts.total / elapsed, 3) if elapsed else 0.0,
                                 first_row_seconds=None if first_row is None else round(first_row, 3),
                                 phases=clock.to_json())
    manifest = results.RunManifest(
        run_id=run_id, status=results.STATUS_SUCCEEDED, input=config.input_uri, output=config.output_uri,
        model=_model_ref(config, meta, model_digest), started_at=started.isoformat(),
        finished_at=datetime.now(timezone.utc).isoformat(), run_date=run_date,
        counts=run_counts, timings=timings,
        resources={**resources, "batch_size": stage_batch_size(len(uris), config.batch_size)},
        parquet_files=files, options=_recorded_options(config, len(uris)), domain_shift=domain_shift,
        faithfulness=faithfulness, warnings=warnings,
        extra=dict(config.manifest_extra or {}))  # extra keys win, as they always did
    if config.before_commit is not None:
        config.before_commit(manifest)
    results.write_manifest(config.output_uri, manifest)
    log.info("run %s took %.1f s%s; phases: %s", run_id, elapsed,
             "" if first_row is None else f", first rows after {first_row:.1f} s",
             ", ".join(f"{k.removesuffix('_s')} {v:g} s" for k, v in timings.phases.items()))
    return manifest.to_json()
