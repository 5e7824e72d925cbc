"""The flattened columns of a result: one definition for results.csv, the ledger and Parquet.

``summarize(operation, result)`` is pure: the same stored result always gives the same
columns, so a row replayed from results.jsonl after a crash is summarised exactly as it was
when its call returned.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# The flattened columns of results.csv, in order. Each operation fills those that apply.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "face_count",
    "labels",
    "best_similarity",
    "matched",
    "match_box",
    "text",
    "moderation_labels",
    "celebrities",
    "person_count",
    "people",
    "dedup_of",
)

Summary = dict[str, Any]


def _names(items: list[dict[str, Any]], key: str = "Name") -> str:
    return ";".join(str(item.get(key, "")) for item in items)


def box_text(box: dict[str, Any] | None) -> str | None:
    """A BoundingBox as the ledger and CSV keep it: ``left,top,width,height``."""
    if not box:
        return None
    return ",".join(f"{float(box.get(k, 0.0)):.4f}" for k in ("Left", "Top", "Width", "Height"))


def box_dict(text: str | None) -> dict[str, float] | None:
    """The inverse of ``box_text``."""
    if not text:
        return None
    left, top, width, height = (float(v) for v in text.split(","))
    return {"Left": left, "Top": top, "Width": width, "Height": height}


def _faces(result: dict[str, Any]) -> Summary:
    return {"face_count": len(result.get("FaceDetails", []))}


def _labels(result: dict[str, Any]) -> Summary:
    return {"labels": _names(result.get("Labels", []))}


def compare_summary(result: dict[str, Any]) -> Summary:
    matches = result.get("FaceMatches", [])
    unmatched = result.get("UnmatchedFaces", [])
    best = max(matches, key=lambda m: float(m.get("Similarity", 0.0)), default=None)
    return {
        "face_count": len(matches) + len(unmatched),
        "best_similarity": round(float(best["Similarity"]), 3) if best else None,
        "matched": bool(matches),
        "match_box": box_text(best.get("Face", {}).get("BoundingBox")) if best else None,
    }


def _text(result: dict[str, Any]) -> Summary:
    lines = [d for d in result.get("TextDetections", []) if d.get("Type") == "LINE"]
    return {"text": " | ".join(str(d.get("DetectedText", "")) for d in lines)}


def _moderation(result: dict[str, Any]) -> Summary:
    return {"moderation_labels": _names(result.get("ModerationLabels", []))}


def _celebrities(result: dict[str, Any]) -> Summary:
    celebs = result.get("CelebrityFaces", [])
    return {
        "celebrities": _names(celebs),
        "face_count": len(celebs) + len(result.get("UnrecognizedFaces", [])),
    }


def _ppe(result: dict[str, Any]) -> Summary:
    return {"person_count": len(result.get("Persons", []))}


def search_summary(result: dict[str, Any]) -> Summary:
    """search_faces: the compare strategy's per-person answer, or the faces the collection
    strategy indexed. ``detail`` is what the ledger keeps to answer the search: the matches
    by person (compare), or ``collection/external id`` (collection)."""
    if result.get("Strategy") == "compare":
        people = result.get("People", {})
        found = {p: v for p, v in people.items() if isinstance(v, dict) and v.get("Matched")}
        return {
            "face_count": result.get("FaceCount"),
            "people": ";".join(sorted(found)),
            "matched": bool(found),
            "best_similarity": max(
                (float(v["Similarity"]) for v in found.values() if v.get("Similarity")),
                default=None,
            ),
            "detail": json.dumps(
                {p: [v.get("Similarity"), v.get("BoundingBox")] for p, v in found.items()},
                separators=(",", ":"),
                sort_keys=True,
            ),
            "billed": result.get("Calls", 1),
        }
    return collection_summary(result)


def collection_summary(result: dict[str, Any]) -> Summary:
    """IndexFaces (index_faces, and search_faces' collection strategy): the faces indexed,
    and ``detail`` = ``collection/external image id``, by which a search's matches are
    mapped back to the objects (and their copies) in the ledger."""
    records = result.get("FaceRecords", [])
    collection = result.get("CollectionId")
    external = next(
        (r.get("Face", {}).get("ExternalImageId") for r in records if r.get("Face")), None
    )
    detail = f"{collection}/{external}" if collection and external else None
    return {"face_count": len(records), "detail": detail}


def indexed_face_ids(result: dict[str, Any] | None) -> list[str]:
    """The FaceIds an IndexFaces result put into its collection (a copy's result names its
    original's)."""
    if not isinstance(result, dict):
        return []
    records = result.get("FaceRecords")
    return [
        str(face["FaceId"])
        for record in (records if isinstance(records, list) else [])
        if isinstance(record, dict)
        and isinstance(face := record.get("Face"), dict)
        and face.get("FaceId")
    ]


SUMMARIZERS: dict[str, Callable[[dict[str, Any]], Summary]] = {
    "detect_faces": _faces,
    "detect_labels": _labels,
    "compare_faces": compare_summary,
    "detect_text": _text,
    "detect_moderation_labels": _moderation,
    "recognize_celebrities": _celebrities,
    "detect_protective_equipment": _ppe,
    "search_faces": search_summary,
    "index_faces": collection_summary,
}


def summarize(operation: str, result: dict[str, Any] | None) -> Summary:
    """The summary columns (and ledger ``detail``) of one stored result; {} when none."""
    summarizer = SUMMARIZERS.get(operation)
    if result is None or summarizer is None:
        return {}
    return summarizer(result)
