"""Ray: the shards of a job as Ray tasks, and the offline backend's analysis on Ray actors.

``run_shards_on_ray`` submits one task per shard. A task is an ordinary shard run (its own
folder, ledger and lock), so when Ray retries it after its worker died, the retry resumes
from the shard's ledger and nothing finished is done again. When every shard is done, the
driver merges them: from the output directory (one machine, or a shared file system), or
from ``output.upload_uri`` when the job uploads (a cluster whose nodes share only S3).

``RayActorExecutor`` is a ``concurrent.futures.Executor`` over a pool of actors, each of
which loads the face models once; ``LocalBackend(executor=...)`` sends its work there
instead of its process pool (``backend.executor = "ray"``).

Ray is an optional extra: ``pip install 'rekbatch[ray]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from rekbatch.config import Config
from rekbatch.engine.shards import Shard, shard_config, shard_folders
from rekbatch.errors import SetupError, TaskFailed

# Retries of a shard whose worker died (a node lost, a process killed). Each resumes.
SHARD_RETRIES = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SetupError(
            "--engine ray / backend.executor = 'ray' needs Ray: pip install 'rekbatch[ray]'"
        ) from None
    return ray


def connect(address: str | None) -> Any:
    """Ray, initialised: the cluster at ``address`` ("auto": the one this node is in), or
    a local one on this machine's cores when there is none."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            with _from_root():
                ray.init(address=address, include_dashboard=False, logging_level="warning")
        except ConnectionError as exc:
            raise SetupError(f"--ray-address {address}: {exc}") from None
    return ray


@contextlib.contextmanager
def _from_root() -> Iterator[None]:
    """The working folder at the file system's root while Ray starts. Ray puts the driver's
    working folder first on every worker's sys.path (and a local Ray's processes start in
    it), so a ``rekbatch`` or ``pyarrow`` package planted there would run in the shard tasks
    and actors. Every path a job holds is absolute, so the workers need no working folder."""
    here = os.getcwd()
    os.chdir(os.path.abspath(os.sep))
    try:
        yield
    finally:
        os.chdir(here)


def run_shard(
    job: dict[str, Any], index: int, count: int, config_path: str, local_workers: int | None
) -> int:
    """One shard, start to end, in this process (the body of a Ray task); its exit code."""
    from rekbatch.engine.run import RunOptions, run_job

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
) -> Any:
    """Run the ``count`` shards of ``cfg`` as Ray tasks, then merge them; the merge's
    outcome."""
    from rekbatch.commands.merge import merge_job

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
    bad = {k: c for k, c in codes.items() if c not in (0, 3)}
    if bad:
        detail = "; ".join(f"shard {k}/{count}: {c}" for k, c in sorted(bad.items()))
        raise TaskFailed("ray", RuntimeError(f"shards did not finish ({detail}); run again"))
    if cfg.output.upload_uri and not _all_local(out, count):
        return merge_job(cfg.output.upload_uri, out)
    return merge_job(str(out), None)


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


class _FaceWorker:
    """A Ray actor: the models loaded once, then any number of tasks."""

    def __init__(self) -> None:
        from rekbatch.backends.local.backend import _init_worker

        _init_worker()

    def run(self, fn: Callable[[], Any]) -> Any:
        return fn()


class RayActorExecutor(Executor):
    """``workers`` actors (one CPU each; by default one per CPU free in the cluster)
    anywhere in the cluster; tasks go to them in turn."""

    def __init__(self, workers: int | None = None, *, address: str | None = None) -> None:
        ray = connect(address)
        if workers is None:
            workers = max(1, int(ray.available_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(_FaceWorker)
        self._actors = [actor.remote() for _ in range(workers)]
        self._next = itertools.cycle(range(workers))
        self._lock = threading.Lock()
        self._ray = ray

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        import functools

        call = functools.partial(fn, *args, **kwargs)
        with self._lock:
            actor = self._actors[next(self._next)]
        future: Future[Any] = actor.run.remote(call).future()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
