"""``--src``: which checkout's ``rekbatch`` a benchmark measures (the code before a change, say).

It must take effect before ``rekbatch`` is imported, so the scripts call ``use_src`` at the top,
ahead of their own argument parsing (which still declares ``--src`` for its help).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def src_from_argv(argv: list[str]) -> Path:
    """The folder named by ``--src DIR`` or ``--src=DIR``; this checkout's ``src`` without."""
    for index, arg in enumerate(argv):
        if arg == "--src" and index + 1 < len(argv):
            return Path(argv[index + 1]).resolve()
        if arg.startswith("--src="):
            return Path(arg.split("=", 1)[1]).resolve()
    return REPO / "src"


def use_src(*, children: bool = False) -> Path:
    """Put the chosen ``src`` first on the import path (and on ``PYTHONPATH`` for processes
    this one starts, with ``children``); returns it."""
    src = src_from_argv(sys.argv)
    sys.path.insert(0, str(src))
    if children:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
    return src
