"""The offline backend's analysis on Ray actors, and joining a Ray cluster.

``RayActorExecutor`` is a ``concurrent.futures.Executor`` over a pool of actors, each of
which loads the face models once; ``LocalBackend(executor=...)`` sends its work there
instead of its process pool (``backend.executor = "ray"``). ``connect`` is also how the
shards of ``--engine ray`` join the cluster (``engine/ray_shards.py``).

Ray is an optional extra: ``pip install 'rekbatch[ray]'``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from rekbatch.errors import SetupError


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
        call = functools.partial(fn, *args, **kwargs)
        with self._lock:
            actor = self._actors[next(self._next)]
        future: Future[Any] = actor.run.remote(call).future()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
