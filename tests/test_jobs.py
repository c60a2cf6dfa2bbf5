"""`ray job submit` of jobs/classify.py against a real Ray head with token authentication."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXCLUDES = [".git", ".venv", ".gpu", ".whl", "demo-output", "tools", "bench", "tests", "docs", "infra"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
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
    port, dash = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"rayjob-{secrets.token_hex(3)}"
    start = [str(bin_dir / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        address = f"http://127.0.0.1:{dash}"
        ray_cli = str(bin_dir / "ray")
        wrong = subprocess.run([ray_cli, "job", "list", "--address", address], capture_output=True, text=True,
                               env={**env, "RAY_AUTH_TOKEN": "wrong-" + token}, timeout=120)
        assert wrong.returncode != 0  # token authentication is really on
        cmd = [ray_cli, "job", "submit", "--address", address, "--submission-id", "job-1", "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
               "python", "jobs/classify.py", str(tmp_path / "in"), str(out), "--run-id", "job-1", "--batch-size", "4"]
        for _ in range(30):  # the head's job agent takes a while to come up on a busy machine
            submit = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=480, cwd=REPO)
            logs = submit.stdout + submit.stderr
            if "No available agent" not in logs:
                break
            time.sleep(3)
        status = subprocess.run([ray_cli, "job", "status", "--address", address, "job-1"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert "job-1' succeeded" in (status.stdout + status.stderr).lower(), logs[-3000:]
        assert "run job-1: 4 images, 4 ok" in logs
        manifest = json.loads((out / "runs" / "job-1.json").read_text())
        assert manifest["status"] == "succeeded" and manifest["counts"]["ok"] == 4
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
