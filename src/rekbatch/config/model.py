"""The job config as pydantic models: sections, operations, and what identifies a job."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

OperationType = Literal[
    "detect_faces",
    "detect_labels",
    "compare_faces",
    "detect_text",
    "detect_moderation_labels",
    "recognize_celebrities",
    "detect_protective_equipment",
    "search_faces",
    "index_faces",
]

_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")


def parse_s3_uri(uri: str) -> tuple[str, str] | None:
    """``s3://bucket/prefix`` to (bucket, prefix); None when ``uri`` is not an S3 URI."""
    match = _S3_URI.match(uri)
    if match is None:
        return None
    return match["bucket"], match["prefix"] or ""


SOURCE_KINDS = ("inventory:", "keys:")
# A queue's name (SQS allows letters, digits, - and _, up to 80, ".fifo" at the end) or URL.
_SQS_URI = re.compile(r"^sqs://(?:[A-Za-z0-9_-]{1,80}(?:\.fifo)?|https?://[^\s]+/[A-Za-z0-9_.-]+)$")


def source_kind(uri: str) -> str:
    """``s3`` (a prefix), ``inventory`` (an S3 Inventory manifest), ``keys`` (a key list),
    ``sqs`` (a queue of S3 event notifications) or ``local`` (a folder or a file)."""
    if uri.startswith("sqs://"):
        return "sqs"
    for kind in SOURCE_KINDS:
        if uri.startswith(kind):
            return kind[:-1]
    return "s3" if parse_s3_uri(uri) is not None else "local"


def uses_s3(uri: str) -> bool:
    """Whether a source's objects (or its list) are on S3: all but local folders."""
    return source_kind(uri) != "local"


def _check_image_location(value: str) -> str:
    if value.startswith("s3://") and parse_s3_uri(value) is None:
        raise ValueError(f"not a valid s3://bucket/key URI: {value!r}")
    if value.startswith("s3://") and not (parse_s3_uri(value) or ("", ""))[1]:
        raise ValueError(f"names a bucket, not an object: {value!r}")
    if not value:
        raise ValueError("must not be empty")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobSection(_Section):
    name: str = "rekbatch-job"
    output_dir: str = "out/rekbatch-job"


# Rekognition's own formats and those rekbatch converts; sniffing decides the real format.
DEFAULT_INCLUDE: list[str] = [
    "*.jpg",
    "*.jpeg",
    "*.png",
    "*.heic",
    "*.heif",
    "*.avif",
    "*.webp",
    "*.tif",
    "*.tiff",
    "*.bmp",
    "*.gif",
]


_USERINFO = re.compile(r"(?<=//)[^/]*@")


def _shown(url: str) -> str:
    """``url`` as an error may print it: never the user name and password in it (also in
    a URL inside another, as in ``sqs://https://...``)."""
    return repr(_USERINFO.sub("***@", url))


def _check_source_uri(uri: str) -> str:
    if uri.startswith("inventory:"):
        if parse_s3_uri(uri[len("inventory:") :]) is None or not uri.endswith(".json"):
            raise ValueError(
                f"an inventory source is inventory:s3://bucket/.../manifest.json: {uri!r}"
            )
    elif uri.startswith("keys:"):
        rest = uri[len("keys:") :]
        if not rest or (rest.startswith("s3://") and not (parse_s3_uri(rest) or "")[1:]):
            raise ValueError(
                f"a key list source is keys:s3://bucket/list.csv or keys:/path: {uri!r}"
            )
    elif uri.startswith("sqs://"):
        if "@" in uri:
            raise ValueError(
                f"holds a user name or password ({_shown(uri)}); requests are signed with "
                "AWS credentials: give them by profile or environment, not in the URL"
            )
        if _SQS_URI.match(uri) is None:
            raise ValueError(
                f"a queue source is sqs://QUEUE_NAME or sqs://https://QUEUE_URL: {uri!r}"
            )
    elif uri.startswith("s3://"):
        if parse_s3_uri(uri) is None:
            raise ValueError(f"not a valid s3://bucket[/prefix] URI: {uri!r}")
    elif "://" in uri:
        raise ValueError(f"only s3:// URIs and local directories are sources: {uri!r}")
    elif not uri:
        raise ValueError("empty source")
    return uri


# Checked one by one, so that every bad entry is named with its index.
SourceUri = Annotated[str, AfterValidator(_check_source_uri)]
ImageLocation = Annotated[str, AfterValidator(_check_image_location)]


class SourceSection(_Section):
    uris: list[SourceUri] = Field(min_length=1)
    include: list[str] = DEFAULT_INCLUDE
    exclude: list[str] = []
    sniff: bool = True
    # Convert what Rekognition refuses (formats, sizes) and send it as bytes; needs sniff.
    convert: bool = True
    # A header declaring more pixels than this is refused undecoded (a decompression bomb).
    max_pixels: int = Field(default=150_000_000, ge=1_000_000, le=2_000_000_000)
    # Paginators listing one S3 prefix at once, over disjoint key ranges.
    list_concurrency: int = Field(default=16, ge=1, le=256)
    # A queue source (sqs://) is done once no message came for this long (without --follow).
    queue_idle_seconds: float = Field(default=20.0, gt=0, le=86_400)
    # Decoded-image memory that all conversions (and the offline backend's decodes) may
    # hold at once; an image needing more alone is skipped as too_large.
    convert_memory_mb: int = Field(default=1024, ge=64, le=1_048_576)
    # Local folders: a symbolic link is recorded as skipped (reason symlink) unless true.
    follow_symlinks: bool = False


def _check_endpoint(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(f"not an http(s)://host[:port] URL: {_shown(value)}") from None
    if "@" in parts.netloc:
        # Requests are signed with the AWS credentials; a password in the URL is never used,
        # and would be saved with the job and shown wherever the URL is.
        raise ValueError(
            f"holds a user name or password ({_shown(value)}); rekbatch signs its requests "
            "with AWS credentials: give them by profile or environment, not in the URL"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s)://host[:port] URL: {_shown(value)}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"the port is not a number: {_shown(value)}") from None
    return value


_REGION = r"^[a-z]{2}(-[a-z]+)+-\d+$"
_COLLECTION_ID = r"^[a-zA-Z0-9_.\-]+$"
# What a value that does not match a field's pattern is, in the words of an error line.
PATTERN_WORDS = {
    _REGION: "not a Region name such as eu-west-1",
    _COLLECTION_ID: "a collection ID holds only letters, digits, '_', '.' and '-'",
}


class AwsSection(_Section):
    region: str = Field(default="us-east-1", pattern=_REGION)
    profile: str | None = None
    s3_endpoint_url: str | None = None
    rekognition_endpoint_url: str | None = None
    sqs_endpoint_url: str | None = None
    # "auto": S3Object where the bucket is in Rekognition's region, bytes elsewhere.
    image_mode: Literal["auto", "s3", "bytes"] = "auto"
    # How Rekognition calls are made: a signed request of rekbatch's own through the
    # client's HTTP session ("direct"), or the aiobotocore client's methods ("client").
    call_path: Literal["direct", "client"] = "direct"
    # Rekognition Regions the stateless calls are spread over, each at its own quota;
    # None: ``[region]``. Face collections stay in ``region``.
    regions: list[Annotated[str, Field(pattern=_REGION)]] | None = Field(default=None, min_length=1)
    # "bucket": each object's calls go to its bucket's own Region.
    rekognition_region: Literal["bucket"] | None = None

    _endpoints = field_validator("s3_endpoint_url", "rekognition_endpoint_url", "sqs_endpoint_url")(
        classmethod(lambda cls, v: _check_endpoint(v))
    )

    @field_validator("regions")
    @classmethod
    def _regions(cls, regions: list[str] | None) -> list[str] | None:
        if regions is not None and len(set(regions)) != len(regions):
            raise ValueError("a Region is listed twice")
        return regions

    @model_validator(mode="after")
    def _one_way(self) -> AwsSection:
        if self.regions is not None and self.rekognition_region == "bucket":
            raise ValueError(
                'aws.regions and aws.rekognition_region = "bucket" both choose the Regions '
                "Rekognition is called in: set one of them"
            )
        return self

    def calling_regions(self) -> list[str]:
        """The Regions stateless calls may go to (``rekognition_region = "bucket"`` adds
        the source buckets' Regions once they are known)."""
        return list(self.regions) if self.regions is not None else [self.region]


class BackendSection(_Section):
    kind: Literal["aws", "local"] = "aws"
    # Where the offline backend's analysis runs: this machine's process pool, or Ray actors
    # (models loaded once per actor) anywhere in the cluster at ``ray_address``.
    executor: Literal["pool", "ray"] = "pool"
    ray_address: str | None = None


class _Operation(_Section):
    pass


class _FaceOperation(_Operation):
    # "faces": photos in which the offline detector finds no face are skipped (no_face_local).
    prefilter: Literal["faces"] | None = None


class DetectFacesOp(_FaceOperation):
    type: Literal["detect_faces"]
    attributes: list[Literal["ALL", "DEFAULT"]] = ["DEFAULT"]


class DetectLabelsOp(_Operation):
    type: Literal["detect_labels"]
    max_labels: int = Field(default=10, ge=1, le=1000)
    min_confidence: float = Field(default=55.0, ge=0, le=100)


class CompareFacesOp(_FaceOperation):
    type: Literal["compare_faces"]
    reference: Annotated[str, Field(min_length=1)]
    similarity_threshold: float = Field(default=80.0, ge=0, le=100)

    _ref = field_validator("reference")(classmethod(lambda cls, v: _check_image_location(v)))


class DetectTextOp(_Operation):
    type: Literal["detect_text"]
    min_confidence: float | None = Field(default=None, ge=0, le=100)


class DetectModerationLabelsOp(_Operation):
    type: Literal["detect_moderation_labels"]
    min_confidence: float = Field(default=50.0, ge=0, le=100)


class RecognizeCelebritiesOp(_Operation):
    type: Literal["recognize_celebrities"]


class DetectProtectiveEquipmentOp(_Operation):
    type: Literal["detect_protective_equipment"]
    min_confidence: float = Field(default=80.0, ge=50, le=100)
    required_equipment: list[Literal["FACE_COVER", "HAND_COVER", "HEAD_COVER"]] = []


class SearchFacesOp(_FaceOperation):
    type: Literal["search_faces"]
    people: dict[str, list[ImageLocation]] = Field(min_length=1)
    strategy: Literal["auto", "compare", "collection"] = "auto"
    collection_id: str = Field(default="rekbatch-faces", pattern=_COLLECTION_ID)
    keep_collection: bool = False
    similarity_threshold: float = Field(default=80.0, ge=0, le=100)

    @field_validator("people")
    @classmethod
    def _people(cls, people: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, refs in people.items():
            if not refs:
                raise ValueError(f"person {name!r} has no reference image")
        return people


class IndexFacesOp(_FaceOperation):
    """Every face of every image into the job's face index, for ``rekbatch find``."""

    type: Literal["index_faces"]
    # AWS: the collection (and its shards -0001, -0002, ...), kept after the run.
    collection_id: str = Field(default="rekbatch-index", pattern=_COLLECTION_ID)
    max_faces: int = Field(default=100, ge=1, le=100)
    quality_filter: Literal["NONE", "AUTO", "LOW", "MEDIUM", "HIGH"] = "AUTO"


Operation = Annotated[
    DetectFacesOp
    | DetectLabelsOp
    | CompareFacesOp
    | DetectTextOp
    | DetectModerationLabelsOp
    | RecognizeCelebritiesOp
    | DetectProtectiveEquipmentOp
    | SearchFacesOp
    | IndexFacesOp,
    Field(discriminator="type"),
]


OPERATION_MODELS: dict[str, type[_Operation]] = {
    model.model_fields["type"].annotation.__args__[0]: model  # type: ignore[union-attr]
    for model in (
        DetectFacesOp,
        DetectLabelsOp,
        CompareFacesOp,
        DetectTextOp,
        DetectModerationLabelsOp,
        RecognizeCelebritiesOp,
        DetectProtectiveEquipmentOp,
        SearchFacesOp,
        IndexFacesOp,
    )
}


class LimitsSection(_Section):
    concurrency: int = Field(default=32, ge=1, le=4096)
    max_tps: float | dict[str, float] | None = None
    max_attempts: int = Field(default=8, ge=1, le=100)
    max_images: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)
    # An endpoint answering nothing for this long stops the run (resumable).
    unreachable_seconds: float = Field(default=120.0, ge=1, le=86400)
    # The failure breaker (calls/breaker.py): more than this share of the last
    # ``failure_window`` records failed stops the run (exit 1, resumable); 1 turns it off.
    max_failed_share: float = Field(default=0.5, gt=0, le=1)
    failure_window: int = Field(default=1000, ge=1, le=1_000_000)
    # After SIGINT/SIGTERM, how long in-flight calls may finish before they are cancelled.
    stop_grace_seconds: float = Field(default=20.0, ge=0, le=3600)

    @field_validator("max_tps")
    @classmethod
    def _tps(cls, value: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = value.values() if isinstance(value, dict) else [value] if value else []
        for tps in values:
            if tps <= 0:
                raise ValueError("rates must be positive")
        return value


class OutputSection(_Section):
    upload_uri: str | None = None
    # Parquet beside the JSONL and CSV: "auto" writes it when pyarrow is installed.
    parquet: bool | Literal["auto"] = "auto"
    # results.csv cells that would start a spreadsheet formula get a leading "'" unless "raw".
    csv_formulas: Literal["neutralise", "raw"] = "neutralise"

    def parquet_enabled(self) -> bool:
        if self.parquet != "auto":
            return bool(self.parquet)
        import importlib.util

        return importlib.util.find_spec("pyarrow") is not None

    @field_validator("upload_uri")
    @classmethod
    def _upload(cls, value: str | None) -> str | None:
        if value is not None and parse_s3_uri(value) is None:
            raise ValueError(f"not a valid s3://bucket/prefix URI: {value!r}")
        return value


class Config(_Section):
    job: JobSection = JobSection()
    source: SourceSection
    aws: AwsSection = AwsSection()
    backend: BackendSection = BackendSection()
    operations: list[Operation] = Field(min_length=1)
    limits: LimitsSection = LimitsSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _checks(self) -> Config:
        seen: set[str] = set()
        for index, op in enumerate(self.operations):
            if op.type in seen:
                raise ValueError(
                    f"operations[{index}]: operation {op.type!r} is listed twice; "
                    "each operation runs once per image"
                )
            seen.add(op.type)
        return self

    def fingerprint(self) -> str:
        """What identifies the job: its sources and operations. Rates, concurrency, caps and
        endpoints may change between a run and its resume; these may not."""
        # How fast it is listed, and the memory its decoding may hold, do not change what
        # the job is.
        source = self.source.model_dump(
            exclude={"list_concurrency", "queue_idle_seconds", "convert_memory_mb"}
        )
        # Keys added later leave the fingerprint of a job that keeps their defaults as it
        # was, so a job started before them resumes.
        for key, default in (
            ("convert", True),
            ("max_pixels", 150_000_000),
            ("follow_symlinks", False),
        ):
            if source.get(key) == default:
                del source[key]
        if source.get("include") == DEFAULT_INCLUDE:
            source["include"] = ["*.jpg", "*.jpeg", "*.png"]
        identity = {
            "source": source,
            "operations": [op.model_dump() for op in self.operations],
            # "auto" is "s3" wherever a job of the old default could run at all.
            "image_mode": "s3" if self.aws.image_mode == "auto" else self.aws.image_mode,
            "backend": self.backend.kind,
        }
        blob = json.dumps(identity, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
