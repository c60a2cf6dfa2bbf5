"""Where a run's stages run (wbc_batch/runner.py): the choice, the in-process stream, and the same rows either way."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.results_factory import read_rows
from wbc_batch import cluster, runner
from wbc_batch.cluster import ClusterUnreachableError
from wbc_batch.runner import IN_PROCESS_MAX_IMAGES, choose_runner, stream_in_process

REPO = Path(__file__).resolve().parents[1]
NO_SIZING = {"workers": None, "gpus_per_worker": None, "cpus_per_worker": None}


@pytest.fixture()
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cluster given or recorded on this machine, and no Ray in this process."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "_recorded_head", lambda: (None, "ray_current_cluster"))
    monkeypatch.setattr(runner, "_ray_initialised", lambda: False)


@pytest.fixture()
def listening() -> Any:
    """An address where something accepts TCP connections (a head that answers the probe: the kernel
    completes the connect of a listening socket)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_auto_runs_a_small_run_without_a_cluster_in_process(no_cluster: None) -> None:
    choice = choose_runner("auto", None, NO_SIZING, 64)
    assert choice.name == "in-process" and choice.cluster is None
    assert choice.reason == f"64 images (at most {IN_PROCESS_MAX_IMAGES}) and no Ray cluster given or running"
    assert choose_runner("auto", None, NO_SIZING, IN_PROCESS_MAX_IMAGES).name == "in-process"


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"runner": "ray"}, "--runner ray"),
    ({"n_images": IN_PROCESS_MAX_IMAGES + 1},
     f"{IN_PROCESS_MAX_IMAGES + 1} images, more than the {IN_PROCESS_MAX_IMAGES} a run keeps in-process"),
    ({"sizing": {**NO_SIZING, "workers": 2}}, "--workers size Ray's model actors"),
    ({"sizing": {**NO_SIZING, "gpus_per_worker": 1.0, "cpus_per_worker": 2.0}},
     "--gpus-per-worker, --cpus-per-worker size Ray's model actors"),
    ({"ray_address": "local"}, "a private local Ray asked for (--ray-address local or RAY_ADDRESS=local)"),
])
def test_auto_uses_ray_when_asked_or_too_big(no_cluster: None, kwargs: dict[str, Any], reason: str) -> None:
    args = {"runner": "auto", "ray_address": None, "sizing": NO_SIZING, "n_images": 64, **kwargs}
    choice = choose_runner(**args)
    assert (choice.name, choice.reason) == ("ray", reason)
    assert choice.cluster is not None and choice.cluster.address is None  # a new local Ray


def test_a_cluster_given_or_running_takes_the_run(no_cluster: None, listening: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    given = choose_runner("auto", listening, NO_SIZING, 8)
    assert (given.name, given.reason) == ("ray", f"a Ray cluster at {listening} (--ray-address)")
    assert given.cluster == cluster.ClusterChoice(listening, "--ray-address")  # probed once, handed to connect
    monkeypatch.setattr(cluster, "_recorded_head", lambda: (listening, "ray_current_cluster"))
    recorded = choose_runner("auto", None, NO_SIZING, 8)
    assert (recorded.name, recorded.reason) == ("ray", f"a Ray cluster at {listening} (ray start)")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert choose_runner("auto", None, NO_SIZING, 8).reason.startswith("a private local Ray")


def test_a_cluster_that_does_not_answer_is_still_exit_5(no_cluster: None) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterUnreachableError, match=f"127.0.0.1:{port} \\(from --ray-address\\) did not answer"):
        choose_runner("auto", f"127.0.0.1:{port}", NO_SIZING, 8)


def test_in_process_refuses_ray_options() -> None:
    assert choose_runner("in-process", None, NO_SIZING, 10_000).name == "in-process"  # any size when asked
    with pytest.raises(ValueError, match="--runner in-process runs without Ray; --ray-address does not apply"):
        choose_runner("in-process", "127.0.0.1:6379", NO_SIZING, 8)
    with pytest.raises(ValueError, match="--workers, --cpus-per-worker do not apply"):
        choose_runner("in-process", None, {**NO_SIZING, "workers": 2, "cpus_per_worker": 1.0}, 8)
    with pytest.raises(ValueError, match="--runner must be one of auto, ray, in-process, got 'spark'"):
        choose_runner("spark", None, NO_SIZING, 8)


def test_ray_already_running_in_the_process_keeps_the_run_on_it(ray_local: None) -> None:
    choice = choose_runner("auto", None, NO_SIZING, 8)
    assert (choice.name, choice.reason, choice.cluster) == ("ray", "Ray is already initialised in this process", None)


# --- the in-process stream ----------------------------------------------------------------


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_stream_runs_every_stage_once_per_batch_and_keeps_the_order() -> None:
    items = [{"image_uri": f"u{i:02d}"} for i in range(23)]
    seen: dict[str, list[int]] = {"load": [], "model": [], "render": []}

    def stage(name: str) -> Any:
        def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen[name].append(len(batch["image_uri"]))
            return {**batch, name: np.full(len(batch["image_uri"]), threading.current_thread().name, dtype=object)}
        return run

    out: list[dict[str, np.ndarray]] = []
    first = stream_in_process(items, 5, stage("load"), stage("model"), stage("render"), _columns, out.append,
                              quiet=False)
    assert first is not None
    assert [u for b in out for u in b["image_uri"]] == [r["image_uri"] for r in items]
    assert seen == {"load": [5, 5, 5, 5, 3], "model": [5, 5, 5, 5, 3], "render": [5, 5, 5, 5, 3]}
    # reading and rendering run beside the model, in their own threads
    assert {t for b in out for t in b["load"]} == {"wbc-read_0"}
    assert {t for b in out for t in b["render"]} == {"wbc-render_0"}
    assert {t for b in out for t in b["model"]} == {threading.current_thread().name}
    assert stream_in_process([], 5, stage("load"), stage("model"), stage("render"), _columns, out.append,
                             quiet=False) is None


@pytest.mark.parametrize("failing", ["load", "model", "render"])
def test_a_stage_that_raises_ends_the_stream_with_its_error(failing: str) -> None:
    items = [{"image_uri": f"u{i}"} for i in range(40)]
    calls: list[str] = []

    def stage(name: str) -> Any:
        def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            calls.append(name)
            if name == failing and calls.count(name) == 2:
                raise RuntimeError(f"{name} broke")
            return batch
        return run

    out: list[Any] = []
    with pytest.raises(RuntimeError, match=f"{failing} broke"):
        stream_in_process(items, 4, stage("load"), stage("model"), stage("render"), _columns, out.append,
                          quiet=False)
    assert calls.count("load") < 10, "the batches still queued were dropped, not read"
    assert len(out) <= 1


# --- the same rows either way ---------------------------------------------------------------


def _run(small_input: Path, out: Path, runner_name: str) -> tuple[dict[str, Any], pd.DataFrame]:
    from wbc_batch.pipeline import ClassifyConfig, run_classify

    manifest = run_classify(ClassifyConfig(input_uri=str(small_input), output_uri=str(out), batch_size=4,
                                           run_id=f"same-{runner_name}", runner=runner_name,
                                           faithfulness_sample=2))
    return manifest, read_rows(str(out)).sort_values("image_uri").reset_index(drop=True)


def test_in_process_and_ray_give_the_same_rows_heatmaps_and_faithfulness(ray_local: None, small_input: Path,
                                                                          tmp_path: Path) -> None:
    (small_input / "slide-B" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    here, rows_here = _run(small_input, tmp_path / "here", "in-process")
    on_ray, rows_ray = _run(small_input, tmp_path / "ray", "ray")
    assert here["resources"]["runner"] == "in-process" and on_ray["resources"]["runner"] == "ray"
    assert here["resources"]["runner_reason"] == "--runner in-process"
    assert len(rows_here) == 13 and list(rows_here.image_uri) == list(rows_ray.image_uri)
    assert list(rows_here.columns) == list(rows_ray.columns)
    differ_by_run = {"run_id", "processed_at", "heatmap_uri"}  # the run's id and time; OUTPUT differs
    for column in rows_here.columns.difference(sorted(differ_by_run)):
        here_col, ray_col = rows_here[column], rows_ray[column]
        if here_col.dtype.kind == "f":
            np.testing.assert_allclose(here_col, ray_col, atol=1e-4, err_msg=column)
        else:
            assert here_col.tolist() == ray_col.tolist(), column
    assert {"predicted_class", "confidence", "ood_score", "cam_in_cell", "needs_review"} <= set(rows_here.columns)
    ok = rows_here.status == "ok"
    assert ok.sum() == 12 and rows_here.loc[~ok, "error_kind"].tolist() == ["permanent"]
    for uri in rows_here.loc[ok, "heatmap_uri"]:
        assert Path(uri).is_file() and Path(uri).read_bytes()[:2] == b"\xff\xd8"
    assert here["counts"] == on_ray["counts"] and here["domain_shift"] == on_ray["domain_shift"]
    f_here, f_ray = here["faithfulness"], on_ray["faithfulness"]
    assert f_here["image_uris"] == f_ray["image_uris"] and f_here["n_images"] == 2 == f_ray["n_images"]
    assert json.dumps(f_here, sort_keys=True) == json.dumps(f_ray, sort_keys=True)
    assert "ray_connect_s" not in here["timings"]["phases"] and "actor_process_s" not in here["timings"]["phases"]
    assert {"tensorflow_import_s", "model_load_s", "first_model_batch_s", "stream_s"} <= set(here["timings"]["phases"])


def test_a_cold_small_cli_run_starts_no_ray_and_says_so(small_input: Path, tmp_path: Path) -> None:
    """`wbc-batch classify` as a newcomer types it: no cluster on the machine, a handful of images."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(tmp_path / "ray-tmp"), "TMPDIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "wbc_batch.cli", "classify", str(small_input), str(out),
                           "--run-id", "cold"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("run cold: 12 images, 12 ok, 0 errors")
    assert f"ran in-process: 12 images (at most {IN_PROCESS_MAX_IMAGES}) and no Ray cluster" in proc.stdout
    manifest = json.loads((out / "runs" / "cold.json").read_text())
    assert manifest["resources"]["runner"] == "in-process"
    assert manifest["resources"]["runner_reason"] == (f"12 images (at most {IN_PROCESS_MAX_IMAGES}) and no Ray "
                                                      "cluster given or running")
    assert manifest["faithfulness"]["sample_size"] == 1 and len(list((out / "heatmaps").rglob("*.jpg"))) >= 1
    assert not (tmp_path / "ray-tmp").exists() and not list(tmp_path.glob("ray*")), "no Ray session was started"
    assert "Traceback" not in proc.stderr
