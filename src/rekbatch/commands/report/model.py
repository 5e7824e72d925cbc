"""What a report shows, before any HTML: where an image lives, the boxes drawn on its
thumbnail, the face answers (a person, their references and matched images) and the rendered
thumbnails. The readers (``answers.py``, ``results.py``) build it; ``page.py`` renders it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Box = tuple[float, float, float, float]  # Left, Top, Width, Height: ratios of the image
View = tuple[Box, ...]  # the boxes drawn on one thumbnail


@dataclass(frozen=True)
class Location:
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
class Match:
    where: Location
    similarity: float | None
    box: Box | None

    @property
    def view(self) -> View:
        return view_of(self.box)


@dataclass
class Person:
    name: str
    references: list[Location]
    matched: int
    searched: int
    matches: list[Match]


@dataclass
class Answer:
    """One face operation's answer: compare_faces, search_faces, or the people ``find``
    looked up."""

    operation: str
    people: list[Person]
    threshold: float | None
    images: int
    strategy: str | None = None


@dataclass
class Thumb:
    """A rendered thumbnail (JPEG bytes and size) or the reason there is none."""

    jpeg: bytes | None = None
    width: int = 0
    height: int = 0
    error: str | None = None


Thumbs = dict[tuple[Location, View], Thumb]


@dataclass
class Wanted:
    """The views to draw of one image (each image is read once, however many it has)."""

    views: list[View] = field(default_factory=list)


def want(wanted: dict[Location, Wanted], where: Location, view: View) -> None:
    entry = wanted.setdefault(where, Wanted())
    if view not in entry.views:
        entry.views.append(view)


def view_of(box: Box | None) -> View:
    return () if box is None else (box,)


def box_of(value: Any) -> Box | None:
    """A Rekognition ``BoundingBox`` as a ``Box``; None when it is not one."""
    if not isinstance(value, dict):
        return None
    try:
        box = tuple(float(value[k]) for k in ("Left", "Top", "Width", "Height"))
    except (KeyError, TypeError, ValueError):
        return None
    return (box[0], box[1], box[2], box[3])
