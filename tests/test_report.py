"""``rekbatch report``: the HTML evidence page, from local folders and from S3."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image

from rekbatch.commands.report import REPORT_FILE, THUMB_PX, build_report
from rekbatch.config import Config
from rekbatch.errors import SetupError
from tests.conftest import REGION, SAMPLES, make_bucket
from tests.support.servers import StartFake

DATA_URI = "data:image/jpeg;base64,"
REFERENCE = "ric_harvey.jpeg"
# Plausible Rekognition boxes (ratios of the orientation-corrected image) around Ric's face.
MATCHES = [
    ("ric.jpg", 99.87, {"Left": 0.26, "Top": 0.15, "Width": 0.52, "Height": 0.64}),
    ("ric_crowd1.jpg", 97.21, {"Left": 0.275, "Top": 0.355, "Width": 0.19, "Height": 0.34}),
]
# scripts/test installs Debian's Chromium there when it is missing, or names another one.
CHROMIUM = os.environ.get("REKBATCH_CHROMIUM", "/usr/bin/chromium")


class PageParser(HTMLParser):
    """Checks that the page's elements nest and close, and collects images and captions."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.seen: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.captions: list[str] = []
        self.placeholders: list[str] = []
        self.external: list[str] = []
        self._caption: list[str] | None = None
        self._placeholder: list[str] | None = None
        self._placeholder_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.seen.append(tag)
        for name in ("src", "href"):
            value = attributes.get(name)
            if value is not None and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "img":
            self.images.append(attributes)
        if tag in self.VOID:
            return
        self.stack.append(tag)
        if tag == "figcaption":
            self._caption = []
        if tag == "div" and "placeholder" in (attributes.get("class") or "").split():
            self._placeholder = []
            self._placeholder_depth = len(self.stack)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        if tag == "figcaption" and self._caption is not None:
            self.captions.append(" ".join("".join(self._caption).split()))
            self._caption = None
        if self._placeholder is not None and len(self.stack) == self._placeholder_depth:
            self.placeholders.append(" ".join("".join(self._placeholder).split()))
            self._placeholder = None
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self._caption is not None:
            self._caption.append(data + " ")
        if self._placeholder is not None:
            self._placeholder.append(data + " ")


def parse_page(path: Path) -> PageParser:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = PageParser()
    parser.feed(text)
    parser.close()
    assert parser.problems == []
    assert parser.stack == [], f"unclosed: {parser.stack}"
    for tag in (
        "html",
        "head",
        "title",
        "style",
        "body",
        "header",
        "h1",
        "main",
        "section",
        "figure",
        "figcaption",
        "footer",
    ):
        assert tag in parser.seen, tag
    assert parser.external == [], "the report must not load anything from outside"
    assert "<script" not in text
    return parser


def decode_images(parser: PageParser) -> list[Image.Image]:
    out: list[Image.Image] = []
    for attrs in parser.images:
        src = attrs["src"] or ""
        assert src.startswith(DATA_URI)
        raw = base64.b64decode(src[len(DATA_URI) :], validate=True)
        image = Image.open(io.BytesIO(raw))
        assert image.format == "JPEG"
        image.load()
        assert max(image.size) <= THUMB_PX
        assert (attrs["width"], attrs["height"]) == (str(image.width), str(image.height))
        out.append(image)
    return out


def box_colour_near(image: Image.Image, box: dict[str, float]) -> bool:
    """The drawn rectangle (bright yellow) runs along the left edge of the box."""
    rgb = image.convert("RGB")
    x = round(box["Left"] * rgb.width)
    y = round((box["Top"] + box["Height"] / 2) * rgb.height)
    for dx in range(-3, 4):
        r, g, b = rgb.getpixel((min(max(x + dx, 0), rgb.width - 1), y))  # type: ignore[misc]
        if r > 200 and g > 170 and b < 90:
            return True
    return False


def local_job(tmp_path: Path) -> tuple[Path, Config]:
    photos = tmp_path / "photos"
    refs = tmp_path / "refs"
    out = tmp_path / "out"
    for folder in (photos, refs, out):
        folder.mkdir()
    shutil.copy(SAMPLES / REFERENCE, refs / REFERENCE)
    for name, _, _ in MATCHES:
        shutil.copy(SAMPLES / name, photos / name)
    shutil.copy(SAMPLES / "sample-image0.jpeg", photos / "sample-image0.jpeg")  # not matched
    summary = {
        "job": "wheres-ric",
        "compare_faces": {
            "reference": str(refs / REFERENCE),
            "similarity_threshold": 80.0,
            "images_compared": 3,
            "images_matched": 2,
            "matched_keys": [name for name, _, _ in MATCHES],
            "matches": [
                {"bucket": None, "key": name, "similarity": sim, "bounding_box": box}
                for name, sim, box in MATCHES
            ],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    cfg = Config.model_validate(
        {
            "job": {"name": "wheres-ric", "output_dir": str(out)},
            "source": {"uris": [str(photos)]},
            "backend": {"kind": "local"},
            "operations": [{"type": "compare_faces", "reference": str(refs / REFERENCE)}],
        }
    )
    return out, cfg


def check_compare_page(parser: PageParser, text: str) -> None:
    images = decode_images(parser)
    assert len(images) == 1 + len(MATCHES)  # the reference, then every match
    assert parser.placeholders == []
    assert "found in <strong>2</strong> of 3 images" in text
    assert "found in 2 of 3 images" in text
    assert "wheres-ric" in text and "80" in text and "UTC" in text
    assert len(parser.captions) == 3
    assert REFERENCE in parser.captions[0] and "reference" in parser.captions[0]
    for (name, sim, box), caption, image in zip(
        MATCHES, parser.captions[1:], images[1:], strict=True
    ):
        assert name in caption
        assert f"{sim:.1f}%" in caption
        assert box_colour_near(image, box), f"no box drawn on {name}"
    assert not box_colour_near(images[0], MATCHES[1][2])  # the reference has no box


async def test_report_from_local_folder(tmp_path: Path) -> None:
    out, cfg = local_job(tmp_path)
    path = await build_report(out, cfg)
    assert path == out / REPORT_FILE
    parser = parse_page(path)
    check_compare_page(parser, path.read_text(encoding="utf-8"))
    assert list(out.glob("*.tmp")) == []


async def test_report_from_s3(tmp_path: Path, s3: Any, moto_endpoint: str) -> None:
    bucket = make_bucket(s3, "report-photos")
    s3.put_object(Bucket=bucket, Key=f"refs/{REFERENCE}", Body=(SAMPLES / REFERENCE).read_bytes())
    for name, _, _ in MATCHES:
        s3.put_object(Bucket=bucket, Key=f"event/{name}", Body=(SAMPLES / name).read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    reference = f"s3://{bucket}/refs/{REFERENCE}"
    summary = {
        "job": "wheres-ric",
        "compare_faces": {
            "reference": reference,
            "similarity_threshold": 80.0,
            "images_compared": 3,
            "images_matched": 2,
            "matched_keys": [f"event/{name}" for name, _, _ in MATCHES],
            "matches": [
                {"bucket": bucket, "key": f"event/{name}", "similarity": sim, "bounding_box": box}
                for name, sim, box in MATCHES
            ],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    cfg = Config.model_validate(
        {
            "job": {"name": "wheres-ric"},
            "source": {"uris": [f"s3://{bucket}/event/"]},
            "aws": {"region": REGION, "s3_endpoint_url": moto_endpoint},
            "operations": [{"type": "compare_faces", "reference": reference}],
        }
    )
    path = await build_report(out, cfg)
    text = path.read_text(encoding="utf-8")
    parser = parse_page(path)
    check_compare_page(parser, text)
    assert f"s3://{bucket}/event/ric.jpg" in parser.captions[1]


async def test_search_faces_people_escaping_and_placeholders(tmp_path: Path) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    out = tmp_path / "out"
    for folder in (first, second / "sub", out):
        folder.mkdir(parents=True)
    odd = 'a&b <i>"x".jpg'
    shutil.copy(SAMPLES / "ric.jpg", first / odd)
    shutil.copy(SAMPLES / "ric_crowd1.jpg", second / "sub" / "crowd.jpg")
    shutil.copy(SAMPLES / "broken.jpg", first / "broken.jpg")
    box = MATCHES[0][2]
    summary = {
        "job": "<b>people</b>",
        "search_faces": {
            "strategy": "compare",
            "images_searched": 5,
            "people": {
                "ric": {
                    "references": [str(SAMPLES / REFERENCE)],
                    "images_matched": 4,
                    "matches": [
                        {"bucket": None, "key": odd, "similarity": 99.0, "bounding_box": box},
                        {
                            "bucket": None,
                            "key": "sub/crowd.jpg",
                            "similarity": 93.35,
                            "bounding_box": MATCHES[1][2],
                        },
                        {
                            "bucket": None,
                            "key": "gone.jpg",
                            "similarity": 90.0,
                            "bounding_box": box,
                        },
                        {
                            "bucket": None,
                            "key": "broken.jpg",
                            "similarity": 85.0,
                            "bounding_box": None,
                        },
                    ],
                },
                "andrew": {
                    "references": [str(tmp_path / "missing-ref.jpg")],
                    "images_matched": 0,
                    "matches": [],
                },
            },
        },
    }
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    cfg = Config.model_validate(
        {
            "source": {"uris": [str(first), "s3://elsewhere/x/", str(second)]},
            "backend": {"kind": "local"},
            "operations": [
                {
                    "type": "search_faces",
                    "similarity_threshold": 90,
                    "people": {
                        "ric": [str(SAMPLES / REFERENCE)],
                        "andrew": [str(tmp_path / "missing-ref.jpg")],
                    },
                }
            ],
        }
    )
    path = await build_report(out, cfg)
    text = path.read_text(encoding="utf-8")
    parser = parse_page(path)
    assert "<b>people</b>" not in text and "&lt;b&gt;people&lt;/b&gt;" in text
    assert "<i>" not in text
    # ric's reference and two readable matches; the rest are placeholders with the reason.
    assert len(decode_images(parser)) == 3
    assert len(parser.placeholders) == 3
    assert any("gone.jpg" in p or "not found" in p for p in parser.placeholders)
    assert any("not an image" in p for p in parser.placeholders)
    assert any("missing-ref.jpg" in p for p in parser.placeholders)
    assert any(odd in c and "99.0%" in c for c in parser.captions)
    assert any("sub/crowd.jpg" in c and f"{93.35:.1f}%" in c for c in parser.captions)
    assert "1</strong> of 2 people found in 5 images" in text
    assert "not found in any of 5 images" in text
    assert ">90<" in text  # the threshold, from the config when the summary has none


async def test_boxes_follow_exif_orientation(tmp_path: Path) -> None:
    """Rekognition's box refers to the upright image: a portrait file stored sideways with
    Orientation=6 is shown upright and boxed where the face is when upright."""
    stored = Image.new("RGB", (400, 800), (40, 90, 160))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photos = tmp_path / "photos"
    out = tmp_path / "out"
    photos.mkdir()
    out.mkdir()
    stored.save(photos / "sideways.jpg", "JPEG", exif=exif.tobytes())
    box = {"Left": 0.1, "Top": 0.2, "Width": 0.3, "Height": 0.5}
    summary = {
        "job": "exif",
        "compare_faces": {
            "reference": str(photos / "sideways.jpg"),
            "similarity_threshold": 80,
            "images_compared": 1,
            "images_matched": 1,
            "matched_keys": ["sideways.jpg"],
            "matches": [
                {"bucket": None, "key": "sideways.jpg", "similarity": 99.0, "bounding_box": box}
            ],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    cfg = Config.model_validate(
        {
            "source": {"uris": [str(photos)]},
            "backend": {"kind": "local"},
            "operations": [{"type": "compare_faces", "reference": str(photos / "sideways.jpg")}],
        }
    )
    images = decode_images(parse_page(await build_report(out, cfg)))
    boxed = images[1]
    assert boxed.size == (THUMB_PX, THUMB_PX // 2)  # landscape once upright
    assert box_colour_near(boxed, box)


async def test_missing_pillow_is_a_setup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cfg = local_job(tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(SetupError, match=r"pip install 'rekbatch\[report\]'"):
        await build_report(out, cfg)


async def test_no_face_answer_is_a_setup_error(tmp_path: Path) -> None:
    out, cfg = local_job(tmp_path)
    (out / "summary.json").write_text(json.dumps({"job": "x"}), encoding="utf-8")
    with pytest.raises(SetupError, match="no results to show"):
        await build_report(out, cfg)
    (out / "summary.json").unlink()
    with pytest.raises(SetupError, match=r"no summary\.json"):
        await build_report(out, cfg)


def screenshot(page: Path, tmp_path: Path) -> Image.Image:
    """``page`` as headless Chromium draws it in a 1200x900 window."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing; this test renders the report in a real browser. "
            "Run the tests with ./scripts/test, which installs it"
        )
    profile = tmp_path / "chromium-profile"
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--screenshot={shot}",
        "--window-size=1200,900",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert shot.exists(), f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    # A text-only rendering of these pages is about 60 kB; with the photos, over 300 kB.
    assert shot.stat().st_size > 150_000, "the screenshot is too small to hold photos"
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
    assert rgb.size == (1200, 900)
    extrema = cast(tuple[tuple[int, int], ...], rgb.getextrema())
    assert any(low != high for low, high in extrema), "a blank, single-colour page"
    return rgb


def distinct_colours(rgb: Image.Image) -> int:
    colours = rgb.getcolors(maxcolors=1 << 18)
    return len(colours) if colours is not None else 1 << 18


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    out, cfg = local_job(tmp_path)
    report = asyncio.run(build_report(out, cfg))
    rgb = screenshot(report, tmp_path)
    distinct = distinct_colours(rgb)
    # Text and flat CSS give about 1,400 colours; with the photographs, about 85,000.
    assert distinct > 20_000, f"only {distinct} colours: were the thumbnails drawn?"


def test_report_of_a_detect_labels_job_through_the_cli_renders_in_chromium(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, start_fake: StartFake
) -> None:
    from tests.helpers import invoke, read_jsonl, sample_people

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ric.jpg", "ric_crowd0.jpg", "sample-image0.jpeg", "sample-image1.jpeg"):
        shutil.copy(SAMPLES / name, photos / name)
    (photos / "notes.txt").write_text("not a picture")
    out = tmp_path / "out"
    fake = start_fake(people=sample_people())
    monkeypatch.setenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL", fake.url)
    ops = ["detect_labels", "detect_faces", "detect_text", "detect_moderation_labels"]
    args = [arg for op in ops for arg in ("--op", op)]
    ran = invoke("scan", str(photos), *args, "-o", str(out), "--log-format", "json")
    assert ran.exit_code == 0, ran.stderr
    made = invoke("report", str(out))
    assert made.exit_code == 0, made.stderr
    page = out / REPORT_FILE
    assert f"report: {page}" in made.stdout
    text = page.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(text)
    parser.close()
    assert parser.problems == [] and parser.stack == []
    assert parser.external == [] and "<script" not in text

    rows = [r for r in read_jsonl(out / "results.jsonl") if r["status"] == "ok"]
    per_label: Counter[str] = Counter()
    faces = 0
    for row in rows:
        if row["operation"] == "detect_labels":
            per_label.update({label["Name"] for label in row["result"]["Labels"]})
        if row["operation"] == "detect_faces":
            faces += len(row["result"]["FaceDetails"])
    assert per_label and faces
    # The headline and the bar chart count images per label, most frequent first.
    assert f"<strong>{len(per_label)}</strong> labels in" in text
    assert f"<strong>{faces}</strong> faces in" in text
    top, count = sorted(per_label.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    assert f'<span class="name">{top}</span>' in text
    assert f"{top} <span class='count'>in {count} images" in text
    assert 'class="bar"' in text and 'id="detect_text"' in text
    assert 'id="detect_moderation_labels"' in text and 'id="records"' in text
    images = decode_images(parser)
    assert len(images) >= 4 and parser.placeholders == []
    # Every face of the image with the most faces is boxed on its thumbnail.
    best = max(
        (r for r in rows if r["operation"] == "detect_faces"),
        key=lambda r: (len(r["result"]["FaceDetails"]), r["key"]),
    )
    assert parser.captions[0].startswith(best["key"])
    assert all(
        box_colour_near(images[0], face["BoundingBox"]) for face in best["result"]["FaceDetails"]
    )
    rgb = screenshot(page, tmp_path)
    assert distinct_colours(rgb) > 20_000, "were the thumbnails drawn?"
