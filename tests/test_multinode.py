"""Classify on a cluster of three raylets on one machine, with a worker node killed mid-run.

``ray.cluster_utils.Cluster`` cannot start actor pools for an outside driver on these machines, so the
cluster is real: ``ray start --head`` plus two ``ray start --address``, each with ``--block`` in its own
process group, with the cluster's own temp dir and ports (never the machine's default cluster, whose
record in /tmp/ray is left alone). Only those process groups, and what they started, are ended, on
failure too; plain ``ray stop`` would end every Ray on the machine and is never run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.processes import cmdline, descendants, end_process_group, free_port
from wbc_batch import cluster

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
ACTOR = "MapBatches(BatchClassifier)"


def _node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """One raylet: a blocking ``ray start`` of 1 CPU with ports of its own, in its own process group."""
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=1",
                             "--object-store-memory=100000000", *ports, *args], env=env, cwd=REPO,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _actor_node(nodes: list[subprocess.Popen]) -> tuple[int | None, bool]:  # type: ignore[type-arg]
    """Index of the node whose processes include the model actor, and whether it is running a batch."""
    for i, node in enumerate(nodes):
        titles = [cmdline(pid) for pid in descendants(node.pid)]
        actors = [t for t in titles if ACTOR in t]
        if actors:
            return i, any("submit" in t for t in actors)
    return None, False


def test_worker_node_killed_mid_run_still_one_row_per_image(tmp_path: Path, samples_dir: Path) -> None:
    import pyarrow.parquet as pq

    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    # Ray 2.60 turns on token authentication when ~/.ray/auth_token exists; every process then needs the mode
    env.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", RAY_AUTH_MODE="token")
    inp, out = tmp_path / "in", tmp_path / "out"
    for i, f in enumerate(sorted(samples_dir.rglob("*.jpg"))):  # 64 images, 16 batches: the kill comes at the first
        (inp / f"slide-{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, inp / f"slide-{i % 2}" / f"{f.parent.name}-{f.name}")
    images = sorted(str(p) for p in inp.rglob("*.jpg"))
    procs: list[subprocess.Popen] = []  # type: ignore[type-arg]
    t0 = time.monotonic()
    try:
        procs.append(_node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
                            f"--ray-client-server-port={free_port()}"], env, tmp_path / "head.log"))
        deadline = time.monotonic() + 120
        while not cluster.answers(address, 1.0):
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(0.5)
        for i in (1, 2):  # one at a time: a raylet has 30 s to register with the GCS
            procs.append(_node([f"--address={address}"], env, tmp_path / f"worker{i}.log"))
            status = ""
            while status.count(" node_") < i + 1:
                assert time.monotonic() < deadline and procs[i].poll() is None, (
                    f"worker node {i} did not join: {(tmp_path / f'worker{i}.log').read_text()[-2000:]}")
                time.sleep(1)
                status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True,
                                        text=True, timeout=60).stdout
        nodes = list(procs)
        driver = subprocess.Popen(
            [sys.executable, "-m", "wbc_batch.cli", "classify", str(inp), str(out), "--ray-address", address,
             "--run-id", "multinode-1", "--batch-size", "4", "--no-heatmaps", "--faithfulness-sample", "0"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(driver)
        # Kill a worker node once the model actor runs batches: the one hosting the actor when it is on a
        # worker (the actor and its batch must be restarted elsewhere), else worker 1 (its read tasks).
        killed, first_seen = None, None
        deadline = time.monotonic() + 300
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            where, busy = _actor_node(nodes)
            if where is not None:
                first_seen = first_seen or time.monotonic()
                if busy or time.monotonic() - first_seen > 15:
                    killed = where if where != 0 else 1
                    end_process_group(nodes[killed])
                    print(f"killed worker node {killed} (actor on node {where}, busy={busy}) "
                          f"{time.monotonic() - t0:.0f}s in")
            time.sleep(0.2)
        assert killed is not None, f"the run ended or stalled before the kill: {driver.poll()}"
        try:
            stdout, stderr = driver.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True,
                                    text=True, timeout=60).stdout
            raise AssertionError(f"classify still running 300 s after the kill; ray status:\n{status}") from None
        print(f"classify finished {time.monotonic() - t0:.0f}s in")
        assert driver.returncode == 0, stderr[-3000:]
        assert "the Ray cluster has 3 nodes and INPUT and OUTPUT are local paths" in stderr
        rows = pq.read_table(out / "predictions").to_pylist()
        assert Counter(r["image_uri"] for r in rows) == Counter(images), "exactly one row per image"
        assert all(r["status"] == "ok" for r in rows)
        manifest = json.loads((out / "runs" / "multinode-1.json").read_text())
        assert manifest["status"] == "succeeded" and manifest["counts"]["total"] == len(images)
    finally:
        for proc in reversed(procs):
            end_process_group(proc)
        for logs in Path(temp).glob("session_2*/logs"):  # kept beside the test's other files for a post-mortem
            shutil.copytree(logs, tmp_path / "ray-logs", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize(("nodes", "options", "expected"), [
    ([(1.0, 0.0)] * 3, {}, (1, 0.0, 0.5)),  # sized from the cluster's 3 CPUs it asked 2.5 and waited forever
    ([(2.0, 0.0)] * 2, {}, (1, 0.0, 1.5)),
    ([(4.0, 0.0)], {}, (1, 0.0, 3.5)),  # one node: as before
    ([(4.0, 1.0), (4.0, 1.0)], {}, (2, 1.0, 1.0)),
    ([(4.0, 1.0), (4.0, 0.0)], {"gpus_per_worker": 0.6}, (1, 0.6, 1.0)),  # 0.6 of each GPU: one actor fits
])
def test_actor_is_sized_to_fit_a_node(monkeypatch: pytest.MonkeyPatch, nodes: list[tuple[float, float]],
                                      options: dict[str, float], expected: tuple[int, float, float]) -> None:
    import ray

    from wbc_batch.pipeline import ClassifyConfig, _plan_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": sum(c for c, _ in nodes),
                                                           "GPU": sum(g for _, g in nodes)})
    monkeypatch.setattr(cluster, "node_resources", lambda: nodes)
    assert _plan_resources(ClassifyConfig("in", "out", **options)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [{"cpus_per_worker": 2.0}, {"gpus_per_worker": 1.0, "cpus_per_worker": 1.5}])
def test_an_actor_no_node_can_hold_fails_at_once(monkeypatch: pytest.MonkeyPatch, options: dict[str, float]) -> None:
    import ray

    from wbc_batch.pipeline import ClassifyConfig, _plan_resources

    nodes = [(1.0, 1.0), (2.0, 0.0)]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0, "GPU": 1.0})
    monkeypatch.setattr(cluster, "node_resources", lambda: nodes)
    with pytest.raises(ValueError, match="no node of the Ray cluster has that much"):
        _plan_resources(ClassifyConfig("in", "out", **options))  # type: ignore[arg-type]
