"""Where a run's stages run: on Ray (read tasks, model actors, render tasks) or in the driver's own process.

A cold run on a local Ray pays about 8 s before its first batch (Ray's start,
the actor's worker, TensorFlow's import there; BENCHMARKS.md, "Small runs"),
whatever its size: up to a few hundred images that is most of the run, and
the one-at-a-time loop the product replaces was faster. The same three stages
(``pipeline.load_images``, ``pipeline.BatchClassifier``,
``pipeline.render_explanations``, one recipe for both runners) then run in
this process instead: reading the next batch and rendering the last one in
two threads while the model works on the current one, so that the stages
overlap as they do on Ray. Every row, heatmap, OOD flag and faithfulness
record is the same; what a run in-process has not is Ray's fault tolerance
(a model actor killed mid-run is restarted on Ray) and more than one machine.

``--runner auto`` (the default) picks the driver's process only where Ray has
nothing to add: a run of at most :data:`IN_PROCESS_MAX_IMAGES` images, no
cluster given or running (``--ray-address``, ``RAY_ADDRESS``, a head from
``ray start``; ``--ray-address local`` asks for Ray), no actor sizing asked for
(``--workers``, ``--gpus-per-worker``, ``--cpus-per-worker``) and no Ray already
initialised in the process (a notebook, a test, a job driver). The manifest
records the runner and why (``resources.runner``, ``resources.runner_reason``).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from wbc_batch import cluster, console

RUNNERS = ("auto", "ray", "in-process")
# The largest run ``auto`` keeps in-process (BENCHMARKS.md, "Small runs in-process"). On 2 cores a cold local
# Ray costs about 9 s more whatever the size (512 images: 12.0 s in-process, 21.4 s on Ray), over 40% of a run
# up to here; beyond it the run stays on Ray for what Ray adds: a killed actor restarted and its batch retried,
# a cluster's nodes and GPUs, read and render tasks on more cores than two threads.
IN_PROCESS_MAX_IMAGES = 512
PREFETCH_BATCHES = 2  # batches read ahead of the model, and rendered behind it, at most

Batch = dict[str, Any]


@dataclass(frozen=True)
class RunnerChoice:
    """The runner of a run (``ray`` or ``in-process``), why, and the cluster chosen when it is Ray."""

    name: str
    reason: str
    cluster: cluster.ClusterChoice | None = None


def _ray_initialised() -> bool:
    """True when this process already runs Ray (without importing Ray to find out)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def check_runner(runner: str) -> None:
    """Raise ValueError unless ``runner`` is one of :data:`RUNNERS`."""
    if runner not in RUNNERS:
        raise ValueError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")


def _options_given(sizing: dict[str, Any]) -> list[str]:
    """The actor options of ``sizing`` that were given, as their command-line names."""
    return [f"--{name.replace('_', '-')}" for name, value in sizing.items() if value is not None]


def _ray_asked_for(runner: str, ray_address: str | None, sizing: dict[str, Any], n_images: int) -> str | None:
    """Why a run must use Ray whatever the cluster, or None."""
    if runner == "ray":
        return "--runner ray"
    asked = _options_given(sizing)
    if asked:
        return f"{', '.join(asked)} size Ray's model actors"
    if n_images > IN_PROCESS_MAX_IMAGES:
        return f"{n_images} images, more than the {IN_PROCESS_MAX_IMAGES} a run keeps in-process"
    if _ray_initialised():
        return "Ray is already initialised in this process"
    if "local" in (ray_address, os.environ.get("RAY_ADDRESS")):
        return "a private local Ray asked for (--ray-address local or RAY_ADDRESS=local)"
    return None


def choose_runner(runner: str, ray_address: str | None, sizing: dict[str, Any], n_images: int) -> RunnerChoice:
    """Decide where a run of ``n_images`` runs (see the module docstring).

    ``sizing`` holds the actor options as given (None: left out). The
    cluster is chosen (and probed) only once, here, when it matters.

    Raises:
        ValueError: ``--runner in-process`` with a cluster address or actor sizing.
        cluster.ClusterUnreachableError: a cluster was named and does not answer.
    """
    check_runner(runner)
    if runner == "in-process":
        conflicts = _options_given(sizing)
        if ray_address:
            conflicts.insert(0, "--ray-address")
        if conflicts:
            raise ValueError(f"--runner in-process runs without Ray; {', '.join(conflicts)} "
                             f"{'does' if len(conflicts) == 1 else 'do'} not apply")
        return RunnerChoice("in-process", "--runner in-process")
    why = _ray_asked_for(runner, ray_address, sizing, n_images)
    if why is not None:
        return RunnerChoice("ray", why, None if _ray_initialised() else cluster.choose(ray_address))
    chosen = cluster.choose(ray_address)
    if chosen.address is not None:
        return RunnerChoice("ray", f"a Ray cluster at {chosen.address} ({chosen.source})", chosen)
    return RunnerChoice("in-process", f"{n_images} images (at most {IN_PROCESS_MAX_IMAGES}) and no Ray cluster "
                                      "given or running")


def _batches(items: list[Batch], batch_size: int) -> Iterator[list[Batch]]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def stream_in_process(items: list[Batch], batch_size: int, load: Callable[[Batch], Batch],
                      model: Callable[[Batch], Batch], render: Callable[[Batch], Batch],
                      columns: Callable[[list[Batch]], Batch], on_batch: Callable[[Batch], None],
                      quiet: bool) -> float | None:
    """Run ``load -> model -> render`` over ``items`` in this process and feed each result to ``on_batch``
    in order; the ``perf_counter`` of the first one (None for no items).

    ``columns`` turns a list of row dicts into a column batch (the shape Ray
    Data hands the stages). One thread reads ahead, one renders behind, at
    most :data:`PREFETCH_BATCHES` each: TensorFlow, OpenCV and storage I/O
    release the GIL, so the three stages share the cores as Ray's tasks and
    actor do. An exception in any stage ends the run with it.
    """
    progress = console.Progress(len(items)) if quiet else None
    first: float | None = None
    pending = _batches(items, batch_size)
    loads: deque[Future[Batch]] = deque()
    renders: deque[Future[Batch]] = deque()

    def emit(batch: Batch) -> None:
        nonlocal first
        if first is None:
            first = time.perf_counter()
        on_batch(batch)
        if progress is not None:
            progress.update(len(batch["image_uri"]))

    def read_ahead(pool: ThreadPoolExecutor) -> None:
        while len(loads) < PREFETCH_BATCHES:
            chunk = next(pending, None)
            if chunk is None:
                return
            loads.append(pool.submit(load, columns(chunk)))

    try:
        with ThreadPoolExecutor(1, "wbc-read") as reader, ThreadPoolExecutor(1, "wbc-render") as renderer:
            try:
                read_ahead(reader)
                while loads:
                    loaded = loads.popleft().result()
                    read_ahead(reader)
                    renders.append(renderer.submit(render, model(loaded)))
                    while renders and (renders[0].done() or len(renders) > PREFETCH_BATCHES):
                        emit(renders.popleft().result())
                while renders:
                    emit(renders.popleft().result())
            except BaseException:
                for future in (*loads, *renders):  # queued work is dropped, not waited for
                    future.cancel()
                raise
    finally:
        if progress is not None:
            progress.close()
    return first
