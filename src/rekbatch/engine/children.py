"""The run's child processes, ended at once when a second signal stops the run.

A run may have children: the offline backend's worker pool and the face pre-filter's
(``multiprocessing``, spawned), the Parquet export, and the ``multiprocessing`` resource
tracker. Leaving the process with ``os._exit`` does not end them: pool workers ignore
SIGINT and wait on their queues, and the resource tracker waits until every process
holding its pipe is gone. So each child but the tracker is killed first; the tracker then
reads the end of its pipe, removes what the pool left behind, and exits by itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from pathlib import Path


def child_pids() -> set[int]:
    """The process ids of this process's children: from /proc where it lists them (Linux),
    else those ``multiprocessing`` started."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                found.update(int(pid) for pid in (task / "children").read_text().split())
    for child in multiprocessing.active_children():
        if child.pid is not None:
            found.add(child.pid)
    return found


def _resource_tracker_pid() -> int | None:
    from multiprocessing import resource_tracker

    pid = getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)
    return pid if isinstance(pid, int) else None


def kill_children() -> int:
    """SIGKILL every child but the resource tracker; returns how many were signalled."""
    tracker = _resource_tracker_pid()
    killed = 0
    for pid in child_pids():
        if pid == tracker:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed
