"""`ray job submit` of jobs/classify.py against a real Ray head with token authentication."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.processes import free_port

REPO = Path(__file__).resolve().parent.parent
EXCLUDES = [".git", ".venv", ".gpu", ".whl", "demo-output", "tools", "bench", "tests", "docs", "infra"]


def test_job_submit_with_token_auth(samples_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in" / "slide-1"
    src.mkdir(parents=True)
    for folder in ("eosinophil", "monocyte"):
        for p in sorted((samples_dir / folder).iterdir())[:2]:
            shutil.copy(p, src / p.name)
    out = tmp_path / "out"
    bin_dir = Path(sys.executable).parent
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": ""}
    port, dash = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rayjob-{secrets.token_hex(3)}"
    start = [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
             # ports of its own: another Ray on the machine (a developer's) holds the defaults 52365 and 10001
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    # --block in its own process group: the test stops exactly this head, never another cluster on the machine.
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait_for_dashboard(address, head)
        ray_cli = str(bin_dir / "ray")
        wrong = subprocess.run([ray_cli, "job", "list", "--address", address], capture_output=True, text=True,
                               env={**env, "RAY_AUTH_TOKEN": "wrong-" + token}, timeout=120)
        assert wrong.returncode != 0  # token authentication is really on
        assert "auth" in (wrong.stdout + wrong.stderr).lower()
        for attempt in range(30):  # the head's job agent takes a while to come up on a busy machine
            submission_id = f"job-1-try{attempt}"
            cmd = [ray_cli, "job", "submit", "--address", address, "--submission-id", submission_id,
                   "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
                   "python", "jobs/classify.py", str(tmp_path / "in"), str(out), "--run-id", "job-1", "--batch-size", "4"]
            submit = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=480, cwd=REPO)
            logs = submit.stdout + submit.stderr
            if "No available agent" not in logs:
                break
            time.sleep(3)
        status = subprocess.run([ray_cli, "job", "status", "--address", address, submission_id],
                                capture_output=True, text=True, env=env, timeout=120)
        assert f"{submission_id}' succeeded" in (status.stdout + status.stderr).lower(), logs[-3000:]
        assert "run job-1: 4 images, 4 ok" in logs
        # the console carries our lines (wbc_batch/console.py): no TensorFlow absl/cuInit lines, no Ray start notice
        noise = [ln for ln in logs.splitlines() if any(s in ln for s in ("absl", "cuInit", "Started a local Ray instance"))]
        assert not noise, noise
        manifest = json.loads((out / "runs" / "job-1.json").read_text())
        assert manifest["status"] == "succeeded" and manifest["counts"]["ok"] == 4
        # a job's driver runs on the cluster that started it (Ray sets RAY_ADDRESS for it), however small the run
        assert manifest["resources"]["runner"] == "ray", manifest["resources"]
        assert "(RAY_ADDRESS)" in manifest["resources"]["runner_reason"], manifest["resources"]
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, head: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until the head's HTTP server answers (401 counts: it is up and wants a token)."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"Ray head at {address} did not come up in {timeout}s")


def _stop_head(head: subprocess.Popen) -> None:
    """Stop the blocking `ray start` and everything it started (SIGTERM, then SIGKILL)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
