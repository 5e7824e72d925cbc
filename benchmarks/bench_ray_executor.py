"""Offline backend: images/s with the Ray actor pool (``backend.executor = "ray"``) against
the local process pool, on this machine (issue 13).

The same ``LocalBackend`` answers ``DetectFaces`` for the sample photos (each photo
``--copies`` times: the backend itself has no deduplication), 2 in flight per worker, with
its own process pool or with ``RayActorExecutor`` over a local Ray (``num_cpus`` = the
cores). Start-up (model loading) is excluded: every worker answers one image first. On one
machine both use the same cores, so the ratio shows what Ray adds per image; the contenders
alternate for ``--rounds`` rounds; medians.

    python -m benchmarks.bench_ray_executor --copies 4 --rounds 3

Raw results: benchmarks/results/ray_executor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks.servers import save_report
from rekbatch.backends.base import ImageInput
from rekbatch.backends.local.backend import LocalBackend, default_workers

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "wheres-ric"
RESULTS = Path(__file__).parent / "results" / "ray_executor.json"
PHOTOS = ("ric.jpg", "ric_crowd0.jpg", "sample-image0.jpeg", "sample-image1.jpeg", "demo0.png")


async def _measure(backend: LocalBackend, images: list[bytes], workers: int) -> float:
    async def one(data: bytes) -> None:
        await backend.call("DetectFaces", {}, {"Image": ImageInput(data=data)})

    await asyncio.gather(*(one(images[0]) for _ in range(workers)))  # warm every worker
    gate = asyncio.Semaphore(workers * 2)

    async def bounded(data: bytes) -> None:
        async with gate:
            await one(data)

    started = time.perf_counter()
    await asyncio.gather(*(bounded(d) for d in images))
    return len(images) / (time.perf_counter() - started)


def run(kind: str, images: list[bytes], workers: int) -> float:
    executor = None
    if kind == "ray":
        from rekbatch.backends.local.ray_actors import RayActorExecutor

        executor = RayActorExecutor(workers)
    backend = LocalBackend(workers=workers, executor=executor)

    async def main() -> float:
        try:
            return await _measure(backend, images, workers)
        finally:
            await backend.aclose()

    try:
        return asyncio.run(main())
    finally:
        if executor is not None:
            executor.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import ray

    workers = default_workers()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="warning")
    images = [(SAMPLES / name).read_bytes() for name in PHOTOS] * args.copies
    rates: dict[str, list[float]] = {"pool": [], "ray": []}
    try:
        for round_ in range(args.rounds):
            for kind in ("pool", "ray") if round_ % 2 == 0 else ("ray", "pool"):
                rates[kind].append(run(kind, images, workers))
                print(f"round {round_} {kind}: {rates[kind][-1]:.2f} images/s", flush=True)
    finally:
        ray.shutdown()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    report = {
        "command": "python -m benchmarks.bench_ray_executor "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "workers": workers,
            "python": platform.python_version(),
        },
        "images_per_round": len(images),
        "images_per_second": rates,
        "median_images_per_second": {k: round(v, 3) for k, v in medians.items()},
        "ray_over_pool": round(medians["ray"] / medians["pool"], 3),
    }
    save_report(RESULTS, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
