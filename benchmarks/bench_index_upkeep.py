"""What keeping the face index in step with the rows costs (index_faces).

Four measurements:

- ``replace``: what a replaced photo costs, and whether ``find`` still answers it. A bucket
  of ``--images`` photos, ric in every 10th (the fake's ``--people``); a first run indexes
  them, then a tenth of the photos are replaced under their keys (half of them ric's, by
  photos without him) and the job is run again; then ``rekbatch find --person ric=REF``.
  This checkout against ``--baseline-src``, alternating, each round from a fresh bucket
  state, fake and output folder. Per contender: the calls of the second run by API, its
  CPU seconds, the extra calls and CPU milliseconds per replaced photo (this minus the
  baseline), the photos ``find`` answers that are no longer ric's, and the faces left in the
  collection that no current row names.
- ``normal``: a clean ``rekbatch run`` of ``--images`` photos with ``index_faces`` against the
  fake Rekognition (its own process; S3 is moto, its own process), the code of this checkout
  against ``--baseline-src`` (another checkout's ``src``, e.g. main's), alternating, each
  round in a fresh output folder. Per contender: the calls the fake saw by API (the point: no
  call beyond CreateCollection and IndexFaces) and rekbatch's CPU seconds per photo; the
  ratio of the medians.
- ``resume``: the same run killed (SIGKILL) while the fake holds an IndexFaces answer whose
  faces it has indexed (``--fail-call K=stall``, K at 80% of the photos, concurrency 32),
  then ``rekbatch resume``: the ListFaces and DeleteFaces calls of the resume, the faces it
  deleted, the seconds its upkeep took (its log line), and whether each face is then in the
  index exactly once.
- ``offline``: an offline collection of ``--faces`` synthetic faces (the store's own append),
  ten images of which have faces but no row: the sweep (``FaceUpkeep`` through the local
  backend's ListFaces, 4,096 a page, and DeleteFaces), its calls and seconds.

    python benchmarks/bench_index_upkeep.py [--images 2000] [--rounds 3]
        [--baseline-src /work/main/src] [--faces 1000000]
        [--parts replace,normal,resume,offline]

Prints a summary and writes ``benchmarks/results/index_upkeep.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "index_upkeep.json"
BUCKET = "bench-upkeep"
LOG = ("--log-format", "json")

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from benchmarks.servers import (  # noqa: E402
    bench_client,
    bench_env,
    fake_admin,
    fake_rekognition,
    fill_bucket,
    moto_s3,
    write_job,
)

OPERATIONS = '[[operations]]\ntype = "index_faces"\ncollection_id = "bench-upkeep"\n'


def _job(folder: Path, s3_url: str, rek_url: str) -> str:
    return write_job(
        str(folder / "job.toml"),
        bucket=BUCKET,
        out=str(folder / "out"),
        s3_url=s3_url,
        rek_url=rek_url,
        operations=OPERATIONS,
        limits="concurrency = 32\nmax_tps = 100000",
        source_extra="sniff = false",
    )


def _rekbatch(src: Path | None, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``rekbatch ARGS`` as a child; its CPU seconds (user + system)."""
    env = bench_env()
    if src is not None:
        env["PYTHONPATH"] = str(src)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-m", "rekbatch", *args, *([] if args[0] == "find" else LOG)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
        cwd=REPO,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, cpu


def _faces(rek_url: str) -> dict[str, int]:
    """FaceId -> how many times the fake's collections list it."""
    client = bench_client("rekognition", rek_url)
    found: dict[str, int] = {}
    for collection in client.list_collections()["CollectionIds"]:
        for page in client.get_paginator("list_faces").paginate(CollectionId=collection):
            for face in page["Faces"]:
                found[face["FaceId"]] = found.get(face["FaceId"], 0) + 1
    return found


def _named(out: Path) -> set[str]:
    from rekbatch.operations.summaries import indexed_face_ids
    from rekbatch.sinks.current import current_lines

    named: set[str] = set()
    for line in current_lines(out):
        row = json.loads(line)
        if row["status"] == "ok":
            named.update(indexed_face_ids(row["result"]))
    return named


def _photo(seed: int) -> bytes:
    from tests.helpers import fake_jpeg

    return fake_jpeg(seed)


def part_replace(images: int, rounds: int, baseline: Path | None) -> dict[str, Any]:
    """See the module docstring; the figures of each round, and their medians."""
    import hashlib

    originals = {f"img/{i:07d}.jpg": _photo(i) for i in range(images)}
    ric = {key for i, key in enumerate(originals) if i % 10 == 0}
    # A tenth replaced: half of ric's photos (by photos without him), as many others.
    replaced = {key: _photo(10_000_000 + i) for i, key in enumerate(originals) if i % 20 in (0, 5)}
    truth = ric - set(replaced)
    people = {hashlib.sha256(body).hexdigest(): [f"p{n}", f"q{n}"] for n, body in
              enumerate([*originals.values(), *replaced.values()])}  # fmt: skip
    for key in ric:
        people[hashlib.sha256(originals[key]).hexdigest()].append("ric")
    reference = _photo(-1)
    people[hashlib.sha256(reference).hexdigest()] = ["ric"]
    contenders: dict[str, Path | None] = {"this": None}
    if baseline is not None:
        contenders = {"baseline": baseline, "this": None}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    with moto_s3() as s3_url, tempfile.TemporaryDirectory() as shared:
        people_file = Path(shared) / "people.json"
        people_file.write_text(json.dumps(people))
        ref_file = Path(shared) / "ric.jpg"
        ref_file.write_bytes(reference)
        s3 = bench_client("s3", s3_url)
        s3.create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        for round_ in range(rounds):
            order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
            for name in order:
                _put(s3, originals)
                with (
                    fake_rekognition(s3_url, "--people", str(people_file)) as rek_url,
                    tempfile.TemporaryDirectory() as tmp,
                ):
                    src = contenders[name]
                    job = _job(Path(tmp), s3_url, rek_url)
                    done, _ = _rekbatch(src, "run", job)
                    if done.returncode != 0:
                        raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr[-2000:]}")
                    _put(s3, replaced)
                    fake_admin(rek_url, "/_fake/reset", {})
                    started = time.monotonic()
                    done, cpu = _rekbatch(src, "run", job)
                    seconds = time.monotonic() - started
                    if done.returncode != 0:
                        raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr[-2000:]}")
                    calls = fake_admin(rek_url, "/_fake/stats")["calls"]
                    out = Path(tmp) / "out"
                    found, _ = _rekbatch(src, "find", str(out), "--person", f"ric={ref_file}")
                    if found.returncode != 0:
                        raise RuntimeError(f"{name} find: {found.stderr[-2000:]}")
                    answered = {
                        json.loads(line)["key"]
                        for line in (out / "find" / "ric.jsonl").read_text().splitlines()
                    }
                    indexed = _faces(rek_url)
                    named = _named(out)
                rows[name].append(
                    {
                        "rerun_calls": calls,
                        "rerun_cpu_seconds": round(cpu, 3),
                        "rerun_seconds": round(seconds, 3),
                        "find_answers": len(answered),
                        "find_stale_answers": len(answered - truth),
                        "find_missed": len(truth - answered),
                        "faces_in_index": sum(indexed.values()),
                        "faces_no_row_names": len(set(indexed) - named),
                    }
                )
                print(f"replace round {round_ + 1} {name}: {json.dumps(rows[name][-1])}")
    result: dict[str, Any] = {
        "images": images,
        "replaced": len(replaced),
        "ric_photos_before": len(ric),
        "ric_photos_after": len(truth),
        "rounds": rows,
    }
    medians = {
        name: {
            "rerun_cpu_seconds": statistics.median(r["rerun_cpu_seconds"] for r in runs),
            "rerun_seconds": statistics.median(r["rerun_seconds"] for r in runs),
        }
        for name, runs in rows.items()
    }
    result["medians"] = medians
    if "baseline" in rows:
        this_calls = sum(rows["this"][0]["rerun_calls"].values())
        base_calls = sum(rows["baseline"][0]["rerun_calls"].values())
        extra_cpu = medians["this"]["rerun_cpu_seconds"] - medians["baseline"]["rerun_cpu_seconds"]
        result["extra_calls_per_replaced_photo"] = round(
            (this_calls - base_calls) / len(replaced), 4
        )
        result["extra_cpu_ms_per_replaced_photo"] = round(1000 * extra_cpu / len(replaced), 3)
        result["rerun_cpu_ratio_this_to_baseline"] = round(
            medians["this"]["rerun_cpu_seconds"] / medians["baseline"]["rerun_cpu_seconds"], 3
        )
    return result


def _put(s3: Any, bodies: dict[str, bytes]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def put(item: tuple[str, bytes]) -> None:
        s3.put_object(Bucket=BUCKET, Key=item[0], Body=item[1])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, bodies.items()))


def part_normal(images: int, rounds: int, baseline: Path | None) -> dict[str, Any]:
    contenders: dict[str, Path | None] = {"this": None}
    if baseline is not None:
        contenders = {"baseline": baseline, "this": None}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    calls: dict[str, dict[str, int]] = {}
    with moto_s3() as s3_url:
        fill_bucket(s3_url, BUCKET, images)
        for round_ in range(rounds):
            order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
            for name in order:
                with (
                    fake_rekognition(s3_url, "--s3-cache") as rek_url,
                    tempfile.TemporaryDirectory() as tmp,
                ):
                    done, cpu = _rekbatch(contenders[name], "run", _job(Path(tmp), s3_url, rek_url))
                    if done.returncode != 0:
                        raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr[-2000:]}")
                    calls[name] = fake_admin(rek_url, "/_fake/stats")["calls"]
                samples[name].append(cpu / images)
                print(f"normal round {round_ + 1} {name}: {1000 * cpu / images:.3f} ms CPU/photo")
    medians = {name: statistics.median(values) for name, values in samples.items()}
    out: dict[str, Any] = {
        "images": images,
        "rounds": rounds,
        "cpu_ms_per_photo": {n: [round(1000 * v, 3) for v in vs] for n, vs in samples.items()},
        "median_cpu_ms_per_photo": {n: round(1000 * v, 3) for n, v in medians.items()},
        "calls": calls,
    }
    if "baseline" in medians:
        out["ratio_this_to_baseline"] = round(medians["this"] / medians["baseline"], 3)
    return out


def part_resume(images: int) -> dict[str, Any]:
    stall_at = int(images * 0.8)
    with moto_s3() as s3_url:
        fill_bucket(s3_url, BUCKET, images)
        with (
            fake_rekognition(
                s3_url,
                "--s3-cache",
                "--latency-ms",
                "50",
                "--fail-call",
                f"{stall_at}=stall",
                "--stall-seconds",
                "0",
            ) as rek_url,
            tempfile.TemporaryDirectory() as tmp,
        ):
            folder = Path(tmp)
            job = _job(folder, s3_url, rek_url)
            env = bench_env()
            proc = subprocess.Popen(
                [sys.executable, "-m", "rekbatch", "run", job, "--log-format", "json"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
            )
            deadline = time.monotonic() + 600
            while not fake_admin(rek_url, "/_fake/stats")["stalled"].get("IndexFaces"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the run ended (or stalled nothing) before the kill")
                time.sleep(0.05)
            time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            before = _faces(rek_url)
            out = folder / "out"
            named_before = _named(out)
            fake_admin(rek_url, "/_fake/config", {"fail_calls": {}})
            fake_admin(rek_url, "/_fake/reset", {})
            started = time.monotonic()
            done, cpu = _rekbatch(None, "resume", str(out))
            seconds = time.monotonic() - started
            if done.returncode != 0:
                raise RuntimeError(f"resume: exit {done.returncode}: {done.stderr[-2000:]}")
            calls = fake_admin(rek_url, "/_fake/stats")["calls"]
            upkeep = [
                json.loads(line)
                for line in done.stderr.splitlines()
                if '"face_index_upkeep"' in line
            ]
            after = _faces(rek_url)
            named_after = _named(out)
            notes = (out / ".rekbatch" / "index_faces.notes").read_text()
    return {
        "images": images,
        "stalled_call": stall_at,
        "faces_before_resume": sum(before.values()),
        "faces_without_a_row_before_resume": len(set(before) - named_before),
        "resume_calls": calls,
        "upkeep": upkeep,
        "resume_seconds": round(seconds, 2),
        "resume_cpu_seconds": round(cpu, 2),
        "faces_after": sum(after.values()),
        "each_face_once_and_named": max(after.values(), default=1) == 1
        and set(after) == named_after,
        "notes_left": notes,
    }


def part_offline(faces: int) -> dict[str, Any]:
    import numpy as np

    from rekbatch.backends.local.backend import LocalBackend
    from rekbatch.backends.local.collections import CollectionStore, StoredFace
    from rekbatch.calls.caller import Caller
    from rekbatch.calls.retry import RetryPolicy
    from rekbatch.operations.index_upkeep import FaceUpkeep
    from rekbatch.store.ledger import Ledger, LedgerDB

    strays = 10
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "results.jsonl").write_bytes(b"")
        root = out / "collections"
        store = CollectionStore(root)
        store.create("bench")
        rng = np.random.default_rng(28)
        started = time.monotonic()
        batch = 50_000
        for start in range(0, faces, batch):
            count = min(batch, faces - start)
            vectors = rng.normal(size=(count, 128))
            store.append(
                "bench",
                [
                    StoredFace(
                        face_id=f"{i:08x}-0000-4000-8000-{i:012x}",
                        image_id=f"image-{i // 4}",
                        # four faces an image; the first ten images have no row
                        external_image_id=f"img-{i // 4}",
                        box={"Width": 0.1, "Height": 0.1, "Left": 0.1, "Top": 0.1},
                        confidence=99.0,
                        embedding=vector,
                    )
                    for i, vector in zip(range(start, start + count), vectors.tolist(), strict=True)
                ],
            )
        built = time.monotonic() - started
        store.close()
        LedgerDB(out / "ledger.sqlite").close()

        async def sweep() -> tuple[float, Any, int]:
            ledger = Ledger(out / "ledger.sqlite")
            backend = LocalBackend(root, workers=1)
            try:
                caller = Caller(
                    backend, max_tps=1e9, region="eu-west-1", retry=RetryPolicy(max_attempts=1)
                )
                upkeep = FaceUpkeep("index_faces", out, ledger, caller)
                began = time.monotonic()
                await upkeep.run({("bench", f"img-{n}") for n in range(strays)})
                return time.monotonic() - began, upkeep.calls, 0
            finally:
                await backend.aclose()
                await ledger.close()

        seconds, calls, _ = asyncio.run(sweep())
        left = CollectionStore(root)
        try:
            remaining = left.count("bench")
        finally:
            left.close()
    return {
        "faces": faces,
        "stray_images": strays,
        "build_seconds": round(built, 1),
        "sweep_seconds": round(seconds, 2),
        "list_faces_calls": calls.list_faces,
        "delete_faces_calls": calls.delete_faces,
        "deleted": calls.deleted,
        "faces_left": remaining,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--parts", default="replace,normal,resume,offline")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average_before": list(os.getloadavg()),
        "python": platform.python_version(),
    }
    if "replace" in parts:
        results["replace"] = part_replace(args.images, args.rounds, args.baseline_src)
    if "normal" in parts:
        results["normal"] = part_normal(args.images, args.rounds, args.baseline_src)
    if "resume" in parts:
        results["resume"] = part_resume(args.images)
        print("resume:", json.dumps(results["resume"], indent=1))
    if "offline" in parts:
        results["offline"] = part_offline(args.faces)
        print("offline:", json.dumps(results["offline"], indent=1))
    results["load_average_after"] = list(os.getloadavg())
    if "replace" in results:
        summary = {k: v for k, v in results["replace"].items() if k != "rounds"}
        print("replace:", json.dumps(summary, indent=1))
    if "normal" in results:
        print("normal:", json.dumps(results["normal"], indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
