"""How close ``rekbatch plan``'s time for the offline backend comes to the run it estimates.

Each round plans the offline Where's Ric job (configs/wheres-ric-local.toml) and then runs it
into a fresh output directory, both through the CLI in their own processes; the ratio is the
run's wall time over the plan's estimate. Plans and runs alternate, so both see the same load
on the machine.

    python -m benchmarks.bench_plan_estimate --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "wheres-ric-local.toml"


def _rekbatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rekbatch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for n in range(args.rounds):
        plan_started = time.perf_counter()
        plan = json.loads(_rekbatch("plan", "--json", str(CONFIG)).stdout)
        plan_seconds = time.perf_counter() - plan_started
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            _rekbatch(
                "run", str(CONFIG), "--output", str(Path(tmp) / "out"), "--log-format", "json"
            )
            run_seconds = time.perf_counter() - started
        estimate = float(plan["estimated_seconds"])
        rounds.append(
            {
                "round": n,
                "estimated_seconds": estimate,
                "run_seconds": round(run_seconds, 2),
                "plan_seconds": round(plan_seconds, 2),
                "ratio_run_to_estimate": round(run_seconds / estimate, 3),
                "timing": plan["offline_timing"],
            }
        )
        print(json.dumps(rounds[-1]), flush=True)
    summary = {
        "median_estimated_seconds": statistics.median(r["estimated_seconds"] for r in rounds),
        "median_run_seconds": statistics.median(r["run_seconds"] for r in rounds),
        "median_plan_seconds": statistics.median(r["plan_seconds"] for r in rounds),
        "median_ratio_run_to_estimate": statistics.median(
            r["ratio_run_to_estimate"] for r in rounds
        ),
        "rounds": rounds,
    }
    out = REPO / "benchmarks" / "results" / "plan_estimate.json"
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))


if __name__ == "__main__":
    main()
