"""The test servers as fixtures: ``start_fake`` starts fake Rekognition servers (on the
session's moto S3 unless told otherwise) and stops them when the test ends; ``fake`` is one
with the default behaviour, which a module overrides when its tests need another
(``def fake(start_fake): return start_fake(people=sample_people())``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, Protocol

import pytest

from tests.support.fake_rekognition import FakeConfig, FakeRekognition


class StartFake(Protocol):
    def __call__(self, **behaviour: Any) -> FakeRekognition: ...


@pytest.fixture
def start_fake(request: pytest.FixtureRequest) -> Iterator[StartFake]:
    """``start_fake(**behaviour)``: a started fake, ``behaviour`` being ``FakeConfig``'s
    fields; ``s3_endpoint_url`` defaults to the moto server (``None``: no S3)."""
    with ExitStack() as servers:

        def start(**behaviour: Any) -> FakeRekognition:
            if "s3_endpoint_url" not in behaviour:
                behaviour["s3_endpoint_url"] = request.getfixturevalue("moto_endpoint")
            return servers.enter_context(FakeRekognition(FakeConfig(**behaviour)))

        yield start


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    """A fake Rekognition on the moto server, with the default behaviour."""
    return start_fake()
