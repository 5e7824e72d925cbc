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
from html import escape
from pathlib import Path
from typing import Any

from rekbatch.commands.report import (
    Thumbs,
    View,
    _box,
    _frame,
    _Location,
    _Wanted,
    want,
)

GALLERY = 24  # thumbnails for detect_faces and detect_text
TOP_LABELS = 6  # labels with a gallery
PER_LABEL = 6  # thumbnails per label gallery
BAR_LABELS = 20  # labels in the bar chart
MODERATION_KEYS = 10  # keys listed per moderation label

EXTRA_CSS = """
.op { margin-top: 30px; }
.op h2 { margin: 0 0 6px; font-size: 20px; }
.op .lead { margin: 0 0 14px; color: var(--muted); }
.op h3 { margin: 18px 0 10px; font-size: 16px; }
table.counts { border-collapse: collapse; margin: 6px 0 10px; background: var(--card); }
table.counts th, table.counts td { border: 1px solid var(--line); padding: 4px 10px;
  text-align: left; font-size: 14px; }
table.counts td.n { text-align: right; font-variant-numeric: tabular-nums; }
.bars { display: grid; grid-template-columns: minmax(120px, max-content) 1fr; gap: 4px 12px;
  align-items: center; max-width: 900px; }
.bars .name { font-size: 14px; overflow-wrap: anywhere; }
.bars .bar { background: var(--accent); height: 16px; border-radius: 3px; color: #fff;
  font-size: 11px; padding-left: 6px; line-height: 16px; min-width: 28px; }
.lines { margin: 4px 0 0; padding: 0; list-style: none; font-size: 12px; color: var(--muted);
  overflow-wrap: anywhere; }
ul.keys { margin: 4px 0 12px; font: 13px/1.5 ui-monospace, Menlo, Consolas, monospace; }
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _where(row: dict[str, Any]) -> _Location:
    bucket = row.get("bucket")
    if isinstance(bucket, str) and bucket:
        return _Location("s3", bucket, str(row["key"]))
    return _Location("source", None, str(row["key"]))


def _boxes(items: Any, *path: str) -> View:
    found = []
    for item in items if isinstance(items, list) else []:
        node: Any = item
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        box = _box(node)
        if box is not None:
            found.append(box)
    return tuple(found)


class _Best:
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
class _Card:
    where: _Location
    view: View
    caption: str
    extra: list[str] = field(default_factory=list)


@dataclass
class _Results:
    records: dict[str, Counter[str]] = field(default_factory=dict)
    faces_images: int = 0
    faces_total: int = 0
    faces_hist: Counter[int] = field(default_factory=Counter)
    faces_best: _Best = field(default_factory=lambda: _Best(GALLERY))
    label_images: Counter[str] = field(default_factory=Counter)
    label_best: dict[str, _Best] = field(default_factory=dict)
    labelled: int = 0
    text_images: int = 0
    text_best: _Best = field(default_factory=lambda: _Best(GALLERY))
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
        card = _Card(_where(row), _boxes(faces, "BoundingBox"), caption)
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
            card = _Card(
                _where(row),
                _boxes(label.get("Instances"), "BoundingBox"),
                f"{confidence:.1f}%",
            )
            self.label_best.setdefault(name, _Best(PER_LABEL)).offer(
                confidence, str(row["key"]), card
            )

    def _text(self, row: dict[str, Any], result: dict[str, Any]) -> None:
        found = result.get("TextDetections") or []
        lines = [t for t in found if isinstance(t, dict) and t.get("Type") == "LINE"]
        if not lines:
            return
        self.text_images += 1
        card = _Card(
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


_HANDLERS: dict[str, Callable[[_Results, dict[str, Any], dict[str, Any]], None]] = {
    "detect_faces": _Results._faces,
    "detect_labels": _Results._labels,
    "detect_text": _Results._text,
    "detect_moderation_labels": _Results._moderation,
}


def read_results(path: Path) -> _Results:
    """The current rows of a job's results.jsonl (``sinks/current.py``)."""
    from rekbatch.sinks.current import current_lines

    results = _Results()
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


@dataclass
class Sections:
    """The sections of a report's results part: what to fetch, and the HTML once fetched."""

    results: _Results

    def wanted(self) -> dict[_Location, _Wanted]:
        wanted: dict[_Location, _Wanted] = {}
        for card in self._cards():
            want(wanted, card.where, card.view)
        return wanted

    def _cards(self) -> list[_Card]:
        r = self.results
        cards = [*r.faces_best.best(), *r.text_best.best()]
        for name, _ in r.label_images.most_common(TOP_LABELS):
            cards += r.label_best[name].best()
        return cards

    def headlines(self) -> list[str]:
        r = self.results
        out = []
        if "detect_faces" in r.records:
            out.append(
                f"<strong>{r.faces_total}</strong> faces in <strong>{r.faces_images}</strong> "
                f"of {sum(r.faces_hist.values())} images"
            )
        if "detect_labels" in r.records:
            out.append(f"<strong>{len(r.label_images)}</strong> labels in {r.labelled} images")
        if "detect_text" in r.records:
            out.append(f"Text in <strong>{r.text_images}</strong> images")
        if "detect_moderation_labels" in r.records:
            noun = "image" if r.moderation_images == 1 else "images"
            out.append(f"<strong>{r.moderation_images}</strong> {noun} flagged by moderation")
        return out

    def html(self, thumbs: Thumbs) -> str:
        r = self.results
        parts: list[str] = []
        if "detect_faces" in r.records:
            parts.append(self._faces_html(thumbs))
        if "detect_labels" in r.records:
            parts.append(self._labels_html(thumbs))
        if "detect_text" in r.records:
            parts.append(self._text_html(thumbs))
        if "detect_moderation_labels" in r.records:
            parts.append(self._moderation_html())
        parts.append(self._records_html())
        return "\n".join(parts)

    @staticmethod
    def _grid(cards: list[_Card], thumbs: Thumbs) -> str:
        out = ['<div class="grid">']
        for card in cards:
            lines = "".join(f"<li>{_e(text)}</li>" for text in card.extra)
            extra = f'<ul class="lines">{lines}</ul>' if lines else ""
            out.append(
                f'<figure class="card" title="{_e(card.where.label)}">'
                f"{_frame(thumbs.get((card.where, card.view)), card.where.label)}"
                f'<figcaption><span class="key">{_e(card.where.label)}{extra}</span>'
                f'<span class="sim">{_e(card.caption)}</span></figcaption></figure>'
            )
        out.append("</div>")
        return "".join(out)

    def _faces_html(self, thumbs: Thumbs) -> str:
        r = self.results
        hist = "".join(
            f"<tr><td>{n}</td><td class='n'>{count}</td></tr>"
            for n, count in sorted(r.faces_hist.items())
        )
        best = r.faces_best.best()
        return (
            '<section class="op" id="detect_faces"><h2>detect_faces</h2>'
            f'<p class="lead">{r.faces_total} faces in {r.faces_images} images; the '
            f"{len(best)} with the most faces, every face boxed.</p>"
            '<table class="counts"><tr><th>faces</th><th>images</th></tr>'
            f"{hist}</table>{self._grid(best, thumbs)}</section>"
        )

    def _labels_html(self, thumbs: Thumbs) -> str:
        r = self.results
        top = r.label_images.most_common(BAR_LABELS)
        most = top[0][1] if top else 1
        bars = "".join(
            f'<span class="name">{_e(name)}</span>'
            f'<div class="bar" style="width:{max(4.0, 100.0 * n / most):.1f}%">{n}</div>'
            for name, n in top
        )
        parts = [
            '<section class="op" id="detect_labels"><h2>detect_labels</h2>',
            f'<p class="lead">{len(r.label_images)} labels in {r.labelled} images; images '
            f"per label, the {len(top)} most frequent:</p>",
            f'<div class="bars" role="list">{bars}</div>' if top else "<p>No label.</p>",
        ]
        for name, n in r.label_images.most_common(TOP_LABELS):
            cards = r.label_best[name].best()
            parts.append(
                f"<h3>{_e(name)} <span class='count'>in {n} images; the {len(cards)} most "
                "confident</span></h3>"
            )
            parts.append(self._grid(cards, thumbs))
        parts.append("</section>")
        return "".join(parts)

    def _text_html(self, thumbs: Thumbs) -> str:
        r = self.results
        best = r.text_best.best()
        return (
            '<section class="op" id="detect_text"><h2>detect_text</h2>'
            f'<p class="lead">Text in {r.text_images} images; the {len(best)} with the most '
            f"lines, lines boxed.</p>{self._grid(best, thumbs)}</section>"
        )

    def _moderation_html(self) -> str:
        r = self.results
        rows = "".join(
            f"<tr><td>{_e(name)}</td><td class='n'>{n}</td></tr>"
            for name, n in r.moderation_labels.most_common()
        )
        lists = "".join(
            f"<h3>{_e(name)}</h3><ul class='keys'>"
            + "".join(f"<li>{_e(key)}</li>" for key in r.moderation_keys[name])
            + "</ul>"
            for name, _ in r.moderation_labels.most_common()
        )
        return (
            '<section class="op" id="detect_moderation_labels"><h2>detect_moderation_labels'
            f'</h2><p class="lead">{r.moderation_images} images flagged. Keys only: the page '
            "shows none of the flagged images.</p>"
            '<table class="counts"><tr><th>label</th><th>images</th></tr>'
            f"{rows}</table>{lists}</section>"
        )

    def _records_html(self) -> str:
        rows = "".join(
            f"<tr><td>{_e(op)}</td>"
            + "".join(
                f"<td class='n'>{counts.get(status, 0)}</td>"
                for status in ("ok", "failed", "skipped")
            )
            + "</tr>"
            for op, counts in self.results.records.items()
        )
        return (
            '<section class="op" id="records"><h2>Records</h2>'
            '<table class="counts"><tr><th>operation</th><th>ok</th><th>failed</th>'
            f"<th>skipped</th></tr>{rows}</table></section>"
        )
