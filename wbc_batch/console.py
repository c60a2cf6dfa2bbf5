"""What a run prints on the console: our lines, not the libraries' chatter, and progress on long runs.

One setting, the CLI's ``-v``/``--verbose``: without it (:func:`configure`
with ``verbose=False``) a run is quiet:

* TensorFlow's C++ logging: ``TF_CPP_MIN_LOG_LEVEL=3`` in the driver and,
  in the Ray workers (inherited by a local Ray; through
  ``ray.init(runtime_env={"env_vars": ...})`` on a cluster started elsewhere,
  :func:`ray_init_kwargs`); the lines TF 2.21 writes through absl while it is
  imported (oneDNN, "Could not find cuda drivers", the cuInit failure), which
  no setting turns off, are dropped by :func:`import_tensorflow_quietly`;
* Ray: no worker output forwarded to the driver, no "Started a local Ray
  instance" line, no "Token authentication is enabled" notice for the local
  cluster Ray starts; Ray Data: no progress bars, no per-dataset INFO lines
  (:func:`quiet_ray_data`);
* every logger stays at WARNING, so warnings and errors are still shown.

With ``--verbose`` the libraries log as they would (and our loggers at
INFO). A ``TF_CPP_MIN_LOG_LEVEL`` set in the environment is kept either way.

:class:`Progress` reports images done on stderr: one updating line on a
terminal, a plain line every :data:`PLAIN_INTERVAL_S` seconds otherwise (log
files, ``ray job submit``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

PLAIN_INTERVAL_S = 10.0
TTY_INTERVAL_S = 0.5
_NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"

_quiet = False
_tf_level_was_set = False


def quiet() -> bool:
    """True after :func:`configure` without ``verbose``."""
    return _quiet


class _DropTokenNotice(logging.Filter):
    """Drops Ray's notice that a local cluster turned token authentication on; its warning when *off* stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _TOKEN_NOTICE not in record.getMessage()


_DROP_TOKEN_NOTICE = _DropTokenNotice()


def configure(verbose: bool) -> None:
    """Set the console up for one CLI command: logging format and level, and how loud the libraries are."""
    global _quiet, _tf_level_was_set
    _quiet = not verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    token_logger = logging.getLogger(_TOKEN_LOGGER)
    if verbose:
        for name in (*_NOISY_LOGGERS, "ray.data._internal.progress"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        token_logger.removeFilter(_DROP_TOKEN_NOTICE)
        return
    _tf_level_was_set = "TF_CPP_MIN_LOG_LEVEL" in os.environ
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported; 3 also hides the cuInit error
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    token_logger.addFilter(_DROP_TOKEN_NOTICE)


def ray_init_kwargs(existing_cluster: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` (wbc_batch/cluster.py): quiet ones unless ``--verbose``.

    Worker output is never forwarded (it is in the Ray session's log files).
    Quiet runs also keep Ray's INFO lines ("Started a local Ray instance")
    off and, on an ``existing_cluster`` (``ray start``, ``ray job submit``),
    whose workers do not inherit the driver's environment, pass
    ``TF_CPP_MIN_LOG_LEVEL`` to them; a local Ray started by ``ray.init``
    inherits it. A level the environment (or a job's runtime_env) already
    set is left to it.
    """
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if _quiet:
        kwargs["logging_level"] = logging.WARNING
        if existing_cluster and not _tf_level_was_set:
            kwargs["runtime_env"] = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}}
    return kwargs


def quiet_ray_data() -> None:
    """No Ray Data progress bars or per-dataset INFO lines (:class:`Progress` reports instead)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and find its devices with file descriptor 2 sent to /dev/null.

    TF 2.21 logs through absl while its shared libraries load ("All log
    messages before absl::InitializeLog() ...", oneDNN, "Could not find cuda
    drivers"), before it reads ``TF_CPP_MIN_LOG_LEVEL``. Call it in the main
    thread before other threads write to stderr (an import error is still
    raised). Does nothing once TensorFlow is imported.
    """
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        import tensorflow as tf

        tf.config.list_physical_devices()  # the cuInit attempt, once, here
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def human_duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 4 min``: as a person reads a duration."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def percent(part: float, whole: float) -> str:
    """``20.3%`` (one decimal); ``0.0%`` for an empty whole."""
    return f"{100.0 * part / whole:.1f}%" if whole else "0.0%"


class Progress:
    """Images done of a run on ``stream`` (default stderr).

    On a terminal: one line rewritten in place (``\\r``), at most every
    :data:`TTY_INTERVAL_S`. Otherwise (a log file, ``ray job submit``): a
    plain line every ``interval`` seconds and none for a run shorter than
    that. Each line: ``classify: 32/64 images (50.0%), 12.3 images/s, ETA 3 s``.
    The rate is the stream's since the reporter started; the run's summary
    gives the rate over the whole run (Ray's start and the model load
    included), so a finished run's lines leave the rate out: the terminal's
    last state is ``classify: 64/64 images (100.0%)`` and plain output prints
    no line for it.
    """

    def __init__(self, total: int, label: str = "classify", stream: IO[str] | None = None,
                 interval: float = PLAIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label, self.interval, self.clock = total, label, interval, clock
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError, OSError):
            self.tty = False
        self.done = 0
        self.started = clock()
        self.last = self.started
        self.width = 0  # of the last line on a terminal, to blank what a shorter one leaves

    def line(self) -> str:
        """The current line, without a line end."""
        elapsed = self.clock() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.label}: {self.done}/{self.total} images ({percent(self.done, self.total)})"
        if rate > 0 and self.done < self.total:
            text += f", {rate:.1f} images/s, ETA {human_duration((self.total - self.done) / rate)}"
        return text

    def update(self, n: int) -> None:
        """``n`` more images done; prints when the interval has passed."""
        self.done += n
        now = self.clock()
        if now - self.last < (TTY_INTERVAL_S if self.tty else self.interval):
            return
        if not self.tty and self.done >= self.total:
            return  # the summary follows at once
        self.last = now
        self._write()

    def close(self) -> None:
        """End a terminal's line (after its final state); plain output needs no last line, the summary follows."""
        if self.tty and self.done:
            self._write()
            self.stream.write("\n")
            self.stream.flush()

    def _write(self) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
