"""Calls per second with 1, 2 and 3 Regions (``aws.regions``) against the fake Rekognition.

One fake endpoint serves every Region: each request counts in the Region it is signed for,
and each Region has its own DetectLabels quota (``--quota``, 40/s by default, a token bucket
with one second of burst) and lognormal latency. The ceilings come from the fake's Service
Quotas (the quota, as an account's applied one). rekbatch runs through its CLI over the same
bucket (``benchmarks.synthetic_s3``, in eu-west-1, the home Region: S3Object references
there, the bytes read from S3 and sent to the others),
once per Region set and round, the sets alternating. The rate is the fake's count of
accepted calls over the run's steady seconds (from the third second with calls to the
second before the last); "share" is that over the quotas the Regions give together.

    python -m benchmarks.bench_regions [--images 1800] [--quota 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.servers import (
    CREDENTIALS,
    fake_admin,
    fake_rekognition,
    run_cli,
    synthetic_s3,
    write_job,
)

RESULTS = Path(__file__).parent / "results"
REGIONS = ["eu-west-1", "us-east-1", "us-west-2"]


def steady_rate(timeline: dict[str, dict[str, list[int]]]) -> tuple[float, int]:
    """Accepted calls a second over the steady seconds, and how many seconds that is."""
    length = max((len(t.get("ok", [])) for t in timeline.values()), default=0)
    ok = [sum(t.get("ok", [])[i] if i < len(t.get("ok", [])) else 0 for t in timeline.values())
          for i in range(length)]  # fmt: skip
    busy = [i for i, n in enumerate(ok) if n]
    if len(busy) < 6:
        return 0.0, 0
    window = ok[busy[0] + 2 : busy[-1]]
    return sum(window) / len(window), len(window)


def one_run(
    s3_url: str, rek_url: str, bucket: str, regions: list[str], work: Path, label: str, args: Any
) -> dict[str, Any]:
    out = work / f"out-{label}"
    config = write_job(
        str(work / f"{label}.toml"),
        bucket=bucket,
        out=str(out),
        s3_url=s3_url,
        rek_url=rek_url,
        operations='[[operations]]\ntype = "detect_labels"\n',
        limits=f"concurrency = {args.concurrency}",
        source_extra="sniff = false",
        aws_extra=f"regions = {json.dumps(regions)}",
    )
    fake_admin(rek_url, "/_fake/reset", {})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_cli(
        "run", config, "--log-format", "json", env={"AWS_ENDPOINT_URL_SERVICE_QUOTAS": rek_url}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"rekbatch exited {proc.returncode}: {proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    stats = fake_admin(rek_url, "/_fake/stats")
    summary = json.loads((out / "summary.json").read_text())
    rate, seconds = steady_rate(stats["region_timeline"])
    served = stats["regions"]
    calls = sum(s.get("calls", 0) for s in served.values())
    throttled = sum(s.get("throttled", 0) for s in served.values())
    return {
        "regions": len(regions),
        "calls": calls,
        "steady_seconds": seconds,
        "calls_per_second": round(rate, 2),
        "share_of_quotas": round(rate / (args.quota * len(regions)), 3),
        "throttled_share": round(throttled / calls, 4) if calls else 0.0,
        "per_region_ok": {r: served.get(r, {}).get("ok", 0) for r in regions},
        "run_seconds": summary["elapsed_seconds"],
        # the rekbatch process's CPU per call: on a busy machine what bounds the rate
        "client_cpu_ms_per_call": round(1000 * cpu / calls, 2) if calls else None,
        "ok": summary["counts"]["by_status"].get("ok", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1800)
    parser.add_argument("--quota", type=float, default=40.0)
    parser.add_argument("--latency-ms", type=float, default=150.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    bucket = "bench-regions"
    with (
        synthetic_s3({bucket: args.images}) as s3,
        fake_rekognition(
            s3.url,
            "--s3-cache",
            "--quota",
            f"DetectLabels={args.quota}",
            "--latency-ms",
            str(args.latency_ms),
        ) as rek_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        s3_url = s3.url
        applied = {region: {"DetectLabels": args.quota} for region in REGIONS}
        fake_admin(rek_url, "/_fake/config", {"applied_quotas": applied})
        work = Path(tmp)
        sets = [REGIONS[:1], REGIONS[:2], REGIONS[:3]]
        for round_ in range(args.rounds):
            order = sets if round_ % 2 == 0 else list(reversed(sets))
            for regions in order:
                label = f"r{round_}-{len(regions)}"
                result = one_run(s3_url, rek_url, bucket, regions, work, label, args)
                result["round"] = round_
                result["load"] = round(os.getloadavg()[0], 2)
                rows.append(result)
                print(json.dumps(result), flush=True)
                time.sleep(1)
    medians: dict[int, dict[str, float]] = {}
    for n in (1, 2, 3):
        mine = [r for r in rows if r["regions"] == n]
        medians[n] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("calls_per_second", "share_of_quotas", "throttled_share")
        }
    ratios = [
        three["calls_per_second"] / one["calls_per_second"]
        for one, three in zip(
            [r for r in rows if r["regions"] == 1],
            [r for r in rows if r["regions"] == 3],
            strict=True,
        )
    ]
    payload = {
        "images": args.images,
        "quota_per_region": args.quota,
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "rows": rows,
        "medians": medians,
        "ratio_3_to_1_median": round(statistics.median(ratios), 3),
        "cores": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"regions-quota{args.quota:g}.json"
    (RESULTS / name).write_text(json.dumps(payload, indent=2) + "\n")
    print("\n| Regions | calls/s (median) | share of their quotas | throttled |")
    print("|---|---|---|---|")
    for n, m in medians.items():
        print(
            f"| {n} | {m['calls_per_second']:.1f} | {m['share_of_quotas']:.3f} | "
            f"{100 * m['throttled_share']:.2f}% |"
        )
    print(f"\n3 Regions / 1 Region (median of rounds): {payload['ratio_3_to_1_median']}")
    print(f"load average before {payload['load_before']}, after {payload['load_after']}")


if __name__ == "__main__":
    main()
