"""Conversion benchmark (issue 16).

1. convert: images per second of ``rekbatch.sources.convert.convert_image`` on a 12 MP HEIC
   (4032 x 3024, a phone's) and a 24 MP JPEG (6000 x 4000 at quality 95 with a little
   grain, over 5 MB, so it is re-encoded to go as bytes), on 1 thread and on one thread per
   core through the run's ``Converter``; per core = images/s over threads, and images per
   CPU second of the process (which a shared machine does not distort). The pictures
   are the sample photo ``ric_crowd1.jpg`` scaled up, so they hold a photo's detail.
2. plain: a bucket of plain JPEGs (real 800 x 600 photos with EXIF) through ``rekbatch run``
   (moto S3 and the fake Rekognition, each in its own process), three contenders alternating
   for ``--rounds`` rounds: this version with ``convert = true`` (the default), this version
   with ``convert = false``, and the version before issue 16 (``--before``, a commit; its
   ``src`` is exported with ``git archive`` to a temporary folder), which sniffed 16 bytes.
   The ratio is the median of the runs' wall times (spawn to exit).

    python -m benchmarks.bench_convert                      # both
    python -m benchmarks.bench_convert --only convert --seconds 20
    python -m benchmarks.bench_convert --only plain --images 1000 --rounds 5

Raw results go to benchmarks/results/convert.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.servers import REGION, bench_env, fake_rekognition, moto_s3, s3_client, src_of

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "wheres-ric" / "ric_crowd1.jpg"
BEFORE = "5380d8d"  # the last commit before issue 16


def _photo(width: int, height: int, grain: float = 0.0) -> Any:
    """The sample photo at ``width`` x ``height``; ``grain`` blends in sensor-like noise,
    which a camera's full-size JPEG has and an upscaled photo lacks."""
    from PIL import Image

    with Image.open(SAMPLE) as img:
        photo = img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    if grain:
        noise = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
        photo = Image.blend(photo, noise, grain)
    return photo


def _encode(img: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def inputs() -> dict[str, bytes]:
    import pillow_heif

    pillow_heif.register_heif_opener()
    return {
        "heic_12mp": _encode(_photo(4032, 3024), "HEIF", quality=80),
        "jpeg_24mp": _encode(_photo(6000, 4000, grain=0.08), "JPEG", quality=95),
    }


async def _throughput(data: bytes, workers: int, seconds: float) -> dict[str, Any]:
    from rekbatch.sources.convert import Converter

    done = 0
    sizes: tuple[int, int] = (0, 0)
    out_bytes = 0
    async with Converter(workers=workers) as converter:
        cpu = time.process_time()
        start = time.perf_counter()
        deadline = start + seconds

        async def one() -> None:
            nonlocal done, sizes, out_bytes
            while time.perf_counter() < deadline:
                result = await converter.convert(data, 10_000)
                done += 1
                sizes = (result.sent_width, result.sent_height)
                out_bytes = len(result.data)

        await asyncio.gather(*(one() for _ in range(workers)))
        elapsed = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu
    rate = done / elapsed
    return {
        "threads": workers,
        "images": done,
        "seconds": round(elapsed, 2),
        "images_per_second": round(rate, 3),
        "images_per_second_per_core": round(rate / workers, 3),
        # CPU seconds of this process (all threads) per image: what a core does when it is
        # not shared, whatever else the machine runs
        "cpu_seconds_per_image": round(cpu_seconds / max(done, 1), 3),
        "images_per_cpu_second": round(done / max(cpu_seconds, 1e-9), 3),
        "sent": list(sizes),
        "sent_bytes": out_bytes,
    }


def bench_convert(seconds: float) -> dict[str, Any]:
    from rekbatch.sources.convert import default_workers

    cores = default_workers()
    results: dict[str, Any] = {"cores": cores}
    for name, data in inputs().items():
        rows = [asyncio.run(_throughput(data, n, seconds)) for n in sorted({1, cores})]
        results[name] = {"input_bytes": len(data), "runs": rows}
        for row in rows:
            print(
                f"{name}: {row['threads']} thread(s) {row['images_per_second']:.2f} images/s, "
                f"{row['images_per_second_per_core']:.2f} per core, "
                f"{row['images_per_cpu_second']:.2f} per CPU second "
                f"({len(data) / 1e6:.1f} MB in, {row['sent_bytes'] / 1e6:.1f} MB out)",
                flush=True,
            )
    return results


# --------------------------------------------------------------------------- plain JPEGs


def _plain_jpegs(url: str, bucket: str, count: int) -> None:
    from PIL import Image

    base = _photo(800, 600)
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "bench camera"
    s3 = s3_client(url)
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})

    def put(i: int) -> None:
        img = base.copy()
        img.putpixel((i % 800, (i // 800) % 600), (i % 256, 0, 0))  # distinct content
        body = _encode(img, "JPEG", quality=85, exif=exif.tobytes())
        s3.put_object(Bucket=bucket, Key=f"img/{i:06d}.jpg", Body=body)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))


def _job(path: Path, out: Path, s3_url: str, rek_url: str, bucket: str, convert: bool) -> Path:
    convert_line = "" if convert else "convert = false\n"
    path.write_text(
        f'[job]\nname = "bench-convert"\noutput_dir = "{out}"\n'
        f'[source]\nuris = ["s3://{bucket}/"]\nsniff = true\n{convert_line}'
        f'[aws]\nregion = "{REGION}"\nimage_mode = "s3"\n'
        f's3_endpoint_url = "{s3_url}"\nrekognition_endpoint_url = "{rek_url}"\n'
        "[limits]\nconcurrency = 64\nmax_tps = 100000\n"
        '[output]\nparquet = false\n[[operations]]\ntype = "detect_labels"\n',
        encoding="utf-8",
    )
    return path


def _run(config: Path, pythonpath: str | None) -> float:
    env = bench_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rekbatch", "run", str(config), "--fresh", "--log-format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # so the installed (or exported) package is imported
        timeout=900,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"rekbatch exited {proc.returncode}: {proc.stderr[-2000:]}")
    return elapsed


def bench_plain(images: int, rounds: int, before: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old = src_of(before, tmp / "before")
        with moto_s3() as s3_url, fake_rekognition(s3_url, "--s3-cache") as rek_url:
            bucket = "bench-plain"
            _plain_jpegs(s3_url, bucket, images)
            # The old version has no source.convert: its config is that of "convert on".
            contenders: dict[str, tuple[Path, str | None]] = {
                "convert on": (
                    _job(tmp / "on.toml", tmp / "on", s3_url, rek_url, bucket, True),
                    None,
                ),
                "convert off": (
                    _job(tmp / "off.toml", tmp / "off", s3_url, rek_url, bucket, False),
                    None,
                ),
                f"before ({before}, 16-byte sniff)": (
                    _job(tmp / "old.toml", tmp / "old", s3_url, rek_url, bucket, True),
                    str(old / "src"),
                ),
            }
            _run(contenders["convert on"][0], None)  # warm moto's and the fake's caches
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for r in range(rounds):
                order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
                for name in order:
                    config, path = contenders[name]
                    times[name].append(_run(config, path))
                print(
                    f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in times),
                    flush=True,
                )
    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians[next(n for n in medians if n.startswith("before"))]
    return {
        "images": images,
        "rounds": rounds,
        "seconds": {n: [round(v, 3) for v in vs] for n, vs in times.items()},
        "median_seconds": {n: round(v, 3) for n, v in medians.items()},
        "images_per_second": {n: round(images / v, 1) for n, v in medians.items()},
        "time_ratio_to_before": {n: round(v / baseline, 3) for n, v in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", choices=["convert", "plain"])
    parser.add_argument("--seconds", type=float, default=15.0, help="per conversion contender")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default=BEFORE)
    args = parser.parse_args()
    path = RESULTS / "convert.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    if args.only in (None, "convert"):
        results["convert"] = bench_convert(args.seconds)
    if args.only in (None, "plain"):
        results["plain"] = bench_plain(args.images, args.rounds, args.before)
        print(json.dumps(results["plain"]["time_ratio_to_before"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
