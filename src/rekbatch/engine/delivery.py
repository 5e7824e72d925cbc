"""How a job's images reach Rekognition, and so which sizes it takes: one answer for the run
and for ``plan``.

Rekognition reads an S3 object itself (an S3Object reference) when the backend is AWS,
``aws.image_mode`` allows it and the bucket is in Rekognition's region; it then takes up to
15 MB. Everything else goes as bytes, up to 5 MB. With conversion on (``source.convert`` and
sniffing), anything up to 200 MB is worth downloading, to be made small enough. Which
buckets are elsewhere is asked once per run (``find_delivery``); ``Delivery`` then answers
per object without I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rekbatch.config import Config, parse_s3_uri, uses_s3
from rekbatch.errors import SetupError
from rekbatch.sources.filters import MAX_CONVERT_BYTES, MAX_IMAGE_BYTES, MAX_S3_OBJECT_BYTES
from rekbatch.sources.s3 import S3, buckets_elsewhere, region_error


@dataclass(frozen=True, slots=True)
class Delivery:
    references: bool  # S3Object references at all: the AWS backend, image_mode not "bytes"
    convert: bool  # images Rekognition refuses are converted (source.convert with sniffing)
    bytes_buckets: frozenset[str] = frozenset()  # source buckets in another region

    @classmethod
    def of(cls, cfg: Config, bytes_buckets: Iterable[str] = ()) -> Delivery:
        return cls(
            references=cfg.backend.kind == "aws" and cfg.aws.image_mode != "bytes",
            convert=cfg.source.convert and cfg.source.sniff,
            bytes_buckets=frozenset(bytes_buckets),
        )

    def by_reference(self, bucket: str | None) -> bool:
        """Whether Rekognition reads the object itself; local files, ``image_mode =
        "bytes"``, buckets elsewhere and the offline backend need the bytes here."""
        return self.references and bucket is not None and bucket not in self.bytes_buckets

    @staticmethod
    def image_limit(by_reference: bool) -> int:
        """The largest image Rekognition takes unchanged, sent this way."""
        return MAX_S3_OBJECT_BYTES if by_reference else MAX_IMAGE_BYTES

    def listing_limit(self, uri: str) -> int:
        """The largest object of the source ``uri`` a worker takes on; a larger one is
        skipped as ``too_large`` from its listing entry, before anything is read."""
        if self.convert:
            return MAX_CONVERT_BYTES
        parsed = parse_s3_uri(uri)  # inventories and key lists name their buckets per object
        by_reference = uses_s3(uri) and self.by_reference(parsed[0] if parsed else "")
        return self.image_limit(by_reference)


@dataclass(frozen=True)
class Placement:
    """What ``find_delivery`` found: the delivery, each source bucket's Region, the calling
    Regions, and the buckets whose images go as bytes (bucket: its Region)."""

    delivery: Delivery
    bucket_regions: dict[str, str]
    lanes: list[str]
    as_bytes: dict[str, str]


async def find_delivery(cfg: Config, s3: S3 | None) -> Placement:
    """Where the source buckets are against the Regions Rekognition is called in: a bucket
    in one of them is read there by reference; with ``image_mode = "auto"`` the images of
    the others go as bytes, with ``"s3"`` a ``SetupError`` stops the job before any call.
    ``rekognition_region = "bucket"`` adds each bucket's own Region to the calling ones."""
    lanes = cfg.aws.calling_regions()
    delivery = Delivery.of(cfg)
    if s3 is None or not delivery.references:
        return Placement(delivery, {}, lanes, {})
    home = cfg.aws.region
    buckets = [p[0] for p in map(parse_s3_uri, cfg.source.uris) if p]
    elsewhere = await buckets_elsewhere(s3, buckets, home)
    regions = {**dict.fromkeys(buckets, home), **elsewhere}
    if cfg.aws.rekognition_region == "bucket":
        # Each bucket's own Region calls for its objects; the home Region keeps the rest.
        lanes = list(dict.fromkeys([home, *sorted(elsewhere.values())]))
    as_bytes = {b: r for b, r in regions.items() if r not in lanes}
    for bucket, region in as_bytes.items():
        if cfg.aws.image_mode == "s3":
            raise SetupError(region_error(bucket, region, home))
    return Placement(Delivery.of(cfg, as_bytes), regions, lanes, as_bytes)
