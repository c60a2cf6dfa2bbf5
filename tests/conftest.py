"""Shared fixtures: bundled samples, a real local Ray cluster, a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import free_port

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


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto server) on loopback; AWS_* variables point at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
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


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A plain boto3 S3 client on the loopback endpoint, to set up and read back buckets apart from the code under test."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def s3_keys(s3_client: Any) -> Callable[..., list[str]]:
    """``s3_keys(bucket, prefix="")``: every key under the prefix, sorted (listed with :func:`s3_client`)."""

    def keys(bucket: str, prefix: str = "") -> list[str]:
        pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    return keys


@pytest.fixture()
def s3_bucket(s3_client: Any) -> str:
    """A fresh, empty bucket on the loopback endpoint; returns its name."""
    import uuid

    name = f"wbc-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def shipped() -> Any:
    """The shipped model artifact (wbc_batch.model.load_artifact()), loaded once per test module."""
    from wbc_batch.model import load_artifact

    return load_artifact()


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
