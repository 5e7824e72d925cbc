"""``rekbatch report DIR``: the face answers of a job as one self-contained HTML page.

The page shows, for each person looked for (the reference of ``compare_faces``, each person
of ``search_faces``, each person ``rekbatch find`` looked up), the reference image and every
matched image as a thumbnail with the matched face boxed, captioned with its key and
similarity. Only matched images (and the references, once) are read; thumbnails are JPEG
data URIs, so ``report.html`` needs nothing else: no network, no files beside it.

Pillow draws the thumbnails; it is the optional extra ``rekbatch[report]``. They are decoded
as the run's conversions are (``sources/decoding.py``): reduced while decoding where the
format allows, within the job's ``source.max_pixels`` and ``source.convert_memory_mb``; an
image beyond them shows why in place of its thumbnail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import io
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from rekbatch import __version__
from rekbatch.config import CompareFacesOp, Config, SearchFacesOp, parse_s3_uri
from rekbatch.errors import EndpointNeverReached, EndpointUnreachable, SetupError
from rekbatch.sources.decoding import (
    MB,
    MemoryBudget,
    Plan,
    TooManyPixels,
    TooMuchMemory,
    megabytes,
    plan_header,
    return_freed_memory,
)

if TYPE_CHECKING:
    from rekbatch.commands.report_results import Sections

REPORT_FILE = "report.html"
THUMB_PX = 320  # the longest side of a thumbnail
MAX_FETCH_CONCURRENCY = 16
_BOX_COLOUR = (255, 212, 0)
_BOX_SHADOW = (0, 0, 0)
_ERROR_CHARS = 300
# A report is asked for at a terminal: S3 out of reach is said at once (one request, one
# attempt, short timeouts), and an outage while thumbnails are read stops it within
# REPORT_UNREACHABLE_SECONDS, not the run's unreachable_seconds. report.html stays as it was.
PROBE_TIMEOUT_SECONDS = 5
REPORT_UNREACHABLE_SECONDS = 15.0

Box = tuple[float, float, float, float]  # Left, Top, Width, Height: ratios of the image
View = tuple[Box, ...]  # the boxes drawn on one thumbnail


@dataclass(frozen=True)
class _Location:
    """Where an image lives: an S3 object, a key under a local source folder, or a path."""

    kind: Literal["s3", "source", "path"]
    bucket: str | None
    key: str

    @property
    def label(self) -> str:
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return self.key


@dataclass(frozen=True)
class _Match:
    where: _Location
    similarity: float | None
    box: Box | None


@dataclass
class _Person:
    name: str
    references: list[_Location]
    matched: int
    searched: int
    matches: list[_Match]


@dataclass
class _Answer:
    operation: str
    people: list[_Person]
    threshold: float | None
    images: int
    strategy: str | None = None


@dataclass
class _Thumb:
    """A rendered thumbnail (JPEG bytes and size) or the reason there is none."""

    jpeg: bytes | None = None
    width: int = 0
    height: int = 0
    error: str | None = None


Thumbs = dict[tuple["_Location", View], "_Thumb"]


@dataclass
class _Wanted:
    views: list[View] = field(default_factory=list)


def _view(box: Box | None) -> View:
    return () if box is None else (box,)


def _require_pillow() -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise SetupError(
            "rekbatch report needs Pillow to draw thumbnails: pip install 'rekbatch[report]'"
        ) from None


# -- reading summary.json -------------------------------------------------------------------


def _box(value: Any) -> Box | None:
    if not isinstance(value, dict):
        return None
    try:
        box = tuple(float(value[k]) for k in ("Left", "Top", "Width", "Height"))
    except (KeyError, TypeError, ValueError):
        return None
    return (box[0], box[1], box[2], box[3])


def _similarity(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _reference_location(uri: str) -> _Location:
    parsed = parse_s3_uri(uri)
    if parsed is not None:
        return _Location("s3", parsed[0], parsed[1])
    return _Location("path", None, uri)


def _matches(items: Any) -> list[_Match]:
    out: list[_Match] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            continue
        bucket = item.get("bucket")
        where = (
            _Location("s3", bucket, item["key"])
            if isinstance(bucket, str) and bucket
            else _Location("source", None, item["key"])
        )
        similarity = _similarity(item.get("similarity"))
        out.append(_Match(where, similarity, _box(item.get("bounding_box"))))
    # Best evidence first; ties in key order so the page is stable.
    out.sort(key=lambda m: (-(m.similarity or 0.0), m.where.label))
    return out


def _person_name(uri: str) -> str:
    name = PurePosixPath(uri.rstrip("/")).name
    stem = PurePosixPath(name).stem
    return stem or name or uri


def _op_threshold(cfg: Config, kind: type[CompareFacesOp] | type[SearchFacesOp]) -> float | None:
    for op in cfg.operations:
        if isinstance(op, kind):
            return op.similarity_threshold
    return None


def _answers(summary: dict[str, Any], cfg: Config) -> list[_Answer]:
    answers: list[_Answer] = []
    compare = summary.get("compare_faces")
    if isinstance(compare, dict):
        reference = str(compare.get("reference") or "")
        images = int(compare.get("images_compared") or 0)
        matches = _matches(compare.get("matches"))
        person = _Person(
            name=_person_name(reference) if reference else "reference",
            references=[_reference_location(reference)] if reference else [],
            matched=int(compare.get("images_matched", len(matches)) or 0),
            searched=images,
            matches=matches,
        )
        threshold = _similarity(compare.get("similarity_threshold"))
        answers.append(
            _Answer(
                "compare_faces",
                [person],
                threshold if threshold is not None else _op_threshold(cfg, CompareFacesOp),
                images,
            )
        )
    search = summary.get("search_faces")
    if isinstance(search, dict):
        images = int(search.get("images_searched") or 0)
        people: list[_Person] = []
        raw_people = search.get("people")
        for name, value in raw_people.items() if isinstance(raw_people, dict) else []:
            raw: dict[str, Any] = value if isinstance(value, dict) else {}
            refs = raw.get("references")
            matches = _matches(raw.get("matches"))
            people.append(
                _Person(
                    name=str(name),
                    references=[
                        _reference_location(r)
                        for r in (refs if isinstance(refs, list) else [])
                        if isinstance(r, str) and r
                    ],
                    matched=int(raw.get("images_matched", len(matches)) or 0),
                    searched=images,
                    matches=matches,
                )
            )
        threshold = _similarity(search.get("similarity_threshold"))
        answers.append(
            _Answer(
                "search_faces",
                people,
                threshold if threshold is not None else _op_threshold(cfg, SearchFacesOp),
                images,
                strategy=str(search["strategy"]) if search.get("strategy") else None,
            )
        )
    return answers


def _find_answers(output_dir: Path) -> list[_Answer]:
    """The people ``rekbatch find`` looked up (``find/summary.json`` and each person's
    ``find/NAME.jsonl``); unreadable files are left out, and so are the photos found then
    that changed or were removed since (their current row no longer names the face)."""
    try:
        found = json.loads((output_dir / "find" / "summary.json").read_text(encoding="utf-8"))
        raw_people = found["people"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    with _still_found(output_dir) as current:
        return _found_people(output_dir, raw_people, current)


@contextlib.contextmanager
def _still_found(output_dir: Path) -> Iterator[Callable[[dict[str, Any]], bool]]:
    """Whether a row of ``find/NAME.jsonl`` still holds, by the job's ledger (every row
    holds where the job has no ledger)."""
    from rekbatch.commands.find import Resolver

    try:
        resolver = Resolver(output_dir)
    except (SetupError, OSError, sqlite3.Error):
        yield lambda row: True
        return
    try:
        yield lambda row: resolver.still_found(
            str(row.get("source")),
            str(row.get("key")),
            str(row["face_id"]) if row.get("face_id") else None,
        )
    finally:
        resolver.close()


def _found_people(
    output_dir: Path, raw_people: Any, current: Callable[[dict[str, Any]], bool]
) -> list[_Answer]:
    people: list[_Person] = []
    thresholds: set[float] = set()
    images = 0
    for name, raw in raw_people.items() if isinstance(raw_people, dict) else []:
        if not isinstance(raw, dict):
            continue
        try:
            lines = (output_dir / str(raw.get("matches_file"))).read_text(encoding="utf-8")
            rows = [json.loads(line) for line in lines.splitlines() if line.strip()]
        except (OSError, ValueError):
            continue
        matches = _matches([row for row in rows if isinstance(row, dict) and current(row)])
        searched = int(raw.get("images_searched") or 0)
        images = max(images, searched)
        threshold = _similarity(raw.get("similarity_threshold"))
        if threshold is not None:
            thresholds.add(threshold)
        reference = raw.get("reference")
        people.append(
            _Person(
                name=str(name),
                references=[_reference_location(reference)] if isinstance(reference, str) else [],
                matched=len(matches),
                searched=searched,
                matches=matches,
            )
        )
    if not people:
        return []
    threshold = thresholds.pop() if len(thresholds) == 1 else None
    return [_Answer("find", people, threshold, images)]


def _read_summary(output_dir: Path) -> dict[str, Any]:
    path = output_dir / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetupError(f"{output_dir}: no summary.json; run the job first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SetupError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise SetupError(f"{path}: not a rekbatch summary")
    return data


# -- fetching and drawing -------------------------------------------------------------------


def _local_roots(cfg: Config) -> list[Path]:
    roots = [Path(uri).expanduser() for uri in cfg.source.uris if parse_s3_uri(uri) is None]
    # A single-file source lists its file by name, under the file's folder.
    return [root.parent if root.is_file() else root for root in roots]


def _read_path(path: str) -> bytes:
    return Path(path).expanduser().read_bytes()


def _read_under_roots(roots: list[Path], key: str) -> bytes:
    rel = PurePosixPath(key)
    if not key or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"not a key inside a source folder: {key!r}")
    if not roots:
        raise FileNotFoundError("no local folder among source.uris")
    for root in roots:
        path = root.joinpath(*rel.parts)
        if path.is_file():
            return path.read_bytes()
    where = ", ".join(str(r) for r in roots)
    raise FileNotFoundError(f"not found under {where}")


def _describe(exc: BaseException) -> str:
    import botocore.exceptions as bexc

    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "ClientError")
        message = str(error.get("Message") or "")
        text = f"{code}: {message}" if message and message != code else code
    elif isinstance(exc, FileNotFoundError):
        text = f"file not found: {exc.filename}" if exc.filename else str(exc) or "not found"
    elif type(exc).__name__ == "UnidentifiedImageError":
        text = "not an image Pillow can read"
    elif isinstance(exc, TooMuchMemory):
        text = (
            f"too large to draw: {exc.plan.describe()} needs about {megabytes(exc.plan.peak)}"
            f" to decode, more than source.convert_memory_mb ({exc.limit // MB:,} MB)"
        )
    elif isinstance(exc, TooManyPixels):
        text = f"too large to draw: {exc}, more than source.max_pixels"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"


def _render(
    data: bytes, views: list[View], limit: int | None = None, max_pixels: int | None = None
) -> list[_Thumb]:
    """One thumbnail per view (its boxes drawn), drawn on the orientation-corrected image (the frame
    Rekognition's bounding boxes refer to); decoding holds at most ``limit`` bytes."""
    from PIL import Image, ImageDraw

    from rekbatch.sources.convert import heif_available
    from rekbatch.sources.decoding import decode_fitted

    heif_available()
    image, _, _ = decode_fitted(
        data, THUMB_PX, limit=limit, max_pixels=max_pixels, resample=Image.Resampling.LANCZOS
    )
    image = image.convert("RGB")
    width, height = image.size
    thumbs: list[_Thumb] = []
    for view in views:
        canvas = image.copy()
        for box in view:
            left, top, box_w, box_h = box
            x0 = min(max(round(left * width), 0), width - 1)
            y0 = min(max(round(top * height), 0), height - 1)
            x1 = min(max(round((left + box_w) * width), x0 + 1), width - 1)
            y1 = min(max(round((top + box_h) * height), y0 + 1), height - 1)
            draw = ImageDraw.Draw(canvas)
            # A dark rim under a bright line stays visible on light and dark faces alike.
            draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=_BOX_SHADOW, width=5)
            draw.rectangle((x0, y0, x1, y1), outline=_BOX_COLOUR, width=3)
        out = io.BytesIO()
        canvas.save(out, "JPEG", quality=85, optimize=True)
        thumbs.append(_Thumb(out.getvalue(), width, height))
    return thumbs


def _plan(data: bytes) -> Plan | None:
    from rekbatch.sources.convert import heif_available

    heif_available()
    return plan_header(data, THUMB_PX)


class _Fetcher:
    """Reads each image once (bounded concurrency) and renders all thumbnails asked of it."""

    def __init__(self, cfg: Config, read_s3: Callable[[str, str], Awaitable[bytes]] | None) -> None:
        self._roots = _local_roots(cfg)
        self._read_s3 = read_s3
        limit = max(1, min(cfg.limits.concurrency, MAX_FETCH_CONCURRENCY))
        self._sem = asyncio.Semaphore(limit)
        self._memory = MemoryBudget(cfg.source.convert_memory_mb * MB)
        return_freed_memory()
        self._max_pixels = cfg.source.max_pixels

    async def _read(self, where: _Location) -> bytes:
        if where.kind == "s3":
            if self._read_s3 is None or where.bucket is None:
                raise RuntimeError("no S3 client")
            return await self._read_s3(where.bucket, where.key)
        if where.kind == "path":
            return await asyncio.to_thread(_read_path, where.key)
        return await asyncio.to_thread(_read_under_roots, self._roots, where.key)

    async def thumbs(self, where: _Location, views: list[View]) -> list[_Thumb]:
        async with self._sem:
            try:
                data = await self._read(where)
                return await self._draw(data, views)
            except (EndpointUnreachable, EndpointNeverReached):
                raise  # no page whose every image says so: the report stops
            except Exception as exc:  # shown on the page in place of the image
                message = _describe(exc)
                return [_Thumb(error=message) for _ in views]

    async def _draw(self, data: bytes, views: list[View]) -> list[_Thumb]:
        """The thumbnails, decoded within the job's memory budget: planned from the header,
        then drawn holding the plan's bytes (an image needing more than the whole budget
        is not decoded; its frame says so)."""
        plan = await asyncio.to_thread(_plan, data)
        memory = self._memory
        # Without a plan (a header Pillow cannot read) it decodes alone, if at all.
        need = memory.total if plan is None else plan.peak + len(data)
        if plan is not None and not memory.fits(need):
            raise TooMuchMemory(plan, memory.total)
        async with memory.hold(need):
            limit = max(0, need - len(data))
            return await asyncio.to_thread(_render, data, views, limit, self._max_pixels)

    async def all(self, wanted: dict[_Location, _Wanted]) -> Thumbs:
        items = list(wanted.items())
        tasks = [asyncio.ensure_future(self.thumbs(where, w.views)) for where, w in items]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out: Thumbs = {}
        for (where, w), thumbs in zip(items, results, strict=True):
            for view, thumb in zip(w.views, thumbs, strict=True):
                out[(where, view)] = thumb
        return out


def want(wanted: dict[_Location, _Wanted], where: _Location, view: View) -> None:
    entry = wanted.setdefault(where, _Wanted())
    if view not in entry.views:
        entry.views.append(view)


def _wanted(answers: Iterable[_Answer], max_per_person: int | None) -> dict[_Location, _Wanted]:
    wanted: dict[_Location, _Wanted] = {}
    for answer in answers:
        for person in answer.people:
            for ref in person.references:
                want(wanted, ref, ())
            for match in person.matches[:max_per_person]:
                want(wanted, match.where, _view(match.box))
    return wanted


# -- the page -------------------------------------------------------------------------------

_CSS = """
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2129; --muted: #5f6672; --line: #dde1e7;
  --accent: #0a66c2; --ref: #7c4dff; --ok: #137333; --frame: #e9ecf1; }
* { box-sizing: border-box; }
html { background: var(--bg); }
body { margin: 0; color: var(--ink); line-height: 1.4;
  font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.top { background: var(--card); border-bottom: 1px solid var(--line); padding: 22px 32px 18px; }
.top h1 { margin: 0 0 4px; font-size: 24px; font-weight: 650; letter-spacing: -.01em; }
.top .kind { margin: 0; color: var(--muted); font-size: 13px; text-transform: uppercase;
  letter-spacing: .06em; }
.answer { margin: 10px 0 14px; font-size: 19px; }
.answer strong { color: var(--ok); }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 0; }
.facts div { display: flex; gap: 6px; align-items: baseline; }
.facts dt { color: var(--muted); font-size: 13px; }
.facts dd { margin: 0; font-weight: 600; font-size: 14px; }
main { padding: 8px 32px 32px; }
.person { margin-top: 22px; }
.person h2 { margin: 0 0 12px; font-size: 20px; display: flex; flex-wrap: wrap;
  align-items: baseline; gap: 4px 12px; }
.person h2 .count { font-size: 14px; font-weight: 500; color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 16px;
  align-items: start; }
.card { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  overflow: hidden; box-shadow: 0 1px 2px rgba(20, 30, 50, .06); display: flex;
  flex-direction: column; }
.card.ref { border-color: var(--ref); box-shadow: 0 0 0 1px var(--ref); }
.card.ref figcaption { flex-direction: column; align-items: flex-start; gap: 4px; }
.frame { aspect-ratio: 1 / 1; background: var(--frame); display: flex; align-items: center;
  justify-content: center; }
.frame img { display: block; max-width: 100%; max-height: 100%; width: auto; height: auto; }
.placeholder { padding: 16px; text-align: center; color: #a50e0e; font-size: 13px;
  overflow-wrap: anywhere; }
.placeholder b { display: block; margin-bottom: 6px; font-size: 14px; }
figcaption { padding: 8px 12px 10px; display: flex; gap: 8px; align-items: baseline;
  justify-content: space-between; border-top: 1px solid var(--line); }
.key { font: 13px/1.35 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  overflow-wrap: anywhere; min-width: 0; }
.sim { font-weight: 700; color: var(--ok); white-space: nowrap; }
.tag { font-size: 11px; font-weight: 700; color: #fff; background: var(--ref);
  border-radius: 4px; padding: 1px 6px; text-transform: uppercase; letter-spacing: .05em;
  white-space: nowrap; }
.none, .more { color: var(--muted); margin: 10px 0 0; }
footer { padding: 0 32px 28px; color: var(--muted); font-size: 12px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _frame(thumb: _Thumb | None, alt: str) -> str:
    if thumb is None or thumb.jpeg is None:
        error = thumb.error if thumb is not None else "not rendered"
        return (
            '<div class="frame"><div class="placeholder" role="img" '
            f'aria-label="{_e(alt)}"><b>Image unavailable</b>{_e(error)}</div></div>'
        )
    data = base64.b64encode(thumb.jpeg).decode("ascii")
    return (
        f'<div class="frame"><img src="data:image/jpeg;base64,{data}" '
        f'width="{thumb.width}" height="{thumb.height}" alt="{_e(alt)}"></div>'
    )


def _person_html(
    person: _Person,
    index: int,
    thumbs: Thumbs,
    max_per_person: int | None,
) -> str:
    parts = [f'<section class="person" id="person-{index}">']
    found = (
        f"found in {person.matched} of {_plural(person.searched, 'image')}"
        if person.matched
        else f"not found in any of {_plural(person.searched, 'image')}"
    )
    parts.append(f'<h2>{_e(person.name)} <span class="count">{_e(found)}</span></h2>')
    parts.append('<div class="grid">')
    for ref in person.references:
        parts.append(
            f'<figure class="card ref" title="{_e(ref.label)}">'
            f"{_frame(thumbs.get((ref, ())), f'reference image of {person.name}')}"
            '<figcaption><span class="tag">reference</span>'
            f'<span class="key">{_e(ref.label)}</span></figcaption></figure>'
        )
    shown = person.matches[:max_per_person]
    for match in shown:
        similarity = "n/a" if match.similarity is None else f"{match.similarity:.1f}%"
        alt = f"{person.name} in {match.where.label}"
        parts.append(
            f'<figure class="card match" title="{_e(match.where.label)}">'
            f"{_frame(thumbs.get((match.where, _view(match.box))), alt)}"
            f'<figcaption><span class="key">{_e(match.where.label)}</span>'
            f'<span class="sim">{_e(similarity)}</span></figcaption></figure>'
        )
    parts.append("</div>")
    if not person.matches:
        parts.append('<p class="none">No matched image.</p>')
    elif len(shown) < len(person.matches):
        parts.append(
            f'<p class="more">Showing the best {len(shown)} of {len(person.matches)} '
            "matches; all matched keys are in summary.json.</p>"
        )
    parts.append("</section>")
    return "".join(parts)


def _headline(answer: _Answer) -> str:
    images = _e(_plural(answer.images, "image"))
    if answer.operation == "compare_faces" and answer.people:
        person = answer.people[0]
        return f"Reference face found in <strong>{person.matched}</strong> of {images}"
    found = sum(1 for p in answer.people if p.matched)
    people = "person" if len(answer.people) == 1 else "people"
    return f"<strong>{found}</strong> of {len(answer.people)} {people} found in {images}"


def _page(
    job: str,
    answers: list[_Answer],
    thumbs: Thumbs,
    generated: datetime,
    max_per_person: int | None,
    sections: Sections | None = None,
) -> str:
    from rekbatch.commands.report_results import EXTRA_CSS

    stamp = generated.strftime("%Y-%m-%d %H:%M:%S UTC")
    kind = "rekbatch face report" if sections is None else "rekbatch report"
    out = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="rekbatch">\n'
        f"<title>{_e(job)}: {kind}</title>\n<style>{_CSS}{EXTRA_CSS}</style>\n</head>\n"
        '<body>\n<header class="top">'
        f'<p class="kind">{kind}</p>'
        f"<h1>{_e(job)}</h1>"
    ]
    for line in sections.headlines() if sections is not None else []:
        out.append(f'<p class="answer">{line}</p>')
    for answer in answers:
        facts = [("Operation", answer.operation)]
        if answer.strategy:
            facts.append(("Strategy", answer.strategy))
        facts.append(("Similarity threshold", _number(answer.threshold)))
        if answer.operation == "compare_faces" and answer.people:
            matched = answer.people[0].matched
            facts.append(("Matched", str(matched)))
            facts.append(("Not matched", str(max(0, answer.images - matched))))
        facts.append(("Generated", stamp))
        facts_html = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts)
        out.append(f'<p class="answer">{_headline(answer)}</p><dl class="facts">{facts_html}</dl>')
    out.append("</header>\n<main>\n")
    index = 0
    for answer in answers:
        for person in answer.people:
            index += 1
            out.append(_person_html(person, index, thumbs, max_per_person) + "\n")
    if sections is not None:
        out.append(sections.html(thumbs) + "\n")
    out.append(
        f"</main>\n<footer>Generated by rekbatch {_e(__version__)} on {_e(stamp)}. "
        "Boxes mark what was found (the face that matched, faces, label instances, lines of "
        "text); similarity and confidence are on Rekognition's 0-100 scale.</footer>\n"
        "</body>\n</html>\n"
    )
    return "".join(out)


# -- entry point ----------------------------------------------------------------------------


def _out_of_reach(cfg: Config, detail: str) -> SetupError:
    where = cfg.aws.s3_endpoint_url or f"AWS in {cfg.aws.region}"
    detail = " ".join(detail.split())
    return SetupError(
        f"report: S3 is out of reach at {where} ({detail}); {REPORT_FILE} was left as it was"
    )


async def _probe_s3(session: Any, cfg: Config, where: _Location) -> None:
    """One request for one of the images, before any other: a ``SetupError`` at once when
    S3 cannot be reached. Any other answer (a missing object) is left to its thumbnail."""
    from aiobotocore.config import AioConfig

    from rekbatch.calls.classify import failure_of

    config = AioConfig(
        retries={"mode": "standard", "max_attempts": 1},
        connect_timeout=PROBE_TIMEOUT_SECONDS,
        read_timeout=PROBE_TIMEOUT_SECONDS * 2,
    )
    async with session.client("s3", endpoint_url=cfg.aws.s3_endpoint_url, config=config) as s3:
        try:
            await s3.head_object(Bucket=where.bucket, Key=where.key)
        except Exception as exc:
            failure = failure_of(exc)
            if failure is not None and failure.connection is not None:
                raise _out_of_reach(cfg, f"{failure.code}: {failure.message}") from None


async def build_report(output_dir: Path, cfg: Config, *, max_per_person: int | None = None) -> Path:
    """Write ``output_dir/report.html`` from the job's ``summary.json``; return its path.

    ``max_per_person`` caps the thumbnails per person (best similarity first); None shows all.
    Raises ``SetupError`` when Pillow is missing or the directory holds no face answer.
    """
    from rekbatch.commands.report_results import Sections, read_results

    _require_pillow()
    output_dir = Path(output_dir)
    summary = _read_summary(output_dir)
    answers = _answers(summary, cfg) + _find_answers(output_dir)
    results_path = output_dir / "results.jsonl"
    sections = None
    if results_path.exists():
        sections = Sections(await asyncio.to_thread(read_results, results_path))
        if not sections.results.records:
            sections = None
    if not answers and sections is None:
        raise SetupError(f"{output_dir}: no results to show (results.jsonl holds no record)")
    if max_per_person is not None and max_per_person < 1:
        raise ValueError("max_per_person must be at least 1")
    wanted = _wanted(answers, max_per_person)
    if sections is not None:
        for where, entry in sections.wanted().items():
            for view in entry.views:
                want(wanted, where, view)
    needs_s3 = any(where.kind == "s3" for where in wanted)
    if needs_s3:
        import aioboto3

        from rekbatch.sources import S3

        session = aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region)
        await _probe_s3(session, cfg, next(w for w in wanted if w.kind == "s3"))
        pool = min(cfg.limits.concurrency, MAX_FETCH_CONCURRENCY) + 4
        async with S3(
            session,
            endpoint_url=cfg.aws.s3_endpoint_url,
            pool=pool,
            unreachable_seconds=REPORT_UNREACHABLE_SECONDS,
        ) as s3:
            try:
                thumbs = await _Fetcher(cfg, s3.read).all(wanted)
            except (EndpointUnreachable, EndpointNeverReached) as exc:
                raise _out_of_reach(cfg, str(exc)) from None
    else:
        thumbs = await _Fetcher(cfg, None).all(wanted)
    job = str(summary.get("job") or cfg.job.name)
    page = _page(job, answers, thumbs, datetime.now(UTC), max_per_person, sections)
    target = output_dir / REPORT_FILE
    tmp = target.with_name(f".{REPORT_FILE}.{os.getpid()}.tmp")
    await asyncio.to_thread(tmp.write_text, page, encoding="utf-8")
    os.replace(tmp, target)
    return target
