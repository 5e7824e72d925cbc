"""Shard benchmark (issue 13): the job's total calls/s with 1, 2 and 4 shard processes.

Each contender runs ``rekbatch run CONFIG --shards N --shard-index-env IDX`` as N processes
at once (as a Kubernetes Indexed Job or an AWS Batch array job would), against moto and the
fake Rekognition (no quota, ``--latency-ms`` latency, objects cached), one ``detect_labels``
per image, a high ceiling; time from the first spawn to the last exit, then ``merge``. The
contenders alternate for ``--rounds`` rounds; medians and ratios to 1 shard.

    python -m benchmarks.bench_shards --images 2000 --rounds 3

Raw results: benchmarks/results/shards.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.servers import (
    bench_env,
    fake_rekognition,
    fill_bucket,
    moto_s3,
    save_report,
    write_job,
)

RESULTS = Path(__file__).parent / "results" / "shards.json"


def run_shards(config: str, count: int) -> float:
    """Seconds from the first shard's spawn to the last one's exit (merge excluded)."""
    started = time.perf_counter()
    command = [
        *(sys.executable, "-m", "rekbatch", "run", config, "--shards", str(count)),
        *("--shard-index-env", "IDX", "--log-format", "json"),
    ]
    procs = [
        subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**bench_env(), "IDX": str(k)},
        )
        for k in range(count)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"a shard failed: {err[-2000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--latency-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.shards.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    seconds: dict[int, list[float]] = {c: [] for c in counts}
    try:
        with (
            moto_s3() as s3,
            fake_rekognition(s3, "--latency-ms", str(args.latency_ms), "--s3-cache") as rek,
        ):
            fill_bucket(s3, "bench-shards", args.images)
            for round_ in range(args.rounds):
                order = counts if round_ % 2 == 0 else counts[::-1]
                for count in order:
                    out = work / f"out-{count}"
                    shutil.rmtree(out, ignore_errors=True)
                    config = write_job(
                        str(work / f"job-{count}.toml"),
                        bucket="bench-shards",
                        out=str(out),
                        s3_url=s3,
                        rek_url=rek,
                        operations='[[operations]]\ntype = "detect_labels"\n',
                        limits="concurrency = 32\nmax_tps = 100000",
                        source_extra="sniff = false",
                    )
                    seconds[count].append(run_shards(config, count))
                    print(f"round {round_} shards {count}: {seconds[count][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {c: statistics.median(v) for c, v in seconds.items()}
    rates = {c: args.images / m for c, m in medians.items()}
    report = {
        "command": "python -m benchmarks.bench_shards " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "images": args.images,
        "seconds": seconds,
        "median_seconds": medians,
        "calls_per_second": {c: round(r, 1) for c, r in rates.items()},
        "ratio_to_1_shard": {c: round(r / rates[counts[0]], 2) for c, r in rates.items()},
    }
    save_report(RESULTS, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
