"""The test servers as fixtures: ``start_fake`` starts fake Rekognition servers (on the
session's moto S3 unless told otherwise) and stops them when the test ends; ``fake`` is one
with the default behaviour, which a module overrides when its tests need another
(``def fake(start_fake): return start_fake(people=sample_people())``); ``served_job`` writes
a job on them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.configs import write_job
from tests.support.fake_rekognition import FakeConfig, FakeRekognition


class StartFake(Protocol):
    def __call__(
        self,
        *,
        clock: Callable[[], float] = ...,
        sleep: Callable[[float], Awaitable[None]] = ...,
        **behaviour: Any,
    ) -> FakeRekognition: ...


@pytest.fixture
def start_fake(request: pytest.FixtureRequest) -> Iterator[StartFake]:
    """``start_fake(**behaviour)``: a started fake, ``behaviour`` being ``FakeConfig``'s
    fields; ``s3_endpoint_url`` defaults to the moto server (``None``: no S3). ``clock`` and
    ``sleep`` replace the fake's own (``FakeRekognition``)."""
    with ExitStack() as servers:

        def start(
            *,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
            **behaviour: Any,
        ) -> FakeRekognition:
            if "s3_endpoint_url" not in behaviour:
                behaviour["s3_endpoint_url"] = request.getfixturevalue("moto_endpoint")
            server = FakeRekognition(FakeConfig(**behaviour), clock=clock, sleep=sleep)
            return servers.enter_context(server)

        yield start


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    """A fake Rekognition on the moto server, with the default behaviour."""
    return start_fake()


class ServedJob(Protocol):
    def __call__(self, fake: FakeRekognition, *uris: str | Path, **settings: Any) -> Path: ...


@pytest.fixture
def served_job(tmp_path: Path, moto_endpoint: str) -> ServedJob:
    """``served_job(fake, *uris, **settings)``: a job on the moto server and ``fake`` in
    ``tmp_path / "job.toml"``, writing to ``tmp_path / "out"``; ``settings`` as
    ``job_config``'s (``source={"sniff": False}``, ``operations=...``)."""

    def write(fake: FakeRekognition, *uris: str | Path, **settings: Any) -> Path:
        settings.setdefault("output_dir", tmp_path / "out")
        return write_job(
            tmp_path / "job.toml",
            uris=uris,
            s3_endpoint=moto_endpoint,
            rek_endpoint=fake.url,
            **settings,
        )

    return write
