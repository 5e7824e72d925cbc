"""Running rekbatch on a folder it cannot write, whoever runs the tests.

A user other than root is refused by the permission bits (``chmod a-w``). Root is not: for
root the folder is bind-mounted read-only over itself in a private mount namespace of the
command (``unshare -m``), or, where that is not allowed, made immutable (``chattr +i``).
``how`` says which was used; where none of them works (root without those capabilities),
``how`` is None and the command runs on the writable folder: the caller then still checks
that nothing in it was written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TIMEOUT = 120


def _works(command: list[str]) -> bool:
    try:
        done = subprocess.run(command, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _folders(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())]


def _bind_prefix(folder: Path) -> list[str] | None:
    """A command prefix that runs the rest with ``folder`` read-only, or None."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && shift && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, "sh", str(folder)]
    probe = ["sh", "-c", f'! touch "{folder}/.probe" 2>/dev/null']
    return prefix if _works([*prefix, *probe]) else None


@contextmanager
def _chattr(folder: Path) -> Iterator[bool]:
    folders = _folders(folder)
    if shutil.which("chattr") is None or not _works(["chattr", "+i", str(folder)]):
        yield False
        return
    _works(["chattr", "-i", str(folder)])
    try:
        for path in folders:
            _works(["chattr", "+i", str(path)])
        yield True
    finally:
        for path in folders:
            _works(["chattr", "-i", str(path)])


@contextmanager
def _chmod(folder: Path) -> Iterator[None]:
    folders = _folders(folder)
    modes = {path: path.stat().st_mode for path in folders}
    try:
        for path in folders:
            path.chmod(0o555)
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def run_read_only(folder: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str | None]:
    """``python -m rekbatch ARGS`` with ``folder`` (and all below it) not writable; returns the
    finished process and how the folder was made read-only."""
    command = [sys.executable, "-m", "rekbatch", *args]

    def run(prefix: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, *command], capture_output=True, text=True, timeout=TIMEOUT, check=False
        )

    if os.geteuid() != 0:
        with _chmod(folder):
            return run([]), "chmod"
    prefix = _bind_prefix(folder)
    if prefix is not None:
        return run(prefix), "bind mount"
    with _chattr(folder) as immutable:
        return run([]), "chattr" if immutable else None
