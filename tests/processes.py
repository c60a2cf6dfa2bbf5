"""Process helpers for tests that run the CLI, a Ray node or a server in its own process.

Process trees and command lines come from /proc; ports are free loopback ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port nobody listens on (bound, then released), for a server, a Ray port, or a dead address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cmdline(pid: int) -> str:
    """A process's command line with spaces between arguments (its title, for Ray workers); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def sigkill(pids: Iterable[int]) -> None:
    """SIGKILL each of these pids (ones the test started or found below its own processes); gone ones are skipped."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so only our own Ray's processes are touched or checked."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def end_process_group(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGKILL a process group this test started and every process below its leader (a Ray node's raylet, GCS,
    agents, workers): only ours."""
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    sigkill(below)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
