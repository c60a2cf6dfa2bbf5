"""Shared fixtures: bundled samples, a real local Ray cluster, a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "pbc"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The bundled PBC sample images in class-folder layout (8 per folder)."""
    return SAMPLES


@pytest.fixture()
def small_input(tmp_path: Path) -> Path:
    """A slide-like input folder: two 'samples' with a few real images each."""
    root = tmp_path / "input"
    picks = {"slide-A": ["neutrophil", "lymphocyte", "eosinophil"], "slide-B": ["monocyte", "basophil", "platelet"]}
    for slide, folders in picks.items():
        (root / slide).mkdir(parents=True)
        for folder in folders:
            for src in sorted((SAMPLES / folder).iterdir())[:2]:
                shutil.copy(src, root / slide / src.name)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto server) on loopback; AWS_* variables point at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the loopback endpoint; returns its name."""
    import uuid

    import boto3

    name = f"wbc-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    """One real local Ray cluster for the session (4 logical CPUs on 2 cores, no dashboard).

    It starts after the S3 endpoint so that its workers inherit the AWS_*
    variables, as a cluster's nodes get them from their environment.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
