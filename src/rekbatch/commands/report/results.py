"""The report's sections for the one-call operations, read from ``results.jsonl`` in one pass:
detect_faces (the images with the most faces, every face boxed), detect_labels (images per
label, a bar chart, a gallery per top label with its instances boxed), detect_text (the
images with the most lines, lines boxed and quoted) and detect_moderation_labels (counts and
keys per label; no thumbnails, so the page never shows what was flagged). Every operation of
the job also gets its record counts.

What is kept while reading is bounded (a few heaps of the best images and a counter per
label), so a large job's report needs no more memory than a small one's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rekbatch.commands.report.model import Location, View, Wanted, box_of, want

GALLERY = 24  # thumbnails for detect_faces and detect_text
TOP_LABELS = 6  # labels with a gallery
PER_LABEL = 6  # thumbnails per label gallery
BAR_LABELS = 20  # labels in the bar chart
MODERATION_KEYS = 10  # keys listed per moderation label


def _where(row: dict[str, Any]) -> Location:
    bucket = row.get("bucket")
    if isinstance(bucket, str) and bucket:
        return Location("s3", bucket, str(row["key"]))
    return Location("source", None, str(row["key"]))


def _boxes(items: Any, *path: str) -> View:
    found = []
    for item in items if isinstance(items, list) else []:
        node: Any = item
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        box = box_of(node)
        if box is not None:
            found.append(box)
    return tuple(found)


class Best:
    """The ``size`` items of highest score seen, ties in key order (a stable page). Keeps at
    most ``4 * size`` items between trims."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: list[tuple[float, str, Any]] = []

    def offer(self, score: float, key: str, item: Any) -> None:
        self._items.append((-score, key, item))
        if len(self._items) >= 4 * self.size:
            self._trim()

    def _trim(self) -> None:
        self._items.sort(key=lambda e: (e[0], e[1]))
        del self._items[self.size :]

    def best(self) -> list[Any]:
        self._trim()
        return [item for *_, item in self._items]


@dataclass
class Card:
    where: Location
    view: View
    caption: str
    extra: list[str] = field(default_factory=list)


@dataclass
class Results:
    records: dict[str, Counter[str]] = field(default_factory=dict)
    faces_images: int = 0
    faces_total: int = 0
    faces_hist: Counter[int] = field(default_factory=Counter)
    faces_best: Best = field(default_factory=lambda: Best(GALLERY))
    label_images: Counter[str] = field(default_factory=Counter)
    label_best: dict[str, Best] = field(default_factory=dict)
    labelled: int = 0
    text_images: int = 0
    text_best: Best = field(default_factory=lambda: Best(GALLERY))
    moderation_images: int = 0
    moderation_labels: Counter[str] = field(default_factory=Counter)
    moderation_keys: dict[str, list[str]] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        op = str(row.get("operation"))
        self.records.setdefault(op, Counter())[str(row.get("status"))] += 1
        result = row.get("result")
        if row.get("status") != "ok" or not isinstance(result, dict) or "key" not in row:
            return
        handler = _HANDLERS.get(op)
        if handler is not None:
            handler(self, row, result)

    def _faces(self, row: dict[str, Any], result: dict[str, Any]) -> None:
        faces = result.get("FaceDetails") or []
        n = len(faces) if isinstance(faces, list) else 0
        self.faces_hist[n] += 1
        if not n:
            return
        self.faces_images += 1
        self.faces_total += n
        caption = f"{n} face{'s' if n != 1 else ''}"
        card = Card(_where(row), _boxes(faces, "BoundingBox"), caption)
        self.faces_best.offer(n, str(row["key"]), card)

    def _labels(self, row: dict[str, Any], result: dict[str, Any]) -> None:
        labels = result.get("Labels") or []
        if labels:
            self.labelled += 1
        for label in labels if isinstance(labels, list) else []:
            if not isinstance(label, dict) or not label.get("Name"):
                continue
            name = str(label["Name"])
            self.label_images[name] += 1
            confidence = float(label.get("Confidence") or 0.0)
            card = Card(
                _where(row),
                _boxes(label.get("Instances"), "BoundingBox"),
                f"{confidence:.1f}%",
            )
            self.label_best.setdefault(name, Best(PER_LABEL)).offer(
                confidence, str(row["key"]), card
            )

    def _text(self, row: dict[str, Any], result: dict[str, Any]) -> None:
        found = result.get("TextDetections") or []
        lines = [t for t in found if isinstance(t, dict) and t.get("Type") == "LINE"]
        if not lines:
            return
        self.text_images += 1
        card = Card(
            _where(row),
            _boxes(lines, "Geometry", "BoundingBox"),
            f"{len(lines)} line{'s' if len(lines) != 1 else ''}",
            [str(t.get("DetectedText", "")) for t in lines[:3]],
        )
        self.text_best.offer(len(lines), str(row["key"]), card)

    def _moderation(self, row: dict[str, Any], result: dict[str, Any]) -> None:
        labels = result.get("ModerationLabels") or []
        names = set()
        for label in labels if isinstance(labels, list) else []:
            if isinstance(label, dict) and label.get("Name"):
                parent = label.get("ParentName")
                names.add(f"{parent} / {label['Name']}" if parent else str(label["Name"]))
        if not names:
            return
        self.moderation_images += 1
        for name in names:
            self.moderation_labels[name] += 1
            keys = self.moderation_keys.setdefault(name, [])
            if len(keys) < MODERATION_KEYS:
                keys.append(_where(row).label)


_HANDLERS: dict[str, Callable[[Results, dict[str, Any], dict[str, Any]], None]] = {
    "detect_faces": Results._faces,
    "detect_labels": Results._labels,
    "detect_text": Results._text,
    "detect_moderation_labels": Results._moderation,
}


def read_results(path: Path) -> Results:
    """The current rows of a job's results.jsonl (``sinks/current.py``)."""
    from rekbatch.sinks.current import current_lines

    results = Results()
    for raw in current_lines(path.parent):
        line = raw.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed run; the ledger has the truth
        if isinstance(row, dict):
            results.add(row)
    return results


@dataclass(frozen=True)
class LabelGallery:
    name: str
    images: int
    cards: list[Card]


@dataclass(frozen=True)
class Bar:
    name: str
    images: int
    width: float  # percent of the most frequent label's bar


@dataclass
class Sections:
    """What the results part of a report shows, in the order of the page, and the
    thumbnails it needs."""

    results: Results

    def wanted(self) -> dict[Location, Wanted]:
        wanted: dict[Location, Wanted] = {}
        r = self.results
        cards = [*r.faces_best.best(), *r.text_best.best()]
        for gallery in self.label_galleries():
            cards += gallery.cards
        for card in cards:
            want(wanted, card.where, card.view)
        return wanted

    def has(self, operation: str) -> bool:
        return operation in self.results.records

    def faces_images_seen(self) -> int:
        return sum(self.results.faces_hist.values())

    def faces_histogram(self) -> list[tuple[int, int]]:
        return sorted(self.results.faces_hist.items())

    def bars(self) -> list[Bar]:
        top = self.results.label_images.most_common(BAR_LABELS)
        most = top[0][1] if top else 1
        return [Bar(name, n, max(4.0, 100.0 * n / most)) for name, n in top]

    def label_galleries(self) -> list[LabelGallery]:
        r = self.results
        return [
            LabelGallery(name, n, r.label_best[name].best())
            for name, n in r.label_images.most_common(TOP_LABELS)
        ]

    def moderation(self) -> list[tuple[str, int, list[str]]]:
        """Each moderation label: images flagged and the first keys."""
        r = self.results
        return [(name, n, r.moderation_keys[name]) for name, n in r.moderation_labels.most_common()]
