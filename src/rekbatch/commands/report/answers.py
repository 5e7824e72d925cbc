"""The face answers of a job: ``summary.json`` (compare_faces, search_faces) and the people
``rekbatch find`` looked up (``find/``), read into the report's model."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from rekbatch.commands.report.model import (
    Answer,
    Location,
    Match,
    Person,
    Wanted,
    box_of,
    want,
)
from rekbatch.config import CompareFacesOp, Config, SearchFacesOp, parse_s3_uri
from rekbatch.errors import SetupError


def _similarity(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _reference_location(uri: str) -> Location:
    parsed = parse_s3_uri(uri)
    if parsed is not None:
        return Location("s3", parsed[0], parsed[1])
    return Location("path", None, uri)


def _matches(items: Any) -> list[Match]:
    out: list[Match] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            continue
        bucket = item.get("bucket")
        where = (
            Location("s3", bucket, item["key"])
            if isinstance(bucket, str) and bucket
            else Location("source", None, item["key"])
        )
        similarity = _similarity(item.get("similarity"))
        out.append(Match(where, similarity, box_of(item.get("bounding_box"))))
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


def _person(name: str, references: list[str], raw: dict[str, Any], searched: int) -> Person:
    matches = _matches(raw.get("matches"))
    return Person(
        name=name,
        references=[_reference_location(r) for r in references],
        matched=int(raw.get("images_matched", len(matches)) or 0),
        searched=searched,
        matches=matches,
    )


def _threshold(
    section: dict[str, Any], cfg: Config, kind: type[CompareFacesOp] | type[SearchFacesOp]
) -> float | None:
    """The summary's threshold, else the config's (a summary written before it was kept)."""
    threshold = _similarity(section.get("similarity_threshold"))
    return threshold if threshold is not None else _op_threshold(cfg, kind)


def summary_answers(summary: dict[str, Any], cfg: Config) -> list[Answer]:
    answers: list[Answer] = []
    compare = summary.get("compare_faces")
    if isinstance(compare, dict):
        reference = str(compare.get("reference") or "")
        images = int(compare.get("images_compared") or 0)
        name = _person_name(reference) if reference else "reference"
        person = _person(name, [reference] if reference else [], compare, images)
        threshold = _threshold(compare, cfg, CompareFacesOp)
        answers.append(Answer("compare_faces", [person], threshold, images))
    search = summary.get("search_faces")
    if isinstance(search, dict):
        images = int(search.get("images_searched") or 0)
        people: list[Person] = []
        raw_people = search.get("people")
        for name, value in raw_people.items() if isinstance(raw_people, dict) else []:
            raw: dict[str, Any] = value if isinstance(value, dict) else {}
            refs = raw.get("references")
            references = [
                r for r in (refs if isinstance(refs, list) else []) if isinstance(r, str) and r
            ]
            people.append(_person(str(name), references, raw, images))
        answers.append(
            Answer(
                "search_faces",
                people,
                _threshold(search, cfg, SearchFacesOp),
                images,
                strategy=str(search["strategy"]) if search.get("strategy") else None,
            )
        )
    return answers


def find_answers(output_dir: Path) -> list[Answer]:
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
) -> list[Answer]:
    people: list[Person] = []
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
            Person(
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
    return [Answer("find", people, threshold, images)]


def read_summary(output_dir: Path) -> dict[str, Any]:
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


def wanted_of(answers: Iterable[Answer], max_per_person: int | None) -> dict[Location, Wanted]:
    """The thumbnails the answers show: each reference plain, each shown match boxed."""
    wanted: dict[Location, Wanted] = {}
    for answer in answers:
        for person in answer.people:
            for ref in person.references:
                want(wanted, ref, ())
            for match in person.matches[:max_per_person]:
                want(wanted, match.where, match.view)
    return wanted
