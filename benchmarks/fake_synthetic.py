"""The project's fake Rekognition, answering S3Object images of a synthetic bucket without
fetching them: the bytes of ``s3://bucket/key`` are made from the key the way
``benchmarks.synthetic_s3`` makes them, so every answer is what the fake would give after a
GET, minus the GET. For the 1M-object memory runs, where each key is called once and a GET
per call would make the fake (not the client) the bound, and ``--s3-cache`` would only cost
the fake memory.

This overrides ``FakeRekognition._fetch_s3``, a private method of tests/support: if it is
gone (the fake is being changed elsewhere), ``--check`` says so and bench_engine falls back
to the plain fake fetching from the synthetic S3.

    python -m benchmarks.fake_synthetic --port 0 --s3-endpoint-url URL
"""

from __future__ import annotations

import argparse
import inspect
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from tests.support.fake_rekognition import FakeConfig, FakeRekognition

from benchmarks.synthetic_s3 import object_body


def hook_available() -> bool:
    method = getattr(FakeRekognition, "_fetch_s3", None)
    if method is None or not inspect.iscoroutinefunction(method):
        return False
    return list(inspect.signature(method).parameters) == ["self", "bucket", "key", "version"]


class SyntheticFake(FakeRekognition):
    async def _fetch_s3(self, bucket: str, key: str, version: str | None) -> bytes:
        return object_body(key)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fake_synthetic")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--s3-endpoint-url", default=None)
    parser.add_argument("--region", default="eu-west-1")
    parser.add_argument("--check", action="store_true", help="exit 0 if the hook still fits")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if hook_available() else 1
    if not hook_available():
        print("FakeRekognition._fetch_s3 changed: cannot answer without fetching", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    config = FakeConfig(s3_endpoint_url=args.s3_endpoint_url, region=args.region)
    with SyntheticFake(config, host=args.host, port=args.port) as fake:
        print(fake.url, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
