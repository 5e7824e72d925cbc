"""Decompression bombs: conversions, the offline backend and the report's thumbnails decode
within one memory budget (``source.convert_memory_mb``), and an image that alone does not
fit is skipped as ``too_large`` with its estimate, without being decoded.

The bomb folder is built here (``tests/support/bombs.py``: small files that decode into
hundreds of megabytes); a run over it is measured as the peak resident size of its process
tree (``RUSAGE_CHILDREN`` of a wrapper process) against a generous bound, and a plan's
estimate against what converting really takes (the peak resident size of a child process),
never against the clock.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rekbatch.sources.convert import conversion_plan, convert_image
from rekbatch.sources.decoding import MB, MemoryBudget, TooMuchMemory, make_plan, open_image
from rekbatch.sources.sniff import sniff
from tests.conftest import SAMPLES, make_bucket
from tests.helpers import invoke, read_jsonl, write_config
from tests.support import bombs
from tests.support.servers import ServedJob, StartFake
from tests.test_engine import assert_exactly_once

BOUND = 120.0  # seconds a run may take before the test gives up on it
PHOTOS = ("ric.jpg", "ric_crowd0.jpg", "sample-image1.jpeg")


def _encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


# -- what a plan counts against what Pillow allocates -----------------------------------------


def _rgba(side: int) -> bytes:
    img = Image.linear_gradient("L").resize((side, side))
    return _encode(Image.merge("RGBA", (img, img, img, img)), "PNG")


def _grey16(side: int) -> bytes:
    img = Image.linear_gradient("L").resize((side, side)).convert("I;16")
    return _encode(img, "PNG")


@pytest.mark.parametrize(
    ("name", "make", "side"),
    [
        ("1-bit TIFF", lambda: bombs.tiff_1bit(5_000), 4_096),
        ("palette PNG", lambda: bombs.png_palette(4_500), 4_096),
        ("grey PNG", lambda: bombs.png_grey(5_000), 10_000),
        ("RGBA PNG", lambda: _rgba(3_000), 10_000),
        ("16-bit PNG", lambda: _grey16(3_000), 2_000),
        ("GIF of 5,000 frames", lambda: bombs.gif_frames(5_000, 3_000), 10_000),
        ("progressive JPEG", lambda: bombs.noisy_jpeg(2_400, 1_600, 85), 1_000),
    ],
)
def test_a_plan_holds_at_least_what_converting_allocates(
    name: str, make: Callable[[], bytes], side: int, tmp_path: Path
) -> None:
    data = make()
    if name == "progressive JPEG":
        data = _encode(open_image(data), "JPEG", quality=85, progressive=True)
    path = tmp_path / "image"
    path.write_bytes(data)
    plan = conversion_plan(data, sniff(data[:262_144]), side)
    assert plan is not None
    proc = subprocess.run(
        [sys.executable, "-c", bombs.CONVERT_PEAK, str(path), str(side)],
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=True,
    )
    grown = int(proc.stdout) * 1024  # bytes the process grew by while converting
    assert grown <= plan.peak, (name, grown / MB, plan.peak / MB)
    assert plan.peak <= 3 * grown + 16 * MB, (name, grown / MB, plan.peak / MB)  # not absurd


def test_a_jpeg_too_large_at_full_scale_is_decoded_at_a_coarser_one() -> None:
    data = bombs.noisy_jpeg(4_000, 3_000, 80)
    with open_image(data) as img:
        full = make_plan(img, 10_000)
    with open_image(data) as img:
        fitted = make_plan(img, 10_000, limit=full.peak // 3)
    assert full.scale == 1 and fitted.scale > 1
    assert fitted.peak <= full.peak // 3
    done = convert_image(data, 10_000, memory_limit=full.peak // 3)
    assert (done.width, done.height) == (4_000, 3_000)
    assert done.sent_width == 4_000 // fitted.scale
    with pytest.raises(TooMuchMemory) as info:  # not even 1/8 fits: not decoded at all
        convert_image(data, 10_000, memory_limit=MB)
    assert info.value.plan.peak > MB


async def test_the_budget_hands_out_bytes_first_come_first_served() -> None:
    budget = MemoryBudget(100)
    order: list[str] = []

    async def take(name: str, nbytes: int, hold: asyncio.Event) -> None:
        async with budget.hold(nbytes):
            order.append(name)
            await hold.wait()

    release = {name: asyncio.Event() for name in "abcd"}
    async with asyncio.timeout(10):
        a = asyncio.create_task(take("a", 60, release["a"]))
        await asyncio.sleep(0)
        b = asyncio.create_task(take("b", 70, release["b"]))  # waits for a
        await asyncio.sleep(0)
        c = asyncio.create_task(take("c", 10, release["c"]))  # fits, but b is first in line
        await asyncio.sleep(0)
        assert order == ["a"] and budget.free == 40
        d = asyncio.create_task(take("d", 20, release["d"]))
        await asyncio.sleep(0)
        d.cancel()  # a waiter that leaves takes nothing with it
        await asyncio.gather(d, return_exceptions=True)
        release["a"].set()
        await a
        await asyncio.sleep(0)
        assert order == ["a", "b", "c"] and budget.free == 20
        release["b"].set()
        release["c"].set()
        await asyncio.gather(b, c)
    assert budget.free == 100 and budget.peak_held == 80
    assert not budget.fits(101)
    with pytest.raises(ValueError):
        async with budget.hold(101):
            pass


# -- the bomb folder, run whole ---------------------------------------------------------------

BUDGET_MB = 128
# The run's process (or its biggest worker) with the budget in use: Python, Pillow, botocore
# or the offline models (about 220 MB) and the budget. main's code peaked at 3.5 GB here.
PEAK_BOUND_MB = 600


@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bombs")
    files = {
        "bombs/page-1bit.tif": bombs.tiff_1bit(9_000),
        # Over Rekognition's 10,000 px a side: converted, not sent as they are.
        "bombs/grey-110mp.png": bombs.png_grey(10_500),
        "bombs/palette-110mp.png": bombs.png_palette(10_500),
        "bombs/declares-100k.png": bombs.png_declaring(100_000, 100_000),
        "bombs/frames.gif": bombs.gif_frames(5_000, 3_000),
        "bombs/page-4000.tif": bombs.tiff_1bit(4_000),
        "bombs/strip.jpg": bombs.noisy_jpeg(12_000, 400),
        "bombs/truncated.jpg": bombs.truncated_jpeg(10_400, 300),
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    for name in PHOTOS:
        shutil.copyfile(SAMPLES / name, folder / name)
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 12 * MB
    return folder


def _measured_run(config: Path, cwd: Path) -> tuple[int, int, str]:
    """``rekbatch run CONFIG`` in a child process: its exit code, the largest resident size
    (MB) of it and its descendants, and its stderr."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
        "sys.exit(p.returncode)\n"
    )
    argv = [sys.executable, "-c", wrapper, sys.executable, "-m", "rekbatch", "run", str(config)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=BOUND, cwd=cwd, check=False)
    return proc.returncode, int(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _check_bomb_records(out: Path) -> None:
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}

    def outcome(key: str) -> tuple[str, str | None]:
        row = rows[key]
        return row["status"], row["reason"] or row["error_code"]

    for key, size in (
        ("bombs/page-1bit.tif", "9000x9000"),
        ("bombs/grey-110mp.png", "10500x10500"),
        ("bombs/palette-110mp.png", "10500x10500"),
    ):
        assert outcome(key) == ("skipped", "too_large"), rows[key]
        message = rows[key]["error_message"]
        assert size in message and f"({BUDGET_MB} MB)" in message
        needs = int(message.split("needs about ")[1].split(" MB")[0].replace(",", ""))
        assert needs > BUDGET_MB
    assert outcome("bombs/declares-100k.png") == ("skipped", "too_large")
    assert "source.max_pixels" in rows["bombs/declares-100k.png"]["error_message"]
    assert outcome("bombs/truncated.jpg") == ("failed", "ImageDecodeError")
    for key, fmt, sent in (
        ("bombs/frames.gif", "gif", (3_000, 3_000)),
        ("bombs/page-4000.tif", "tiff", (4_000, 4_000)),
        ("bombs/strip.jpg", "jpeg", (10_000, 333)),
    ):
        assert outcome(key) == ("ok", None), rows[key]
        assert rows[key]["converted_from"] == fmt
        assert (rows[key]["sent_width"], rows[key]["sent_height"]) == sent
    for key in PHOTOS:
        assert outcome(key) == ("ok", None), rows[key]
    assert len(rows) == 11


def _resume_once(config: Path, out: Path, folder_uri: str) -> None:
    """A second run finds every record done: nothing is tried again."""
    result = invoke("run", str(config))
    assert result.exit_code == 3, result.stderr  # the truncated JPEG failed, as before
    keys = {r["key"] for r in read_jsonl(out / "results.jsonl")}
    assert_exactly_once(out, {(folder_uri, k, "detect_faces") for k in keys})


def test_the_bomb_folder_is_answered_within_the_budget_on_the_aws_path(
    bomb_folder: Path,
    s3: Any,
    tmp_path: Path,
    start_fake: StartFake,
    served_job: ServedJob,
) -> None:
    bucket = make_bucket(s3, "bombs")
    for path in sorted(bomb_folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, path.relative_to(bomb_folder).as_posix())
    out = tmp_path / "out"
    fake = start_fake(region="eu-west-1")
    config = served_job(
        fake,
        f"s3://{bucket}/",
        output={"parquet": False},
        limits={"max_tps": 1000},
        source={"convert_memory_mb": BUDGET_MB},
        aws={"image_mode": "bytes"},
    )
    code, peak_mb, stderr = _measured_run(config, tmp_path)
    assert code == 3, stderr
    assert peak_mb < PEAK_BOUND_MB, peak_mb
    _check_bomb_records(out)
    _resume_once(config, out, f"s3://{bucket}/")


def test_the_bomb_folder_is_answered_within_the_budget_offline(
    bomb_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "bombs"\noutput_dir = "{out}"\n'
        f'[source]\nuris = ["{bomb_folder}"]\nconvert_memory_mb = {BUDGET_MB}\n'
        '[backend]\nkind = "local"\n[output]\nparquet = false\n'
        '[[operations]]\ntype = "detect_faces"\n',
    )
    code, peak_mb, stderr = _measured_run(config, tmp_path)
    assert code == 3, stderr
    assert peak_mb < PEAK_BOUND_MB, peak_mb
    _check_bomb_records(out)
    _resume_once(config, out, str(bomb_folder))


async def test_the_offline_backend_refuses_a_decode_larger_than_its_budget() -> None:
    from rekbatch.backends.base import ImageInput
    from rekbatch.backends.local.backend import LocalBackend
    from rekbatch.errors import BackendError

    grey = bombs.png_grey(6_000)  # 36 MP: within the backend's pixel limit, not this budget
    backend = LocalBackend(workers=1, memory=MemoryBudget(64 * MB))
    try:
        with pytest.raises(BackendError) as info:
            async with asyncio.timeout(BOUND):
                await backend.call("DetectFaces", {}, {"Image": ImageInput(data=grey)})
        assert info.value.code == "ImageTooLargeException"
        assert "6000x6000" in info.value.message and "(64 MB)" in info.value.message
        assert backend.worker_pids() == []  # refused before any worker was asked
    finally:
        await backend.aclose()


async def test_report_thumbnails_obey_the_jobs_memory_budget(
    bomb_folder: Path, tmp_path: Path
) -> None:
    from rekbatch.commands.report.model import Location
    from rekbatch.commands.report.thumbs import Fetcher
    from rekbatch.config import load_config

    config = write_config(
        tmp_path / "job.toml",
        f'[source]\nuris = ["{bomb_folder}"]\nconvert_memory_mb = 64\n'
        '[[operations]]\ntype = "detect_faces"\n',
    )
    fetcher = Fetcher(load_config(config, environ={}), None)
    async with asyncio.timeout(BOUND):
        bomb = await fetcher.thumbs(Location("source", None, "bombs/grey-110mp.png"), [()])
        photo = await fetcher.thumbs(Location("source", None, "ric.jpg"), [()])
    assert bomb[0].jpeg is None and bomb[0].error is not None
    assert "too large to draw" in bomb[0].error and "(64 MB)" in bomb[0].error
    assert photo[0].jpeg is not None and max(photo[0].width or 0, photo[0].height or 0) == 266
    assert fetcher._memory.peak_held < 64 * MB


def test_the_budget_is_a_setting_of_the_run_not_of_the_job(tmp_path: Path) -> None:
    from rekbatch.config import load_config

    def config(extra: str) -> Path:
        return write_config(
            tmp_path / f"job{len(extra)}.toml",
            f'[source]\nuris = ["{tmp_path}"]\n{extra}[[operations]]\ntype = "detect_faces"\n',
        )

    default = load_config(config(""), environ={})
    larger = load_config(config("convert_memory_mb = 4096\n"), environ={})
    assert (default.source.convert_memory_mb, larger.source.convert_memory_mb) == (1024, 4096)
    assert default.fingerprint() == larger.fingerprint()  # a resume may change it
    result = invoke("validate", str(config("convert_memory_mb = 8\n")))
    assert result.exit_code == 2 and "source.convert_memory_mb" in result.stderr


def test_a_run_sends_a_jpeg_at_a_coarser_scale_when_full_scale_does_not_fit(
    tmp_path: Path,
) -> None:
    from rekbatch.config import load_config
    from rekbatch.engine import Job, RunOptions
    from tests.support.fake_backend import FakeBackend

    folder = tmp_path / "photos"
    folder.mkdir()
    # Wider than 10,000 px and over 5 MB: converted; about 85 MB at full scale.
    (folder / "strip.jpg").write_bytes(bombs.noisy_jpeg(12_000, 400))
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "coarse"\noutput_dir = "{out}"\n'
        f'[source]\nuris = ["{folder}"]\nconvert_memory_mb = 64\n'
        '[output]\nparquet = false\n[[operations]]\ntype = "detect_faces"\n',
    )
    cfg = load_config(config, environ={})

    async def run() -> int:
        job = Job(cfg, RunOptions(output_dir=out), backend=FakeBackend())
        async with asyncio.timeout(BOUND):
            return (await job.run()).exit_code

    assert asyncio.run(run()) == 0
    [row] = read_jsonl(out / "results.jsonl")
    assert (row["status"], row["converted_from"], row["width"]) == ("ok", "jpeg", 12_000)
    assert (row["sent_width"], row["sent_height"]) == (6_000, 200)  # decoded at 1/2
    assert asyncio.run(run()) == 0  # resumed: done already
    assert_exactly_once(out, {(str(folder), "strip.jpg", "detect_faces")})
