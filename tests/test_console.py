"""The console (wbc_batch/console.py): progress lines, the quiet setting and -v, numbers as a person reads them."""

from __future__ import annotations

import io
import logging
import os

import pytest

from wbc_batch import console


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_plain_lines_every_interval_when_not_a_terminal() -> None:
    clock, out = Clock(), io.StringIO()
    progress = console.Progress(100, stream=out, interval=10.0, clock=clock)
    clock.now += 5
    progress.update(10)
    assert out.getvalue() == ""  # under the interval: nothing yet
    clock.now += 5
    progress.update(10)
    clock.now += 10
    progress.update(30)
    clock.now += 10
    progress.update(50)  # done: the summary that follows says so
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == ["classify: 20/100 images (20.0%), 2.0 images/s, ETA 40 s",
                     "classify: 50/100 images (50.0%), 2.5 images/s, ETA 20 s"]
    assert "\r" not in out.getvalue()


def test_progress_updates_one_line_on_a_terminal() -> None:
    clock, out = Clock(), Terminal()
    progress = console.Progress(64, stream=out, clock=clock)
    for _ in range(4):
        clock.now += 8
        progress.update(16)
    progress.close()
    text = out.getvalue()
    assert text.startswith("\rclassify: 16/64 images (25.0%), 2.0 images/s, ETA 24 s")
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.rstrip("\n").rsplit("\r", 1)[-1].rstrip() == "classify: 64/64 images (100.0%)"


def test_numbers_as_a_person_reads_them() -> None:
    assert console.percent(13, 64) == "20.3%" and console.percent(0, 0) == "0.0%"
    assert [console.human_duration(s) for s in (0.4, 42, 185, 7440)] == ["0 s", "42 s", "3 min 5 s", "2 h 4 min"]


@pytest.fixture
def restore_console(monkeypatch: pytest.MonkeyPatch):
    """configure() changes process-wide logging: leave the root logger alone and put every level back after."""
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    names = [*console._NOISY_LOGGERS, "ray.data._internal.progress"]
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    logging.getLogger(console._TOKEN_LOGGER).removeFilter(console._DROP_TOKEN_NOTICE)
    console._quiet = False
    console._tf_level_was_set = False


def test_quiet_sets_env_and_log_levels_and_verbose_restores_them(restore_console) -> None:
    console.configure(verbose=False)
    assert console.quiet()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert logging.getLogger("ray").level == logging.WARNING
    assert logging.getLogger("ray.data._internal.progress").level == logging.ERROR
    kwargs = console.ray_init_kwargs()
    assert kwargs["log_to_driver"] is False and kwargs["logging_level"] == logging.WARNING
    assert kwargs["runtime_env"] == {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}}  # workers of a `ray start` cluster
    assert "runtime_env" not in console.ray_init_kwargs(existing_cluster=False)  # a local Ray inherits os.environ
    token = logging.getLogger(console._TOKEN_LOGGER)
    notice = token.makeRecord(token.name, logging.WARNING, __file__, 1,
                              "Token authentication is enabled for this Ray cluster. Set ...", (), None)
    assert not token.filter(notice)
    warning = token.makeRecord(token.name, logging.WARNING, __file__, 1, "Token authentication is disabled ...", (), None)
    assert token.filter(warning)  # the security warning stays

    console.configure(verbose=True)
    assert not console.quiet()
    assert logging.getLogger("ray").level == logging.NOTSET
    assert logging.getLogger("ray.data._internal.progress").level == logging.NOTSET
    assert token.filter(notice)
    kwargs = console.ray_init_kwargs()
    assert "logging_level" not in kwargs and "runtime_env" not in kwargs and kwargs["log_to_driver"] is False


def test_a_level_set_in_the_environment_is_kept(restore_console, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    console.configure(verbose=False)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    assert "runtime_env" not in console.ray_init_kwargs()  # no runtime_env to clash with a job's own
