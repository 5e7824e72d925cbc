"""glibc's allocator settings (``mallopt``), for the two places that tune how a process
keeps image-sized blocks: conversions (``sources/decoding.py``) and the offline face
detector's worker processes (``backends/local/detector.py``). Elsewhere than glibc on
Linux nothing changes."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def mallopt(*settings: tuple[int, int]) -> bool:
    """Apply each ``(parameter, value)`` in order; whether all of them applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        call = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    call.argtypes = (ctypes.c_int, ctypes.c_int)
    call.restype = ctypes.c_int
    return all(bool(call(parameter, value)) for parameter, value in settings)
