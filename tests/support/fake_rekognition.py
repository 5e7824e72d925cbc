"""A fake Amazon Rekognition endpoint that speaks the real wire protocol.

Tests and benchmarks point real aiobotocore/boto3 clients at it with ``endpoint_url``:
AWS JSON 1.1, ``POST /`` with ``X-Amz-Target: RekognitionService.<Operation>``; replies are
``application/x-amz-json-1.1`` with an ``x-amzn-RequestId`` header, errors are
``{"__type": "<Code>", "Message": "..."}`` with the status the real service uses:

- 400: ``ProvisionedThroughputExceededException`` (quota), ``InvalidImageFormatException``,
  ``InvalidS3ObjectException``, ``ImageTooLargeException``, ``InvalidParameterException``,
  ``ResourceNotFoundException``, ``ResourceAlreadyExistsException``,
  ``InvalidPaginationTokenException``, ``SerializationException`` (body is not JSON),
  ``UnknownOperationException`` (missing/unknown ``X-Amz-Target``).
- 500: ``InternalServerError`` (``error_rate``) and ``ThrottlingException`` (``throttle_rate``),
  as the Rekognition API reference lists them.

Answers are deterministic functions of the image's sha256 (see ``FakeConfig.people``), so the
same image always gets the same faces, labels and similarities. S3Object images are read from
a (moto) S3 server at ``FakeConfig.s3_endpoint_url``. As with Rekognition, IndexFaces of an
image already in a collection adds its faces again under new FaceIds (still the same ids
for the same sequence of calls).

Faults beyond error answers, for testing a client's fault handling (``FakeConfig``'s ``*_rate``
fields, or ``fail_calls`` to pick them by call number). What aiobotocore 2.25 raises for each:

- ``drop``: the request is read and processed, then the connection is closed (FIN) with no
  response: ``botocore.exceptions.ConnectionClosedError`` (its ``error`` is aiohttp's
  ``ServerDisconnectedError``).
- ``reset``: the same, but closed with a TCP RST: ``EndpointConnectionError`` (its ``error``
  is ``ClientOSError(104, 'Connection reset by peer')``).
- ``stall``: the answer is held for ``stall_seconds`` (0: until the client gives up or the
  server stops): ``ReadTimeoutError`` once the client's read timeout passes.
- ``malformed``: HTTP 200 whose members have the wrong type for the output shape; botocore's
  parser raises a bare ``AttributeError`` (``'int' object has no attribute 'get'``).
- ``garbage``: HTTP 200 with half a JSON document. botocore raises nothing: its JSON parser
  turns an unparsable body into ``{"message": ...}``, so the caller gets a dict holding only
  ``ResponseMetadata`` (no ``Labels``, no ``FaceDetails``).
- ``down_for_seconds``: the endpoint stops listening (connections are refused, open ones are
  closed): ``EndpointConnectionError`` (``ClientConnectorError``, errno 111).
- ``slow_body_bytes``: a request whose body is at least this large (an image sent as bytes)
  is answered only after ``slow_seconds`` (0: held until the client gives up), every time:
  a request always slower than the client's deadline. Counted in ``slow``.
- ``unmodelled_members``: every answer also carries members a newer service might send
  before botocore's model knows them, and JSON nulls (botocore's parser drops both).
- ``refused_keys``: requests signed with one of these access key ids are refused with the
  given code (``ExpiredTokenException``, ``UnrecognizedClientException``), HTTP 400, as
  the service refuses credentials that expired or that it does not know.

Regions: every request is taken to be in the region it is signed for (the credential scope of
its SigV4 ``Authorization`` header; ``FakeConfig.region`` when unsigned), as one URL serves
every region's client of a job with ``rekognition_endpoint_url``. Each region has its own
token bucket per API (``quotas``, overridden per region by ``region_quotas``), its own
counters (``stats()["regions"]``, ``region_timeline``) and can be given a fault for every
call (``region_faults``: ``reset`` to make it unreachable, ``denied`` to refuse every call).

Service Quotas (AWS JSON 1.1, ``X-Amz-Target: ServiceQuotasV20190624.<Operation>``) is
served on the same URL: ``ListServiceQuotas`` and ``GetServiceQuota`` for service code
``rekognition`` answer the applied quotas of ``applied_quotas[region]`` under their real
quota codes and names (``SERVICE_QUOTAS``); ``service_quotas_error`` refuses every such call.

``billed`` counts only answers delivered as HTTP 200 with a valid result; ``undelivered``
counts, per object too, the answers the fake computed as billable but never delivered intact
(dropped, reset, malformed, garbage, or abandoned by the client), which real AWS may well
have billed. ``billed + undelivered`` is the upper bound of what the service could charge.

Run it standalone with ``python -m tests.support.fake_rekognition --port 9001 ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import contextvars
import dataclasses
import errno
import hashlib
import json
import logging
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

from aiohttp import web

__all__ = [
    "CALL_FAULTS",
    "FAULT_RATES",
    "JPEG_MAGIC",
    "MAX_BYTES_IMAGE",
    "MAX_S3_IMAGE",
    "PNG_MAGIC",
    "FakeConfig",
    "FakeRekognition",
    "config_from_args",
    "image_digest",
    "main",
]

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
_T = TypeVar("_T")
_K = TypeVar("_K")

TARGET_PREFIX = "RekognitionService."
CONTENT_TYPE = "application/x-amz-json-1.1"
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_BYTES_IMAGE = 5 * 1024 * 1024
MAX_S3_IMAGE = 15 * 1024 * 1024
ACCOUNT_ID = "123456789012"
FACE_MODEL_VERSION = "7.0"
THROTTLE_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException"})
_OFFLOAD_BYTES = 512 * 1024  # parse/hash bigger payloads off the event loop
_COLLECTION_ID_RE = re.compile(r"[a-zA-Z0-9_.\-]+")
_EXTERNAL_IMAGE_ID_RE = re.compile(r"[a-zA-Z0-9_.\-:]+")
#: faults that replace the answer or the connection, with their FakeConfig rate fields
FAULT_RATES: dict[str, str] = {
    "drop": "drop_rate",
    "reset": "reset_rate",
    "stall": "stall_rate",
    "malformed": "malformed_rate",
    "garbage": "garbage_rate",
}
#: what ``FakeConfig.fail_calls`` may name: the faults above, plus the error answers
CALL_FAULTS = frozenset({*FAULT_RATES, "throttle", "error", "quota"})
#: how often a held (stalled) answer checks whether its client or the server has gone
_HOLD_POLL_SECONDS = 0.05
#: connections taken per readiness of a listening socket, and the pause after running out of
#: descriptors (as asyncio's own accept loop)
_ACCEPT_BATCH = 1024
_ACCEPT_RETRY_SECONDS = 1.0
#: loop iterations that ``stop()`` lets closing connections take before it closes them itself
_CLOSE_ITERATIONS = 100
_NO_FACE = "There are no faces in the image. Should be at least 1."
_CREDENTIAL_SCOPE_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/")
#: the region of the request being served (its SigV4 credential scope)
_REQUEST_REGION: contextvars.ContextVar[str] = contextvars.ContextVar("region", default="")
#: faults ``FakeConfig.region_faults`` may give a region's every call
REGION_FAULTS = frozenset({"reset", "drop", "stall", "error", "throttle", "denied"})
SERVICE_QUOTAS_PREFIX = "ServiceQuotasV20190624."
#: Rekognition's TPS quotas in Service Quotas (service code ``rekognition``): API -> (quota
#: code, quota name), as AWS lists them (ListAWSDefaultServiceQuotas, February 2024; the
#: quota table of docs.aws.amazon.com/general/latest/gr/rekognition.html).
SERVICE_QUOTAS: dict[str, tuple[str, str]] = {
    api: (
        code,
        f"Transactions per second per account for the Amazon Rekognition Image {kind} {api}",
    )
    for api, code, kind in (
        ("DetectFaces", "L-A5121FD7", "operation"),
        ("CompareFaces", "L-73A341CE", "operation"),
        ("DetectLabels", "L-E29B542B", "operation"),
        ("DetectText", "L-87CF5BA6", "operation"),
        ("DetectModerationLabels", "L-7F4D1AC4", "operation"),
        ("RecognizeCelebrities", "L-5FF750C4", "operation"),
        (
            "DetectProtectiveEquipment",
            "L-6F294C5B",
            "personal protective equipment operation",
        ),
        ("IndexFaces", "L-7C13EBAD", "operation"),
        ("SearchFacesByImage", "L-43CBEB68", "operation"),
        ("SearchFaces", "L-99829151", "operation"),
        ("ListFaces", "L-970B5808", "operation"),
        ("CreateCollection", "L-CE977716", "operation"),
        ("DeleteCollection", "L-5346A13A", "operation"),
        ("DescribeCollection", "L-6FDFFAF5", "operation"),
        ("ListCollections", "L-0366BB0F", "operation"),
        ("DeleteFaces", "L-220834FB", "operation"),
    )
}
_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/")
_CREDENTIAL_MESSAGES = {
    "ExpiredTokenException": "The security token included in the request is expired",
    "UnrecognizedClientException": "The security token included in the request is invalid.",
}
_BAD_S3 = (
    "Unable to get object metadata from S3. Check object key, region and/or access permissions."
)


@dataclass
class FakeConfig:
    """Behaviour of the fake; change it at runtime with ``FakeRekognition.configure``."""

    s3_endpoint_url: str | None = None
    region: str = "eu-west-1"
    #: API name -> transactions per second; a missing API is unlimited, 0 rejects everything.
    quotas: dict[str, float] = field(default_factory=dict)
    #: token bucket capacity = quota * burst_seconds (at least 1 for a positive quota)
    burst_seconds: float = 1.0
    #: lognormal latency of accepted calls around this median; 0 = no sleep
    latency_median_ms: float = 0.0
    latency_sigma: float = 0.5
    #: fixed delay of throttle replies (quota or injected)
    throttle_latency_ms: float = 2.0
    #: probability of an injected HTTP 500 InternalServerError
    error_rate: float = 0.0
    #: probability of an injected ThrottlingException (HTTP 500), regardless of quota
    throttle_rate: float = 0.0
    seed: int = 0
    #: sha256 hex of image bytes -> identities of its faces, largest face first. Images not
    #: listed get 0-3 anonymous faces. An identity ``celeb:<Name>`` is a celebrity.
    people: dict[str, list[str]] = field(default_factory=dict)
    #: keep fetched S3 objects in memory (benchmarks whose objects never change), so the
    #: fake measures the client rather than the S3 stand-in behind it
    s3_cache: bool = False
    #: refuse S3Object images of buckets outside the request's signing Region (``region``
    #: when unsigned) with InvalidS3ObjectException, as Rekognition does (it reads S3 only
    #: in its own Region)
    check_bucket_region: bool = False
    # Faults (see the module docstring for what a client sees). Each call draws at most one
    # of them, from (seed, call number), so a seed gives the same faults on the same calls
    # whatever the concurrency; the rates are shares of one draw and add up to at most 1.
    #: probability that the connection is closed (FIN) after the request, with no answer
    drop_rate: float = 0.0
    #: probability that the connection is reset (RST) after the request, with no answer
    reset_rate: float = 0.0
    #: probability that the answer is held for ``stall_seconds``
    stall_rate: float = 0.0
    #: how long a stalled answer is held; 0 = until the client gives up or the server stops
    stall_seconds: float = 30.0
    #: probability of an HTTP 200 whose members have the wrong type (botocore raises)
    malformed_rate: float = 0.0
    #: probability of an HTTP 200 whose body is half a JSON document
    garbage_rate: float = 0.0
    #: call number (1-based, counted since start or the last ``reset_stats``) -> one of
    #: ``CALL_FAULTS``: that call gets that fault, whatever the rates draw
    fail_calls: dict[int, str] = field(default_factory=dict)
    #: setting it > 0 takes the endpoint down for that many seconds from then (it stops
    #: listening and closes open connections); 0 brings it back. Reads 0 again once it is up.
    down_for_seconds: float = 0.0
    #: signing region -> API -> TPS, over ``quotas`` for that region (each region has its
    #: own buckets either way)
    region_quotas: dict[str, dict[str, float]] = field(default_factory=dict)
    #: signing region -> one of ``REGION_FAULTS``, given to every call signed for it
    region_faults: dict[str, str] = field(default_factory=dict)
    #: Service Quotas: signing region -> API -> the applied quota listed for it; an API not
    #: listed is not found (as when AWS has no applied value)
    applied_quotas: dict[str, dict[str, float]] = field(default_factory=dict)
    #: an error code (``AccessDeniedException``) every Service Quotas call is refused with
    service_quotas_error: str | None = None
    #: requests with a body of at least this many bytes are held ``slow_seconds`` before
    #: their answer (0 = off)
    slow_body_bytes: int = 0
    #: how long a slow request is held; 0 = until the client gives up or the server stops
    slow_seconds: float = 0.0
    #: access key id -> the error code its requests are refused with
    refused_keys: dict[str, str] = field(default_factory=dict)
    #: answers also carry members outside botocore's model, and JSON nulls
    unmodelled_members: bool = False


def image_digest(data: bytes) -> str:
    """The key of ``FakeConfig.people``: sha256 hex of the image bytes."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- determinism


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _between(lo: float, hi: float, *parts: object) -> float:
    return round(lo + (hi - lo) * _unit(*parts), 6)


def _uuid_from(*parts: object) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return str(uuid.UUID(bytes=h[:16], version=4))


def _box(left: float, top: float, width: float, height: float) -> JSON:
    return {
        "Width": round(width, 6),
        "Height": round(height, 6),
        "Left": round(left, 6),
        "Top": round(top, 6),
    }


# relative (x, y) positions of landmarks inside a face box; the first five are the default set
_LANDMARKS: tuple[tuple[str, float, float], ...] = (
    ("eyeLeft", 0.30, 0.40),
    ("eyeRight", 0.70, 0.40),
    ("mouthLeft", 0.36, 0.78),
    ("mouthRight", 0.64, 0.78),
    ("nose", 0.50, 0.60),
    ("leftEyeBrowLeft", 0.18, 0.30),
    ("leftEyeBrowRight", 0.42, 0.29),
    ("leftEyeBrowUp", 0.30, 0.26),
    ("rightEyeBrowLeft", 0.58, 0.29),
    ("rightEyeBrowRight", 0.82, 0.30),
    ("rightEyeBrowUp", 0.70, 0.26),
    ("leftEyeLeft", 0.22, 0.40),
    ("leftEyeRight", 0.38, 0.40),
    ("leftEyeUp", 0.30, 0.37),
    ("leftEyeDown", 0.30, 0.43),
    ("rightEyeLeft", 0.62, 0.40),
    ("rightEyeRight", 0.78, 0.40),
    ("rightEyeUp", 0.70, 0.37),
    ("rightEyeDown", 0.70, 0.43),
    ("noseLeft", 0.43, 0.63),
    ("noseRight", 0.57, 0.63),
    ("mouthUp", 0.50, 0.74),
    ("mouthDown", 0.50, 0.83),
    ("leftPupil", 0.30, 0.40),
    ("rightPupil", 0.70, 0.40),
    ("upperJawlineLeft", 0.05, 0.40),
    ("midJawlineLeft", 0.12, 0.75),
    ("chinBottom", 0.50, 1.00),
    ("midJawlineRight", 0.88, 0.75),
    ("upperJawlineRight", 0.95, 0.40),
)
_EMOTIONS = ("HAPPY", "CALM", "SURPRISED", "CONFUSED", "SAD", "ANGRY", "DISGUSTED", "FEAR")
_ATTRIBUTE_FIELDS = {
    "AGE_RANGE": "AgeRange",
    "BEARD": "Beard",
    "EMOTIONS": "Emotions",
    "EYE_DIRECTION": "EyeDirection",
    "EYEGLASSES": "Eyeglasses",
    "EYES_OPEN": "EyesOpen",
    "GENDER": "Gender",
    "MOUTH_OPEN": "MouthOpen",
    "MUSTACHE": "Mustache",
    "FACE_OCCLUDED": "FaceOccluded",
    "SMILE": "Smile",
    "SUNGLASSES": "Sunglasses",
}


@dataclass(frozen=True)
class _Face:
    identity: str
    key: str  # "<digest>:<index>": seed of per-face fields
    left: float
    top: float
    width: float
    height: float

    @property
    def box(self) -> JSON:
        return _box(self.left, self.top, self.width, self.height)

    @property
    def confidence(self) -> float:
        return _between(99.5, 99.9999, self.key, "conf")

    def landmarks(self, everything: bool) -> list[JSON]:
        marks = _LANDMARKS if everything else _LANDMARKS[:5]
        return [
            {
                "Type": name,
                "X": round(self.left + rx * self.width, 6),
                "Y": round(self.top + ry * self.height, 6),
            }
            for name, rx, ry in marks
        ]

    def pose(self) -> JSON:
        return {
            "Roll": _between(-20, 20, self.key, "roll"),
            "Yaw": _between(-35, 35, self.key, "yaw"),
            "Pitch": _between(-20, 20, self.key, "pitch"),
        }

    def quality(self) -> JSON:
        return {
            "Brightness": _between(40, 95, self.key, "bright"),
            "Sharpness": _between(50, 98, self.key, "sharp"),
        }

    def _flag(self, name: str, p_true: float, by_identity: bool = False) -> JSON:
        seed = self.identity if by_identity else self.key
        return {
            "Value": _unit(seed, name) < p_true,
            "Confidence": _between(80, 99.9, seed, name, "conf"),
        }

    def emotions(self) -> list[JSON]:
        dominant = int(_unit(self.key, "emotion") * len(_EMOTIONS))
        top = _between(55, 97, self.key, "emotion-top")
        rest = [_unit(self.key, "emotion", name) + 0.01 for name in _EMOTIONS]
        scale = (100.0 - top) / (sum(rest) - rest[dominant])
        out = [
            {"Type": name, "Confidence": top if i == dominant else round(rest[i] * scale, 6)}
            for i, name in enumerate(_EMOTIONS)
        ]
        return sorted(out, key=lambda e: -float(e["Confidence"]))

    def attribute(self, name: str) -> Any:
        if name == "AgeRange":
            low = 18 + int(50 * _unit(self.identity, "age"))
            return {"Low": low, "High": low + 4 + int(8 * _unit(self.identity, "age-span"))}
        if name == "Gender":
            male = _unit(self.identity, "gender") < 0.5
            return {
                "Value": "Male" if male else "Female",
                "Confidence": _between(95, 99.9, self.identity, "gender-conf"),
            }
        if name == "Emotions":
            return self.emotions()
        if name == "EyeDirection":
            return {
                "Yaw": _between(-15, 15, self.key, "eye-yaw"),
                "Pitch": _between(-15, 15, self.key, "eye-pitch"),
                "Confidence": _between(90, 99.9, self.key, "eye-conf"),
            }
        by_identity = name in ("Beard", "Mustache", "Eyeglasses")
        p_true = {"Smile": 0.5, "EyesOpen": 0.9, "MouthOpen": 0.3, "FaceOccluded": 0.05}.get(
            name, 0.2
        )
        return self._flag(name, p_true, by_identity)

    def detail(self, attributes: set[str]) -> JSON:
        """A FaceDetail: defaults plus the requested attribute fields."""
        out: JSON = {"BoundingBox": self.box}
        for name in _ATTRIBUTE_FIELDS.values():
            if name in attributes:
                out[name] = self.attribute(name)
        out["Landmarks"] = self.landmarks(everything="ALL" in attributes)
        out["Pose"] = self.pose()
        out["Quality"] = self.quality()
        out["Confidence"] = self.confidence
        return out

    def compared(self) -> JSON:
        """A ComparedFace (CompareFaces, RecognizeCelebrities)."""
        return {
            "BoundingBox": self.box,
            "Confidence": self.confidence,
            "Landmarks": self.landmarks(everything=False),
            "Pose": self.pose(),
            "Quality": self.quality(),
        }

    def body_box(self) -> JSON:
        width = min(self.width * 2.4, 1.0)
        left = min(max(self.left + self.width / 2 - width / 2, 0.0), 1.0 - width)
        top = max(self.top - self.height * 0.2, 0.0)
        height = min(self.height * 4.0, 1.0 - top)
        return _box(left, top, width, height)


def _faces_for(digest: str, people: Mapping[str, Sequence[str]]) -> list[_Face]:
    """The faces of an image, largest first (non-overlapping, left to right)."""
    if digest in people:
        identities = list(people[digest])
    else:
        count = int(digest[:2], 16) % 4
        identities = [f"anon:{digest[:12]}:{i}" for i in range(count)]
    n = len(identities)
    faces: list[_Face] = []
    for i, identity in enumerate(identities):
        key = f"{digest}:{i}"
        slot = 1.0 / n
        width = min(0.42, 0.8 * slot) * (1.0 - 0.5 * i / n)
        height = min(width * 1.3, 0.9)
        left = i * slot + (slot - width) * _unit(key, "left")
        top = 0.05 + max(0.9 - height, 0.0) * _unit(key, "top")
        faces.append(_Face(identity, key, left, top, width, height))
    return faces


def _similarity(identity_a: str, key_a: str, identity_b: str, key_b: str) -> float:
    pair = sorted((key_a, key_b))
    if identity_a == identity_b:
        return _between(95.0, 99.99, "sim-same", *pair)
    return _between(0.5, 39.9, "sim-diff", *pair)


# --------------------------------------------------------------------------- labels etc.

_PERSON_CATEGORY = "Person Description"
# (name, parents, category)
_LABEL_VOCABULARY: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Indoors", (), "Buildings and Architecture"),
    ("Outdoors", (), "Nature and Outdoors"),
    ("Architecture", (), "Buildings and Architecture"),
    ("Building", ("Architecture",), "Buildings and Architecture"),
    ("Urban", (), "Buildings and Architecture"),
    ("City", ("Urban",), "Buildings and Architecture"),
    ("Furniture", (), "Home and Indoors"),
    ("Chair", ("Furniture",), "Home and Indoors"),
    ("Table", ("Furniture",), "Home and Indoors"),
    ("Electronics", (), "Technology and Computing"),
    ("Computer", ("Electronics",), "Technology and Computing"),
    ("Screen", ("Electronics",), "Technology and Computing"),
    ("Text", (), "Text and Documents"),
    ("Nature", (), "Nature and Outdoors"),
    ("Plant", (), "Plants and Flowers"),
    ("Tree", ("Plant",), "Plants and Flowers"),
    ("Transportation", (), "Vehicles and Automotive"),
    ("Vehicle", ("Transportation",), "Vehicles and Automotive"),
    ("Car", ("Vehicle", "Transportation"), "Vehicles and Automotive"),
    ("Food", (), "Food and Beverage"),
    ("Animal", (), "Animals and Pets"),
    ("Mammal", ("Animal",), "Animals and Pets"),
    ("Pet", ("Animal",), "Animals and Pets"),
    ("Dog", ("Mammal", "Pet", "Animal"), "Animals and Pets"),
)
_WORDS = ("REGISTRATION", "AWS", "SUMMIT", "WELCOME", "EXIT", "HALL", "DEMO", "OPEN", "2019")


def _labels_for(digest: str, faces: list[_Face]) -> list[JSON]:
    labels: dict[str, JSON] = {}

    def add(name: str, parents: Sequence[str], category: str, conf: float) -> JSON:
        label = labels.get(name)
        if label is None:
            label = {
                "Name": name,
                "Confidence": conf,
                "Instances": [],
                "Parents": [{"Name": p} for p in parents],
                "Aliases": [{"Name": "Human"}] if name == "Person" else [],
                "Categories": [{"Name": category}],
            }
            labels[name] = label
        label["Confidence"] = max(float(label["Confidence"]), conf)
        return label

    if faces:
        person = add("Person", (), _PERSON_CATEGORY, _between(98.5, 99.99, digest, "person"))
        person["Instances"] = [
            {"BoundingBox": f.body_box(), "Confidence": f.confidence} for f in faces
        ]
        add("Face", ("Person",), _PERSON_CATEGORY, _between(96, 99.9, digest, "face"))
        add("Head", ("Person",), _PERSON_CATEGORY, _between(90, 99.9, digest, "head"))
        if len(faces) >= 3:
            add("Crowd", ("Person",), _PERSON_CATEGORY, _between(70, 95, digest, "crowd"))
    vocab = {name: (parents, category) for name, parents, category in _LABEL_VOCABULARY}
    for name, parents, category in _LABEL_VOCABULARY:
        if _unit(digest, "label", name) < 0.3:
            conf = _between(50, 99.5, digest, "label-conf", name)
            add(name, parents, category, conf)
            for parent in parents:
                p_parents, p_category = vocab[parent]
                add(parent, p_parents, p_category, conf)
    return sorted(labels.values(), key=lambda lab: (-float(lab["Confidence"]), lab["Name"]))


def _text_for(digest: str) -> list[JSON]:
    n_lines = int(_unit(digest, "lines") * 3)
    lines: list[JSON] = []
    words: list[JSON] = []
    next_id = n_lines
    for line_no in range(n_lines):
        n_words = 1 + int(_unit(digest, "words", line_no) * 3)
        chosen = [
            _WORDS[int(_unit(digest, "word", line_no, w) * len(_WORDS))] for w in range(n_words)
        ]
        top = 0.1 + 0.25 * line_no
        left = _between(0.05, 0.4, digest, "line-left", line_no)
        height = 0.05
        word_w = 0.08
        line_box = _box(left, top, word_w * n_words * 1.1, height)
        lines.append(_text_detection(" ".join(chosen), "LINE", line_no, None, line_box, digest))
        for w, text in enumerate(chosen):
            box = _box(left + w * word_w * 1.1, top, word_w, height)
            words.append(_text_detection(text, "WORD", next_id, line_no, box, digest))
            next_id += 1
    return lines + words


def _text_detection(
    text: str, kind: str, ident: int, parent: int | None, box: JSON, digest: str
) -> JSON:
    left, top, width, height = box["Left"], box["Top"], box["Width"], box["Height"]
    out: JSON = {
        "DetectedText": text,
        "Type": kind,
        "Id": ident,
        "Confidence": _between(85, 99.9, digest, "text", ident),
        "Geometry": {
            "BoundingBox": box,
            "Polygon": [
                {"X": left, "Y": top},
                {"X": round(left + width, 6), "Y": top},
                {"X": round(left + width, 6), "Y": round(top + height, 6)},
                {"X": left, "Y": round(top + height, 6)},
            ],
        },
    }
    if parent is not None:
        out["ParentId"] = parent
    return out


# --------------------------------------------------------------------------- errors & params


class _ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def _invalid(message: str = "Request has invalid parameters") -> _ApiError:
    return _ApiError("InvalidParameterException", message)


def _int_param(req: JSON, name: str, default: int, lo: int, hi: int) -> int:
    value = req.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _invalid(f"{name} must be an integer between {lo} and {hi}")
    return value


def _float_param(req: JSON, name: str, default: float, lo: float = 0.0, hi: float = 100.0) -> float:
    value = req.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _invalid(f"{name} must be a number between {lo} and {hi}")
    return float(value)


def _str_param(req: JSON, name: str) -> str:
    value = req.get(name)
    if not isinstance(value, str) or not value:
        raise _invalid(f"{name} is required")
    return value


def _attributes(req: JSON, name: str) -> set[str]:
    value = req.get(name) or ["DEFAULT"]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"{name} must be a list of attribute names")
    unknown = set(value) - {"DEFAULT", "ALL", *_ATTRIBUTE_FIELDS}
    if unknown:
        raise _invalid(f"Unknown attribute(s): {', '.join(sorted(unknown))}")
    if "ALL" in value:
        return {"ALL", *_ATTRIBUTE_FIELDS.values()}
    return {_ATTRIBUTE_FIELDS[v] for v in value if v in _ATTRIBUTE_FIELDS}


def _page(req: JSON, default_max: int) -> tuple[int, int]:
    limit = _int_param(req, "MaxResults", default_max, 0, 4096)
    token = req.get("NextToken")
    if token is None:
        return 0, limit or default_max
    if not isinstance(token, str) or not token.isdigit():
        raise _ApiError("InvalidPaginationTokenException", "Invalid Token")
    return int(token), limit or default_max


# --------------------------------------------------------------------------- state


class _TokenBucket:
    def __init__(self, rate: float, burst_seconds: float, now: float) -> None:
        self.rate = 0.0
        self.capacity = 0.0
        self.tokens = 0.0
        self.updated = now
        self.reconfigure(rate, burst_seconds, now)
        self.tokens = self.capacity

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def reconfigure(self, rate: float, burst_seconds: float, now: float) -> None:
        self._refill(now)
        self.rate = max(rate, 0.0)
        self.capacity = max(1.0, self.rate * burst_seconds) if self.rate > 0 else 0.0
        self.tokens = min(self.tokens, self.capacity)

    def try_take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _bump(counter: Counter[_K], key: _K, delta: int) -> None:
    counter[key] += delta
    if counter[key] <= 0:  # a count taken back leaves no zero entry behind
        del counter[key]


def _per_second(counts: Counter[int]) -> list[int]:
    return [counts.get(i, 0) for i in range(max(counts, default=-1) + 1)]


@dataclass
class _Stats:
    calls: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    throttled: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_codes: dict[str, Counter[str]] = field(default_factory=dict)
    billed: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: S3 objects the fake read to answer a call (``s3://bucket/key``), cached reads included
    s3_reads: Counter[str] = field(default_factory=Counter)
    #: injected faults per API; "stalled" counts holds begun, whatever became of them
    dropped: Counter[str] = field(default_factory=Counter)
    reset: Counter[str] = field(default_factory=Counter)
    stalled: Counter[str] = field(default_factory=Counter)
    #: holds begun for requests over ``slow_body_bytes``
    slow: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    garbage: Counter[str] = field(default_factory=Counter)
    #: answers that never left: the client had gone (a stall it gave up on, a slow call it
    #: timed out) or the server stopped first
    abandoned: Counter[str] = field(default_factory=Counter)
    #: requests that reached an open connection while the endpoint was down (closed unanswered)
    down: Counter[str] = field(default_factory=Counter)
    #: billable answers (API, object) computed but not delivered intact (see module docstring)
    undelivered: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: API calls received; the number of the latest one, as ``FakeConfig.fail_calls`` counts
    call_number: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    #: when the counters started, and per API the outcomes of each whole second since then
    #: ("ok", "throttled", "error", and the fault counters' names), so benchmarks can see a
    #: rate over time
    since: float = field(default_factory=time.monotonic)
    timeline: dict[str, dict[str, Counter[int]]] = field(default_factory=dict)
    #: per signing region: "calls" and each outcome's counter name, over all APIs; and the
    #: outcomes of each whole second, as ``timeline``
    regions: dict[str, Counter[str]] = field(default_factory=dict)
    region_timeline: dict[str, dict[str, Counter[int]]] = field(default_factory=dict)
    #: Service Quotas calls per operation
    service_quotas: Counter[str] = field(default_factory=Counter)

    def count_region(self, region: str, outcome: str, delta: int = 1) -> None:
        _bump(self.regions.setdefault(region, Counter()), outcome, delta)
        if outcome != "calls":
            second = int(time.monotonic() - self.since)
            by_outcome = self.region_timeline.setdefault(region, {})
            _bump(by_outcome.setdefault(outcome, Counter()), second, delta)


@dataclass
class _StoredFace:
    face_id: str
    image_id: str
    external_image_id: str | None
    box: JSON
    confidence: float
    identity: str

    def record(self) -> JSON:
        out: JSON = {
            "FaceId": self.face_id,
            "BoundingBox": self.box,
            "ImageId": self.image_id,
            "Confidence": self.confidence,
            "IndexFacesModelVersion": FACE_MODEL_VERSION,
        }
        if self.external_image_id is not None:
            out["ExternalImageId"] = self.external_image_id
        return out


@dataclass
class _Collection:
    collection_id: str
    created: float
    faces: dict[str, _StoredFace] = field(default_factory=dict)
    #: IndexFaces calls per image digest: indexing an image again adds new faces (new
    #: FaceIds), as Rekognition does, rather than finding the first ones
    indexings: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Image:
    digest: str
    identity: str  # billing identity: s3://bucket/key or sha256:<hex>


def _check_magic(data: bytes) -> None:
    if not (data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)):
        raise _ApiError("InvalidImageFormatException", "Request has invalid image format")


def _decode_bytes(raw: str) -> tuple[bytes, str]:
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid("Image.Bytes is not valid base64") from exc
    if not data:
        raise _invalid("Image.Bytes must not be empty")
    if len(data) > MAX_BYTES_IMAGE:
        raise _ApiError("ImageTooLargeException", "Image size is too large.")
    return data, image_digest(data)


def _parse_body(raw: bytes) -> JSON:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ApiError("SerializationException", "Request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _ApiError("SerializationException", "Request body must be a JSON object")
    return body


# --------------------------------------------------------------------------- faults

#: per operation, a member of its output whose wrong type makes botocore's parser raise
#: (a list of structures given integers: ``AttributeError: 'int' object has no attribute
#: 'get'``); operations without such a member get a JSON array as the whole body, which
#: fails the same way on the output structure itself
_MALFORMED_MEMBER = {
    "DetectFaces": "FaceDetails",
    "DetectLabels": "Labels",
    "CompareFaces": "FaceMatches",
    "DetectText": "TextDetections",
    "DetectModerationLabels": "ModerationLabels",
    "RecognizeCelebrities": "CelebrityFaces",
    "DetectProtectiveEquipment": "Persons",
    "IndexFaces": "FaceRecords",
    "ListFaces": "Faces",
    "SearchFaces": "FaceMatches",
    "SearchFacesByImage": "FaceMatches",
}


def _malformed(op: str, answer: JSON) -> Any:
    """The answer with one member of the wrong type; the rest stays as the service sent it."""
    member = _MALFORMED_MEMBER.get(op)
    if member is None:
        return [1, 2]
    return {**answer, member: [1, 2]}


def _with_unmodelled(op: str, answer: JSON) -> JSON:
    """The answer with members outside the output shape and nulls, at the top and in each
    structure of its main list."""
    extra: JSON = {"UnmodelledMember": {"Since": "2027"}, "UnmodelledNull": None}
    member = _MALFORMED_MEMBER.get(op)
    items = answer.get(member) if member else None
    out = {**answer, **extra}
    if member and isinstance(items, list):
        out[member] = [{**x, **extra} if isinstance(x, dict) else x for x in items]
    return out


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _cut(request: web.BaseRequest, *, reset: bool) -> web.Response:
    """Close the connection without an answer: FIN, or RST with ``reset``.

    The returned response is never sent: aiohttp finds the transport gone when it writes
    and drops the connection quietly ("premature client disconnection").
    """
    transport = request.transport
    if transport is not None:
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    request.protocol.force_close()  # also forgets the transport, so nothing is written
    return web.Response(status=204)


async def _deliver(
    request: web.BaseRequest, status: int, data: bytes, request_id: str
) -> tuple[web.StreamResponse, bool]:
    """Write the answer here rather than leave it to aiohttp, to learn whether it got out."""
    response = web.Response(
        status=status,
        body=data,
        content_type=CONTENT_TYPE,
        headers={"x-amzn-RequestId": request_id},
    )
    if _client_gone(request):
        return response, False
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        return response, False
    return response, True


def _hold_port(address: Any) -> socket.socket:
    """A socket bound to ``address`` that does not listen: the port stays ours, connections
    to it are refused. SO_REUSEADDR lets it bind beside the accepted connections."""
    ipv6 = len(address) == 4
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ipv6:  # as asyncio's create_server: the IPv4 address has a socket of its own
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _listening_socket(address: Any) -> socket.socket:
    """A listening socket on ``address``; Linux lets it bind beside a placeholder that
    does not listen (both with SO_REUSEADDR)."""
    sock = _hold_port(address)
    try:
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host``, all on one port (port 0: a free one,
    the same for every address, since the URL names one)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for address in dict.fromkeys(info[4] for info in infos):
            if socks and port == 0:
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            socks.append(_listening_socket(address))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _fail_calls(value: Any) -> dict[int, str]:
    """``fail_calls`` from Python or JSON (string keys): call number -> fault kind."""
    if not isinstance(value, Mapping):
        raise ValueError("fail_calls must map call numbers to fault kinds")
    out: dict[int, str] = {}
    for key, kind in value.items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"fail_calls: {key!r} is not a call number") from None
        if number < 1:
            raise ValueError(f"fail_calls: call numbers start at 1, got {number}")
        if kind not in CALL_FAULTS:
            kinds = ", ".join(sorted(CALL_FAULTS))
            raise ValueError(f"fail_calls: unknown fault {kind!r} (one of {kinds})")
        out[number] = str(kind)
    return out


def _check_faults(config: FakeConfig) -> None:
    rates = {name: float(getattr(config, name)) for name in FAULT_RATES.values()}
    for name, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {rate}")
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError(f"the fault rates add up to more than 1: {rates}")
    for name in ("stall_seconds", "down_for_seconds", "slow_seconds", "slow_body_bytes"):
        if float(getattr(config, name)) < 0:
            raise ValueError(f"{name} must not be negative")


def _coerce_field(name: str, value: Any) -> Any:
    """A FakeConfig field's value from Python or JSON, in the field's own type."""
    if name == "quotas":
        return {str(k): float(v) for k, v in dict(value).items() if v is not None}
    if name == "people":
        return {str(k).lower(): [str(p) for p in v] for k, v in dict(value).items()}
    if name == "fail_calls":
        return _fail_calls(value)
    if name in ("region_quotas", "applied_quotas"):
        return {
            str(region): {str(api): float(tps) for api, tps in dict(by_api).items()}
            for region, by_api in dict(value).items()
        }
    if name == "region_faults":
        faults = {str(region): str(kind) for region, kind in dict(value).items()}
        unknown = set(faults.values()) - REGION_FAULTS
        if unknown:
            raise ValueError(f"region_faults: unknown fault(s) {sorted(unknown)}")
        return faults
    if name == "service_quotas_error":
        return None if value is None else str(value)
    if name == "s3_endpoint_url":
        return None if value is None else str(value)
    if name == "region":
        return str(value)
    if name in ("seed", "slow_body_bytes"):
        return int(value)
    if name == "refused_keys":
        return {str(k): str(v) for k, v in dict(value).items()}
    if name in ("s3_cache", "check_bucket_region", "unmodelled_members"):
        return bool(value)
    return float(value)


_Handler = Callable[[JSON], Awaitable[tuple[JSON, str | None]]]


class FakeRekognition:
    """The fake server: an aiohttp app on its own thread and event loop.

    ``start()`` returns the endpoint URL; ``stop()`` shuts it down (also a context manager).
    Runtime changes (``set_quota``, ``configure``) and ``stats()`` are thread-safe.
    """

    def __init__(
        self,
        config: FakeConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``clock`` drives the quota buckets and how long a stall is held; ``sleep`` is
        how latency and throttle replies wait. Tests give their own to control both."""
        config = config or FakeConfig()
        self._config = dataclasses.replace(
            config,
            quotas={str(k): float(v) for k, v in config.quotas.items()},
            people={str(k).lower(): [str(p) for p in v] for k, v in config.people.items()},
            fail_calls=_fail_calls(config.fail_calls),
            region_quotas=_coerce_field("region_quotas", config.region_quotas),
            region_faults=_coerce_field("region_faults", config.region_faults),
            applied_quotas=_coerce_field("applied_quotas", config.applied_quotas),
            refused_keys={str(k): str(v) for k, v in config.refused_keys.items()},
        )
        _check_faults(self._config)
        self._host = host
        self._port = port
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.RLock()
        self._rng = random.Random(self._config.seed)
        self._buckets: dict[tuple[str, str], _TokenBucket] = {}  # (region, API)
        self._stats = _Stats()
        self._collections: dict[str, _Collection] = {}
        self._request_counter = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._failures: list[BaseException] = []
        self._url: str | None = None
        self._s3: Any = None
        self._s3_cache: dict[tuple[str, str, str | None], bytes] = {}
        # the listening side, kept so that a down window can stop and resume it (loop thread).
        # The fake accepts connections itself rather than through asyncio's Server: that
        # one forgets the connections it has accepted but not yet set up when it is closed
        # (their transports fail to attach, and their sockets are never closed).
        self._runner: web.AppRunner | None = None
        self._listeners: list[socket.socket] = []
        self._bound: list[Any] = []  # socket addresses the listeners are bound to
        #: every accepted connection until its socket is closed -> its transport (None until
        #: it is set up); changed on the loop thread, under the lock for ``stats()``
        self._accepted: dict[socket.socket, asyncio.Transport | None] = {}
        self._connecting: set[asyncio.Task[None]] = set()  # accepted, being set up
        self._placeholders: list[socket.socket] = []  # hold the port while down
        self._down_until = 0.0  # time.monotonic() deadline; 0 = up
        self._up_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, _Handler] = {
            "DetectFaces": self._detect_faces,
            "DetectLabels": self._detect_labels,
            "CompareFaces": self._compare_faces,
            "DetectText": self._detect_text,
            "DetectModerationLabels": self._detect_moderation_labels,
            "RecognizeCelebrities": self._recognize_celebrities,
            "DetectProtectiveEquipment": self._detect_protective_equipment,
            "CreateCollection": self._create_collection,
            "DeleteCollection": self._delete_collection,
            "DescribeCollection": self._describe_collection,
            "ListCollections": self._list_collections,
            "IndexFaces": self._index_faces,
            "ListFaces": self._list_faces,
            "DeleteFaces": self._delete_faces,
            "SearchFaces": self._search_faces,
            "SearchFacesByImage": self._search_faces_by_image,
        }
        self._sync_buckets()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakeRekognition is not running")
        return self._url

    @property
    def config(self) -> FakeConfig:
        """A copy of the current configuration."""
        with self._lock:
            return dataclasses.replace(
                self._config,
                quotas=dict(self._config.quotas),
                people={k: list(v) for k, v in self._config.people.items()},
                fail_calls=dict(self._config.fail_calls),
                region_quotas={r: dict(q) for r, q in self._config.region_quotas.items()},
                region_faults=dict(self._config.region_faults),
                applied_quotas={r: dict(q) for r, q in self._config.applied_quotas.items()},
                refused_keys=dict(self._config.refused_keys),
            )

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("FakeRekognition already started")
        ready = threading.Event()
        self._failures = []
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="fake-rekognition", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout=30):
            raise RuntimeError("FakeRekognition did not start within 30 s")
        if self._failures:
            self._thread.join(timeout=30)
            self._thread = None
            raise RuntimeError("FakeRekognition failed to start") from self._failures[0]
        return self.url

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError("FakeRekognition did not stop within 30 s")
        self._thread = None
        self._url = None
        if self._failures:
            raise RuntimeError("FakeRekognition crashed") from self._failures[0]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:  # reported by start()/stop()
            self._failures.append(exc)
        finally:
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            endpoint = self._config.s3_endpoint_url
            if endpoint:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                self._s3 = await stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        region_name=self._config.region,
                        endpoint_url=endpoint,
                        aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=AioConfig(
                            s3={"addressing_style": "path"},
                            retries={"mode": "standard", "total_max_attempts": 2},
                            max_pool_connections=128,
                            connect_timeout=5,
                            read_timeout=60,
                        ),
                    )
                )
                stack.callback(setattr, self, "_s3", None)
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/", self._handle_api)
            app.router.add_get("/_fake/stats", self._handle_stats)
            app.router.add_post("/_fake/config", self._handle_config)
            app.router.add_post("/_fake/reset", self._handle_reset)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
            await runner.setup()
            # in this order on the way out: stop listening and setting connections up,
            # aiohttp closes the connections it serves, then whatever is left is closed
            stack.push_async_callback(self._close_accepted)
            stack.push_async_callback(runner.cleanup)
            stack.callback(self._release_listening)
            self._runner = runner
            for sock in _listening_sockets(self._host, self._port):
                self._listen(sock)
            self._bound = [sock.getsockname() for sock in self._listeners]
            port = self._bound[0][1]
            self._url = f"http://{self._host}:{port}"
            with self._lock:
                down_for = self._config.down_for_seconds
            if down_for > 0:
                await self._set_down(down_for)
            ready.set()
            await self._stop_event.wait()

    # ------------------------------------------------------------------ runtime control

    def set_quota(self, api: str, tps: float | None, *, region: str | None = None) -> None:
        """Set (or with None remove) one API's quota, in every region or in ``region``
        alone; takes effect at once."""
        with self._lock:
            quotas = (
                self._config.quotas
                if region is None
                else self._config.region_quotas.setdefault(region, {})
            )
            if tps is None:
                quotas.pop(api, None)
            else:
                quotas[api] = float(tps)
            self._sync_buckets()

    def configure(self, **fields: Any) -> None:
        """Change FakeConfig fields at runtime (``quotas``, ``people`` and ``fail_calls``
        replace the whole map). Nothing changes if any value is invalid (``ValueError``).

        ``s3_endpoint_url`` can only change while the server is stopped. ``down_for_seconds``
        takes the endpoint down (or back up) before this returns.
        """
        down_for = self._apply(fields)
        if down_for is not None:
            self._run_on_loop(self._set_down(down_for))

    def _apply(self, fields: Mapping[str, Any]) -> float | None:
        """Validate and apply ``fields``; the down window to set now, if one was given."""
        names = {f.name for f in dataclasses.fields(FakeConfig)}
        unknown = set(fields) - names
        if unknown:
            raise ValueError(f"unknown FakeConfig field(s): {', '.join(sorted(unknown))}")
        coerced = {name: _coerce_field(name, value) for name, value in fields.items()}
        with self._lock:
            if (
                "s3_endpoint_url" in coerced
                and self._thread is not None
                and coerced["s3_endpoint_url"] != self._config.s3_endpoint_url
            ):
                raise ValueError("s3_endpoint_url cannot change while the server runs")
            _check_faults(dataclasses.replace(self._config, **coerced))
            for name, value in coerced.items():
                setattr(self._config, name, value)
            if "seed" in coerced:
                self._rng.seed(self._config.seed)
            if {"quotas", "region_quotas", "burst_seconds"} & set(coerced):
                self._sync_buckets()
            running = self._thread is not None
        # before start, the server opens the window itself when it starts listening
        return coerced["down_for_seconds"] if running and "down_for_seconds" in coerced else None

    def _run_on_loop(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the server's loop; from another thread, wait for it (bounded)."""
        loop = self._loop
        if loop is None or self._thread is None or loop.is_closed():
            coro.close()
            return
        if threading.current_thread() is self._thread:
            task = loop.create_task(coro)
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10)

    def _quota(self, region: str, api: str) -> float | None:
        """The TPS quota of ``api`` in ``region``; None: unlimited. Under the lock."""
        by_region = self._config.region_quotas.get(region, {})
        return by_region[api] if api in by_region else self._config.quotas.get(api)

    def _sync_buckets(self) -> None:
        """Each region's buckets to the quotas as they are now (new ones start full when a
        region first calls)."""
        now = self._clock()
        burst = self._config.burst_seconds
        for key, bucket in list(self._buckets.items()):
            tps = self._quota(*key)
            if tps is None:
                del self._buckets[key]
            else:
                bucket.reconfigure(tps, burst, now)

    def stats(self) -> dict[str, Any]:
        """Counters since start/reset, per API unless said otherwise.

        Every call that is no longer in flight ended in exactly one of ``ok``, ``throttled``,
        ``errors`` (answers as asked), ``dropped``, ``reset``, ``malformed``, ``garbage``
        (injected faults), ``abandoned`` (never answered: client gone or server stopping) and
        ``down`` (closed while the endpoint was down). ``stalled`` counts holds begun: a held
        call also ends in one of the others (``ok`` etc. if its client was still there).
        ``billed`` and ``undelivered`` are per (API, object). ``connections`` counts the
        accepted connections whose socket the fake has not closed yet (0 once it stopped).
        """
        with self._lock:
            s = self._stats
            down_left = max(self._down_until - time.monotonic(), 0.0) if self._down_until else 0.0
            return {
                "calls": dict(s.calls),
                "ok": dict(s.ok),
                "throttled": dict(s.throttled),
                "errors": dict(s.errors),
                "error_codes": {api: dict(c) for api, c in s.error_codes.items()},
                "billed": dict(s.billed),
                "s3_reads": dict(s.s3_reads),
                "dropped": dict(s.dropped),
                "reset": dict(s.reset),
                "stalled": dict(s.stalled),
                "slow": dict(s.slow),
                "malformed": dict(s.malformed),
                "garbage": dict(s.garbage),
                "abandoned": dict(s.abandoned),
                "down": dict(s.down),
                "undelivered": dict(s.undelivered),
                "call_number": s.call_number,
                # False from a down window's start until the fake listens again
                "listening": not self._down_until,
                "down_seconds_left": round(down_left, 3),
                "in_flight": s.in_flight,
                "max_in_flight": s.max_in_flight,
                # accepted connections whose socket is still open
                "connections": sum(1 for sock in self._accepted if sock.fileno() != -1),
                "timeline": {
                    api: {outcome: _per_second(c) for outcome, c in by.items()}
                    for api, by in s.timeline.items()
                },
                "regions": {region: dict(c) for region, c in s.regions.items()},
                "region_timeline": {
                    region: {outcome: _per_second(c) for outcome, c in by.items()}
                    for region, by in s.region_timeline.items()
                },
                "service_quotas": dict(s.service_quotas),
            }

    def reset_stats(self) -> None:
        """Zero the counters; call numbers (``fail_calls``) count from 1 again."""
        with self._lock:
            in_flight = self._stats.in_flight
            self._stats = _Stats(in_flight=in_flight, max_in_flight=in_flight)

    # ------------------------------------------------------------------ admin endpoints

    def _stats_json(self) -> JSON:
        stats = self.stats()
        for name in ("billed", "undelivered"):
            stats[name] = {f"{api} {ident}": n for (api, ident), n in stats[name].items()}
        return stats

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self._stats_json())

    async def _handle_config(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"{}")
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            down_for = self._apply(body)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        response = web.json_response(dataclasses.asdict(self.config))
        if down_for is not None:
            # this connection is spared so the answer gets out, then closed with it
            await self._set_down(down_for, spare=request.protocol)
            if down_for > 0:
                response.force_close()
        return response

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response({"ok": True})

    # ------------------------------------------------------------------ down windows

    async def _set_down(self, seconds: float, spare: object = None) -> None:
        """Stop listening for ``seconds`` (then resume), or with 0 resume now. Loop thread.

        While down, the port is held by a bound socket that does not listen, so connections
        are refused (ECONNREFUSED) and nobody else can take the port; open connections are
        closed, except ``spare`` (the admin request that asked for this), and so are those
        accepted before the window but set up after it began (``_connect``).
        """
        if self._up_timer is not None:
            self._up_timer.cancel()
            self._up_timer = None
        if seconds <= 0:
            self._listen_again()
            return
        with self._lock:
            self._down_until = time.monotonic() + seconds
        if self._listeners:
            # nothing between closing the listeners and binding the placeholders: the port
            # is free only for that instant
            self._stop_listening()
            self._placeholders = [_hold_port(address) for address in self._bound]
        runner = self._runner
        server = runner.server if runner is not None else None
        for conn in server.connections if server is not None else []:
            if conn is not spare:
                conn.force_close()
        self._up_timer = asyncio.get_running_loop().call_later(seconds, self._come_back)

    def _come_back(self) -> None:
        self._up_timer = None
        self._listen_again()

    def _listen_again(self) -> None:
        """Listen again on the same addresses, bound beside the placeholders before they go."""
        try:
            if not self._listeners and self._runner is not None:
                socks = [_listening_socket(address) for address in self._bound]
                for placeholder in self._placeholders:
                    placeholder.close()
                self._placeholders = []
                for sock in socks:
                    self._listen(sock)
        except OSError as exc:  # the port was ours all along, so this is a bug: report it
            logger.exception("fake rekognition could not listen again")
            self._failures.append(exc)
        finally:
            with self._lock:
                self._down_until = 0.0
                self._config.down_for_seconds = 0.0

    # ------------------------------------------------------------------ connections

    def _listen(self, sock: socket.socket) -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)
        self._listeners.append(sock)

    def _stop_listening(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners = []

    def _accept(self, sock: socket.socket) -> None:
        """Take the connections waiting on ``sock``; from here on each is in ``_accepted``
        until its socket is closed, whatever happens to it."""
        loop = asyncio.get_running_loop()
        server = self._runner.server if self._runner is not None else None
        if server is None:  # stopping (the listeners are closed first, so not expected)
            loop.remove_reader(sock.fileno())
            return
        with self._lock:  # forget the connections that have been closed
            for closed in [conn for conn in self._accepted if conn.fileno() == -1]:
                del self._accepted[closed]
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise  # the loop logs it and carries on
                logger.warning("fake rekognition: accept() out of resources: %s", exc)
                loop.remove_reader(sock.fileno())
                loop.call_later(_ACCEPT_RETRY_SECONDS, self._accept_again, sock)
                return
            with self._lock:
                self._accepted[conn] = None
            task = loop.create_task(self._connect(conn, server))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _accept_again(self, sock: socket.socket) -> None:
        if sock in self._listeners:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    async def _connect(self, conn: socket.socket, server: web.Server) -> None:
        """Hand an accepted connection to aiohttp (``stop()`` closes it if this never runs)."""
        try:
            transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
                server, conn
            )
        except BaseException as exc:
            # a transport that was made has been closed; this closes the socket if none was
            conn.close()
            if not isinstance(exc, Exception):
                raise
            logger.debug("fake rekognition: could not set a connection up", exc_info=exc)
            return
        with self._lock:
            if conn in self._accepted:
                self._accepted[conn] = transport
        if self._is_down():  # accepted before the window began: closed like the others
            protocol.force_close()

    def _release_listening(self) -> None:
        if self._up_timer is not None:
            self._up_timer.cancel()
            self._up_timer = None
        self._stop_listening()
        for placeholder in self._placeholders:
            placeholder.close()
        self._placeholders = []
        for task in self._connecting:
            task.cancel()
        self._runner = None
        with self._lock:
            self._down_until = 0.0

    async def _close_accepted(self) -> None:
        """After aiohttp has closed the connections it knew: close every accepted one left
        (set up too late for aiohttp's shutdown, or closing with unsent data), and let the
        loop finish closing them before it ends."""
        await asyncio.gather(*self._connecting, return_exceptions=True)
        with self._lock:
            accepted = list(self._accepted.items())
        for conn, transport in accepted:
            if transport is not None:
                # drops unsent data of one still closing; no-op for one closed already
                transport.abort()
            else:
                conn.close()  # never set up: no transport owns it
        for _ in range(_CLOSE_ITERATIONS):
            if all(conn.fileno() == -1 for conn, _ in accepted):
                break
            await asyncio.sleep(0)
        else:
            logger.warning("fake rekognition: connections still open after stopping")
        with self._lock:
            self._accepted.clear()

    def _is_down(self) -> bool:
        with self._lock:
            return self._down_until > 0.0

    # ------------------------------------------------------------------ the API

    def _begin(self, api: str) -> tuple[str, str | None]:
        """Count a new call; its request id and the fault it gets (None for none)."""
        with self._lock:
            self._request_counter += 1
            s = self._stats
            s.calls[api] += 1
            s.count_region(_REQUEST_REGION.get(), "calls")
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            s.call_number += 1
            request_id = _uuid_from("request", self._config.seed, self._request_counter)
            return request_id, self._fault_for(s.call_number)

    def _fault_for(self, number: int) -> str | None:
        """The schedule's fault for this call number, else one drawn from (seed, number)."""
        cfg = self._config
        scheduled = cfg.fail_calls.get(number)
        if scheduled is not None:
            return scheduled
        rates = [(kind, float(getattr(cfg, name))) for kind, name in FAULT_RATES.items()]
        if not any(rate > 0 for _, rate in rates):
            return None
        # not self._rng: that one is shared with latency and throttle draws, whose order
        # depends on the interleaving of concurrent calls
        draw = _unit(cfg.seed, "fault", number)
        for kind, rate in rates:
            if draw < rate:
                return kind
            draw -= rate
        return None

    def _finish(self, api: str, code: str | None, billed: str | None, delta: int = 1) -> None:
        """Count an answer; ``delta=-1`` takes it back (it could not be delivered)."""
        with self._lock:
            s = self._stats
            second = int(time.monotonic() - s.since)
            outcome = "ok" if code is None else "throttled" if code in THROTTLE_CODES else "error"
            _bump(s.timeline.setdefault(api, {}).setdefault(outcome, Counter()), second, delta)
            s.count_region(
                _REQUEST_REGION.get(), "errors" if outcome == "error" else outcome, delta
            )
            if code is None:
                _bump(s.ok, api, delta)
                if billed is not None:
                    _bump(s.billed, (api, billed), delta)
            else:
                _bump(s.throttled if code in THROTTLE_CODES else s.errors, api, delta)
                _bump(s.error_codes.setdefault(api, Counter()), code, delta)

    def _finish_unanswered(self, api: str, outcome: str, billable: str | None) -> None:
        """A call that ended without a valid answer: ``outcome`` names its counter."""
        with self._lock:
            s = self._stats
            second = int(time.monotonic() - s.since)
            s.timeline.setdefault(api, {}).setdefault(outcome, Counter())[second] += 1
            counter: Counter[str] = getattr(s, outcome)
            counter[api] += 1
            s.count_region(_REQUEST_REGION.get(), outcome)
            if billable is not None:
                s.undelivered[(api, billable)] += 1

    def _count_hold(self, api: str, counter: str) -> None:
        with self._lock:
            held: Counter[str] = getattr(self._stats, counter)
            held[api] += 1

    def _is_slow(self, request: web.BaseRequest) -> bool:
        with self._lock:
            threshold = self._config.slow_body_bytes
        size = request.content_length
        return threshold > 0 and size is not None and size >= threshold

    def _end(self) -> None:
        with self._lock:
            self._stats.in_flight -= 1

    def _take_token(self, api: str) -> bool:
        """A token of ``api``'s bucket in the request's region (each region its own)."""
        key = (_REQUEST_REGION.get(), api)
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                tps = self._quota(*key)
                if tps is None:
                    return True
                bucket = self._buckets[key] = _TokenBucket(tps, self._config.burst_seconds, now)
            return bucket.try_take(now)

    def _signing_region(self, request: web.BaseRequest) -> str:
        match = _CREDENTIAL_SCOPE_RE.search(request.headers.get("Authorization", ""))
        if match:
            return match[1]
        with self._lock:
            return self._config.region

    def _roll(self, probability: float) -> bool:
        if probability <= 0:
            return False
        if probability >= 1:
            return True
        with self._lock:
            return self._rng.random() < probability

    def _draw_latency(self) -> float:
        with self._lock:
            median, sigma = self._config.latency_median_ms, self._config.latency_sigma
            if median <= 0:
                return 0.0
            return self._rng.lognormvariate(math.log(median), max(sigma, 0.0)) / 1000.0

    def _refused_credentials(self, request: web.BaseRequest) -> str | None:
        """The error code for a request signed with a refused access key, else None."""
        with self._lock:
            refused = self._config.refused_keys
            if not refused:
                return None
        match = _CREDENTIAL_RE.search(request.headers.get("Authorization", ""))
        return refused.get(match[1]) if match else None

    async def _offload(self, size: int, fn: Callable[..., _T], *args: Any) -> _T:
        if size > _OFFLOAD_BYTES:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        target = request.headers.get("X-Amz-Target", "")
        region = self._signing_region(request)
        _REQUEST_REGION.set(region)  # this request's task: its counters and buckets
        if target.startswith(SERVICE_QUOTAS_PREFIX):
            return await self._handle_service_quotas(request, target, region)
        op = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
        api = op or "<unknown>"
        request_id, fault = self._begin(api)
        with self._lock:
            fault = self._config.region_faults.get(region) or fault
        ended = False  # True once the call is in exactly one outcome counter
        try:
            if self._is_down():  # a request that slipped in on a connection still open
                with contextlib.suppress(web.HTTPException):
                    await request.read()
                self._finish_unanswered(api, "down", None)
                ended = True
                return _cut(request, reset=False)
            status, answer, code, billed = await self._answer(api, op, request, fault)
            billable = billed if status == 200 else None
            if fault in ("drop", "reset"):
                self._finish_unanswered(api, "dropped" if fault == "drop" else "reset", billable)
                ended = True
                return _cut(request, reset=fault == "reset")
            if fault == "malformed":
                self._finish_unanswered(api, "malformed", billable)
                ended = True
                status, data = 200, json.dumps(_malformed(op, answer if status == 200 else {}))
            elif fault == "garbage":
                self._finish_unanswered(api, "garbage", billable)
                ended = True
                whole = json.dumps(answer)
                status, data = 200, whole[: len(whole) // 2]  # a JSON object's prefix never parses
            else:
                slow = self._is_slow(request)
                if fault == "stall" or slow:
                    self._count_hold(api, "slow" if slow else "stalled")
                    if not await self._hold(request, slow=slow):
                        self._finish_unanswered(api, "abandoned", billable)
                        ended = True
                        return _cut(request, reset=False)
                if status == 200 and self._config.unmodelled_members:
                    answer = _with_unmodelled(op, answer)
                data = json.dumps(answer)
            # counted before it is written, so that a client that has its answer finds it in
            # the stats; taken back if it cannot be written
            counted = not ended
            if counted:
                self._finish(api, code, billed)
                ended = True
            response, delivered = await _deliver(request, status, data.encode(), request_id)
            if counted and not delivered:
                self._finish(api, code, billed, delta=-1)
                self._finish_unanswered(api, "abandoned", billable)
            return response
        finally:
            if not ended:  # cancelled (server stopping) or the client left mid-request
                self._finish_unanswered(api, "abandoned", None)
            self._end()

    async def _answer(
        self, api: str, op: str, request: web.Request, fault: str | None
    ) -> tuple[int, JSON, str | None, str | None]:
        """What the service answers: status, body, error code, billing identity."""
        try:
            body, billed = await self._dispatch(api, op, request, fault)
        except _ApiError as err:
            return err.status, {"__type": err.code, "Message": err.message}, err.code, None
        except ConnectionError:
            raise  # the client went away while its request was read: nobody to answer
        except Exception as exc:  # a bug in the fake; still answer on the wire
            logger.exception("fake rekognition failed on %s", api)
            code = "InternalServerError"
            return 500, {"__type": code, "Message": f"fake failure: {exc!r}"}, code, None
        return 200, body, None, billed

    async def _hold(self, request: web.Request, *, slow: bool = False) -> bool:
        """Hold a stalled (or slow) answer; True if its client is still there when the time
        is up."""
        with self._lock:
            seconds = self._config.slow_seconds if slow else self._config.stall_seconds
        deadline = self._clock() + seconds if seconds > 0 else math.inf
        stop = self._stop_event
        while True:
            # polled, not awaited: aiohttp has no "client disconnected" event to wait on
            if (stop is not None and stop.is_set()) or _client_gone(request):
                return False
            left = deadline - self._clock()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, _HOLD_POLL_SECONDS))

    async def _dispatch(
        self, api: str, op: str, request: web.Request, fault: str | None = None
    ) -> tuple[JSON, str | None]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _ApiError("ImageTooLargeException", "Image size is too large.") from exc
        handler = self._handlers.get(op)
        if handler is None:
            raise _ApiError(
                "UnknownOperationException", f"Unknown or unsupported operation: {_target_of(op)}"
            )
        if fault == "denied":
            raise _ApiError(
                "AccessDeniedException",
                f"User is not authorized to perform: rekognition:{op} in this region",
            )
        refused = self._refused_credentials(request)
        if refused is not None:
            raise _ApiError(refused, _CREDENTIAL_MESSAGES.get(refused, "Invalid credentials"))
        if fault == "quota" or not self._take_token(api):
            await self._sleep(self._config.throttle_latency_ms / 1000.0)
            raise _ApiError("ProvisionedThroughputExceededException", "Provisioned rate exceeded.")
        if fault == "throttle" or self._roll(self._config.throttle_rate):
            await self._sleep(self._config.throttle_latency_ms / 1000.0)
            raise _ApiError(
                "ThrottlingException", "Slow down; sudden increase in rate of requests.", 500
            )
        latency = self._draw_latency()
        if latency > 0:
            await self._sleep(latency)
        if fault == "error" or self._roll(self._config.error_rate):
            raise _ApiError("InternalServerError", "Internal server error", 500)
        body = await self._offload(len(raw), _parse_body, raw)
        return await handler(body)

    # ------------------------------------------------------------------ Service Quotas

    async def _handle_service_quotas(
        self, request: web.Request, target: str, region: str
    ) -> web.Response:
        op = target[len(SERVICE_QUOTAS_PREFIX) :]
        with self._lock:
            self._stats.service_quotas[op or "<unknown>"] += 1
            refused = self._config.service_quotas_error
            applied = dict(self._config.applied_quotas.get(region, {}))
        try:
            body = _parse_body(await request.read())
            if refused:
                raise _ApiError(
                    refused, f"User is not authorized to perform: servicequotas:{op or '?'}"
                )
            answer = _service_quotas_answer(op, body, region, applied)
        except _ApiError as err:
            status, answer = err.status, {"__type": err.code, "Message": err.message}
        else:
            status = 200
        return web.Response(
            status=status, body=json.dumps(answer).encode(), content_type=CONTENT_TYPE
        )

    # ------------------------------------------------------------------ images

    async def _load_image(self, req: JSON, name: str = "Image") -> _Image:
        image = req.get(name)
        if not isinstance(image, dict):
            raise _invalid(f"{name} is required")
        has_bytes, has_s3 = image.get("Bytes") is not None, image.get("S3Object") is not None
        if has_bytes == has_s3:
            raise _invalid(f"{name} needs exactly one of Bytes and S3Object")
        if has_bytes:
            raw = image["Bytes"]
            if not isinstance(raw, str):
                raise _invalid(f"{name}.Bytes must be base64 text")
            data, digest = await self._offload(len(raw), _decode_bytes, raw)
            _check_magic(data)
            return _Image(digest, f"sha256:{digest}")
        obj = image["S3Object"]
        if not isinstance(obj, dict):
            raise _invalid(f"{name}.S3Object must be an object")
        bucket, key, version = obj.get("Bucket"), obj.get("Name"), obj.get("Version")
        if not isinstance(bucket, str) or not bucket or not isinstance(key, str) or not key:
            raise _invalid(f"{name}.S3Object needs Bucket and Name")
        if version is not None and not isinstance(version, str):
            raise _invalid(f"{name}.S3Object.Version must be a string")
        data = await self._fetch_s3(bucket, key, version)
        _check_magic(data)
        digest = await self._offload(len(data), image_digest, data)
        return _Image(digest, f"s3://{bucket}/{key}")

    async def _fetch_s3(self, bucket: str, key: str, version: str | None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = self._s3
        if s3 is None:
            raise _ApiError("InvalidS3ObjectException", _BAD_S3)
        with self._lock:
            caching = self._config.s3_cache
            self._stats.s3_reads[f"s3://{bucket}/{key}"] += 1
        cached = self._s3_cache.get((bucket, key, version)) if caching else None
        if cached is not None:
            return cached
        kwargs: JSON = {"Bucket": bucket, "Key": key}
        if version:
            kwargs["VersionId"] = version
        with self._lock:
            # the Region the request is signed for: Rekognition reads S3 only there
            region = _REQUEST_REGION.get() or self._config.region
            check_region = self._config.check_bucket_region
        try:
            if check_region:
                location = await s3.get_bucket_location(Bucket=bucket)
                if (location.get("LocationConstraint") or "us-east-1") != region:
                    raise _ApiError("InvalidS3ObjectException", _BAD_S3)
            resp = await s3.get_object(**kwargs)
            async with resp["Body"] as stream:
                if int(resp.get("ContentLength") or 0) > MAX_S3_IMAGE:
                    raise _ApiError("ImageTooLargeException", "Image size is too large.")
                data: bytes = await stream.read()
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise _ApiError("InvalidS3ObjectException", _BAD_S3) from exc
        if len(data) > MAX_S3_IMAGE:
            raise _ApiError("ImageTooLargeException", "Image size is too large.")
        if caching:
            self._s3_cache[(bucket, key, version)] = data
        return data

    def _faces(self, image: _Image) -> list[_Face]:
        with self._lock:
            people = self._config.people
        return _faces_for(image.digest, people)

    # ------------------------------------------------------------------ image operations

    async def _detect_faces(self, req: JSON) -> tuple[JSON, str | None]:
        attributes = _attributes(req, "Attributes")
        image = await self._load_image(req)
        details = [face.detail(attributes) for face in self._faces(image)]
        return {"FaceDetails": details}, image.identity

    async def _detect_labels(self, req: JSON) -> tuple[JSON, str | None]:
        max_labels = _int_param(req, "MaxLabels", 1000, 0, 1_000_000)
        min_conf = _float_param(req, "MinConfidence", 55.0)
        image = await self._load_image(req)
        labels = [
            lab
            for lab in _labels_for(image.digest, self._faces(image))
            if float(lab["Confidence"]) >= min_conf
        ][:max_labels]
        return {"Labels": labels, "LabelModelVersion": "3.0"}, image.identity

    async def _compare_faces(self, req: JSON) -> tuple[JSON, str | None]:
        threshold = _float_param(req, "SimilarityThreshold", 80.0)
        source = await self._load_image(req, "SourceImage")
        target = await self._load_image(req, "TargetImage")
        source_faces = self._faces(source)
        if not source_faces:
            raise _invalid(_NO_FACE)
        src = source_faces[0]
        matches: list[JSON] = []
        unmatched: list[JSON] = []
        for face in self._faces(target):
            similarity = _similarity(src.identity, src.key, face.identity, face.key)
            if similarity >= threshold:
                matches.append({"Similarity": similarity, "Face": face.compared()})
            else:
                unmatched.append(face.compared())
        matches.sort(key=lambda m: -float(m["Similarity"]))
        body = {
            "SourceImageFace": {"BoundingBox": src.box, "Confidence": src.confidence},
            "FaceMatches": matches,
            "UnmatchedFaces": unmatched,
        }
        return body, target.identity

    async def _detect_text(self, req: JSON) -> tuple[JSON, str | None]:
        image = await self._load_image(req)
        body = {"TextDetections": _text_for(image.digest), "TextModelVersion": "3.0"}
        return body, image.identity

    async def _detect_moderation_labels(self, req: JSON) -> tuple[JSON, str | None]:
        min_conf = _float_param(req, "MinConfidence", 50.0)
        image = await self._load_image(req)
        labels: list[JSON] = []
        if _unit(image.digest, "moderation") < 0.15:
            conf = _between(50, 95, image.digest, "moderation-conf")
            labels = [
                {"Confidence": conf, "Name": "Suggestive", "ParentName": "", "TaxonomyLevel": 1},
                {
                    "Confidence": round(conf * 0.9, 6),
                    "Name": "Revealing Clothes",
                    "ParentName": "Suggestive",
                    "TaxonomyLevel": 2,
                },
            ]
        labels = [lab for lab in labels if float(lab["Confidence"]) >= min_conf]
        body = {"ModerationLabels": labels, "ModerationModelVersion": "7.0", "ContentTypes": []}
        return body, image.identity

    async def _recognize_celebrities(self, req: JSON) -> tuple[JSON, str | None]:
        image = await self._load_image(req)
        celebrities: list[JSON] = []
        unrecognized: list[JSON] = []
        for face in self._faces(image):
            if face.identity.startswith("celeb:"):
                name = face.identity.removeprefix("celeb:")
                celeb_id = hashlib.sha256(name.encode()).hexdigest()[:8]
                gender = face.attribute("Gender")["Value"]
                celebrities.append(
                    {
                        "Urls": [f"www.wikidata.org/wiki/Q{int(celeb_id, 16) % 10_000_000}"],
                        "Name": name,
                        "Id": celeb_id,
                        "Face": face.compared(),
                        "MatchConfidence": _between(95, 99.9, face.key, "celeb"),
                        "KnownGender": {"Type": gender},
                    }
                )
            else:
                unrecognized.append(face.compared())
        body = {"CelebrityFaces": celebrities, "UnrecognizedFaces": unrecognized}
        return body, image.identity

    async def _detect_protective_equipment(self, req: JSON) -> tuple[JSON, str | None]:
        summary_req = req.get("SummarizationAttributes")
        image = await self._load_image(req)
        persons: list[JSON] = []
        kinds = {
            "FACE": "FACE_COVER",
            "HEAD": "HEAD_COVER",
            "LEFT_HAND": "HAND_COVER",
            "RIGHT_HAND": "HAND_COVER",
        }
        for i, face in enumerate(self._faces(image)):
            parts: list[JSON] = []
            for part, kind in kinds.items():
                detections: list[JSON] = []
                if _unit(face.key, "ppe", part) < 0.3:
                    detections.append(
                        {
                            "BoundingBox": face.box,
                            "Confidence": _between(80, 99.9, face.key, "ppe-conf", part),
                            "Type": kind,
                            "CoversBodyPart": {
                                "Confidence": _between(80, 99.9, face.key, "ppe-cover", part),
                                "Value": True,
                            },
                        }
                    )
                parts.append(
                    {
                        "Name": part,
                        "Confidence": _between(90, 99.9, face.key, "part", part),
                        "EquipmentDetections": detections,
                    }
                )
            persons.append(
                {
                    "BodyParts": parts,
                    "BoundingBox": face.body_box(),
                    "Confidence": face.confidence,
                    "Id": i,
                }
            )
        body: JSON = {"ProtectiveEquipmentModelVersion": "1.0", "Persons": persons}
        if isinstance(summary_req, dict):
            min_conf = _float_param(summary_req, "MinConfidence", 50.0)
            required = set(summary_req.get("RequiredEquipmentTypes") or [])
            with_eq: list[int] = []
            without_eq: list[int] = []
            for person in persons:
                found = {
                    d["Type"]
                    for p in person["BodyParts"]
                    for d in p["EquipmentDetections"]
                    if float(d["Confidence"]) >= min_conf
                }
                (with_eq if required <= found else without_eq).append(person["Id"])
            body["Summary"] = {
                "PersonsWithRequiredEquipment": with_eq,
                "PersonsWithoutRequiredEquipment": without_eq,
                "PersonsIndeterminate": [],
            }
        return body, image.identity

    # ------------------------------------------------------------------ collections

    def _collection(self, req: JSON) -> _Collection:
        collection_id = _str_param(req, "CollectionId")
        with self._lock:
            collection = self._collections.get(collection_id)
        if collection is None:
            raise _ApiError(
                "ResourceNotFoundException", f"The collection id: {collection_id} does not exist"
            )
        return collection

    def _arn(self, collection_id: str) -> str:
        return f"arn:aws:rekognition:{self._config.region}:{ACCOUNT_ID}:collection/{collection_id}"

    async def _create_collection(self, req: JSON) -> tuple[JSON, str | None]:
        collection_id = _str_param(req, "CollectionId")
        if len(collection_id) > 255 or not _COLLECTION_ID_RE.fullmatch(collection_id):
            raise _invalid("CollectionId must match [a-zA-Z0-9_.\\-]+")
        with self._lock:
            if collection_id in self._collections:
                raise _ApiError(
                    "ResourceAlreadyExistsException",
                    f"The collection id: {collection_id} already exists",
                )
            self._collections[collection_id] = _Collection(collection_id, time.time())
        body = {
            "StatusCode": 200,
            "CollectionArn": self._arn(collection_id).removeprefix("arn:"),
            "FaceModelVersion": FACE_MODEL_VERSION,
        }
        return body, None

    async def _delete_collection(self, req: JSON) -> tuple[JSON, str | None]:
        collection = self._collection(req)
        with self._lock:
            self._collections.pop(collection.collection_id, None)
        return {"StatusCode": 200}, None

    async def _describe_collection(self, req: JSON) -> tuple[JSON, str | None]:
        collection = self._collection(req)
        with self._lock:
            count = len(collection.faces)
        body = {
            "FaceCount": count,
            "FaceModelVersion": FACE_MODEL_VERSION,
            "CollectionARN": self._arn(collection.collection_id),
            "CreationTimestamp": collection.created,
            "UserCount": 0,
        }
        return body, None

    async def _list_collections(self, req: JSON) -> tuple[JSON, str | None]:
        start, limit = _page(req, 1000)
        with self._lock:
            ids = sorted(self._collections)
        page = ids[start : start + limit]
        body: JSON = {
            "CollectionIds": page,
            "FaceModelVersions": [FACE_MODEL_VERSION] * len(page),
        }
        if start + limit < len(ids):
            body["NextToken"] = str(start + limit)
        return body, None

    async def _index_faces(self, req: JSON) -> tuple[JSON, str | None]:
        collection = self._collection(req)
        external = req.get("ExternalImageId")
        if external is not None and (
            not isinstance(external, str)
            or len(external) > 255
            or not _EXTERNAL_IMAGE_ID_RE.fullmatch(external)
        ):
            raise _invalid("ExternalImageId must match [a-zA-Z0-9_.\\-:]+")
        max_faces = _int_param(req, "MaxFaces", 100, 1, 1_000_000)
        attributes = _attributes(req, "DetectionAttributes")
        image = await self._load_image(req)
        records: list[JSON] = []
        unindexed: list[JSON] = []
        cid = collection.collection_id
        with self._lock:
            again = collection.indexings[image.digest]
            collection.indexings[image.digest] += 1
        # The first indexing of an image keeps the ids it always had; later ones get new ids.
        nth: tuple[int, ...] = (again,) if again else ()
        image_id = _uuid_from("image", cid, image.digest, *nth)
        for i, face in enumerate(self._faces(image)):
            if i >= max_faces:
                unindexed.append(
                    {"Reasons": ["EXCEEDS_MAX_FACES"], "FaceDetail": face.detail(attributes)}
                )
                continue
            stored = _StoredFace(
                face_id=_uuid_from("face", cid, image.digest, i, *nth),
                image_id=image_id,
                external_image_id=external,
                box=face.box,
                confidence=face.confidence,
                identity=face.identity,
            )
            with self._lock:
                collection.faces[stored.face_id] = stored
            record = stored.record()
            del record["IndexFacesModelVersion"]
            records.append({"Face": record, "FaceDetail": face.detail(attributes)})
        body = {
            "FaceRecords": records,
            "FaceModelVersion": FACE_MODEL_VERSION,
            "UnindexedFaces": unindexed,
        }
        return body, image.identity

    async def _list_faces(self, req: JSON) -> tuple[JSON, str | None]:
        collection = self._collection(req)
        start, limit = _page(req, 1000)
        wanted = req.get("FaceIds")
        with self._lock:
            faces = list(collection.faces.values())
        if isinstance(wanted, list):
            faces = [f for f in faces if f.face_id in set(wanted)]
        page = faces[start : start + limit]
        body: JSON = {"Faces": [f.record() for f in page], "FaceModelVersion": FACE_MODEL_VERSION}
        if start + limit < len(faces):
            body["NextToken"] = str(start + limit)
        return body, None

    async def _delete_faces(self, req: JSON) -> tuple[JSON, str | None]:
        collection = self._collection(req)
        face_ids = req.get("FaceIds")
        if not isinstance(face_ids, list) or not face_ids:
            raise _invalid("FaceIds is required")
        deleted: list[str] = []
        with self._lock:
            for face_id in face_ids:
                if collection.faces.pop(str(face_id), None) is not None:
                    deleted.append(str(face_id))
        return {"DeletedFaces": deleted}, None

    def _search(
        self, collection: _Collection, identity: str, key: str, req: JSON, exclude: str | None
    ) -> list[JSON]:
        threshold = _float_param(req, "FaceMatchThreshold", 80.0)
        max_faces = _int_param(req, "MaxFaces", 4096, 1, 4096)
        with self._lock:
            faces = [f for f in collection.faces.values() if f.face_id != exclude]
        matches: list[JSON] = []
        for stored in faces:
            similarity = _similarity(identity, key, stored.identity, stored.face_id)
            if similarity >= threshold:
                matches.append({"Similarity": similarity, "Face": stored.record()})
        matches.sort(key=lambda m: -float(m["Similarity"]))
        return matches[:max_faces]

    async def _search_faces(self, req: JSON) -> tuple[JSON, str | None]:
        collection = self._collection(req)
        face_id = _str_param(req, "FaceId")
        with self._lock:
            stored = collection.faces.get(face_id)
        if stored is None:
            raise _invalid(f"Face id {face_id} does not exist in collection")
        matches = self._search(collection, stored.identity, stored.face_id, req, face_id)
        body = {
            "SearchedFaceId": face_id,
            "FaceMatches": matches,
            "FaceModelVersion": FACE_MODEL_VERSION,
        }
        return body, None

    async def _search_faces_by_image(self, req: JSON) -> tuple[JSON, str | None]:
        collection = self._collection(req)
        image = await self._load_image(req)
        faces = self._faces(image)
        if not faces:
            raise _invalid(_NO_FACE)
        face = faces[0]
        body = {
            "SearchedFaceBoundingBox": face.box,
            "SearchedFaceConfidence": face.confidence,
            "FaceMatches": self._search(collection, face.identity, face.key, req, None),
            "FaceModelVersion": FACE_MODEL_VERSION,
        }
        return body, image.identity


def _target_of(op: str) -> str:
    return f"{TARGET_PREFIX}{op}" if op else "(no X-Amz-Target)"


def _quota_record(api: str, value: float, region: str) -> JSON:
    code, name = SERVICE_QUOTAS[api]
    return {
        "ServiceCode": "rekognition",
        "ServiceName": "Amazon Rekognition",
        "QuotaArn": f"arn:aws:servicequotas:{region}:{ACCOUNT_ID}:rekognition/{code}",
        "QuotaCode": code,
        "QuotaName": name,
        "Value": value,
        "Unit": "None",
        "Adjustable": True,
        "GlobalQuota": False,
    }


def _service_quotas_answer(op: str, req: JSON, region: str, applied: Mapping[str, float]) -> JSON:
    """Service Quotas' answer to ``op`` for the applied quotas of one region."""
    if req.get("ServiceCode") != "rekognition":
        raise _ApiError(
            "NoSuchResourceException",
            "The request failed because the specified service does not exist.",
        )
    records = [_quota_record(api, applied[api], region) for api in SERVICE_QUOTAS if api in applied]
    if op == "GetServiceQuota":
        code = _str_param(req, "QuotaCode")
        for record in records:
            if record["QuotaCode"] == code:
                return {"Quota": record}
        raise _ApiError(
            "NoSuchResourceException",
            f"The request failed because the quota {code} does not exist.",
        )
    if op == "ListServiceQuotas":
        code = req.get("QuotaCode")
        if code is not None:
            records = [r for r in records if r["QuotaCode"] == code]
        start, limit = _page(req, 100)
        page: JSON = {"Quotas": records[start : start + min(limit, 100)]}
        if start + limit < len(records):
            page["NextToken"] = str(start + limit)
        return page
    raise _ApiError("UnknownOperationException", f"Unknown operation {SERVICE_QUOTAS_PREFIX}{op}")


# --------------------------------------------------------------------------- CLI


def _parse_quota(text: str) -> tuple[str, float]:
    api, sep, tps = text.partition("=")
    try:
        if not sep or not api:
            raise ValueError
        return api, float(tps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected API=TPS, got {text!r}") from None


def _parse_fail_call(text: str) -> tuple[int, str]:
    number, sep, kind = text.partition("=")
    try:
        if not sep:
            raise ValueError
        ((n, k),) = _fail_calls({number: kind}).items()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N=KIND, got {text!r}") from None
    return n, k


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.fake_rekognition",
        description="Serve a fake Amazon Rekognition endpoint until SIGINT/SIGTERM.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--s3-endpoint-url", default=None)
    p.add_argument("--region", default="eu-west-1")
    p.add_argument("--quota", action="append", type=_parse_quota, default=[], metavar="API=TPS")
    p.add_argument("--burst-seconds", type=float, default=1.0)
    p.add_argument("--latency-ms", type=float, default=0.0, help="median latency")
    p.add_argument("--latency-sigma", type=float, default=0.5)
    p.add_argument("--throttle-latency-ms", type=float, default=2.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--throttle-rate", type=float, default=0.0)
    faults = p.add_argument_group("faults", "shares of calls; together at most 1")
    faults.add_argument("--drop-rate", type=float, default=0.0, help="close (FIN), no answer")
    faults.add_argument("--reset-rate", type=float, default=0.0, help="reset (RST), no answer")
    faults.add_argument("--stall-rate", type=float, default=0.0, help="hold the answer")
    faults.add_argument(
        "--stall-seconds", type=float, default=30.0, help="how long; 0 = until the client leaves"
    )
    faults.add_argument("--malformed-rate", type=float, default=0.0, help="200, wrong types")
    faults.add_argument("--garbage-rate", type=float, default=0.0, help="200, half a JSON body")
    faults.add_argument(
        "--fail-call",
        action="append",
        type=_parse_fail_call,
        default=[],
        metavar="N=KIND",
        help=f"call number N gets KIND ({', '.join(sorted(CALL_FAULTS))}); repeatable",
    )
    faults.add_argument(
        "--down-for-seconds", type=float, default=0.0, help="refuse connections from the start"
    )
    faults.add_argument(
        "--slow-body-bytes", type=int, default=0, help="hold requests with bodies this large"
    )
    faults.add_argument(
        "--slow-seconds", type=float, default=0.0, help="how long; 0 = until the client leaves"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s3-cache", action="store_true", help="cache S3 objects (benchmarks)")
    p.add_argument("--people", type=Path, default=None, help="JSON: sha256 -> [identities]")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> tuple[FakeConfig, argparse.Namespace]:
    """The FakeConfig that ``main`` would serve with (argparse exits 2 on a bad flag)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    people: dict[str, list[str]] = {}
    if args.people is not None:
        loaded = json.loads(args.people.read_text())
        if not isinstance(loaded, dict):
            parser.error("--people must hold a JSON object")
        people = {str(k): [str(x) for x in v] for k, v in loaded.items()}
    config = FakeConfig(
        s3_endpoint_url=args.s3_endpoint_url,
        region=args.region,
        quotas=dict(args.quota),
        burst_seconds=args.burst_seconds,
        latency_median_ms=args.latency_ms,
        latency_sigma=args.latency_sigma,
        throttle_latency_ms=args.throttle_latency_ms,
        error_rate=args.error_rate,
        throttle_rate=args.throttle_rate,
        seed=args.seed,
        s3_cache=args.s3_cache,
        people=people,
        drop_rate=args.drop_rate,
        reset_rate=args.reset_rate,
        stall_rate=args.stall_rate,
        stall_seconds=args.stall_seconds,
        malformed_rate=args.malformed_rate,
        garbage_rate=args.garbage_rate,
        fail_calls=dict(args.fail_call),
        down_for_seconds=args.down_for_seconds,
        slow_body_bytes=args.slow_body_bytes,
        slow_seconds=args.slow_seconds,
    )
    try:
        _check_faults(config)
    except ValueError as exc:
        parser.error(str(exc))
    return config, args


def main(argv: Sequence[str] | None = None) -> int:
    config, args = config_from_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with FakeRekognition(config, host=args.host, port=args.port) as fake:
        print(fake.url, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
