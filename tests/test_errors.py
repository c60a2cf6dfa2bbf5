"""The error hierarchy: each class carries its exit code and message prefix; the CLI maps them and nothing else."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from wbc_batch import errors
from wbc_batch.cli import _error_message, build_parser, main
from wbc_batch.cluster import ClusterUnreachableError
from wbc_batch.model import ModelArtifactError
from wbc_batch.query import QueryError
from wbc_batch.storage import StorageError


@pytest.mark.parametrize(("exc", "line", "code"), [
    (ModelArtifactError("bad"), "model error: bad", errors.EXIT_MODEL),
    (StorageError("down"), "storage error: down", errors.EXIT_STORAGE),
    (ClusterUnreachableError("no head"), "ray cluster unreachable: no head", errors.EXIT_CLUSTER),
    (errors.CorruptResultsError("part"), "corrupt results: part", errors.EXIT_CORRUPT_RESULTS),
    (QueryError("refused: COPY"), "invalid input: refused: COPY", errors.EXIT_USAGE),
    (errors.UsageError("--a goes with --b"), "--a goes with --b", errors.EXIT_USAGE),
    (errors.WbcError("held", exit_code=errors.EXIT_LEASE_HELD), "failed: held", errors.EXIT_LEASE_HELD),
    (ValueError("--batch-size must be >= 1"), "invalid input: --batch-size must be >= 1", errors.EXIT_USAGE),
    (FileNotFoundError(2, "No such file", "/x"), "not found: /x", errors.EXIT_USAGE),
    (KeyError("boom"), "failed: KeyError: 'boom'", errors.EXIT_FAILED),
])
def test_each_error_carries_its_line_and_exit_code(exc: BaseException, line: str, code: int) -> None:
    assert _error_message(exc) == (line, code)


def test_the_classes_stay_what_callers_catch() -> None:
    assert issubclass(StorageError, RuntimeError) and issubclass(ModelArtifactError, RuntimeError)
    assert issubclass(ClusterUnreachableError, ConnectionError) and issubclass(QueryError, ValueError)
    assert issubclass(errors.UsageError, ValueError)
    codes = [errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_USAGE, errors.EXIT_STORAGE, errors.EXIT_MODEL,
             errors.EXIT_CLUSTER, errors.EXIT_CORRUPT_RESULTS, errors.EXIT_LEASE_HELD, errors.EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes)


def test_a_known_error_inside_ray_wrappers_is_found() -> None:
    class RayTaskError(Exception):  # Ray keeps the user's exception in .cause
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray.exceptions.RayTaskError(ModelArtifactError): long traceback\n...")
            self.cause = cause

    wrapped = RayTaskError(ModelArtifactError("model file of x does not match model.json"))
    assert _error_message(wrapped) == ("model error: model file of x does not match model.json", errors.EXIT_MODEL)


def test_quiet_is_a_setting_not_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from wbc_batch.pipeline import ClassifyConfig

    monkeypatch.delenv("WBC_QUIET", raising=False)
    assert main(["query", str(tmp_path), "--runs"]) == errors.EXIT_USAGE  # no results there: not found
    assert "WBC_QUIET" not in os.environ
    capsys.readouterr()
    parser: argparse.ArgumentParser = build_parser()
    assert ClassifyConfig.from_args(parser.parse_args(["classify", "in", "out"])).quiet is True
    assert ClassifyConfig.from_args(parser.parse_args(["-v", "classify", "in", "out"])).quiet is False
