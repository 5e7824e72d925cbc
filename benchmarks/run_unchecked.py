"""``rekbatch run CONFIG`` without checkpointing, to measure what checkpointing costs.

The command line's own path (``rekbatch.cli.run_and_report``: signals, the collector, what
is printed) with ``RunOptions(checkpoint=False)``: no fsync, and the ledger written with
``synchronous=OFF``. A machine crash then loses results, a process crash does not. The
production command line has no such switch.

    python -m benchmarks.run_unchecked CONFIG
"""

from __future__ import annotations

import sys
from pathlib import Path

from rekbatch.cli import run_and_report
from rekbatch.config import load_config
from rekbatch.engine import RunOptions
from rekbatch.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.run_unchecked CONFIG", file=sys.stderr)
        return 2
    configure_logging("json")
    cfg = load_config(Path(args[0]))
    options = RunOptions(
        output_dir=Path(cfg.job.output_dir), config_path=args[0], checkpoint=False
    )
    print("checkpointing off (benchmarks only); a crash loses results", file=sys.stderr)
    return run_and_report(cfg, options)


if __name__ == "__main__":
    raise SystemExit(main())
