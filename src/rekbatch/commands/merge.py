"""``rekbatch merge DIR`` and ``rekbatch merge s3://BUCKET/PREFIX/ --output DIR``.

Locally the shards are the folders ``DIR/shard-KKKK-of-NNNN/``. From S3 they are the same
folders under the job's ``output.upload_uri``, as each shard uploaded them; their
results.jsonl, summary.json and job.json are downloaded, merged into ``--output`` and the
merged files uploaded to the prefix itself (where a single run would have put them). The
upload target is the command's prefix (from S3), or the one every shard's job.json names
(locally): never one shard's word alone.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from rekbatch.config import parse_s3_uri
from rekbatch.engine.shards import FOLDER, JOB_FILE, Shard
from rekbatch.errors import ConfigError, SetupError
from rekbatch.sinks.merge import (
    MergeOutcome,
    ShardFiles,
    check_complete,
    check_upload_target,
    local_shards,
    merge_shards,
    read_shard,
)
from rekbatch.sinks.upload import object_key

# What merge needs of a shard, by file name in its folder
_NEEDED = ("results.jsonl", "summary.json", JOB_FILE)


def merge_job(target: str, output: Path | None) -> MergeOutcome:
    parsed = parse_s3_uri(target) if target.startswith("s3://") else None
    if target.startswith("s3://"):
        if parsed is None:
            raise ConfigError(f"merge: not an s3://bucket/prefix URI: {target!r}")
        if output is None:
            raise ConfigError("merge: an s3:// job needs --output DIR for the merged files")
        return asyncio.run(_merge_from_s3(parsed[0], parsed[1], output))
    if output is not None:
        raise ConfigError("merge: --output is for s3:// jobs; a local job merges into DIR")
    directory = Path(target)
    shards = local_shards(directory)
    check_upload_target(directory, shards)
    outcome = merge_shards(directory, shards)
    if outcome.config.output.upload_uri:
        asyncio.run(_upload(outcome, directory))
    return outcome


async def _upload(outcome: MergeOutcome, directory: Path) -> None:
    from rekbatch.sinks.upload import upload_results
    from rekbatch.sources.s3 import S3

    uri = outcome.config.output.upload_uri
    assert uri
    import aioboto3

    session = aioboto3.Session(region_name=outcome.config.aws.region)
    async with S3(session, endpoint_url=outcome.config.aws.s3_endpoint_url, pool=16) as s3:
        await upload_results(s3.client, directory, uri)


async def _merge_from_s3(bucket: str, prefix: str, output: Path) -> MergeOutcome:
    import aioboto3

    from rekbatch.errors import setup_error_from
    from rekbatch.sinks.upload import upload_results
    from rekbatch.sources.s3 import S3

    base = prefix.strip("/")
    session = aioboto3.Session(region_name=os.environ.get("AWS_DEFAULT_REGION"))
    async with S3(
        session, endpoint_url=os.environ.get("REKBATCH_AWS__S3_ENDPOINT_URL"), pool=16
    ) as s3:
        client = s3.client
        try:
            folders = await _shard_prefixes(client, bucket, base)
            if not folders:
                raise SetupError(f"s3://{bucket}/{prefix}: no shard folders here")
            with tempfile.TemporaryDirectory(prefix="rekbatch-merge-") as tmp:
                shards = []
                for shard, name in folders.items():
                    local = Path(tmp) / name
                    local.mkdir()
                    shard_prefix = "/".join(p for p in (base, name) if p)
                    for file in _NEEDED:
                        key = object_key(shard_prefix, file)
                        try:
                            answer = await client.get_object(Bucket=bucket, Key=key)
                        except client.exceptions.NoSuchKey:
                            raise SetupError(
                                f"s3://{bucket}/{key}: missing; shard {shard} has not finished "
                                f"(run it again with --shard {shard})"
                            ) from None
                        async with answer["Body"] as body:
                            (local / file).write_bytes(await body.read())
                    shards.append(read_shard(shard, local))
                where = f"s3://{bucket}/{prefix}"
                ordered: list[ShardFiles] = check_complete(where, shards)
                outcome = await asyncio.to_thread(merge_shards, output, ordered)
            await upload_results(client, output, f"s3://{bucket}/{base}/")
        except SetupError:
            raise
        except Exception as exc:
            setup = setup_error_from(exc, f"s3://{bucket}/{prefix}")
            if setup is None:
                raise
            raise setup from exc
    return outcome


async def _shard_prefixes(client: object, bucket: str, base: str) -> dict[Shard, str]:
    found: dict[Shard, str] = {}
    paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    start = f"{base}/" if base else ""
    async for page in paginator.paginate(Bucket=bucket, Prefix=start, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            name = common["Prefix"][len(start) :].strip("/")
            match = FOLDER.fullmatch(name)
            if match:
                found[Shard(int(match.group(1)), int(match.group(2)))] = name
    return dict(sorted(found.items(), key=lambda kv: kv[0].index))
