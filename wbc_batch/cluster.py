"""Which Ray cluster a run uses, and never hanging on one that is gone.

Order (first that applies):

1. ``--ray-address`` (``ClassifyConfig.ray_address``);
2. the ``RAY_ADDRESS`` environment variable, as ``ray job submit`` sets it
   for the driver it starts;
3. a head started on this machine with ``ray start --head`` (Ray records its
   address in ``<ray temp dir>/ray_current_cluster``), when it answers;
4. otherwise a new local Ray, which ends with the run.

``ray.init`` given an address whose head is gone retries for minutes,
printing GCS time-outs. So every address is first probed with a plain TCP
connect of at most :data:`CONNECT_TIMEOUT_S`: an address the person gave
(1, 2) that does not answer fails the run with
:class:`ClusterUnreachableError` (one line, exit code 5, nothing written);
a recorded head (3) that does not answer is only stale bookkeeping of an
earlier ``ray start``, so a warning names it and a local Ray starts instead.

A head that answers but refuses the driver (``ray.init`` fails: most often
token authentication, which Ray 2.60 turns on for ``ray start --head`` when
``~/.ray/auth_token`` exists, while the driver sends no token) is the same
:class:`ClusterUnreachableError` (exit 5), whatever the address's source,
with a hint: the token (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token``), or ``--ray-address local`` for a private local Ray.

``--ray-address local`` (or ``RAY_ADDRESS=local``) always starts a private
local Ray, whatever runs on the machine. A local Ray started for a run has no
dashboard (nobody can open it before the run ends it; it cost ten processes
at the start).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from wbc_batch.errors import ClusterError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
_LOCAL = "local"


class ClusterUnreachableError(ClusterError):
    """The Ray cluster the run was told to use does not answer (a ConnectionError; exit 5)."""


@dataclass(frozen=True)
class ClusterChoice:
    """Where ``ray.init`` connects: ``address`` (None starts a local Ray) and why."""

    address: str | None
    source: str  # "--ray-address", "RAY_ADDRESS", "ray start", "local"


def _host_port(address: str) -> tuple[str, int] | None:
    """Host and port of ``host:port`` or ``ray://host:port``; None for ``auto``/``local``."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected a Ray address like host:port or ray://host:port, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def answers(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """True when something accepts a TCP connection at the address within ``timeout_s``."""
    host, port = _host_port(address)  # type: ignore[misc]
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _recorded_head() -> tuple[str | None, str]:
    """The address the last ``ray start --head`` on this machine recorded, and the file it is in."""
    try:
        from ray._private.utils import get_ray_address_file, read_ray_address

        return read_ray_address(None), get_ray_address_file(None)
    except Exception:  # noqa: BLE001 - private Ray helpers: no record is the safe answer
        return None, "ray_current_cluster"


def choose(explicit: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> ClusterChoice:
    """Decide which cluster to use, probing every address first (see the module docstring).

    Raises:
        ClusterUnreachableError: ``explicit`` or ``RAY_ADDRESS`` names a head that does not answer.
        ValueError: the address is malformed.
    """
    env = os.environ.get("RAY_ADDRESS") or None
    given, source = (explicit, "--ray-address") if explicit else (env, "RAY_ADDRESS")
    if given and given != "auto":
        if given == _LOCAL:
            return ClusterChoice(None, "local")
        if not answers(given, timeout_s):
            hint = ("check that the Ray head runs there (`ray status --address ...`), or unset RAY_ADDRESS to start "
                    "a local Ray" if source == "RAY_ADDRESS" else
                    "check that the Ray head runs there (`ray status --address ...`), or leave --ray-address out to "
                    "start a local Ray")
            raise ClusterUnreachableError(
                f"Ray cluster at {given} (from {source}) did not answer within {timeout_s:g} s; {hint}")
        return ClusterChoice(given, source)
    recorded, record_file = _recorded_head()
    if recorded:
        if answers(recorded, timeout_s):
            return ClusterChoice(recorded, "ray start")
        log.warning("the Ray head %s recorded in %s (by an earlier `ray start`) did not answer within %g s; "
                    "starting a local Ray instead (`ray stop` clears the record; --ray-address or RAY_ADDRESS "
                    "choose a cluster)", recorded, record_file, timeout_s)
    return ClusterChoice(None, "local")


def connect(explicit: str | None, timeout_s: float = CONNECT_TIMEOUT_S,
            chosen: ClusterChoice | None = None) -> ClusterChoice | None:
    """``ray.init`` on the chosen cluster unless Ray is already initialised in this process.

    ``chosen``: the cluster :func:`choose` picked already (the runner's
    choice, ``runner.py``), so that it is not probed twice.

    Returns:
        The choice, or None when Ray was already initialised (a test, a notebook, a job driver).

    Raises:
        ClusterUnreachableError: see :func:`choose`.
    """
    import ray

    if ray.is_initialized():
        return None
    choice = chosen or choose(explicit, timeout_s)
    from wbc_batch import console

    # quiet unless --verbose; worker output never forwarded
    kwargs: dict[str, Any] = console.ray_init_kwargs(existing_cluster=choice.address is not None)
    if choice.address is None:
        kwargs.setdefault("include_dashboard", False)  # the run's own Ray: no dashboard (module docstring)
    try:
        # "local" rather than None: ray.init(None) would read RAY_ADDRESS and the recorded head itself.
        ray.init(address=choice.address or _LOCAL, **kwargs)
    except Exception as exc:
        if choice.address is None or not _refused(exc):
            raise
        raise ClusterUnreachableError(refused_message(choice, exc)) from exc
    log.info("Ray: %s (%s)", choice.address or "new local cluster", choice.source)
    return choice


def _refused(exc: BaseException) -> bool:
    """True for what ``ray.init`` raises when a head answers but does not let the driver in."""
    from ray.exceptions import AuthenticationError

    return isinstance(exc, ConnectionError | AuthenticationError | RuntimeError | TimeoutError)


def refused_message(choice: ClusterChoice, exc: BaseException) -> str:
    """The one line for a head that answered but refused the driver: what Ray said, and what to do."""
    said = next((line.strip() for line in str(getattr(exc, "message", None) or exc).splitlines() if line.strip()),
                "")
    where = {"ray start": "recorded by `ray start` on this machine", "RAY_ADDRESS": "from RAY_ADDRESS",
             "--ray-address": "from --ray-address"}.get(choice.source, f"from {choice.source}")
    other = {"ray start": "or run on a private local Ray with --ray-address local",
             "RAY_ADDRESS": "or unset RAY_ADDRESS, or run on a private local Ray with --ray-address local",
             }.get(choice.source, "or run on a private local Ray with --ray-address local")
    return (f"Ray cluster at {choice.address} ({where}) refused the connection ({type(exc).__name__}: {said}); "
            "if it uses token authentication, set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or the file "
            f"~/.ray/auth_token that `ray start` used), {other}")


def alive_nodes() -> int:
    """Nodes of the connected cluster that are alive."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def node_resources() -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each alive node of the connected cluster.

    An actor lives on one node, so what fits is decided per node: an actor
    sized from the whole cluster's total may fit none, and Ray Data then
    waits for it forever.
    """
    import ray

    return [(float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
            for n in ray.nodes() if n.get("Alive")]


def local_paths_warning(input_uri: str, output_uri: str, uris: list[str] | None = None) -> str | None:
    """The warning to give when a cluster of several nodes is handed local INPUT/OUTPUT paths, else None.

    Read and render tasks run on every node and open the image paths and
    OUTPUT/heatmaps there; that works only when those paths are one shared
    filesystem mounted alike on every node (as Ray itself assumes for local
    paths). S3 needs no such assumption.
    """
    from wbc_batch import storage

    nodes = alive_nodes()
    if nodes < 2:
        return None
    local = [name for name, uri in (("INPUT", input_uri), ("OUTPUT", output_uri))
             if uri and not storage.is_remote(uri)]
    if uris and not local and any(not storage.is_remote(u) for u in uris[:1000]):
        local = ["INPUT"]
    if not local:
        return None
    return (f"the Ray cluster has {nodes} nodes and {' and '.join(local)} "
            f"{'is a local path' if len(local) == 1 else 'are local paths'}: every node reads the images and writes "
            "heatmaps there, so they must be one shared filesystem mounted at the same path on every node "
            "(use s3:// otherwise)")
