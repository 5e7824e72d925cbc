"""Stand-in services for benchmarks, each in its own process so they do not share the
benchmark's interpreter: moto's S3 server and the project's fake Rekognition server."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3

REGION = "eu-west-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": REGION,
}


def bench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REKBATCH_"))}
    env.update(CREDENTIALS)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except Exception as exc:  # not up yet: connection refused, or an HTTP error page
            if hasattr(exc, "code"):
                return
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout} s")


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=bench_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def fake_rekognition(s3_url: str, *args: str) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.fake_rekognition",
            "--port",
            str(port),
            "--s3-endpoint-url",
            s3_url,
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=bench_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/_fake/stats")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclasses.dataclass(frozen=True)
class RunningServer:
    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server's process has used so far (Linux)."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def url_server(
    argv: list[str], *, timeout: float = 30.0, log_path: str | None = None
) -> Iterator[RunningServer]:
    """Run ``argv`` (a server that prints its URL as the first line of stdout) in a process
    of its own; yield it; stop it (SIGTERM, then SIGKILL) on the way out."""
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log if log is not None else subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=bench_env(),
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} printed no URL within {timeout} s")
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    continue
                line += chunk
        url = line.decode().splitlines()[0].strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"{argv[:4]} printed {url!r}, not a URL")
        yield RunningServer(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if log is not None:
            log.close()


def synthetic_s3(
    buckets: dict[str, int], log_path: str | None = None, page_latency_ms: str = "0-0"
) -> contextlib.AbstractContextManager[RunningServer]:
    """``benchmarks.synthetic_s3`` serving ``buckets`` (name -> object count)."""
    argv = [sys.executable, "-m", "benchmarks.synthetic_s3", "--port", "0", "--region", REGION]
    for name, count in buckets.items():
        argv += ["--bucket", f"{name}={count}"]
    argv += ["--page-latency-ms", page_latency_ms]
    return url_server(argv, log_path=log_path)


def fake_admin(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def bench_client(service: str, url: str) -> Any:
    """A plain boto3 client for ``service`` at ``url`` (moto, the fake)."""
    return boto3.client(
        service,
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )


def s3_client(url: str) -> Any:
    return bench_client("s3", url)


def fill_bucket(url: str, bucket: str, images: int, non_images: int = 0) -> None:
    """``images`` small JPEG-looking objects (distinct content) and some text objects."""
    from concurrent.futures import ThreadPoolExecutor

    s3 = s3_client(url)
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})

    def put(i: int) -> None:
        if i < images:
            body = b"\xff\xd8\xff\xe0" + i.to_bytes(8, "big") * 64 + b"\xff\xd9"
            s3.put_object(Bucket=bucket, Key=f"img/{i:07d}.jpg", Body=body)
        else:
            s3.put_object(Bucket=bucket, Key=f"img/{i:07d}.jpg", Body=b"not a picture " * 8)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(images + non_images)))


def write_job(
    path: str,
    *,
    bucket: str,
    out: str,
    s3_url: str,
    rek_url: str,
    operations: str,
    limits: str,
    source_extra: str = "",
    aws_extra: str = "",
) -> str:
    text = (
        f'[job]\nname = "bench"\noutput_dir = "{out}"\n\n'
        f'[source]\nuris = ["s3://{bucket}/"]\n{source_extra}\n\n'
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{s3_url}"\n'
        f'rekognition_endpoint_url = "{rek_url}"\n{aws_extra}\n\n'
        f"[limits]\n{limits}\n\n{operations}"
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def src_of(revision: str, folder: Path) -> Path:
    """The package sources (``src``) of ``revision`` of this repository, unpacked into
    ``folder`` (made here): a contender to measure against the working tree's."""
    folder.mkdir()
    archive = subprocess.run(
        ["git", "archive", revision, "src"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def save_report(path: Path, report: dict[str, Any]) -> None:
    """The benchmark's figures written to ``path`` (as JSON) and printed."""
    text = json.dumps(report, indent=2)
    path.parent.mkdir(exist_ok=True)
    path.write_text(text + "\n")
    print(text)


def run_cli(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_module("rekbatch", *args, timeout=timeout, env=env)


def run_module(
    module: str, *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m module args``, from the current folder (the repository's, for the
    ``benchmarks.*`` modules)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**bench_env(), **(env or {})},
        timeout=timeout,
        check=False,
    )
