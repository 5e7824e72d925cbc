"""Benchmark the offline face backend (``rekbatch.backends.local.faces``).

For a photo with faces (the 5-person group selfie ``samples/wheres-ric/ric_crowd1.jpg``,
8 MP) resized to 0.1, 2, 8 and 16 MP and re-encoded as JPEG, measure:

- the median wall time (and CPU time, which other load on the machine disturbs less) per photo
  on one core of detect + embed every face, which is what ``compare_faces`` does for a target
  image (``face_embeddings``), and of ``count_faces`` (the detection-only pre-filter) where
  the code has it;
- images per second through a process pool with one worker per available core, over a batch;
- with ``--readme``: the README's first command (``rekbatch run
  configs/wheres-ric-local.toml``, 7 sample photos) as a subprocess, its own
  ``elapsed_seconds`` from summary.json and the whole process's wall time.

``--src`` picks the code to measure, so the same script measures the code before a change
from another checkout (for example ``git archive f22294f | tar -x -C /tmp/before`` and
``--src /tmp/before/src``; the README command then runs from that checkout too). Workers and
this process run single-threaded (OMP/OpenBLAS), as the backend's pool runs them.

Prints a markdown table and writes ``benchmarks/results/local_faces.json`` (or ``--output``).

    python benchmarks/bench_local_faces.py [--repeats 5] [--batch-per-worker 6] [--readme 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PHOTO = REPO / "samples" / "wheres-ric" / "ric_crowd1.jpg"
SIZES_MP = (0.1, 2.0, 8.0, 16.0)
RESULTS = HERE / "results" / "local_faces.json"
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")


sys.path.insert(0, str(REPO))
from benchmarks.src_choice import use_src  # noqa: E402

# --src must take effect before rekbatch is imported (and in the spawned workers).
SRC = use_src(children=True)

from PIL import Image  # noqa: E402

from rekbatch.backends.local import faces as local_faces  # noqa: E402


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


def _count(data: bytes) -> int:
    count: int = local_faces.count_faces(data)  # type: ignore[attr-defined]
    return count


def single_core(task: Any, data: bytes, repeats: int) -> dict[str, Any]:
    faces = task(data)  # warm-up (and models loaded)
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        task(data)
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


def readme_run(runs: int) -> dict[str, Any]:
    """The README's first command, from the checkout that holds ``--src``."""
    root = SRC.parent
    elapsed, wall = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            start = time.perf_counter()
            command = ["run", "configs/wheres-ric-local.toml", "--output", str(out)]
            subprocess.run(
                [sys.executable, "-m", "rekbatch", *command],
                cwd=root,
                check=True,
                capture_output=True,
            )
            wall.append(time.perf_counter() - start)
            summary = json.loads((out / "summary.json").read_text())
            elapsed.append(float(summary["elapsed_seconds"]))
            assert len(summary["compare_faces"]["matched_keys"]) == 3, summary
    return {
        "runs": runs,
        "elapsed_seconds": elapsed,
        "wall_seconds": [round(w, 2) for w in wall],
        "median_elapsed_s": statistics.median(elapsed),
        "median_wall_s": statistics.median(wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the code to measure")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-per-worker", type=int, default=6)
    parser.add_argument("--readme", type=int, default=0, help="README command runs (0: none)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    from rekbatch.backends.local.backend import default_workers

    has_count = hasattr(local_faces, "count_faces")
    workers = default_workers()
    local_faces.warm_up()
    rows = []
    for megapixels in SIZES_MP:
        data = photo_at(megapixels)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        one = single_core(_task, data, args.repeats)
        rate = pool_throughput(data, workers, args.batch_per_worker * workers)
        row = {
            "megapixels": megapixels,
            "width": width,
            "height": height,
            "faces": one["faces"],
            "median_s_per_photo_1_core": round(one["median_s"], 3),
            "min_s_per_photo_1_core": round(one["min_s"], 3),
            "median_cpu_s_per_photo": round(one["median_cpu_s"], 3),
            "pool_images_per_s": round(rate, 2),
        }
        if has_count:
            count = single_core(_count, data, args.repeats)
            row["count_faces_median_cpu_s"] = round(count["median_cpu_s"], 3)
        rows.append(row)
        print(f"{megapixels} MP done", file=sys.stderr)

    import dlib

    result: dict[str, Any] = {
        "src": str(SRC),
        "photo": str(PHOTO.relative_to(REPO)),
        "task": "face_embeddings (detect + landmarks + embedding of every face)",
        "workers": workers,
        "repeats": args.repeats,
        "batch": args.batch_per_worker * workers,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "dlib": dlib.__version__,
        "rows": rows,
    }
    if args.readme:
        result["readme"] = readme_run(args.readme)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    count_head = " count_faces CPU s |" if has_count else ""
    print(
        f"| MP | size | faces | median s/photo (1 core) | median CPU s/photo |{count_head} "
        f"images/s ({workers} workers) |"
    )
    print("|---:|---|---:|---:|---:|" + ("---:|" if has_count else "") + "---:|")
    for row in rows:
        count_cell = f" {row['count_faces_median_cpu_s']:.3f} |" if has_count else ""
        print(
            f"| {row['megapixels']} | {row['width']}x{row['height']} | {row['faces']} "
            f"| {row['median_s_per_photo_1_core']:.3f} | {row['median_cpu_s_per_photo']:.3f} "
            f"|{count_cell} {row['pool_images_per_s']:.2f} |"
        )
    if args.readme:
        readme = result["readme"]
        print(
            f"\nREADME command, {readme['runs']} runs: elapsed_seconds {readme['elapsed_seconds']}"
            f", process wall {readme['wall_seconds']} s"
        )
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
