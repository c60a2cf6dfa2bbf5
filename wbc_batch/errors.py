"""The errors a run can end with, each carrying its exit code and the prefix of its one-line message.

The command line (``wbc_batch.cli``) turns any :class:`WbcError` into one
line on stderr, ``wbc-batch <command>: <prefix>: <message>``, and exits with
the class's ``exit_code``. Library code raises these classes (or a subclass
of its own) instead of choosing numbers.

Exit codes (README.md, "Failures and how to recover"):

====  =========================================================================
0     ok
1     unexpected failure (:class:`WbcError` itself, or any other exception)
2     usage or invalid input (:class:`UsageError`, :class:`InvalidInputError`)
3     storage unreachable or not writable (:class:`StorageError`)
4     model missing, tampered with, untrusted or not the pinned one (:class:`ModelError`)
5     the Ray cluster named by ``--ray-address`` or ``RAY_ADDRESS`` does not answer (:class:`ClusterError`)
6     committed results that cannot be read (:class:`CorruptResultsError`)
75    nightly lease held by another run; try later (EX_TEMPFAIL; :class:`wbc_batch.nightly.LeaseHeldError`)
130   interrupted
====  =========================================================================
"""

from __future__ import annotations

__all__ = [
    "EXIT_CLUSTER", "EXIT_CORRUPT_RESULTS", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_LEASE_HELD", "EXIT_MODEL", "EXIT_OK",
    "EXIT_STORAGE", "EXIT_USAGE", "ClusterError", "CorruptResultsError", "InvalidInputError", "ModelError", "StorageError",
    "UsageError", "WbcError",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_MODEL = 4
EXIT_CLUSTER = 5
EXIT_CORRUPT_RESULTS = 6
EXIT_LEASE_HELD = 75  # EX_TEMPFAIL: a scheduler may simply try again later
EXIT_INTERRUPTED = 130


class WbcError(Exception):
    """Base of every error the command line reports as one line with its own exit code.

    Subclasses set ``exit_code`` and ``prefix``; an instance may override the
    exit code (``WbcError("...", exit_code=75)``) where a module has a code of
    its own.
    """

    exit_code: int = EXIT_FAILED
    prefix: str = "failed"

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        """The line to print: ``<prefix>: <message>``, or the message alone when the prefix is empty."""
        text = str(self)
        return f"{self.prefix}: {text}" if self.prefix else text


class UsageError(WbcError, ValueError):
    """Options that do not go together or are out of range (exit 2); printed without a prefix."""

    exit_code = EXIT_USAGE
    prefix = ""


class InvalidInputError(WbcError, ValueError):
    """INPUT that cannot be classified as given: no images, a bad manifest, a refused query (exit 2)."""

    exit_code = EXIT_USAGE
    prefix = "invalid input"


class StorageError(WbcError, RuntimeError):
    """Local or S3 storage unreachable, unreadable or not writable after the retries (exit 3)."""

    exit_code = EXIT_STORAGE
    prefix = "storage error"


class ModelError(WbcError, RuntimeError):
    """A model artifact that is missing, malformed, tampered with, untrusted or not the pinned one (exit 4)."""

    exit_code = EXIT_MODEL
    prefix = "model error"


class ClusterError(WbcError, ConnectionError):
    """The Ray cluster a run was told to use does not answer (exit 5)."""

    exit_code = EXIT_CLUSTER
    prefix = "ray cluster unreachable"


class CorruptResultsError(WbcError, RuntimeError):
    """A committed run's Parquet part file exists but cannot be decoded (exit 6).

    Not invalid input (the user's command is fine) and not a storage outage
    (the bytes were read): the results themselves are damaged. The message
    names the file and the run, so the run can be re-run with the same run id.
    """

    exit_code = EXIT_CORRUPT_RESULTS
    prefix = "corrupt results"
