"""Throughput benchmark: the classify pipeline against the notebook way and the hardware floor.

One command (``make bench``) measures, in the same invocation, on the same
images and the same shipped model:

- **pipeline**: ``run_classify`` end to end (list, read, hash, decode, CNN +
  Grad-CAM, localisation, heatmap JPEGs, Parquet, manifest) in a child
  process on a fresh local Ray, images/s from input to committed manifest;
- **baseline**: the seed notebook, one image at a time: ``cv2.imread``,
  ``model.predict`` on one image, tf-explain ``GradCAM.explain`` for its
  predicted class, the overlay written with ``cv2.imwrite``;
- **floor**: the model's batched forward + Grad-CAM (``explain.GradCam``)
  on tensors already in memory, one process using every core, plus decoding
  alone (``decode_image`` + ``resize_for_model`` on a thread per core);
  floor = 1 / (model s/image + decode s/image).
- **full floor**: every per-image step the product promises (read, hash,
  decode, resize, segmentation, quality features, network + Grad-CAM + OOD
  score, localisation, overlay + JPEG written) batched in one process
  without Ray: what the pipeline is honestly compared with.
- **small runs** (``--small-sizes``, default 16, 64 and 256 images): a cold
  ``wbc-batch classify`` as a person types it (a subprocess: imports, the
  model, the work, the commit), once with each runner (``--runner
  in-process``; ``--runner ray``: Ray's start, the model actor, Ray's
  shutdown) against the one-at-a-time loop on the same images from a cold
  process (imports, model load, loop), with each phase of the run from its
  manifest (``timings.phases``); ``--compare-tree DIR`` runs another
  checkout's code beside them (a ``git worktree`` of an earlier commit, with
  its own defaults), alternated.

Why a child process per pipeline run: it gets a fresh Ray whose whole
process tree (driver, GCS, raylet, workers) the sampler can attribute, and
nothing (TF threads, object store) leaks between sizes. The child's Ray uses
its own temp dir so it never joins, or is joined by, another local cluster.

The machine may be shared: the baseline, the floor and the pipeline are
interleaved per repeat, the machine's load average is recorded beside each
figure, and medians with min..max are reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "pbc"
SAMPLES = REPO / "samples" / "pbc"
RESULT_TAG = "BENCH_RESULT "
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


# --- inputs -----------------------------------------------------------------


def find_images(data: Path | None) -> tuple[Path, list[Path]]:
    """The benchmark images: ``data`` if given, else the shared PBC set, else the bundled samples."""
    for root in ([data] if data is not None else [SHARED_DATA, SAMPLES]):
        if root is not None and root.is_dir():
            # Hidden files (macOS ".DS_*" junk named *.jpg in the PBC folders) are no images.
            paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                           and not p.name.startswith(".") and p.is_file())
            if paths:
                return root, paths
    raise FileNotFoundError(f"no images under {data or SHARED_DATA} nor {SAMPLES}")


def interleave_classes(paths: list[Path]) -> list[Path]:
    """Round-robin over class folders, so any prefix mixes classes (and predicted targets)."""
    by_folder: dict[str, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(p.parent.name, []).append(p)
    lists = [by_folder[k] for k in sorted(by_folder)]
    out: list[Path] = []
    for i in range(max(len(v) for v in lists)):
        out.extend(v[i] for v in lists if i < len(v))
    return out


def build_manifest(paths: list[Path], n: int, workdir: Path) -> Path:
    """A ``.txt`` manifest of ``n`` distinct URIs drawn from ``paths``.

    Listing de-duplicates URIs, so beyond ``len(paths)`` the list goes on with
    symlinks (``<class>/rep<k>/<name>``) to the same files: same bytes, new URIs.
    """
    uris: list[str] = []
    k = 0
    while len(uris) < n:
        take = paths[: n - len(uris)]
        if k == 0:
            uris.extend(str(p) for p in take)
        else:
            for p in take:
                link = workdir / "links" / p.parent.name / f"rep{k}" / p.name
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(p)
                uris.append(str(link))
        k += 1
    manifest = workdir / f"input-{n}.txt"
    manifest.write_text("\n".join(uris) + "\n")
    return manifest


# --- measurement of a process tree -----------------------------------------


@dataclass
class TreeStats:
    """What the sampler saw of one process tree."""

    peak_rss_mb: float = 0.0
    rss_mb_series: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    n_processes_peak: int = 0


class TreeSampler:
    """Samples RSS and CPU time of a process and all its descendants every ``period`` seconds.

    Why sum RSS: the issue asks for the whole Ray tree (driver, GCS, raylet,
    workers); shared pages (object store, libraries) are counted once per
    process, so this is an upper bound. CPU time keeps the last value seen
    per pid, so processes that exit still count.
    """

    def __init__(self, pid: int, period: float = 0.5) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.period = period
        self.stats = TreeStats()
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.stats.cpu_seconds = sum(self._cpu.values())

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            return
        rss = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    t = proc.cpu_times()
                    self._cpu[proc.pid] = t.user + t.system
            except self._psutil.Error:
                continue
        mb = rss / 2**20
        self.stats.rss_mb_series.append(round(mb, 1))
        self.stats.peak_rss_mb = max(self.stats.peak_rss_mb, mb)
        self.stats.n_processes_peak = max(self.stats.n_processes_peak, len(procs))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)
        self._sample()


def _own_cpu() -> float:
    """CPU seconds (user + system, all threads) of this process so far."""
    t = os.times()
    return t.user + t.system


def machine_busy(before: Any, after: Any) -> float:
    """Share of all cores busy (any process) between two ``psutil.cpu_times()``."""
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    total = sum(after) - sum(before)
    return round(1.0 - idle / total, 3) if total > 0 else 0.0


# --- the pipeline, in a child process ----------------------------------------


def child_pipeline(args: argparse.Namespace) -> int:
    """Child entry: start a fresh local Ray, classify the manifest, print the result as JSON."""
    t_import = time.perf_counter()
    import ray

    from wbc_batch.pipeline import ClassifyConfig, run_classify

    import_s = time.perf_counter() - t_import
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, configure_logging=False,
             include_dashboard=False, _temp_dir=args.ray_temp)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t0
    config = ClassifyConfig(input_uri=args.input, output_uri=args.output, batch_size=args.batch_size,
                            workers=args.workers, cpus_per_worker=args.cpus_per_worker)
    try:
        t1 = time.perf_counter()
        manifest = run_classify(config)
        seconds = time.perf_counter() - t1
    finally:
        ray.shutdown()
    timings = manifest["timings"]
    out = {"ray_start_s": round(ray_start, 2), "seconds": round(seconds, 3), "counts": manifest["counts"],
           "import_s": round(import_s, 2), "first_row_s": timings.get("first_row_seconds"),
           "phases": timings.get("phases", {}),
           "resources": manifest.get("resources", {}), "parquet_files": len(manifest["parquet_files"]),
           "run_id": manifest["run_id"]}
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


def run_pipeline(manifest: Path, n: int, workdir: Path, batch_size: int, workers: int | None,
                 cpus_per_worker: float | None, timeout: float) -> dict[str, Any]:
    """Run the pipeline on ``manifest`` in a child process; time, CPU and memory of its tree."""
    import psutil

    out_dir = workdir / f"out-{n}-{time.time_ns()}"
    ray_temp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths are length-limited
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-pipeline", "--input", str(manifest),
           "--output", str(out_dir), "--batch-size", str(batch_size), "--ray-temp", str(ray_temp)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if cpus_per_worker is not None:
        cmd += ["--cpus-per-worker", str(cpus_per_worker)]
    log_path = workdir / f"pipeline-{n}.log"
    load_before = os.getloadavg()[0]
    busy0 = psutil.cpu_times()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(REPO),
                                env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"})
        with TreeSampler(proc.pid) as sampler:
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
                raise RuntimeError(f"pipeline at n={n} ran past {timeout:.0f} s; log: {log_path}") from None
    wall = time.perf_counter() - t0
    busy = machine_busy(busy0, psutil.cpu_times())
    shutil.rmtree(ray_temp, ignore_errors=True)
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"pipeline at n={n} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    if res["counts"]["total"] != n or res["counts"]["ok"] != n:
        raise RuntimeError(f"pipeline at n={n} classified {res['counts']}")
    ncpu = os.cpu_count() or 1
    series = sampler.stats.rss_mb_series
    half = series[len(series) // 2:] or series
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "n": n,
        "seconds": res["seconds"],
        "images_per_s": round(n / res["seconds"], 2),
        "ray_start_s": res["ray_start_s"],
        # start of run_classify to the first row at the driver; a run from the command line also pays
        # the imports and Ray's start (import_s, ray_start_s) before it
        "first_row_s": res["first_row_s"],
        "import_s": res["import_s"],
        "phases": res["phases"],
        "child_wall_s": round(wall, 2),
        "tree_cpu_util": round(sampler.stats.cpu_seconds / (wall * ncpu), 3),
        "cpu_ms_per_image": round(sampler.stats.cpu_seconds / n * 1e3, 2),
        "machine_busy": busy,
        "peak_rss_mb": round(sampler.stats.peak_rss_mb, 1),
        "median_rss_mb_second_half": round(statistics.median(half), 1) if half else 0.0,
        "processes_peak": sampler.stats.n_processes_peak,
        "parquet_files": res["parquet_files"],
        "resources": res["resources"],
        "load_before": round(load_before, 2),
    }


# --- baseline and floor, in this process ------------------------------------


def run_baseline(model: Any, layer: str, image_size: int, paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """The seed notebook: one image at a time, predict, tf-explain Grad-CAM, overlay written by OpenCV."""
    import cv2
    import numpy as np
    from tf_explain.core.grad_cam import GradCAM

    out_dir.mkdir(parents=True, exist_ok=True)
    explainer = GradCAM()

    def one(path: Path, i: int) -> None:
        bgr = cv2.imread(str(path))
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        x = cv2.resize(rgb, (image_size, image_size), interpolation=cv2.INTER_AREA).astype(np.float32)[None]
        pred = int(np.argmax(model.predict(x, verbose=0)[0]))
        grid = explainer.explain((x, None), model, class_index=pred, layer_name=layer)
        cv2.imwrite(str(out_dir / f"{i:05d}_{path.stem}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))

    one(paths[0], -1)  # warm-up: the notebook pays tracing once per session, not per image
    load_before = os.getloadavg()[0]
    cpu0 = _own_cpu()
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        one(p, i)
    seconds = time.perf_counter() - t0
    cpu = _own_cpu() - cpu0
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"n": len(paths), "seconds": round(seconds, 3), "images_per_s": round(len(paths) / seconds, 3),
            "cpu_ms_per_image": round(cpu / len(paths) * 1e3, 2), "load_before": round(load_before, 2)}


def run_floor(cam: Any, image_size: int, paths: list[Path], batch_size: int) -> dict[str, Any]:
    """Batched forward + Grad-CAM on in-memory tensors, and decoding alone on every core.

    Also times the per-image work the pipeline does beyond the floor (hash,
    full-size decode for rendering, localisation, overlay, JPEG encode), to
    explain the gap rather than hide it.
    """
    import numpy as np

    from wbc_batch.explain import overlay_heatmap
    from wbc_batch.imaging import decode_image, encode_jpeg, resize_for_model
    from wbc_batch.localisation import cam_on_mask, model_input_mask

    ncpu = os.cpu_count() or 1
    blobs = [p.read_bytes() for p in paths]

    def decode(data: bytes) -> np.ndarray:
        return resize_for_model(decode_image(data), image_size)

    decode(blobs[0])
    load_before = os.getloadavg()[0]
    with ThreadPoolExecutor(max_workers=ncpu) as pool:
        cpu0 = _own_cpu()
        t0 = time.perf_counter()
        images = np.stack(list(pool.map(decode, blobs)))
        t_decode = (time.perf_counter() - t0) / len(blobs)
        cpu_decode = (_own_cpu() - cpu0) / len(blobs)
    x = images.astype(np.float32)
    cam(x[:batch_size])  # warm-up (tracing)
    cpu0 = _own_cpu()
    t0 = time.perf_counter()
    cams = []
    for s in range(0, len(x), batch_size):
        cams.append(cam(x[s:s + batch_size]).cams)
    t_model = (time.perf_counter() - t0) / len(x)
    cpu_model = (_own_cpu() - cpu0) / len(x)
    cam_arr = np.concatenate(cams)

    # Beyond the floor, single thread, per image (the pipeline spreads it over tasks).
    m = min(len(blobs), 64)
    t0 = time.perf_counter()
    for b in blobs[:m]:
        hashlib.sha256(b).hexdigest()
    t_hash = (time.perf_counter() - t0) / m
    t0 = time.perf_counter()
    for i in range(m):
        rgb = decode_image(blobs[i])
        cam_on_mask(cam_arr[i], model_input_mask(images[i]))
        encode_jpeg(overlay_heatmap(rgb, cam_arr[i]), quality=85)
    t_render = (time.perf_counter() - t0) / m
    floor = 1.0 / (t_model + t_decode)
    return {
        "n": len(paths), "batch_size": batch_size,
        "model_ms_per_image": round(t_model * 1e3, 3),
        "decode_ms_per_image": round(t_decode * 1e3, 3),
        "model_images_per_s": round(1.0 / t_model, 1),
        "decode_images_per_s": round(1.0 / t_decode, 1),
        "images_per_s": round(floor, 2),
        "cpu_ms_per_image": round((cpu_model + cpu_decode) * 1e3, 2),
        "extra_single_thread_ms_per_image": {"sha256": round(t_hash * 1e3, 3), "render": round(t_render * 1e3, 3)},
        "load_before": round(load_before, 2),
    }


def run_full_floor(cam: Any, meta: Any, paths: list[Path], batch_size: int, out_dir: Path) -> dict[str, Any]:
    """All the per-image work the product promises, batched in one process on every core.

    Per image: read, SHA-256, decode, resize to the model input, segmentation
    of the model input, the OOD quality features, the network + Grad-CAM
    (batched) with the OOD score and calibrated probabilities, where the map
    falls on the cell, the full-size overlay encoded as JPEG and written.
    No Ray, no Parquet, no second decode: what a hand-written program that
    does the same work would cost. Per-image CPU work runs on a thread per
    core (OpenCV and NumPy release the GIL), the model with TensorFlow's own
    threads, batch after batch.
    """
    import numpy as np

    from wbc_batch import metrics
    from wbc_batch.explain import overlay_heatmap
    from wbc_batch.geometry import model_input, view_at
    from wbc_batch.imaging import decode_image, encode_jpeg
    from wbc_batch.localisation import cam_on_mask
    from wbc_batch.ood import OodScorer, quality_features

    ncpu = os.cpu_count() or 1
    size = meta.image_size
    ood = OodScorer.from_metadata(meta) if meta.ood else None
    out_dir.mkdir(parents=True, exist_ok=True)

    def prepare(path: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        rgb = decode_image(data)
        seen = model_input(rgb, size)
        return sha, view_at(rgb, seen.zoom), seen.image, seen.cell_mask

    def finish(args: tuple[str, np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Any]:
        sha, rgb, cam_map, mask = args
        where = cam_on_mask(cam_map, mask)
        (out_dir / f"{sha}.jpg").write_bytes(encode_jpeg(overlay_heatmap(rgb, cam_map), quality=85))
        return where

    load_before = os.getloadavg()[0]
    n_done = 0
    with ThreadPoolExecutor(max_workers=ncpu) as pool:
        prepare(paths[0])
        cpu0 = _own_cpu()
        t0 = time.perf_counter()
        for s in range(0, len(paths), batch_size):
            prepared = list(pool.map(prepare, paths[s:s + batch_size]))
            x = np.stack([p[2] for p in prepared])
            masks = np.stack([p[3] for p in prepared])
            features = quality_features(x, masks)
            result = cam(x.astype(np.float32))
            metrics.softmax(result.logits, meta.temperature)
            if ood is not None:
                ood.score_features(result.embeddings, features)
            n_done += len(list(pool.map(finish, [(p[0], p[1], result.cams[i], p[3])
                                                 for i, p in enumerate(prepared)])))
        seconds = time.perf_counter() - t0
        cpu = _own_cpu() - cpu0
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"n": n_done, "batch_size": batch_size, "seconds": round(seconds, 3),
            "images_per_s": round(n_done / seconds, 2), "cpu_ms_per_image": round(cpu / n_done * 1e3, 2),
            "load_before": round(load_before, 2)}


# --- small runs: cold command-line runs against the one-at-a-time loop -------


def child_loop(args: argparse.Namespace) -> int:
    """Child entry: the notebook way from a cold process, timed; prints the result as JSON.

    Imports TensorFlow and tf-explain, loads the shipped model, then one image
    at a time: ``cv2.imread``, ``model.predict`` on it, tf-explain
    ``GradCAM.explain`` of the predicted class, ``cv2.imwrite`` of the
    overlay. No warm-up: the first image pays tf-explain's tracing, as the
    first run of a notebook cell does.
    """
    t_start = time.perf_counter()
    import cv2
    import numpy as np
    from tf_explain.core.grad_cam import GradCAM

    from wbc_batch.model import load_artifact

    t_import = time.perf_counter()
    artifact = load_artifact()
    model, meta = artifact.model, artifact.meta
    t_load = time.perf_counter()
    paths = [Path(p) for p in Path(args.input).read_text().split("\n") if p]
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    explainer = GradCAM()
    first = None
    for i, path in enumerate(paths):
        bgr = cv2.imread(str(path))
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        x = cv2.resize(rgb, (meta.image_size, meta.image_size), interpolation=cv2.INTER_AREA).astype(np.float32)[None]
        pred = int(np.argmax(model.predict(x, verbose=0)[0]))
        grid = explainer.explain((x, None), model, class_index=pred, layer_name=meta.gradcam_layer)
        cv2.imwrite(str(out_dir / f"{i:05d}_{path.stem}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        if first is None:
            first = time.perf_counter()
    t_end = time.perf_counter()
    out = {"n": len(paths), "import_s": round(t_import - t_start, 3), "model_load_s": round(t_load - t_import, 3),
           "first_image_s": round((first or t_end) - t_load, 3), "loop_s": round(t_end - t_load, 3),
           "in_process_s": round(t_end - t_start, 3)}
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


def _timed_child(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float, watch: Path | None = None,
                 cwd: Path = REPO) -> tuple[subprocess.CompletedProcess[str], float, float, float, float | None]:
    """Run a child, sampling its tree; (completed, wall s, CPU s of the tree, start time.time(), first file s).

    ``watch``: a folder whose first file's appearance (seconds after the
    start) is reported, polled every 0.1 s; None when nothing appeared.
    """
    import psutil

    del psutil  # TreeSampler imports it; fail here, before the child, when it is missing
    first_file: float | None = None
    wall0 = time.time()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(cwd), env=env)
        with TreeSampler(proc.pid, period=0.25) as sampler:
            deadline = t0 + timeout
            while proc.poll() is None:
                if watch is not None and first_file is None and watch.is_dir() and any(
                        f.is_file() for f in watch.rglob("*")):
                    first_file = time.perf_counter() - t0
                if time.perf_counter() > deadline:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"{cmd[:4]} ran past {timeout:.0f} s; log: {log_path}")
                time.sleep(0.1)
            stdout = proc.stdout.read() if proc.stdout is not None else ""
    wall = time.perf_counter() - t0
    completed = subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")
    return completed, wall, sampler.stats.cpu_seconds, wall0, first_file


# Each cold classify of the small runs: its label, which checkout ("this" or "compare") and its options. On Ray,
# ``--ray-address local`` so that it never joins another cluster on the machine; the compare tree keeps its own
# defaults (an earlier checkout may not know --runner).
SMALL_VARIANTS = (("in-process", "this", ("--runner", "in-process")),
                  ("ray", "this", ("--runner", "ray", "--ray-address", "local")),
                  ("compare", "compare", ("--ray-address", "local")))


def run_small_cli(manifest: Path, n: int, workdir: Path, tree: Path, label: str, timeout: float,
                  options: tuple[str, ...] = ()) -> dict[str, Any]:
    """One cold ``wbc-batch classify`` of ``manifest`` as a subprocess, with the code of ``tree``; times and phases.

    The command is what a person types (``python -m wbc_batch.cli classify
    INPUT OUTPUT`` plus ``options``), so it pays everything: Python imports,
    on Ray its start, the actor's start and its shutdown at exit, the work
    and the commit. The checkout (this one or ``--compare-tree``) is the
    working directory and ``PYTHONPATH`` (``python -m`` puts the working
    directory first on ``sys.path``); Ray's workers inherit both.
    """
    out_dir = workdir / f"small-{label}-{n}-{time.time_ns()}"
    run_id = f"small-{n}"
    cmd = [sys.executable, "-m", "wbc_batch.cli", "classify", str(manifest), str(out_dir), "--run-id", run_id,
           *options]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    load_before = os.getloadavg()[0]
    log_path = workdir / f"small-{label}-{n}.log"
    proc, wall, cpu, wall0, first_heatmap = _timed_child(cmd, env, log_path, timeout, watch=out_dir / "heatmaps",
                                                         cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"classify of {n} images ({label}) failed (exit {proc.returncode}); log {log_path}:\n"
                           f"{log_path.read_text()[-2000:]}")
    manifest_json = json.loads((out_dir / "runs" / f"{run_id}.json").read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    counts, timings = manifest_json["counts"], manifest_json["timings"]
    if counts["total"] != n or counts["ok"] != n:
        raise RuntimeError(f"classify of {n} images ({label}) gave {counts}")
    # run_classify's start on the child's clock: its started_at (UTC, microseconds) against the Popen time
    run_start = datetime.fromisoformat(manifest_json["started_at"]).timestamp() - wall0
    first_row = timings.get("first_row_seconds")
    faithfulness = manifest_json.get("faithfulness") or {}
    return {
        "n": n, "tree": label, "runner": manifest_json.get("resources", {}).get("runner", "ray"),
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "cpu_ms_per_image": round(cpu / n * 1e3, 1),
        "run_start_s": round(run_start, 2),  # process start to run_classify: Python imports
        "run_s": timings["seconds"],  # run_classify's start to the parts closed
        "first_row_s": None if first_row is None else round(run_start + first_row, 2),  # from the process start
        "first_heatmap_s": None if first_heatmap is None else round(first_heatmap, 2),
        "after_run_s": round(wall - run_start - timings["seconds"], 2),  # commit, summary, Ray's shutdown at exit
        "phases": timings.get("phases", {}),
        "faithfulness_images": faithfulness.get("n_images", 0),
        "faithfulness_sample_size": faithfulness.get("sample_size"),
        "load_before": round(load_before, 2),
    }


def run_small_loop(manifest: Path, n: int, workdir: Path, timeout: float) -> dict[str, Any]:
    """The one-at-a-time loop on the same images from a cold process (:func:`child_loop`)."""
    out_dir = workdir / f"loop-{n}-{time.time_ns()}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-loop", "--input", str(manifest),
           "--output", str(out_dir)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    load_before = os.getloadavg()[0]
    log_path = workdir / f"loop-{n}.log"
    proc, wall, cpu, _, first_file = _timed_child(cmd, env, log_path, timeout, watch=out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"loop of {n} images failed (exit {proc.returncode}); log {log_path}:\n"
                           f"{log_path.read_text()[-2000:]}")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    return {**res, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cpu_ms_per_image": round(cpu / n * 1e3, 1),
            "first_result_s": None if first_file is None else round(first_file, 2),
            "load_before": round(load_before, 2)}


def run_small(paths: list[Path], sizes: list[int], repeats: int, workdir: Path, compare: Path | None,
              timeout: float) -> dict[str, Any]:
    """The small-runs section: per repeat and size, the cold loop and a cold CLI run of each
    :data:`SMALL_VARIANTS` (the compare tree's only with ``compare``), their order alternated per repeat."""
    manifests = {n: build_manifest(paths, n, workdir) for n in sizes}
    trees = [(label, REPO if tree == "this" else compare, options) for label, tree, options in SMALL_VARIANTS
             if tree == "this" or compare is not None]
    runs: list[dict[str, Any]] = []
    loops: list[dict[str, Any]] = []
    for rep in range(repeats):
        order = trees if rep % 2 == 0 else trees[::-1]  # alternate which checkout goes first
        for n in sizes:
            loop = _again(lambda: run_small_loop(manifests[n], n, workdir, timeout))
            if loop is not None:
                loops.append(loop)
                print(f"[bench]   small loop {loop}", file=sys.stderr, flush=True)
            for label, tree, options in order:
                run = _again(lambda: run_small_cli(manifests[n], n, workdir, tree, label, timeout, options))
                if run is not None:
                    runs.append(run)
                    print(f"[bench]   small cli {run}", file=sys.stderr, flush=True)
    return {"sizes": sizes, "repeats": repeats, "compare_tree": str(compare) if compare else None,
            "compare_commit": _commit_of(compare) if compare else None, "this_commit": _commit_of(REPO),
            "runs": runs, "loops": loops}


def _again(measure: Any, attempts: int = 3) -> dict[str, Any] | None:
    """``measure()``, tried again when it fails (on a crowded machine Ray's node can time out starting up).

    The result records ``attempts``; a measurement that fails every time is
    reported on stderr and left out (None), so one bad minute does not lose
    the rest of the section.
    """
    for attempt in range(1, attempts + 1):
        try:
            return {**measure(), "attempts": attempt}
        except RuntimeError as exc:
            print(f"[bench]   attempt {attempt} failed: {str(exc)[:300]}", file=sys.stderr, flush=True)
    return None


def _commit_of(tree: Path) -> str:
    """The checkout's commit, with ``+dirty`` when its tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "diff", "--quiet", "HEAD", "--", "wbc_batch"],
                               timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


SMALL_LABELS = tuple(label for label, _, _ in SMALL_VARIANTS)
SMALL_PHASES = ("run_start_s", "verify_model_s", "listing_s", "ray_connect_s", "plan_s", "actor_process_s",
                "actor_start_s", "tensorflow_import_s", "model_load_s", "actor_ready_s", "first_model_batch_s",
                "model_s", "faithfulness_s", "stream_s", "commit_s", "after_run_s")


def small_markdown(small: dict[str, Any]) -> list[str]:
    """The "Small runs" section: each cold run beside the cold loop on the same images, then its phases."""
    def med(values: list[Any]) -> str:
        vals = [v for v in values if v is not None]
        return f"{statistics.median(vals):.1f}" if vals else "-"

    lines = ["## Small runs: cold `wbc-batch classify` against the one-at-a-time loop", "",
             f"Trees: this checkout `{small['this_commit']}`"
             + (f", compared with `{small['compare_tree']}` at `{small['compare_commit']}`" if small["compare_tree"]
                else "") + f"; {small['repeats']} repeat(s), medians (min..max in the JSON).", "",
             "| n | what | wall s | first row s | CPU s | CPU ms/image | faithfulness images | load avg before |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in small["sizes"]:
        loops = [r for r in small["loops"] if r["n"] == n]
        lines.append(f"| {n} | cold loop (process start to last image) | {med([r['wall_s'] for r in loops])} | "
                     f"{med([r['first_result_s'] for r in loops])} | {med([r['cpu_s'] for r in loops])} | "
                     f"{med([r['cpu_ms_per_image'] for r in loops])} | - | {med([r['load_before'] for r in loops])} |")
        lines.append(f"| {n} | loop alone (model loaded; first image's tracing in) | "
                     f"{med([r['loop_s'] for r in loops])} | {med([r['first_image_s'] for r in loops])} | - | - | - | - |")
        for label in SMALL_LABELS:
            runs = [r for r in small["runs"] if r["n"] == n and r["tree"] == label]
            if not runs:
                continue
            lines.append(f"| {n} | classify, {label} | {med([r['wall_s'] for r in runs])} | "
                         f"{med([r['first_row_s'] for r in runs])} | {med([r['cpu_s'] for r in runs])} | "
                         f"{med([r['cpu_ms_per_image'] for r in runs])} | "
                         f"{med([r['faithfulness_images'] for r in runs])} | {med([r['load_before'] for r in runs])} |")
    lines += ["", "Phases of the cold runs (seconds, medians; `timings.phases` of each manifest, `run_start_s` = "
              "process start to `run_classify`, `after_run_s` = from the parts closed to the process's exit):", ""]
    groups = [(n, label) for n in small["sizes"] for label in SMALL_LABELS
              if any(r["n"] == n and r["tree"] == label for r in small["runs"])]
    lines.append("| phase | " + " | ".join(f"{n} {label}" for n, label in groups) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in groups) + " |")
    for phase in SMALL_PHASES:
        cells = []
        for n, label in groups:
            runs = [r for r in small["runs"] if r["n"] == n and r["tree"] == label]
            cells.append(med([r.get(phase, r["phases"].get(phase)) for r in runs]))
        if any(c != "-" for c in cells):
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


# --- report -------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """nproc, memory and CPU model, as BENCHMARKS.md records them."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.strip("\n")
    return {"nproc": os.cpu_count(), "cpu_model": model or platform.processor(), "free_g": free,
            "python": platform.python_version(), "platform": platform.platform()}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Medians, spreads, ratios and scaling from the raw repeats."""
    base = [r["images_per_s"] for r in report["baseline"]]
    floor = [r["images_per_s"] for r in report["floor"]]
    full = [r["images_per_s"] for r in report["full_floor"]]
    summary: dict[str, Any] = {"baseline_images_per_s": _spread(base), "floor_images_per_s": _spread(floor),
                               "full_floor_images_per_s": _spread(full), "pipeline": {}}
    b_med, f_med, ff_med = statistics.median(base), statistics.median(floor), statistics.median(full)
    for n in report["sizes"]:
        runs = [r for r in report["pipeline"] if r["n"] == n]
        ips = [r["images_per_s"] for r in runs]
        med = statistics.median(ips)
        summary["pipeline"][str(n)] = {
            "images_per_s": _spread(ips),
            "seconds": _spread([r["seconds"] for r in runs]),
            "peak_rss_mb": _spread([r["peak_rss_mb"] for r in runs]),
            "tree_cpu_util": _spread([r["tree_cpu_util"] for r in runs]),
            "machine_busy": _spread([r["machine_busy"] for r in runs]),
            "vs_baseline": round(med / b_med, 2),
            "vs_floor": round(med / f_med, 3),
            "vs_full_floor": round(med / ff_med, 3),
            "first_row_s": _spread([r["first_row_s"] for r in runs]),
            "cpu_ms_per_image": _spread([r["cpu_ms_per_image"] for r in runs]),
            "cpu_vs_baseline": round(statistics.median(r["cpu_ms_per_image"] for r in report["baseline"])
                                     / statistics.median(r["cpu_ms_per_image"] for r in runs), 2),
            "cpu_vs_floor": round(statistics.median(r["cpu_ms_per_image"] for r in report["floor"])
                                  / statistics.median(r["cpu_ms_per_image"] for r in runs), 3),
        }
    sizes = report["sizes"]
    if len(sizes) >= 2:
        lo, hi = str(sizes[0]), str(sizes[-1])
        p = summary["pipeline"]
        dt = p[hi]["seconds"]["median"] - p[lo]["seconds"]["median"]
        summary["scaling"] = {
            "marginal_images_per_s": round((sizes[-1] - sizes[0]) / dt, 2) if dt > 0 else None,
            "time_ratio": round(p[hi]["seconds"]["median"] / p[lo]["seconds"]["median"], 2),
            "size_ratio": round(sizes[-1] / sizes[0], 2),
            "peak_rss_ratio": round(p[hi]["peak_rss_mb"]["median"] / p[lo]["peak_rss_mb"]["median"], 2),
            # CPU of the added images only: the fixed costs (worker start, model load) cancel out.
            "marginal_cpu_ms_per_image": round(
                (p[hi]["cpu_ms_per_image"]["median"] * sizes[-1] - p[lo]["cpu_ms_per_image"]["median"] * sizes[0])
                / (sizes[-1] - sizes[0]), 2),
        }
    return summary


def to_markdown(report: dict[str, Any]) -> str:
    """BENCHMARKS.md: machine, command, date, and the tables."""
    m = report["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Date: {report['date']}  ",
        f"Command: `{report['command']}`  ",
        f"Images: {report['images']['root']} ({report['images']['unique']} distinct files; "
        "sizes beyond that reuse them through symlinks)  ",
        f"Model: shipped `{report['model']['version']}` ({report['model']['image_size']} px input), "
        f"batch size {report['batch_size']}",
        "",
        "## Machine",
        "",
        f"- `nproc`: {m['nproc']}; CPU: {m['cpu_model']}; Python {m['python']}",
        "- `free -g`:",
        "",
        "```",
        m["free_g"],
        "```",
        "",
    ]
    if report["pipeline"]:
        lines += _large_markdown(report)
    if report.get("small"):
        lines += small_markdown(report["small"])
    if report.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def _large_markdown(report: dict[str, Any]) -> list[str]:
    """Throughput, scaling, CPU and memory of the pipeline against the loop and the floors."""
    m, s = report["machine"], report["summary"]
    fl = report["floor"][-1]
    lines = [
        "Other work on the machine disturbs wall-clock figures, so baseline, floor and pipeline are "
        f"interleaved per repeat ({report['repeats']} repeat(s)), the 1-minute load average before each "
        "measurement is recorded (the run itself raises it), the share of all cores busy with anything is "
        "set beside the pipeline's own CPU use, and figures are medians with min..max.",
        "",
        "## Throughput",
        "",
        "| what | images/s (median) | min..max | CPU ms/image | notes |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    b = s["baseline_images_per_s"]
    b_cpu = statistics.median(r["cpu_ms_per_image"] for r in report["baseline"])
    f_cpu = statistics.median(r["cpu_ms_per_image"] for r in report["floor"])
    lines.append(f"| seed-style baseline (n={report['baseline'][0]['n']}) | {b['median']:.2f} | "
                 f"{b['min']:.2f}..{b['max']:.2f} | {b_cpu:.0f} | cv2.imread, model.predict on 1 image, tf-explain GradCAM, "
                 "cv2.imwrite PNG |")
    f = s["floor_images_per_s"]
    lines.append(f"| floor (n={fl['n']}) | {f['median']:.2f} | {f['min']:.2f}..{f['max']:.2f} | {f_cpu:.0f} | "
                 f"model {fl['model_ms_per_image']:.2f} ms/img + decode {fl['decode_ms_per_image']:.2f} ms/img "
                 f"({m['nproc']} threads) |")
    ff = s["full_floor_images_per_s"]
    ff_cpu = statistics.median(r["cpu_ms_per_image"] for r in report["full_floor"])
    lines.append(f"| full floor (n={report['full_floor'][-1]['n']}) | {ff['median']:.2f} | {ff['min']:.2f}..{ff['max']:.2f} "
                 f"| {ff_cpu:.0f} | every per-image step the product promises, batched in one process "
                 f"({m['nproc']} threads) |")
    for n, p in s["pipeline"].items():
        ips = p["images_per_s"]
        lines.append(f"| pipeline n={n} | {ips['median']:.2f} | {ips['min']:.2f}..{ips['max']:.2f} | "
                     f"{p['cpu_ms_per_image']['median']:.0f} | {p['vs_baseline']:.1f}x baseline, "
                     f"{100 * p['vs_full_floor']:.0f}% of full floor, {100 * p['vs_floor']:.0f}% of floor; "
                     f"first row after {p['first_row_s']['median']:.1f} s; by CPU time "
                     f"{p['cpu_vs_baseline']:.1f}x baseline, {100 * p['cpu_vs_floor']:.0f}% of floor |")
    lines += [
        "",
        "Pipeline images/s run from the start of `run_classify` (listing the manifest) to the committed "
        "manifest, on a Ray started just before (its start time is in the table below, not in the rate). "
        "The floor is 1 / (batched CNN + Grad-CAM per image + decode per image); the pipeline also hashes "
        "each file, decodes it again at full size, computes localisation, renders and writes the heatmap "
        f"JPEG and the Parquet rows: single-threaded that extra is "
        f"{fl['extra_single_thread_ms_per_image']['render']:.2f} ms/image for rendering and "
        f"{fl['extra_single_thread_ms_per_image']['sha256']:.3f} ms/image for hashing. "
        "The full floor does all of that per-image work (read, SHA-256, decode, resize, segmentation, "
        "quality features, network + Grad-CAM + OOD score, where the map falls on the cell, overlay, JPEG "
        "encode and write) batched in one process without Ray: the honest yardstick for the pipeline.",
        "",
        "CPU ms/image (CPU seconds of every thread and process involved, per image) is the figure that "
        "contention disturbs least: wall-clock rates depend on how much of the shared machine each "
        "measurement got, CPU time mostly on the work done. The pipeline's CPU time includes its fixed "
        "costs (Ray workers starting, the model loading in the actor), which weigh on small sizes.",
        "",
        "## Pipeline: scaling, CPU and memory",
        "",
        "| n | seconds | images/s | CPU ms/image | Ray start s | first row s | tree CPU util | machine busy "
        "| peak RSS of Ray tree MB | Parquet files | load avg before |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["pipeline"]:
        lines.append(f"| {r['n']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {r['cpu_ms_per_image']:.0f} | "
                     f"{r['ray_start_s']:.1f} | {r['first_row_s']:.1f} | "
                     f"{100 * r['tree_cpu_util']:.0f}% | {100 * r['machine_busy']:.0f}% | {r['peak_rss_mb']:.0f} | "
                     f"{r['parquet_files']} | {r['load_before']:.1f} |")
    if "scaling" in s:
        sc = s["scaling"]
        lines += ["", f"Scaling {report['sizes'][0]} -> {report['sizes'][-1]} images ({sc['size_ratio']}x): time "
                  f"x{sc['time_ratio']}, peak RSS x{sc['peak_rss_ratio']}; marginal rate "
                  f"{sc['marginal_images_per_s']} images/s and marginal CPU {sc['marginal_cpu_ms_per_image']} ms/image "
                  "(fixed costs such as worker start and model load cancel out)."]
    lines += [
        "",
        "First row s = from the start of `run_classify` to the first classified rows at the driver "
        "(listing, Ray connection, actor start with TensorFlow import and model load, the first batches "
        "through read, model and render); a command-line run also pays Python imports and Ray's start "
        "before it.",
        "",
        "Tree CPU util = CPU seconds of the pipeline's process tree / (wall x nproc). Machine busy = share of "
        "all cores busy with anything, other engineers' work included. Peak RSS sums every process of the "
        "tree (driver, GCS, raylet, workers), sampled every 0.5 s; shared pages count once per process, so "
        "it is an upper bound.",
        "",
    ]
    return lines


KEEP_MARKER = "<!-- Written by hand below this line; bench/run.py keeps it when it rewrites the tables. -->"


def kept_analysis(out: Path) -> str:
    """The hand-written part of an existing report (levers tried, conclusions), so a rerun keeps it."""
    if not out.is_file():
        return ""
    text = out.read_text()
    at = text.find(KEEP_MARKER)
    return "\n" + text[at:] if at >= 0 else ""


# --- main ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,2500,10000", help="comma-separated pipeline input sizes")
    p.add_argument("--baseline-n", type=int, default=50, help="images for the one-at-a-time baseline")
    p.add_argument("--floor-n", type=int, default=512, help="images for the floor measurement")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of baseline, floor and pipeline")
    p.add_argument("--batch-size", type=int, default=None, help="pipeline and floor batch size (default: classify's)")
    p.add_argument("--workers", type=int, default=None, help="pipeline model actors (default: classify's plan)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="pipeline CPUs per actor")
    p.add_argument("--data", type=Path, default=None, help=f"image folder (default {SHARED_DATA}, else samples)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new /tmp folder)")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="Markdown report to write")
    p.add_argument("--json", type=Path, default=None, help="also write the raw report as JSON here")
    p.add_argument("--note", action="append", default=[], help="a line for the report's Notes section")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per pipeline run")
    p.add_argument("--small-sizes", default="16,64,256",
                   help="comma-separated sizes of the small-runs section (cold CLI runs against the cold loop); "
                        "'' skips it")
    p.add_argument("--compare-tree", type=Path, default=None,
                   help="another checkout (a git worktree) whose classify the small runs also time, alternated")
    # child mode (internal)
    p.add_argument("--child-pipeline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--ray-temp", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the report; returns the exit status."""
    args = parse_args(argv)
    if args.batch_size is None:
        from wbc_batch.pipeline import ClassifyConfig

        args.batch_size = ClassifyConfig(input_uri="", output_uri="").batch_size
    if args.child_pipeline:
        return child_pipeline(args)
    if args.child_loop:
        return child_loop(args)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    small_sizes = [int(s) for s in args.small_sizes.split(",") if s.strip()]
    if (not sizes and not small_sizes) or min(sizes + small_sizes) < 1 or args.baseline_n < 1 or args.floor_n < 1 \
            or args.repeats < 1:
        print("error: sizes (or --small-sizes), --baseline-n, --floor-n and --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.compare_tree is not None and not (args.compare_tree / "wbc_batch" / "cli.py").is_file():
        print(f"error: --compare-tree {args.compare_tree} is not a checkout of this project", file=sys.stderr)
        return 2
    root, paths = find_images(args.data)
    paths = interleave_classes(paths)
    own_workdir = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wbc-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from wbc_batch.model import verify_artifact

    meta = verify_artifact(None).meta
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "images": {"root": str(root), "unique": len(paths)},
        "model": {"version": meta.version, "image_size": meta.image_size},
        "batch_size": args.batch_size, "sizes": sizes, "repeats": args.repeats,
        "baseline": [], "floor": [], "full_floor": [], "pipeline": [], "notes": list(args.note),
    }
    try:
        if small_sizes:  # first: cold processes only, before this process holds a model and its threads
            print(f"[bench] small runs {small_sizes}", file=sys.stderr, flush=True)
            report["small"] = run_small(paths, small_sizes, args.repeats, workdir, args.compare_tree, args.timeout)
        if sizes:
            run_large(args, report, paths, sizes, workdir)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if sizes:
        report["summary"] = summarise(report)
    args.out.write_text(to_markdown(report) + kept_analysis(args.out))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report.get("summary", report.get("small")), indent=2))
    return 0


def run_large(args: argparse.Namespace, report: dict[str, Any], paths: list[Path], sizes: list[int],
              workdir: Path) -> None:
    """Baseline, floor, full floor and the pipeline at ``sizes``, interleaved per repeat, into ``report``."""
    from wbc_batch.explain import GradCam
    from wbc_batch.model import load_artifact

    artifact = load_artifact()
    meta = artifact.meta
    cam = GradCam(artifact.model, meta.gradcam_layer, meta.embedding_layer)
    manifests = {n: build_manifest(paths, n, workdir) for n in sizes}
    for rep in range(args.repeats):
        print(f"[bench] repeat {rep + 1}/{args.repeats}: baseline n={args.baseline_n}", file=sys.stderr, flush=True)
        report["baseline"].append(run_baseline(artifact.model, meta.gradcam_layer, meta.image_size,
                                               paths[: args.baseline_n], workdir / "baseline"))
        print(f"[bench]   {report['baseline'][-1]}", file=sys.stderr, flush=True)
        report["floor"].append(run_floor(cam, meta.image_size, paths[: args.floor_n], args.batch_size))
        print(f"[bench]   floor {report['floor'][-1]}", file=sys.stderr, flush=True)
        report["full_floor"].append(run_full_floor(cam, meta, paths[: args.floor_n], args.batch_size,
                                                   workdir / "full-floor"))
        print(f"[bench]   full floor {report['full_floor'][-1]}", file=sys.stderr, flush=True)
        for n in sizes:
            r = run_pipeline(manifests[n], n, workdir, args.batch_size, args.workers, args.cpus_per_worker,
                             args.timeout)
            report["pipeline"].append(r)
            print(f"[bench]   pipeline {r}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
