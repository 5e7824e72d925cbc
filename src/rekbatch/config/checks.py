"""What can be checked about a valid config before any work, each problem one line naming
the file and field: local paths (``local_problems``, no network) and, for ``validate
--online``, buckets, objects and credentials (``online_problems``, no billed call)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rekbatch.config.model import CompareFacesOp, Config, SearchFacesOp, parse_s3_uri
from rekbatch.sources.filters import SNIFF_BYTES, sniff_kind

# "keys:..." and "inventory:..." sources name a list, not a folder; they are checked where
# they are read.
_PREFIXED = re.compile(r"^[a-z]{2,}:")


def references(cfg: Config) -> Iterator[tuple[str, str]]:
    """(field, location) of every reference image of the config's operations."""
    for index, op in enumerate(cfg.operations):
        if isinstance(op, CompareFacesOp):
            yield f"operations[{index}].reference", op.reference
        elif isinstance(op, SearchFacesOp):
            for person, refs in op.people.items():
                for n, ref in enumerate(refs):
                    yield f"operations[{index}].people.{person}[{n}]", ref


def _image_kind(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            return sniff_kind(handle.read(SNIFF_BYTES))
    except OSError:
        return None


def _local_path_problem(location: str, *, folder_ok: bool) -> str | None:
    path = Path(location).expanduser()
    what = "a folder or a JPEG/PNG image" if folder_ok else "a JPEG or PNG image"
    if not path.exists():
        return f"{location} does not exist (expected {what})"
    if path.is_dir():
        return None if folder_ok else f"{location} is a folder (expected {what})"
    if not path.is_file():
        return f"{location} is not a regular file (expected {what})"
    if _image_kind(path) is None:
        return f"{location} is not a JPEG or PNG image (its first bytes say otherwise)"
    return None


def local_problems(cfg: Config) -> list[str]:
    """Problems found without the network: sources and references on this machine, and
    operations the configured backend cannot do."""
    return [f"{field}: {problem}" for field, problem in local_problems_in(cfg.model_dump())]


def _local_location(value: Any) -> bool:
    """A non-empty string naming a path on this machine (not a URI, not a list source)."""
    return (
        isinstance(value, str) and bool(value) and "://" not in value and not _PREFIXED.match(value)
    )


def local_problems_in(data: dict[str, Any]) -> list[tuple[str, str]]:
    """``local_problems`` as (field, problem), from a config's data: also from one the
    schema refused, so that every problem is reported at once. Whatever is not of the
    expected shape is left to the schema's own lines."""
    problems: list[tuple[str, str]] = []
    source = data.get("source")
    uris = source.get("uris") if isinstance(source, dict) else None
    for index, uri in enumerate(uris if isinstance(uris, list) else []):
        if _local_location(uri):
            problem = _local_path_problem(uri, folder_ok=True)
            if problem:
                problems.append((f"source.uris[{index}]", problem))
    operations = data.get("operations")
    operations = operations if isinstance(operations, list) else []
    for index, op in enumerate(operations):
        if not isinstance(op, dict):
            continue
        locations: list[tuple[str, Any]] = []
        if op.get("type") == "compare_faces":
            locations.append((f"operations[{index}].reference", op.get("reference")))
        people = op.get("people") if op.get("type") == "search_faces" else None
        for person, refs in (people if isinstance(people, dict) else {}).items():
            for n, ref in enumerate(refs if isinstance(refs, list) else []):
                locations.append((f"operations[{index}].people.{person}[{n}]", ref))
        for field, location in locations:
            if _local_location(location):
                problem = _local_path_problem(location, folder_ok=False)
                if problem:
                    problems.append((field, problem))
    backend = data.get("backend")
    if isinstance(backend, dict) and backend.get("kind") == "local":
        from rekbatch.backends.local.backend import LOCAL_SUPPORTED_OPERATIONS

        supported = ", ".join(sorted(LOCAL_SUPPORTED_OPERATIONS))
        for index, op in enumerate(operations):
            kind = op.get("type") if isinstance(op, dict) else None
            if isinstance(kind, str) and kind not in LOCAL_SUPPORTED_OPERATIONS:
                problems.append(
                    (
                        f"operations[{index}].type",
                        f"{kind!r} is not available with backend.kind = 'local' "
                        f"(it supports {supported})",
                    )
                )
    return problems


async def online_problems(cfg: Config) -> list[str]:
    """Buckets listable, S3 references present, credentials accepted by S3 and (for the AWS
    backend) by Rekognition; only free calls (ListObjectsV2, HeadObject, ListCollections)."""
    import aioboto3
    import botocore.exceptions as bexc
    from botocore.config import Config as BotoConfig

    from rekbatch.errors import setup_error_from

    try:
        session = aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region)
    except bexc.ProfileNotFound as exc:
        return [f"aws.profile: {exc}"]
    problems: list[str] = []
    # One attempt each: a wrong endpoint or credentials should say so at once.
    boto = BotoConfig(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=15)

    def add(field: str, what: str, exc: Exception) -> None:
        setup = setup_error_from(exc, what)
        problems.append(f"{field}: {setup if setup is not None else f'{what}: {exc}'}")

    buckets: dict[str, str] = {}
    for index, uri in enumerate(cfg.source.uris):
        parsed = parse_s3_uri(uri)
        if parsed is not None:
            buckets.setdefault(parsed[0], f"source.uris[{index}]")
    if cfg.output.upload_uri:
        parsed = parse_s3_uri(cfg.output.upload_uri)
        if parsed is not None:
            buckets.setdefault(parsed[0], "output.upload_uri")
    objects = [(f, parse_s3_uri(loc)) for f, loc in references(cfg) if parse_s3_uri(loc)]
    if buckets or objects:
        async with session.client("s3", endpoint_url=cfg.aws.s3_endpoint_url, config=boto) as s3:
            for bucket, field in buckets.items():
                try:
                    await s3.list_objects_v2(Bucket=bucket, MaxKeys=1)
                except Exception as exc:
                    add(field, f"s3://{bucket}", exc)
            for field, where in objects:
                assert where is not None
                try:
                    await s3.head_object(Bucket=where[0], Key=where[1])
                except Exception as exc:
                    add(field, f"s3://{where[0]}/{where[1]}", exc)
    if cfg.backend.kind == "aws":
        # Every Region the run would call (aws.regions), the home one first.
        for region in dict.fromkeys([cfg.aws.region, *cfg.aws.calling_regions()]):
            rek: Any
            async with session.client(
                "rekognition",
                endpoint_url=cfg.aws.rekognition_endpoint_url,
                region_name=region,
                config=boto,
            ) as rek:
                try:
                    await rek.list_collections(MaxResults=1)
                except Exception as exc:
                    field = "aws.region" if region == cfg.aws.region else "aws.regions"
                    add(field, f"Rekognition in {region}", exc)
    return problems
