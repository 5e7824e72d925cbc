"""How a run ends when something is systemically wrong: four scenarios, each through the CLI
in a process of its own, against moto's S3 and the fake Rekognition (each in its own
process), all with the default settings except those named.

1. ``slow``: 120 small images and one large one sent as bytes (``image_mode = "bytes"``,
   ``max_attempts = 3``, concurrency 4); the fake holds every request with a body over
   100 kB until the client gives up. Figures: sends of the large image, the exit code and
   the run's seconds.
2. ``malformed``: every answer malformed (``malformed_rate = 1``), 500 objects, concurrency
   4. Figures: calls made, seconds until the run exits (or until ``--bound``, when it is
   stopped: "still going").
3. ``sigterm``: every call stalled (``stall_rate = 1``, held until the client leaves), 40
   objects, concurrency 4; SIGTERM once the fake holds four calls. Figures: seconds from
   SIGTERM to exit, the exit code.
4. ``first-contact``: ``rekbatch scan DIR --op compare_faces=REF`` with the Rekognition
   endpoint on a port where nothing listens. Figures: seconds to the exit, the exit code,
   the last line on stderr.

    python -m benchmarks.stops [--src DIR] [--only NAME ...] [--bound 300]

``--src`` measures another checkout's ``rekbatch`` (the code before a change).
"""

from __future__ import annotations

from benchmarks.src_choice import use_src

use_src(children=True)

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.servers import (  # noqa: E402
    REGION,
    bench_env,
    fake_admin,
    fake_rekognition,
    fill_bucket,
    moto_s3,
    s3_client,
    write_job,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "wheres-ric"
LABELS = '[[operations]]\ntype = "detect_labels"\n'


def _cli(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rekbatch", *args, "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
        env={**bench_env(), **(env or {})},
        cwd=REPO,
    )


def _finish(proc: subprocess.Popen[str], bound: float) -> int | None:
    """The exit code, or None when the run was still going after ``bound`` seconds."""
    try:
        return proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("rekbatch:")]
    return lines[-1] if lines else ""


def _calls(rek: str) -> dict[str, Any]:
    return fake_admin(rek, "/_fake/stats")


def _labels_job(
    work: Path, name: str, s3: str, rek: str, limits: str, *, source: str = "", aws: str = ""
) -> str:
    """DetectLabels over the bucket ``name``, without header reads; its output in ``work``."""
    return write_job(
        str(work / f"{name}.toml"),
        bucket=name,
        out=str(work / f"{name}-out"),
        s3_url=s3,
        rek_url=rek,
        operations=LABELS,
        limits=limits,
        source_extra=f"sniff = false\n{source}",
        aws_extra=aws,
    )


def _timed(
    args: list[str], log: Path, bound: float, env: dict[str, str] | None = None
) -> tuple[int | None, float]:
    """The command's exit code (None: still going after ``bound``) and its seconds."""
    started = time.monotonic()
    code = _finish(_cli(args, log, env), bound)
    return code, time.monotonic() - started


def slow(work: Path, s3: str, rek: str, bound: float) -> dict[str, Any]:
    client = s3_client(s3)
    client.create_bucket(Bucket="slow", CreateBucketConfiguration={"LocationConstraint": REGION})
    for i in range(120):
        body = b"\xff\xd8\xff\xe0" + i.to_bytes(8, "big") * 64 + b"\xff\xd9"
        client.put_object(Bucket="slow", Key=f"img/{i:04d}.jpg", Body=body)
    large = b"\xff\xd8\xff\xe0" + b"\x01" * 150_000 + b"\xff\xd9"
    client.put_object(Bucket="slow", Key="img/zz-large.jpg", Body=large)
    fake_admin(rek, "/_fake/reset", {})
    fake_admin(rek, "/_fake/config", {"slow_body_bytes": 100_000, "slow_seconds": 0})
    config = _labels_job(
        work,
        "slow",
        s3,
        rek,
        "concurrency = 4\nmax_tps = 200\nmax_attempts = 3",
        source="list_concurrency = 1",
        aws='image_mode = "bytes"',
    )
    code, seconds = _timed(["run", config], work / "slow.log", bound)
    stats = _calls(rek)
    fake_admin(rek, "/_fake/config", {"slow_body_bytes": 0})
    return {
        "sends of the large image": sum(stats.get("slow", {}).values()),
        "exit": code,
        "seconds": round(seconds, 1),
        "other requests answered": sum(stats["ok"].values()),
        "line": _last_line(work / "slow.log"),
    }


def malformed(work: Path, s3: str, rek: str, bound: float) -> dict[str, Any]:
    fill_bucket(s3, "malformed", 500)
    fake_admin(rek, "/_fake/reset", {})
    fake_admin(rek, "/_fake/config", {"malformed_rate": 1.0})
    config = _labels_job(work, "malformed", s3, rek, "concurrency = 4\nmax_tps = 500")
    code, seconds = _timed(["run", config], work / "malformed.log", bound)
    calls = sum(_calls(rek)["calls"].values())
    fake_admin(rek, "/_fake/config", {"malformed_rate": 0.0})
    return {
        "calls": calls,
        "seconds": round(seconds, 1),
        "exit": code if code is not None else f"still going after {bound:.0f} s",
        "line": _last_line(work / "malformed.log"),
    }


def sigterm(work: Path, s3: str, rek: str, bound: float) -> dict[str, Any]:
    fill_bucket(s3, "stalled", 40)
    fake_admin(rek, "/_fake/reset", {})
    fake_admin(rek, "/_fake/config", {"stall_rate": 1.0, "stall_seconds": 0})
    config = _labels_job(work, "stalled", s3, rek, "concurrency = 4\nmax_tps = 100")
    proc = _cli(["run", config], work / "stalled.log")
    deadline = time.monotonic() + 60
    while sum(_calls(rek)["stalled"].values()) < 4:
        if time.monotonic() > deadline:
            raise RuntimeError("the run did not start calling within 60 s")
        time.sleep(0.05)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = _finish(proc, bound)
    seconds = time.monotonic() - signalled
    fake_admin(rek, "/_fake/config", {"stall_rate": 0.0})
    return {
        "seconds from SIGTERM to exit": round(seconds, 1),
        "exit": code if code is not None else f"still running after {bound:.0f} s",
        "line": _last_line(work / "stalled.log"),
    }


def first_contact(work: Path, s3: str, rek: str, bound: float) -> dict[str, Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"REKBATCH_AWS__REKOGNITION_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    args = ["scan", str(SAMPLES), "--op", f"compare_faces={SAMPLES / 'ric_harvey.jpeg'}"]
    args += ["--output", str(work / "scan-out")]
    code, seconds = _timed(args, work / "scan.log", bound, env)
    return {
        "seconds to the error": round(seconds, 1),
        "exit": code,
        "line": _last_line(work / "scan.log"),
    }


SCENARIOS = {
    "slow": slow,
    "malformed": malformed,
    "sigterm": sigterm,
    "first-contact": first_contact,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="the checkout's src folder to measure")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--bound", type=float, default=300.0, help="seconds a run may take")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, moto_s3() as s3, fake_rekognition(s3) as rek:
        for name in args.only or SCENARIOS:
            work = Path(tmp) / name
            work.mkdir()
            results[name] = SCENARIOS[name](work, s3, rek, args.bound)
            print(json.dumps({name: results[name]}), flush=True)


if __name__ == "__main__":
    main()
