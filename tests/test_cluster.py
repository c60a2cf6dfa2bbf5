"""Which Ray cluster a run joins, and failing fast (never hanging) when that cluster is gone."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import end_process_group, free_port
from wbc_batch import cluster
from wbc_batch.cli import EXIT_CLUSTER

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def listening() -> str:
    """host:port of a socket that accepts connections, standing in for a live head."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.mark.parametrize("source", ["RAY_ADDRESS", "--ray-address"])
def test_a_given_address_that_does_not_answer_fails_fast_and_names_it(monkeypatch: pytest.MonkeyPatch,
                                                                        source: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if source == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", dead)
    probes: list[tuple[tuple[str, int], float]] = []
    connect = socket.create_connection

    def probe(address: tuple[str, int], timeout: float) -> socket.socket:
        probes.append((address, timeout))
        return connect(address, timeout=timeout)

    monkeypatch.setattr(cluster.socket, "create_connection", probe)
    with pytest.raises(cluster.ClusterUnreachableError,
                       match=rf"Ray cluster at {dead} \(from {source}\) did not answer within 2 s"):
        cluster.choose(dead if source == "--ray-address" else None, timeout_s=2.0)
    # fails fast: one connection attempt bounded by the time-out it was given, no retries, never ray.init
    host, port = dead.split(":")
    assert probes == [((host, int(port)), 2.0)]


def test_order_flag_then_environment_then_recorded_head_then_local(monkeypatch: pytest.MonkeyPatch,
                                                                   listening: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RAY_ADDRESS", listening)
    assert cluster.choose(None) == cluster.ClusterChoice(listening, "RAY_ADDRESS")
    assert cluster.choose(f"ray://{listening}") == cluster.ClusterChoice(f"ray://{listening}", "--ray-address")
    assert cluster.choose("local") == cluster.ClusterChoice(None, "local")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(cluster, "_recorded_head", lambda: (listening, "/tmp/ray/ray_current_cluster"))
    assert cluster.choose(None) == cluster.ClusterChoice(listening, "ray start")
    # a head recorded by an earlier `ray start` that has died: one warning naming it, then a local Ray
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setattr(cluster, "_recorded_head", lambda: (dead, "/tmp/ray/ray_current_cluster"))
    with caplog.at_level(logging.WARNING, logger="wbc_batch.cluster"):
        assert cluster.choose(None, timeout_s=2.0) == cluster.ClusterChoice(None, "local")
    [record] = caplog.records
    assert dead in record.getMessage() and "starting a local Ray instead" in record.getMessage()
    monkeypatch.setattr(cluster, "_recorded_head", lambda: (None, "ray_current_cluster"))
    assert cluster.choose(None) == cluster.ClusterChoice(None, "local")
    with pytest.raises(ValueError, match="host:port"):
        cluster.choose("no-port-here")


def test_classify_with_a_dead_ray_address_exits_5_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": dead, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wbc_batch.cli", "classify", str(REPO / "samples" / "pbc" / "basophil"), str(out),
           "--no-heatmaps"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)  # a hang guard only
    assert proc.returncode == EXIT_CLUSTER, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    # what it waited for: the one probe of the address, bounded by the probe's own time-out, not a Ray time-out
    assert last.startswith("wbc-batch classify: ray cluster unreachable: Ray cluster at " + dead
                           + f" (from RAY_ADDRESS) did not answer within {cluster.CONNECT_TIMEOUT_S:g} s;"), last
    assert "Traceback" not in proc.stderr
    assert "GCS" not in proc.stderr, "ray.init must not have been tried"
    assert not (out / "runs").exists() and not (out / "predictions").exists()


@pytest.mark.parametrize(("nodes", "inp", "out", "uris", "expected"), [
    (1, "/data/in", "/data/out", None, None),
    (3, "s3://b/in", "s3://b/out", None, None),
    (3, "/data/in", "s3://b/out", None, "INPUT is a local path"),
    (3, "s3://b/in", "/data/out", None, "OUTPUT is a local path"),
    (2, "/data/in", "/data/out", None, "INPUT and OUTPUT are local paths"),
    (2, "s3://b/list.txt", "s3://b/out", ["/mnt/a.jpg"], "INPUT is a local path"),  # a manifest of local files
])
def test_several_nodes_with_local_paths_warn_about_the_shared_filesystem(monkeypatch: pytest.MonkeyPatch, nodes: int,
                                                                         inp: str, out: str, uris: list[str] | None,
                                                                         expected: str | None) -> None:
    monkeypatch.setattr(cluster, "alive_nodes", lambda: nodes)
    message = cluster.local_paths_warning(inp, out, uris)
    if expected is None:
        assert message is None
    else:
        assert message is not None and expected in message and f"{nodes} nodes" in message
        assert "shared filesystem mounted at the same path on every node" in message


RAY = str(Path(sys.executable).parent / "ray")


def _start_token_head(temp: Path, token: str, log: Path) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    """A blocking ``ray start --head`` with token authentication, recorded in ``<RAY_TMPDIR>/ray`` (not /tmp/ray).

    Its own process group, free ports, 1 CPU, no dashboard; returns the process and the address it recorded.
    A head that dies on its way up (a busy machine: Ray gives its agents 30 s) is started again, twice at most.
    """
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_TMPDIR=str(temp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    record = temp / "ray" / "ray_current_cluster"
    for _attempt in range(3):
        ports = [f"--port={free_port()}", f"--ray-client-server-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        head = subprocess.Popen([RAY, "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=1",
                                 "--include-dashboard=false", "--object-store-memory=100000000", *ports],
                                env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 240
        while head.poll() is None and time.monotonic() < deadline:
            if record.is_file() and record.read_text().strip():
                address = record.read_text().strip()
                if cluster.answers(address, 2.0):
                    return head, address
            time.sleep(0.5)
        end_process_group(head)
    raise AssertionError(f"ray start --head did not come up: {log.read_text()[-2000:]}")


def test_a_recorded_head_that_refuses_the_driver_is_exit_5_with_the_token_hint_and_local_runs_beside_it(
        tmp_path: Path, samples_dir: Path) -> None:
    """#34: with a `ray start --head` cluster on the machine (token authentication on), a run without the token
    picked the head up from Ray's record and ended with exit 1, "failed: ConnectionError: Failed to connect to Ray
    cluster at HOST:PORT". It is the cluster-unreachable error (exit 5) with what to do; `--ray-address local`
    runs on a private local Ray beside that head."""
    import secrets
    import shutil
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="rrf", dir="/tmp"))  # short: Ray's socket paths are length-limited
    home = tmp_path / "home"  # no ~/.ray/auth_token: the driver has no token, as in the report
    home.mkdir()
    src = tmp_path / "in" / "slide-1"
    src.mkdir(parents=True)
    shutil.copy(sorted((samples_dir / "lymphocyte").iterdir())[0], src / "cell.jpg")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(RAY_TMPDIR=str(temp), HOME=str(home), PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    head, address = _start_token_head(temp, secrets.token_hex(16), tmp_path / "head.log")
    try:
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-m", "wbc_batch.cli", "nightly", str(tmp_path / "in"), str(out)],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == EXIT_CLUSTER, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"wbc-batch nightly: ray cluster unreachable: Ray cluster at {address} (recorded by "
                               "`ray start` on this machine) refused the connection"), last
        for hint in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "~/.ray/auth_token", "--ray-address local"):
            assert hint in last, (hint, last)
        assert "Traceback" not in proc.stderr
        assert not (out / "runs").exists() and not (out / "predictions").exists()
        # the hint works: a private local Ray, the refusing head left alone
        proc = subprocess.run([sys.executable, "-m", "wbc_batch.cli", "classify", str(tmp_path / "in"), str(out),
                               "--ray-address", "local", "--run-id", "beside", "--no-heatmaps"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "run beside: 1 images, 1 ok" in proc.stdout
        assert head.poll() is None, "the head was left running"
    finally:
        end_process_group(head)
        shutil.rmtree(temp, ignore_errors=True)
