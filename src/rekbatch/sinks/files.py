"""Append-only result files, cut back to the last committed size on resume.

``append`` is one ``write()`` straight to the kernel: once it returns, the bytes survive the
death of the process (not of the machine: that is what ``sync`` is for). After any crash the
ledger's committed size is a prefix of the file made of whole rows; what lies beyond it is
replayed (results.jsonl) or cut (results.csv) when the job next opens.
"""

from __future__ import annotations

import os
from pathlib import Path


class AppendFile:
    def __init__(self, path: Path, header: bytes = b"") -> None:
        self.path = path
        self.header = header
        self.size = 0
        self._fd: int | None = None

    def open(self, committed_size: int | None) -> None:
        """Open for appending; a new job's file (None) starts with the header. The file may
        be longer than ``committed_size`` (rows written after the last commit); it is left
        as it is for the caller to replay or ``truncate``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if committed_size is None or not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, self.header)
                os.fsync(fd)
            finally:
                os.close(fd)
            committed_size = len(self.header)
        current = self.path.stat().st_size
        if current < committed_size:
            raise RuntimeError(
                f"{self.path} is shorter ({current} bytes) than the job's ledger recorded "
                f"({committed_size}); it was changed outside rekbatch"
            )
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self.size = current

    def truncate(self, size: int) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, size)
        self.size = size

    def append(self, data: bytes) -> int:
        """Write ``data`` at the end; returns the offset it starts at."""
        assert self._fd is not None
        offset = self.size
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except BaseException:
            # A part written (a full disk) is cut at once: the next append must start
            # where ``size`` says, or every later row's recorded offset would be wrong.
            os.ftruncate(self._fd, offset)
            raise
        self.size += len(data)
        return offset

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def pread(self, offset: int, length: int) -> bytes:
        assert self._fd is not None
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
