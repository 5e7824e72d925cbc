"""Formats and sizes Rekognition refuses: sniffed from the header, converted, or skipped
with their reason; bucket regions. Real encoded files, built here with Pillow."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pillow_heif
import pytest
from PIL import Image

from rekbatch.records import ObjectRef
from rekbatch.sources.convert import ConversionError, TooManyPixels, convert_image
from rekbatch.sources.filters import (
    AS_IS,
    MAX_IMAGE_BYTES,
    MAX_S3_OBJECT_BYTES,
    Convert,
    decide,
)
from rekbatch.sources.sniff import HEAD_BYTES, ImageInfo, sniff
from tests.conftest import SAMPLES, make_bucket
from tests.helpers import invoke, read_csv, read_jsonl, write_config
from tests.support.clients import aws_client
from tests.support.fake_rekognition import FakeRekognition
from tests.support.servers import ServedJob, StartFake

pillow_heif.register_heif_opener()


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A picture with some structure (a gradient and a block), not a flat colour."""
    img = Image.linear_gradient("L").resize((width, height)).convert(mode)
    img.paste((200, 30, 30)[: len(mode)] if mode != "L" else 128, (0, 0, width // 3, height // 3))
    return img


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def oriented_jpeg(width: int, height: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(picture(width, height), "JPEG", exif=exif.tobytes())


def animated_gif(width: int, height: int) -> bytes:
    frames = [Image.new("RGB", (width, height), colour) for colour in ("red", "lime", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header declares ``width`` x ``height``: decoding it would take
    30 GB; its data is a few compressed rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (3 * width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def noise_jpeg(width: int, height: int) -> bytes:
    """Noise at quality 95: about 2 bytes per pixel, the worst case for the 5 MB limit."""
    img = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    return encode(img, "JPEG", quality=95)


def padded(jpeg: bytes, nbytes: int) -> bytes:
    """``jpeg`` with APP15 segments of ``nbytes`` in all before its SOF, as large maker notes
    or ICC profiles put it far into the file."""
    segments = b""
    while nbytes > 0:
        chunk = min(nbytes, 65_000)
        segments += b"\xff\xef" + (chunk + 2).to_bytes(2, "big") + b"\x00" * chunk
        nbytes -= chunk
    return jpeg[:2] + segments + jpeg[2:]


def obj(key: str = "k.jpg", size: int = 10_000) -> ObjectRef:
    return ObjectRef("b", key, size, "etag", "2024-01-01T00:00:00Z")


# -- sniffing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "name"),
    [
        ("JPEG", {}, "jpeg"),
        ("JPEG", {"progressive": True}, "jpeg"),
        ("PNG", {}, "png"),
        ("GIF", {}, "gif"),
        ("BMP", {}, "bmp"),
        ("WEBP", {}, "webp"),
        ("WEBP", {"lossless": True}, "webp"),
        ("TIFF", {}, "tiff"),
        ("TIFF", {"compression": "tiff_lzw"}, "tiff"),
        ("HEIF", {}, "heic"),
        ("AVIF", {}, "avif"),
    ],
)
def test_sniff_reads_format_and_dimensions_from_the_header(
    fmt: str, options: dict[str, Any], name: str
) -> None:
    data = encode(picture(321, 123), fmt, **options)
    assert sniff(data[:HEAD_BYTES]) == ImageInfo(name, 321, 123, None)


def test_sniff_webp_with_alpha_uses_the_extended_header() -> None:
    img = picture(321, 123, "RGBA")
    img.putalpha(Image.linear_gradient("L").resize((321, 123)))
    data = encode(img, "WEBP")
    assert data[12:16] == b"VP8X"
    assert sniff(data) == ImageInfo("webp", 321, 123)


def test_sniff_reads_exif_orientation_and_stored_dimensions() -> None:
    data = oriented_jpeg(300, 200, 6)
    assert sniff(data[:HEAD_BYTES]) == ImageInfo("jpeg", 300, 200, 6)
    tiff = encode(picture(50, 40), "TIFF", exif=_exif(8))
    assert sniff(tiff) == ImageInfo("tiff", 50, 40, 8)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_sniff_a_cut_header_knows_the_format_but_not_the_size() -> None:
    data = oriented_jpeg(300, 200, 3)
    sof = data.index(b"\xff\xc0")
    assert sniff(data[: sof + 4]) == ImageInfo("jpeg", None, None, 3)
    assert sniff(b"\xff\xd8\xff\xe0" + b"\x00" * 100) == ImageInfo("jpeg")
    assert sniff(encode(picture(10, 10), "PNG")[:20]) == ImageInfo("png")


@pytest.mark.parametrize(
    "head",
    [b"", b"plain text", b"GIF", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"\x00\x00\x00\x18ftypmp42"],
)
def test_sniff_no_image(head: bytes) -> None:
    assert sniff(head) is None


def test_sniff_the_bomb_declares_its_size() -> None:
    assert sniff(png_bomb()[:HEAD_BYTES]) == ImageInfo("png", 100_000, 100_000)


# -- deciding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "size", "operation", "max_bytes", "convert", "expected"),
    [
        (ImageInfo("jpeg", 800, 600), 10_000, "detect_faces", MAX_S3_OBJECT_BYTES, True, AS_IS),
        (ImageInfo("jpeg", 60, 60), 2_000, "detect_faces", MAX_S3_OBJECT_BYTES, True, "too_small"),
        (ImageInfo("png", 79, 500), 2_000, "detect_labels", MAX_IMAGE_BYTES, True, "too_small"),
        # PPE takes 64 px, but at most 4,096
        (
            ImageInfo("png", 70, 70),
            2_000,
            "detect_protective_equipment",
            MAX_IMAGE_BYTES,
            True,
            AS_IS,
        ),
        (
            ImageInfo("jpeg", 5000, 3000),
            10**6,
            "detect_protective_equipment",
            MAX_S3_OBJECT_BYTES,
            True,
            Convert(4096),
        ),
        (
            ImageInfo("jpeg", 12000, 3000),
            10**6,
            "detect_labels",
            MAX_S3_OBJECT_BYTES,
            True,
            Convert(10_000),
        ),
        (
            ImageInfo("jpeg", 12000, 3000),
            10**6,
            "detect_labels",
            MAX_S3_OBJECT_BYTES,
            False,
            "too_large",
        ),
        (
            ImageInfo("jpeg", 6000, 4000),
            20 * 2**20,
            "detect_faces",
            MAX_S3_OBJECT_BYTES,
            True,
            Convert(10_000),
        ),
        # 6 MB is fine by S3 reference, too much as bytes
        (
            ImageInfo("jpeg", 6000, 4000),
            6 * 2**20,
            "detect_faces",
            MAX_S3_OBJECT_BYTES,
            True,
            AS_IS,
        ),
        (
            ImageInfo("jpeg", 6000, 4000),
            6 * 2**20,
            "detect_faces",
            MAX_IMAGE_BYTES,
            True,
            Convert(10_000),
        ),
        (
            ImageInfo("heic", 4032, 3024),
            2 * 2**20,
            "detect_faces",
            MAX_S3_OBJECT_BYTES,
            True,
            Convert(10_000),
        ),
        (
            ImageInfo("heic", 4032, 3024),
            2 * 2**20,
            "detect_faces",
            MAX_S3_OBJECT_BYTES,
            False,
            "not_image",
        ),
        (ImageInfo("webp"), 50_000, "detect_faces", MAX_S3_OBJECT_BYTES, True, Convert(10_000)),
        (ImageInfo("jpeg"), 50_000, "detect_faces", MAX_S3_OBJECT_BYTES, True, AS_IS),
        (
            ImageInfo("png", 100_000, 100_000),
            500,
            "detect_faces",
            MAX_S3_OBJECT_BYTES,
            True,
            "too_large",
        ),
        (ImageInfo("gif", 0, 0), 500, "detect_faces", MAX_S3_OBJECT_BYTES, True, "not_image"),
        (None, 500, "detect_faces", MAX_S3_OBJECT_BYTES, True, "not_image"),
        (ImageInfo("jpeg", 800, 600), 30, "detect_faces", MAX_S3_OBJECT_BYTES, True, "too_small"),
    ],
)
def test_decide(
    info: ImageInfo | None,
    size: int,
    operation: str,
    max_bytes: int,
    convert: bool,
    expected: object,
) -> None:
    assert decide(obj(size=size), info, operation, max_bytes=max_bytes, convert=convert) == (
        expected
    )


# -- converting -----------------------------------------------------------------------------


def _decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    img.load()
    return img


def test_convert_heic_to_a_jpeg_of_the_same_size() -> None:
    done = convert_image(encode(picture(640, 480), "HEIF"), 10_000)
    assert (done.converted_from, done.width, done.height) == ("heif", 640, 480)
    assert _decoded(done.data).size == (640, 480) == (done.sent_width, done.sent_height)


def test_convert_applies_the_exif_orientation() -> None:
    done = convert_image(oriented_jpeg(300, 200, 6), 10_000)
    assert (done.width, done.height, done.orientation) == (300, 200, 6)
    assert _decoded(done.data).size == (200, 300)  # turned upright


def test_convert_downscales_only_as_far_as_needed() -> None:
    data = encode(picture(5000, 1000), "PNG")
    assert convert_image(data, 10_000).sent_width == 5000
    done = convert_image(data, 4096)
    assert (done.sent_width, done.sent_height) == (4096, 819)
    assert _decoded(done.data).size == (4096, 819)


def test_convert_keeps_within_the_bytes_limit() -> None:
    data = noise_jpeg(1200, 1000)
    assert len(data) > 1_000_000
    done = convert_image(data, 10_000, max_bytes=500_000)
    assert len(done.data) <= 500_000
    assert 400 < done.sent_width < 1200  # smaller, not a thumbnail
    assert done.sent_width / done.sent_height == pytest.approx(1.2, abs=0.01)


def test_convert_takes_the_first_frame_and_flattens_transparency() -> None:
    first = _decoded(convert_image(animated_gif(100, 90), 10_000).data)
    red, green, blue = first.convert("RGB").getpixel((50, 45))  # type: ignore[misc]
    assert red > 200 and green < 60 and blue < 60
    clear = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    white = _decoded(convert_image(encode(clear, "PNG"), 10_000).data).getpixel((5, 5))
    assert min(white) > 245  # type: ignore[arg-type]


def test_convert_refuses_a_bomb_without_decoding_it() -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(TooManyPixels) as info:
            convert_image(png_bomb(), 10_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.value.width, info.value.height) == (100_000, 100_000)
    assert peak < 20_000_000  # 30 GB of pixels were never allocated


@pytest.mark.parametrize(
    "data",
    [
        encode(picture(400, 300), "WEBP")[:300],  # truncated
        b"GIF89a" + b"\x00" * 300,
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x01" * 200,
    ],
)
def test_convert_broken_images_fail_with_a_reason(data: bytes) -> None:
    with pytest.raises(ConversionError) as info:
        convert_image(data, 10_000)
    assert info.value.code == "ImageDecodeError" and info.value.message


# -- end to end: a bucket of everything, through the CLI ------------------------------------


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    panorama = encode(picture(12_000, 3_000), "JPEG", quality=80)
    long_strip = encode(picture(10_400, 300), "JPEG", quality=80)
    return {
        "phone/IMG_0001.HEIC": encode(picture(640, 480), "HEIF"),
        "web/photo.avif": encode(picture(600, 400), "AVIF"),
        "web/photo.webp": encode(picture(500, 400), "WEBP"),
        "scans/page.tif": encode(picture(800, 1000), "TIFF"),
        "old/archive.bmp": encode(picture(300, 200), "BMP"),
        "old/anim.gif": animated_gif(160, 120),
        "camera/big.jpg": noise_jpeg(4800, 3600),
        "camera/panorama.jpg": panorama,
        "small/thumb.jpg": encode(picture(60, 60), "JPEG"),
        "small/thumb-big-header.jpg": padded(encode(picture(60, 50), "JPEG"), 100_000),
        "misnamed/really-a-png.jpg": encode(picture(200, 150), "PNG"),
        "camera/rotated.jpg": oriented_jpeg(300, 200, 6),
        "broken/truncated.jpg": long_strip[: len(long_strip) // 2],
        "broken/bomb.png": png_bomb(),
        "broken/text.heic": b"not a picture, whatever the name says " * 4,
        "docs/notes.txt": b"not selected",
    }


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(check_bucket_region=True)


CONVERTED = {
    "phone/IMG_0001.HEIC": ("heic", (640, 480), (640, 480)),
    "web/photo.avif": ("avif", (600, 400), (600, 400)),
    "web/photo.webp": ("webp", (500, 400), (500, 400)),
    "scans/page.tif": ("tiff", (800, 1000), (800, 1000)),
    "old/archive.bmp": ("bmp", (300, 200), (300, 200)),
    "old/anim.gif": ("gif", (160, 120), (160, 120)),
    "camera/panorama.jpg": ("jpeg", (12_000, 3_000), (10_000, 2_500)),
}


def test_every_format_is_answered_from_the_cli(
    s3: Any,
    fake: FakeRekognition,
    files: dict[str, bytes],
    tmp_path: Path,
    served_job: ServedJob,
) -> None:
    bucket = make_bucket(s3, "formats-bucket")
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    out = tmp_path / "out"
    config = served_job(
        fake, f"s3://{bucket}/", operations='[[operations]]\ntype = "detect_labels"\n'
    )
    result = invoke("run", str(config), "--log-format", "json")
    assert result.exit_code == 3, result.stderr  # the truncated JPEG failed
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(rows) == set(files)

    for key, (fmt, size, sent) in CONVERTED.items():
        row = rows[key]
        assert row["status"] == "ok", row
        assert row["converted_from"] == fmt
        assert (row["width"], row["height"]) == size
        assert (row["sent_width"], row["sent_height"]) == sent
    big = rows["camera/big.jpg"]
    assert big["status"] == "ok" and big["converted_from"] == "jpeg"
    assert (big["width"], big["height"]) == (4800, 3600)
    assert big["sent_width"] < 4800 and big["sent_width"] / big["sent_height"] == pytest.approx(
        4 / 3, abs=0.01
    )
    # Rekognition takes these as they are, by S3 reference; the record still says what they are
    png = rows["misnamed/really-a-png.jpg"]
    assert (png["status"], png["converted_from"], png["width"], png["sent_width"]) == (
        "ok",
        None,
        200,
        200,
    )
    rotated = rows["camera/rotated.jpg"]
    assert (rotated["status"], rotated["exif_orientation"], rotated["width"]) == ("ok", 6, 300)
    assert rotated["converted_from"] is None

    def skipped(key: str) -> tuple[str, str | None]:
        return rows[key]["status"], rows[key]["reason"]

    assert skipped("small/thumb.jpg") == ("skipped", "too_small")
    # its SOF is 100 KB in: found by the second, longer read of the header
    assert skipped("small/thumb-big-header.jpg") == ("skipped", "too_small")
    assert rows["small/thumb-big-header.jpg"]["width"] == 60
    assert rows["small/thumb.jpg"]["width"] == 60
    assert skipped("broken/bomb.png") == ("skipped", "too_large")
    assert rows["broken/bomb.png"]["width"] == 100_000
    assert skipped("broken/text.heic") == ("skipped", "not_image")
    assert skipped("docs/notes.txt") == ("skipped", "excluded")
    truncated = rows["broken/truncated.jpg"]
    assert (truncated["status"], truncated["error_code"]) == ("failed", "ImageDecodeError")
    assert "truncated" in truncated["error_message"]
    assert truncated["width"] == 10_400

    # The fake saw converted images as bytes, the others as S3 objects.
    billed = {ident for api, ident in fake.stats()["billed"] if api == "DetectLabels"}
    by_reference = {i.removeprefix(f"s3://{bucket}/") for i in billed if i.startswith("s3://")}
    assert by_reference == {"misnamed/really-a-png.jpg", "camera/rotated.jpg"}
    assert len(billed) - len(by_reference) == len(CONVERTED) + 1  # + big.jpg

    csv_rows = {r["key"]: r for r in read_csv(out / "results.csv")}
    assert csv_rows["phone/IMG_0001.HEIC"]["converted_from"] == "heic"
    assert csv_rows["camera/panorama.jpg"]["sent_width"] == "10000"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["by_status"] == {"ok": 10, "skipped": 5, "failed": 1}
    assert summary["images_converted"] == len(CONVERTED) + 1  # + big.jpg


def test_convert_off_skips_what_rekognition_refuses(
    s3: Any,
    fake: FakeRekognition,
    files: dict[str, bytes],
    tmp_path: Path,
    served_job: ServedJob,
) -> None:
    bucket = make_bucket(s3, "no-convert-bucket")
    for key in ("phone/IMG_0001.HEIC", "camera/panorama.jpg", "camera/rotated.jpg"):
        s3.put_object(Bucket=bucket, Key=key, Body=files[key])
    out = tmp_path / "out"
    config = served_job(fake, f"s3://{bucket}/", source={"convert": False})
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.stderr
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert rows["phone/IMG_0001.HEIC"]["reason"] == "not_image"
    assert rows["camera/panorama.jpg"]["reason"] == "too_large"
    assert rows["camera/panorama.jpg"]["width"] == 12_000
    assert rows["camera/rotated.jpg"]["status"] == "ok"


# -- regions ----------------------------------------------------------------------------------


def _other_region_bucket(s3: Any, name: str) -> str:
    oregon = aws_client("s3", s3.meta.endpoint_url, "us-west-2")
    oregon.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    s3.put_object(Bucket=name, Key="a.jpg", Body=oriented_jpeg(300, 200, 1))
    s3.put_object(Bucket=name, Key="b.png", Body=encode(picture(120, 90), "PNG"))
    return name


def test_bucket_in_another_region_is_sent_as_bytes_with_auto(
    s3: Any, fake: FakeRekognition, tmp_path: Path, served_job: ServedJob
) -> None:
    bucket = _other_region_bucket(s3, "oregon-photos")
    out = tmp_path / "out"
    config = served_job(fake, f"s3://{bucket}/")
    result = invoke("run", str(config), "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    assert "bucket_in_other_region" in result.stderr and "us-west-2" in result.stderr
    rows = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    billed = {ident for _, ident in fake.stats()["billed"]}
    assert len(billed) == 2 and all(i.startswith("sha256:") for i in billed)


def test_bucket_in_another_region_stops_image_mode_s3(
    s3: Any, fake: FakeRekognition, tmp_path: Path, served_job: ServedJob
) -> None:
    bucket = _other_region_bucket(s3, "oregon-refs")
    config = served_job(fake, f"s3://{bucket}/", aws={"image_mode": "s3"})
    result = invoke("run", str(config))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "oregon-refs" in lines[0] and "us-west-2" in lines[0] and "auto" in lines[0]
    assert sum(fake.stats()["calls"].values()) == 0
    assert not (tmp_path / "out").exists()


# -- offline: a HEIC of Ric is still Ric ------------------------------------------------------


def test_offline_backend_matches_a_converted_heic(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    with Image.open(SAMPLES / "ric.jpg") as ric:
        (photos / "ric.heic").write_bytes(encode(ric.convert("RGB"), "HEIF", quality=90))
    with Image.open(SAMPLES / "sample-image0.jpeg") as other:
        (photos / "other.webp").write_bytes(encode(other.convert("RGB"), "WEBP", quality=90))
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "heic-ric"\noutput_dir = "{out}"\n[source]\nuris = ["{photos}"]\n'
        '[backend]\nkind = "local"\n'
        f'[[operations]]\ntype = "compare_faces"\nreference = "{SAMPLES / "ric_harvey.jpeg"}"\n',
    )
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.stderr
    assert "reference face found in 1 of 2 images" in result.stdout
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert rows["ric.heic"]["converted_from"] == "heic"
    assert rows["other.webp"]["converted_from"] == "webp"
    answer = json.loads((out / "summary.json").read_text())["compare_faces"]
    assert answer["matched_keys"] == ["ric.heic"]


def test_plan_counts_conversions_and_notes_the_region(
    s3: Any,
    fake: FakeRekognition,
    files: dict[str, bytes],
    tmp_path: Path,
    served_job: ServedJob,
) -> None:
    bucket = make_bucket(s3, "plan-formats")
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    config = served_job(
        fake, f"s3://{bucket}/", operations='[[operations]]\ntype = "detect_labels"\n'
    )
    result = invoke("plan", str(config), "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    converting = [*CONVERTED, "camera/big.jpg", "broken/truncated.jpg"]
    assert plan["images_converted"] == len(converting)
    assert plan["converted_bytes"] == sum(len(files[k]) for k in converting)
    assert plan["converted_by_type"] == {
        "heic": 1,
        "avif": 1,
        "webp": 1,
        "tiff": 1,
        "bmp": 1,
        "gif": 1,
        "jpeg": 3,
    }
    assert plan["images_eligible"] == len(converting) + 2
    assert plan["skipped_by_reason"] == {
        "too_small": 2,
        "too_large": 1,
        "not_image": 1,
        "excluded": 1,
    }
    assert plan["calls_by_api"] == {"DetectLabels": len(converting) + 2}
    assert plan["notes"] == []
    assert sum(fake.stats()["calls"].values()) == 0

    oregon = _other_region_bucket(s3, "plan-oregon")
    text = (tmp_path / "job.toml").read_text().replace(f"s3://{bucket}/", f"s3://{oregon}/")
    other = write_config(tmp_path / "oregon.toml", text)
    result = invoke("plan", str(other))
    assert result.exit_code == 0, result.stderr
    assert "s3://plan-oregon is in us-west-2" in result.stdout and "bytes" in result.stdout


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('convert = "sometimes"', "source.convert"),
        ("max_pixels = 10", "source.max_pixels"),
    ],
)
def test_bad_format_settings_are_one_line_naming_the_field(
    tmp_path: Path, line: str, field: str
) -> None:
    path = write_config(
        tmp_path / "job.toml",
        f'[source]\nuris = ["s3://photos/"]\n{line}\n[[operations]]\ntype = "detect_faces"\n',
    )
    result = invoke("validate", str(path))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], result.stderr


def test_default_config_includes_every_convertible_extension(tmp_path: Path) -> None:
    from rekbatch.config import load_config
    from rekbatch.sources.filters import classify_listing

    path = write_config(
        tmp_path / "job.toml",
        '[source]\nuris = ["s3://photos/"]\n[[operations]]\ntype = "detect_faces"\n',
    )
    cfg = load_config(path)
    assert cfg.aws.image_mode == "auto" and cfg.source.convert
    for key in ("a.HEIC", "b.heif", "c.Avif", "d.webp", "e.TIF", "f.tiff", "g.bmp", "h.GIF"):
        assert classify_listing(obj(key), cfg.source.include, [], 2**30) is None, key
    assert classify_listing(obj("notes.txt"), cfg.source.include, [], 2**30) == "excluded"


def test_a_long_header_is_read_a_second_time() -> None:
    from rekbatch.sources.sniff import MAX_HEAD_BYTES, needs_more

    data = padded(encode(picture(300, 200), "JPEG"), 100_000)
    head = data[:HEAD_BYTES]
    info = sniff(head)
    assert info == ImageInfo("jpeg") and needs_more(info, head, len(data))
    assert sniff(data[:MAX_HEAD_BYTES]) == ImageInfo("jpeg", 300, 200)
    small = encode(picture(300, 200), "JPEG")
    assert not needs_more(sniff(small), small, len(small))  # found in the first read
    assert not needs_more(None, b"text", 10_000)  # no image: nothing more to learn
    cut = small[:100]
    assert not needs_more(sniff(cut), cut, len(cut))  # the whole object was read
