"""The rate-limit and fault scenarios on virtual time, through ``Caller``: the figures of
``bench_ratelimit`` and ``bench_faults`` without a machine's noise.

Each scenario runs ``tests.support.simulated_service.simulate`` (a Rekognition operation
and a client processor on virtual time, driven through ``Caller`` with the engine's retry
policy) once per seed; the table shows the median over seeds and the worst. The same
arguments give the same figures on any machine, so "before" and "after" need no
alternating: run it once per checkout.

- quota scenarios (DetectFaces, 64 consumers, 60 s, median latency 150 ms): the quota
  known (ceiling = quota), unknown (ceiling twice the quota), halved from 20 s to 40 s (to
  43 s, by seed), and unknown and halved with refusals answered in 2 ms; quotas 20, 50 and
  100;
- fault mixes (bench_faults' shape: ceiling 400, 32 consumers, 20 ms answers, a client
  spending 2.9 ms of processor per request), on a quiet machine and a busy one (the
  client off its processor 60% of the time and the service 70%, in slices of 0.1 s):
  ok calls per second as a share of the same machine's fault-free rate.

``--src DIR`` measures another checkout's ``rekbatch`` (the simulation itself comes from
this one).

    python -m benchmarks.sim_ratelimit [--src /tmp/before/src] [--seeds 12] [--label before]
        [--only "busy all three"]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.src_choice import use_src

SRC = use_src()

from tests.support.simulated_service import SimResult, simulate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
QUOTAS = (20.0, 50.0, 100.0)
FAULTS_RUN: dict[str, Any] = {
    "quota": None,
    "ceiling": 400.0,
    "consumers": 32,
    "median": 0.02,
    "throttle_latency": 0.002,
    "duration": 30.0,
    "send_cost": 0.0017,
    "receive_cost": 0.0012,
}
MACHINES: dict[str, dict[str, float]] = {
    "quiet": {},
    "busy": {"busy": 0.6, "server_busy": 0.7, "server_cost": 0.001, "busy_slice": 0.1},
}
MIXES: dict[str, dict[str, float]] = {
    "10% throttles": {"throttle_rate": 0.1},
    "20% 500s": {"error_rate": 0.2},
    "2% dropped connections": {"drop_rate": 0.02},
    "all three": {"throttle_rate": 0.1, "error_rate": 0.2, "drop_rate": 0.02},
}


RESTORE_STEP = 0.25
"""Seconds by which each seed moves the quota's return: a limiter probes every few seconds
while the quota is down, and when the quota comes back in that cycle decides how soon it
is found again; the default twelve seeds spread it over about one cycle."""


def quota_scenarios(seed: int) -> dict[str, dict[str, Any]]:
    scenarios: dict[str, dict[str, Any]] = {}
    back = 40.0 + (seed - 1) * RESTORE_STEP
    for q in QUOTAS:
        halved = [(20.0, q / 2), (back, q)]
        scenarios[f"quota {q:g}"] = {"quota": q, "ceiling": q}
        scenarios[f"ceiling 2x the quota ({q:g})"] = {"quota": q, "ceiling": 2 * q}
        scenarios[f"quota {q:g} halves at 20 s, back at 40-43 s"] = {
            "quota": q,
            "ceiling": q,
            "schedule": halved,
        }
        scenarios[f"ceiling 2x, quota {q:g} halves, refusals in 2 ms"] = {
            "quota": q,
            "ceiling": 2 * q,
            "schedule": halved,
            "throttle_latency": 0.002,
        }
    return scenarios


def summary(values: list[float | None], worst: str) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "worst": None}
    pick = min if worst == "min" else max
    return {"median": round(statistics.median(known), 3), "worst": round(pick(known), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, default=SRC, help="the code to measure")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--label", default="", help="suffix of the results file")
    parser.add_argument("--only", default="", help="only the rows whose name contains this")
    args = parser.parse_args()
    seeds = list(range(1, args.seeds + 1))
    rows: list[dict[str, Any]] = []
    print("| scenario | share of quota (steady) | over the run | throttled | back to 0.9 s |")
    print("|---|---|---|---|---|")
    for name in quota_scenarios(1):
        if args.only not in name:
            continue
        results: list[SimResult] = [
            simulate(**quota_scenarios(seed)[name], seed=seed) for seed in seeds
        ]
        row = {
            "scenario": name,
            "steady_share": summary([r.steady_share for r in results], "min"),
            "quota_share": summary([r.quota_share for r in results], "min"),
            "throttled_share": summary([r.throttled_share for r in results], "max"),
            "recovery_seconds": summary([r.recovery for r in results], "max"),
        }
        rows.append(row)
        cells = [
            f"{row[k]['median']} (worst {row[k]['worst']})"
            for k in ("steady_share", "quota_share", "throttled_share", "recovery_seconds")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("\n| machine | fault mix | share of fault-free | fault-free ok/s | cuts |")
    print("|---|---|---|---|---|")
    for machine, load in MACHINES.items():
        mixes = {mix: faults for mix, faults in MIXES.items() if args.only in f"{machine} {mix}"}
        if not mixes:
            continue
        free = [simulate(**FAULTS_RUN, **load, seed=seed) for seed in seeds]
        for mix, faults in mixes.items():
            faulty = [simulate(**FAULTS_RUN, **load, **faults, seed=seed) for seed in seeds]
            shares = [f.ok_per_second / g.ok_per_second for f, g in zip(faulty, free, strict=True)]
            row = {
                "machine": machine,
                "mix": mix,
                "share_of_fault_free": summary(list(shares), "min"),
                "fault_free_ok_per_second": round(
                    statistics.median(g.ok_per_second for g in free), 1
                ),
                "cuts": [f.limiter["cuts"] for f in faulty],
            }
            rows.append(row)
            share = row["share_of_fault_free"]
            print(
                f"| {machine} | {mix} | {share['median']} (worst {share['worst']}) | "
                f"{row['fault_free_ok_per_second']} | {row['cuts']} |",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    name = f"sim_ratelimit{'-' + args.label if args.label else ''}.json"
    payload = {"src": str(args.src), "seeds": seeds, "rows": rows}
    (RESULTS / name).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
