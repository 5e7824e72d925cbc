"""Append-only result files that are cut back to the last committed size on resume.

A batch is written, flushed and fsynced before the ledger records the new size, so after any
crash the ledger's size is a prefix of the file made only of whole records: truncating to it
removes a torn line and anything not yet committed.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiofiles


class DurableFile:
    def __init__(self, path: Path, header: bytes = b"") -> None:
        self.path = path
        self.header = header
        self.size = 0
        self._file: Any = None

    async def open(self, committed_size: int | None) -> None:
        """Open for appending, cut back to ``committed_size`` (None: a new job's file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if committed_size is None or not self.path.exists():
            async with aiofiles.open(self.path, "wb") as fresh:
                await fresh.write(self.header)
                await fresh.flush()
                await asyncio.to_thread(os.fsync, fresh.fileno())
            committed_size = len(self.header)
        current = self.path.stat().st_size
        if current < committed_size:
            raise RuntimeError(
                f"{self.path} is shorter ({current} bytes) than the job's ledger recorded "
                f"({committed_size}); it was changed outside rekbatch"
            )
        if current > committed_size:
            await asyncio.to_thread(os.truncate, self.path, committed_size)
        self._file = await aiofiles.open(self.path, "ab")
        self.size = committed_size

    async def append(self, data: bytes, *, sync: bool = True) -> int:
        """Write, flush and fsync; return the new committed-to-be size."""
        if data:
            await self._file.write(data)
            await self._file.flush()
            if sync:
                await asyncio.to_thread(os.fsync, self._file.fileno())
            self.size += len(data)
        return self.size

    async def close(self) -> None:
        if self._file is not None:
            await self._file.close()
            self._file = None
