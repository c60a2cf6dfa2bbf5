"""Shared fixtures: bundled samples, a real local Ray cluster, a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import free_port

# --- the two tiers: `make test` runs `pytest -m "not slow"`, `make test-all` runs everything ------------------
#
# SLOW is the one definition of what is slow: no test file carries @pytest.mark.slow itself
# (tests/test_tiers.py checks that, that each entry still names a collected test, and both tiers'
# selections). An entry is "test_file.py::test_name": every parametrisation of that test, or
# "test_file.py::test_name[id]" for one. Chosen from one full run's --durations so that `make test`
# stays near 5 minutes on 2 cores while keeping a fast test with real parts for every module and command.
SLOW: frozenset[str] = frozenset({
    # adapt end to end (Ray Train on the shipped model; test_commands.py keeps a one-epoch adapt fast)
    "test_adapt.py::test_adapt_makes_a_new_lab_in_distribution_and_classifies_it",
    "test_adapt.py::test_adapted_artifact_records_its_base_and_the_lab",
    "test_adapt.py::test_adapt_with_replay_records_distillation_and_shows_a_half_size_lab_at_the_bases_scale",
    "test_adapt.py::test_cli_calibrate_refits_on_the_labs_own_cells_only",
    "test_adapt.py::test_cli_evaluate_reports_each_lab_with_intervals",
    # the benchmark harness (classify runs of several sizes)
    "test_bench.py::test_bench_harness_writes_a_complete_report",
    # faults, kills and full disks: each a CLI process with its own Ray
    "test_hardening.py::test_slowdown_and_500_are_retried_and_unreadable_images_become_transient_rows",
    "test_hardening.py::test_endpoint_down_at_start_fails_fast_with_one_line_and_writes_nothing",
    "test_hardening.py::test_actor_killed_mid_run_still_gives_exactly_one_row_per_image",
    "test_hardening.py::test_output_not_writable_is_one_line_and_commits_nothing",
    "test_hardening.py::test_disk_full_is_one_line_and_commits_nothing",
    "test_hardening.py::test_credentials_never_reach_outputs_or_logs_and_names_never_come_from_keys",
    # a `ray start` head with token authentication beside a run's own local Ray
    "test_cluster.py::test_a_recorded_head_that_refuses_the_driver_is_exit_5_with_the_token_hint_and_local_runs_beside_it",
    # a Ray head and job submission
    "test_jobs.py::test_job_submit_with_token_auth",
    # training across labs end to end
    "test_labs.py::test_train_on_two_labs_records_labs_digests_command_and_groups",
    "test_labs.py::test_adapt_replays_every_lab_of_its_base",
    # multi-node
    "test_multinode.py::test_worker_node_killed_mid_run_still_one_row_per_image",
    # nightly runs as processes: killed, concurrent, and real nights
    "test_nightly.py::test_killed_run_then_rerun_then_next_nights",
    "test_nightly.py::test_two_concurrent_runs_only_one_commits",
    "test_nightly.py::test_real_nights_record_the_listing_skip_unread_and_run_twice_on_one_date",
    # more classify runs (a local folder with bad inputs, S3 to S3, a five-class model and a shifted batch stay fast)
    "test_pipeline.py::test_classify_from_manifest_and_rerun_same_run_id",
    "test_pipeline.py::test_the_driver_never_imports_tensorflow_and_the_actors_measure_a_sample_spread_over_the_listing",
    "test_pipeline.py::test_gpu_actors_are_scheduled_on_a_declared_gpu",
    "test_pipeline.py::test_a_small_run_states_its_faithfulness_sample_and_where_its_time_went",
    # training end to end (two Ray Train workers, one killed; test_commands.py keeps a one-epoch train fast)
    "test_training.py::test_two_workers_stay_in_sync_and_resume_after_a_worker_dies",
    "test_training.py::test_non_images_are_skipped_with_a_warning",
    "test_training.py::test_artifact_holds_the_trained_weights_split_and_calibration",
    "test_training.py::test_keras3_artifact_computes_the_logits_of_the_trained_tf_keras_network",
    "test_training.py::test_fine_tuning_starts_from_the_given_model",
    "test_training.py::test_teacher_logits_are_the_teachers_answer_for_each_training_image",
    "test_training.py::test_training_with_a_teacher_records_it_and_its_term",
    "test_training.py::test_fine_tuning_refuses_a_model_of_other_classes_or_size",
    "test_training.py::test_evaluate_uses_the_models_test_split",
    "test_training.py::test_cli_evaluate_prints_and_refuses_a_tampered_model",
})


def slow_keys(nodeid: str) -> tuple[str, str]:
    """The two SLOW keys a test answers to: "file.py::name" (every parametrisation) and "file.py::name[id]"."""
    path, _, name = nodeid.partition("::")
    key = f"{path.rsplit('/', 1)[-1]}::{name}"
    return key.split("[", 1)[0], key


def is_slow(nodeid: str) -> bool:
    """Whether SLOW lists this test (by its pytest node id)."""
    return any(k in SLOW for k in slow_keys(nodeid))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests SLOW lists with ``slow`` (first, so that ``-m`` deselects by it)."""
    for item in items:
        if is_slow(item.nodeid):
            item.add_marker(pytest.mark.slow)


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
