"""Benchmark the offline face backend (``rekbatch.backends.local.faces``).

For a photo with faces (the 5-person group selfie ``samples/wheres-ric/ric_crowd1.jpg``,
8 MP) resized to 0.1, 2, 8 and 16 MP and re-encoded as JPEG, measure:

- the median wall time (and CPU time, which other load on the machine disturbs less) per photo
  on one core of detect + embed every face, which is what ``compare_faces`` does for a target
  image (``face_embeddings``);
- images per second through a process pool with one worker per available core, over a batch.

Prints a markdown table and writes ``benchmarks/results/local_faces.json``.

    python benchmarks/bench_local_faces.py [--repeats 5] [--batch-per-worker 6]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

from rekbatch.backends.local import faces as local_faces  # noqa: E402
from rekbatch.backends.local.backend import default_workers  # noqa: E402

PHOTO = REPO / "samples" / "wheres-ric" / "ric_crowd1.jpg"
SIZES_MP = (0.1, 2.0, 8.0, 16.0)
RESULTS = HERE / "results" / "local_faces.json"


def photo_at(megapixels: float) -> bytes:
    """The sample photo resized to about ``megapixels`` MP, as JPEG bytes (quality 90)."""
    with Image.open(PHOTO) as original:
        image = original.convert("RGB")
    scale = (megapixels * 1e6 / (image.width * image.height)) ** 0.5
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _task(data: bytes) -> int:
    return len(local_faces.face_embeddings(data))


def single_core(data: bytes, repeats: int) -> dict[str, Any]:
    faces = _task(data)  # warm-up (and models loaded)
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        _task(data)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        # CPU seconds of this process: what the photo costs even when other work shares the core.
        "median_cpu_s": statistics.median(cpu),
        "faces": faces,
    }


def pool_throughput(data: bytes, workers: int, batch: int) -> float:
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=local_faces.warm_up
    ) as pool:
        # Start and warm every worker before timing.
        list(pool.map(_task, [data] * workers))
        start = time.perf_counter()
        list(pool.map(_task, [data] * batch))
        elapsed = time.perf_counter() - start
    return batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-per-worker", type=int, default=6)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    workers = default_workers()
    local_faces.warm_up()
    rows = []
    for megapixels in SIZES_MP:
        data = photo_at(megapixels)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        one = single_core(data, args.repeats)
        rate = pool_throughput(data, workers, args.batch_per_worker * workers)
        rows.append(
            {
                "megapixels": megapixels,
                "width": width,
                "height": height,
                "faces": one["faces"],
                "median_s_per_photo_1_core": round(one["median_s"], 3),
                "min_s_per_photo_1_core": round(one["min_s"], 3),
                "median_cpu_s_per_photo": round(one["median_cpu_s"], 3),
                "pool_images_per_s": round(rate, 2),
            }
        )
        print(f"{megapixels} MP done", file=sys.stderr)

    import dlib

    result = {
        "photo": str(PHOTO.relative_to(REPO)),
        "task": "face_embeddings (detect + landmarks + embedding of every face)",
        "workers": workers,
        "repeats": args.repeats,
        "batch": args.batch_per_worker * workers,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "dlib": dlib.__version__,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print(
        f"| MP | size | faces | median s/photo (1 core) | median CPU s/photo "
        f"| images/s ({workers} workers) |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['megapixels']} | {row['width']}x{row['height']} | {row['faces']} "
            f"| {row['median_s_per_photo_1_core']:.3f} | {row['median_cpu_s_per_photo']:.3f} "
            f"| {row['pool_images_per_s']:.2f} |"
        )
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
