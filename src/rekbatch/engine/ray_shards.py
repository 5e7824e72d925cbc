"""Ray: the shards of a job as Ray tasks.

``run_shards_on_ray`` submits one task per shard. A task is an ordinary shard run (its own
folder, ledger and lock), so when Ray retries it after its worker died, the retry resumes
from the shard's ledger and nothing finished is done again. When every shard is done, the
command line merges them as ``rekbatch merge`` does: from the output directory (one
machine, or a shared file system), or from ``output.upload_uri`` when the job uploads (a
cluster whose nodes share only S3).

The offline backend's Ray actors are ``backends/local/ray_actors.py``.

Ray is an optional extra: ``pip install 'rekbatch[ray]'``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from rekbatch.backends.local.ray_actors import connect
from rekbatch.config import Config
from rekbatch.engine.run import RunOptions, run_job
from rekbatch.engine.shards import Shard, shard_config, shard_folders
from rekbatch.errors import EXIT_DONE, TaskFailed

# Retries of a shard whose worker died (a node lost, a process killed). Each resumes.
SHARD_RETRIES = 3


def run_shard(
    job: dict[str, Any], index: int, count: int, config_path: str, local_workers: int | None
) -> int:
    """One shard, start to end, in this process (the body of a Ray task); its exit code."""
    cfg = Config.model_validate(job)
    shard = Shard(index, count)
    own = shard_config(cfg, shard)
    options = RunOptions(
        output_dir=Path(own.job.output_dir),
        config_path=config_path,
        shard=shard,
        job_config=cfg,
        local_workers=local_workers,
    )
    outcome = asyncio.run(run_job(own, options))
    return int(outcome.exit_code)


def run_shards_on_ray(
    cfg: Config, count: int, *, address: str | None, fresh: bool, config_path: str
) -> tuple[str, Path | None]:
    """Run the ``count`` shards of ``cfg`` as Ray tasks; what to merge them from, as
    ``rekbatch merge`` takes it: the output directory, or the upload URI and the folder to
    merge into."""
    out = Path(cfg.job.output_dir)
    if fresh:
        # Here, not in the tasks: a retried task must resume, never start over. The job's
        # split goes too: the shards divide the sources afresh.
        for folder in shard_folders(out).values():
            shutil.rmtree(folder)
        asyncio.run(_forget_split(cfg))
    config_path = os.path.abspath(config_path) if config_path else ""  # workers run elsewhere
    ray = connect(address)
    cpus, workers = 1, None
    if cfg.backend.kind == "local":
        if cfg.backend.executor == "ray":
            # The task only lists and writes; its actors hold the CPUs, shared by the shards.
            cpus, workers = 0, max(1, int(ray.cluster_resources().get("CPU", 1)) // count)
        else:
            workers = 1  # the task's one CPU: one worker process, not one per core of the node
    task = ray.remote(max_retries=SHARD_RETRIES, retry_exceptions=False, num_cpus=cpus)(run_shard)
    job = cfg.model_dump(mode="json")
    refs = [task.remote(job, k, count, config_path, workers) for k in range(count)]
    codes: dict[int, int | str] = {}
    for k, ref in enumerate(refs):
        try:
            codes[k] = int(ray.get(ref))
        except Exception as exc:  # a task that failed after its retries
            last = (str(exc).strip().splitlines() or [""])[-1]
            codes[k] = f"{type(exc).__name__}: {last}"
    bad = {k: code for k, code in codes.items() if code not in EXIT_DONE}
    if bad:
        detail = "; ".join(f"shard {k}/{count}: {c}" for k, c in sorted(bad.items()))
        raise TaskFailed("ray", RuntimeError(f"shards did not finish ({detail}); run again"))
    if cfg.output.upload_uri and not _all_local(out, count):
        return cfg.output.upload_uri, out
    return str(out), None


async def _forget_split(cfg: Config) -> None:
    from rekbatch.engine.shard_split import forget_split
    from rekbatch.sources.s3 import S3

    if not cfg.output.upload_uri:
        await forget_split(cfg, None)
        return
    import aioboto3

    session = aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region)
    async with S3(session, endpoint_url=cfg.aws.s3_endpoint_url, pool=4) as s3:
        await forget_split(cfg, s3)


def _all_local(out: Path, count: int) -> bool:
    folders = shard_folders(out)
    return all(Shard(k, count) in folders for k in range(count))
