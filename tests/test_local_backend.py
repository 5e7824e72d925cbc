"""The offline backend's plumbing: the reference analysed once, workers that outlive a Ctrl-C,
and a face collection that grows in chunks.

The collection tests use made-up embeddings (no models); the others run a real pool.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rekbatch.backends.base import ImageInput
from rekbatch.backends.local.backend import FaceFinder, LocalBackend, local_backend_available
from rekbatch.backends.local.collections import (
    EMBEDDING_SIZE,
    EMBEDDINGS_FILE,
    ROW_BYTES,
    CollectionStore,
    StoredFace,
)
from rekbatch.errors import BackendError

_MISSING = local_backend_available()
if _MISSING is not None:
    raise RuntimeError(f"the offline face tests need the local extra: {_MISSING}")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "wheres-ric"
REFERENCE = (SAMPLES / "ric_harvey.jpeg").read_bytes()
TARGETS = ("ric.jpg", "sample-image0.jpeg", "ric_crowd1.jpg", "sample-image1.jpeg")


def _compare(backend: LocalBackend, target: str, source: bytes = REFERENCE) -> Any:
    return backend.call(
        "CompareFaces",
        {"SimilarityThreshold": 80.0},
        {
            "SourceImage": ImageInput(data=source),
            "TargetImage": ImageInput(data=(SAMPLES / target).read_bytes()),
        },
    )


class RecordingExecutor(Executor):
    """A process pool that notes what each task carried to the workers."""

    def __init__(self) -> None:
        self.inner = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
        self.tasks: list[tuple[str, int]] = []  # (task name, largest bytes argument)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        assert isinstance(fn, functools.partial)
        payload = [*fn.args, *fn.keywords.values()]
        largest = max((len(a) for a in payload if isinstance(a, bytes)), default=0)
        self.tasks.append((str(fn.args[0]), largest))
        return self.inner.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)


# --------------------------------------------------------------------------- the reference


def test_the_reference_is_analysed_once_per_worker() -> None:
    """Many compares with one reference: its bytes go to the worker until the backend holds
    its embedding, then only the 128 floats do; the worker analyses it once in all, even for
    calls that were already on their way with the bytes."""
    recorder = RecordingExecutor()
    backend = LocalBackend(executor=recorder)

    async def run() -> tuple[list[Any], dict[str, Any]]:
        # Four at once: all four carry the bytes (nobody has the embedding yet).
        first = await asyncio.gather(*(_compare(backend, t) for t in TARGETS))
        # Then eight more, concurrently, and a second round with the same targets.
        later = await asyncio.gather(*(_compare(backend, t) for t in TARGETS * 2))
        return first + later, await backend.worker_stats()

    try:
        answers, stats = asyncio.run(run())
    finally:
        asyncio.run(backend.aclose())
        recorder.shutdown()
    matched = [bool(a["FaceMatches"]) for a in answers]
    assert matched == [True, False, True, False] * 3
    assert stats["reference_analyses"] == 1, stats
    # 12 targets analysed, plus the reference once.
    assert stats["analyses"] == len(answers) + 1, stats
    carried = [size for name, size in recorder.tasks if name == "compare_and_reference"]
    assert len(carried) == backend.reference_uploads == 4
    assert all(size >= len(REFERENCE) for size in carried)
    light = [size for name, size in recorder.tasks if name == "compare_with_reference"]
    assert len(light) == 8
    # What travels is the target alone (the largest target is ric_crowd1.jpg).
    assert max(light) == (SAMPLES / "ric_crowd1.jpg").stat().st_size


def test_a_reference_without_a_face_fails_every_compare_without_new_analyses() -> None:
    blank = (SAMPLES / "sample-image1.jpeg").read_bytes()  # a fish
    backend = LocalBackend(workers=1)

    async def run() -> dict[str, Any]:
        for _ in range(3):
            with pytest.raises(BackendError) as info:
                await _compare(backend, "ric.jpg", source=blank)
            assert info.value.code == "InvalidParameterException"
            assert info.value.kind == "permanent"
        return await backend.worker_stats()

    try:
        stats = asyncio.run(run())
    finally:
        asyncio.run(backend.aclose())
    assert backend.reference_uploads == 1
    assert stats["reference_analyses"] == 1


def test_face_finder_counts_faces_through_the_pool() -> None:
    finder = FaceFinder(workers=1)

    async def run() -> list[Any]:
        data = [(SAMPLES / n).read_bytes() for n in ("ric_crowd1.jpg", "sample-image1.jpeg")]
        return [
            await finder.count(data[0]),
            await finder.has_face(data[0]),
            await finder.count(data[1]),
            await finder.has_face(data[1]),
        ]

    try:
        assert asyncio.run(run()) == [5, True, 0, False]
    finally:
        asyncio.run(finder.aclose())


# --------------------------------------------------------------------------- SIGINT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_ignore_sigint_and_keep_answering() -> None:
    backend = LocalBackend(workers=2)

    async def run() -> None:
        await backend.start()
        pids = backend.worker_pids()
        assert len(pids) == 2
        for _ in range(3):
            for pid in pids:
                os.kill(pid, signal.SIGINT)
            await asyncio.sleep(0.1)
        assert all(_alive(pid) for pid in pids)
        answer = await _compare(backend, "ric.jpg")
        assert len(answer["FaceMatches"]) == 1
        assert backend.worker_pids() == pids

    try:
        asyncio.run(run())
    finally:
        asyncio.run(backend.aclose())


_CTRL_C_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from rekbatch.backends.base import ImageInput
    from rekbatch.backends.local.backend import LocalBackend

    interrupts = 0

    def on_sigint(signum, frame):
        global interrupts
        interrupts += 1

    async def main():
        backend = LocalBackend(workers=2)
        print("starting", flush=True)
        await backend.start()
        pids = backend.worker_pids()
        print("ready", flush=True)
        sys.stdin.readline()  # the test has sent another SIGINT to the whole group
        data = open(sys.argv[1], "rb").read()
        found = await backend.call("DetectFaces", {}, {"Image": ImageInput(data=data)})
        alive = all(os.kill(pid, 0) is None for pid in pids)
        same = backend.worker_pids() == pids
        await backend.aclose()
        print(json.dumps({"faces": len(found["FaceDetails"]), "alive": alive, "same": same,
                          "interrupts": interrupts}), flush=True)

    if __name__ == "__main__":
        signal.signal(signal.SIGINT, on_sigint)  # as the engine does: it handles Ctrl-C
        asyncio.run(main())
    """
)


def test_ctrl_c_on_a_terminal_does_not_kill_the_workers(tmp_path: Path) -> None:
    """A terminal's Ctrl-C is SIGINT to the whole foreground process group: the parent (which
    handles it) and every pool worker. Sent repeatedly while the workers start (during their
    imports, before any initializer could run) and again once they are up: they survive, no
    KeyboardInterrupt traceback, and they still answer."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_SCRIPT)
    with subprocess.Popen(
        [sys.executable, str(script), str(SAMPLES / "ric_crowd1.jpg")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    ) as proc:
        out, err, sent = _interrupt_while_starting(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["faces"] == 5
    assert result["alive"] and result["same"], result
    assert sent >= 2 and result["interrupts"] >= 2, (sent, result)


def _interrupt_while_starting(proc: subprocess.Popen[str]) -> tuple[str, str, int]:
    """Drive the Ctrl-C script: SIGINT to its group while its workers start and once after;
    returns its stdout, stderr and how many SIGINTs were sent during the start."""
    assert proc.stdout is not None and proc.stdin is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in iter(proc.stdout.readline, "")], daemon=True
    )
    reader.start()
    try:
        assert lines.get(timeout=60).strip() == "starting"
        # The workers are starting now: interrupt the whole group every 50 ms until they
        # are ready (bounded: at most 60 s).
        sent = 0
        deadline = time.monotonic() + 60
        while lines.empty() and time.monotonic() < deadline:
            os.killpg(proc.pid, signal.SIGINT)
            sent += 1
            time.sleep(0.05)
        assert lines.get(timeout=1).strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
        reader.join(timeout=10)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines.queue), err, sent


# --------------------------------------------------------------------------- collections


def _face(index: int, embedding: np.ndarray) -> StoredFace:
    return StoredFace(
        face_id=f"{index:08x}-0000-4000-8000-000000000000",
        image_id=f"image-{index // 3}",
        external_image_id=f"photo-{index // 3}.jpg",
        box={"Width": 0.1, "Height": 0.1, "Left": 0.2, "Top": 0.3},
        confidence=99.0,
        embedding=[float(v) for v in embedding],
    )


def test_a_large_collection_indexed_a_few_faces_at_a_time(tmp_path: Path) -> None:
    """3,000 faces indexed 1-5 at a time: every search finds the right face, and a fresh
    store (another process) reads the same collection; deleted faces are never found."""
    rng = np.random.default_rng(11)
    store = CollectionStore(tmp_path)
    store.create("big")
    vectors = rng.normal(size=(3000, EMBEDDING_SIZE)) * 0.1
    index = 0
    while index < len(vectors):
        count = int(rng.integers(1, 6))
        batch = range(index, min(index + count, len(vectors)))
        assert store.append("big", [_face(i, vectors[i]) for i in batch]) == list(batch)
        index += count
    faces, matrix = store.snapshot("big")
    assert len(faces) == len(vectors) == matrix.shape[0]
    np.testing.assert_allclose(matrix, vectors, atol=1e-6)  # stored as float32
    for probe in (0, 1234, 2999):
        query = vectors[probe] + rng.normal(size=EMBEDDING_SIZE) * 0.001
        matches = store.search("big", [float(v) for v in query], 80.0, 5)
        assert matches[0]["Face"]["FaceId"] == faces[probe].face_id
        assert matches[0]["Similarity"] > 99.0
    store.append("big", [_face(5000, rng.normal(size=EMBEDDING_SIZE))])
    assert store.count("big") == 3001
    again = CollectionStore(tmp_path)
    assert [f.face_id for f in again.faces("big")] == [f.face_id for f in store.faces("big")]
    deleted = again.delete_faces("big", {faces[0].face_id, faces[1].face_id})
    assert sorted(deleted) == sorted([faces[0].face_id, faces[1].face_id])
    assert again.count("big") == 2999 and again.rows("big") == 3001
    assert not again.search("big", [float(v) for v in vectors[0]], 80.0, 5)
    assert again.face("big", faces[2].face_id) is not None
    store.close()
    again.close()


def test_scan_is_exact_at_the_threshold_and_skips_a_torn_tail(tmp_path: Path) -> None:
    """Faces planted at distances just inside and just outside a threshold's are kept and
    left as float64 would decide; bytes an interrupted append left past the committed rows
    are never read, and the next append writes over them."""
    from rekbatch.backends.local.collections import distance_for_similarity
    from rekbatch.backends.local.faces import similarity_from_distance

    rng = np.random.default_rng(3)
    store = CollectionStore(tmp_path)
    store.create("edge")
    query = rng.normal(size=EMBEDDING_SIZE) * 0.09
    limit = distance_for_similarity(80.0)
    assert similarity_from_distance(limit) == pytest.approx(80.0)
    faces = []
    for i, distance in enumerate([limit * 0.5, limit - 1e-4, limit + 1e-4, limit * 1.5]):
        direction = rng.normal(size=EMBEDDING_SIZE)
        direction /= np.linalg.norm(direction)
        faces.append(_face(i, query + direction * distance))
    store.append("edge", faces)
    found = store.scan("edge", query, 80.0)
    assert [m.row for m in found] == [0, 1]
    assert all(m.similarity >= 80.0 for m in found)
    with (tmp_path / "edge" / EMBEDDINGS_FILE).open("ab") as fh:
        fh.write(b"\x7f" * (ROW_BYTES * 2 + 17))  # a crash mid-append: never committed
    assert [m.row for m in store.scan("edge", query, 80.0)] == [0, 1]
    assert store.append("edge", [_face(9, query)]) == [4]
    assert (tmp_path / "edge" / EMBEDDINGS_FILE).stat().st_size == 5 * ROW_BYTES
    assert [m.row for m in store.scan("edge", query, 80.0)] == [4, 0, 1]
    store.close()


def test_a_collection_of_the_json_format_is_converted(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "meta.json").write_text('{"CollectionId": "old"}')
    vectors = rng.normal(size=(3, EMBEDDING_SIZE)) * 0.1
    lines = [
        json.dumps(
            {
                "FaceId": f"{i:08x}-0000-4000-8000-000000000000",
                "ImageId": "image",
                "ExternalImageId": f"photo-{i}.jpg",
                "BoundingBox": {"Width": 0.1, "Height": 0.1, "Left": 0.2, "Top": 0.3},
                "Confidence": 99.0,
                "Embedding": [round(float(v), 7) for v in vector],
            }
        )
        for i, vector in enumerate(vectors)
    ]
    (folder / "faces.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:40])
    store = CollectionStore(tmp_path)
    assert [f.external_image_id for f in store.faces("old")] == [
        "photo-0.jpg",
        "photo-1.jpg",
        "photo-2.jpg",
    ]
    assert not (folder / "faces.jsonl").exists()
    assert store.scan("old", vectors[1], 90.0)[0].face.external_image_id == "photo-1.jpg"
    store.close()
