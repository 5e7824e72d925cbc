"""What each configured operation asks of Rekognition and how its answer is summarised.

Pure: request parameters from the config, and the flat summary columns of a response.
Images are not part of the parameters; the pipeline attaches them under ``image_field``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rekbatch.config import (
    CompareFacesOp,
    DetectFacesOp,
    DetectLabelsOp,
    DetectModerationLabelsOp,
    DetectProtectiveEquipmentOp,
    DetectTextOp,
    Operation,
)

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


def _names(items: list[dict[str, Any]], key: str = "Name") -> str:
    return ";".join(str(item.get(key, "")) for item in items)


def _faces(result: dict[str, Any]) -> dict[str, Any]:
    return {"face_count": len(result.get("FaceDetails", []))}


def _labels(result: dict[str, Any]) -> dict[str, Any]:
    return {"labels": _names(result.get("Labels", []))}


def box_text(box: dict[str, Any] | None) -> str | None:
    """A BoundingBox as the ledger and CSV keep it: ``left,top,width,height``."""
    if not box:
        return None
    return ",".join(f"{float(box.get(k, 0.0)):.4f}" for k in ("Left", "Top", "Width", "Height"))


def compare_summary(result: dict[str, Any]) -> dict[str, Any]:
    matches = result.get("FaceMatches", [])
    unmatched = result.get("UnmatchedFaces", [])
    best = max(matches, key=lambda m: float(m.get("Similarity", 0.0)), default=None)
    return {
        "face_count": len(matches) + len(unmatched),
        "best_similarity": round(float(best["Similarity"]), 3) if best else None,
        "matched": bool(matches),
        "match_box": box_text(best.get("Face", {}).get("BoundingBox")) if best else None,
    }


def _text(result: dict[str, Any]) -> dict[str, Any]:
    lines = [d for d in result.get("TextDetections", []) if d.get("Type") == "LINE"]
    return {"text": " | ".join(str(d.get("DetectedText", "")) for d in lines)}


def _moderation(result: dict[str, Any]) -> dict[str, Any]:
    return {"moderation_labels": _names(result.get("ModerationLabels", []))}


def _celebrities(result: dict[str, Any]) -> dict[str, Any]:
    celebs = result.get("CelebrityFaces", [])
    return {
        "celebrities": _names(celebs),
        "face_count": len(celebs) + len(result.get("UnrecognizedFaces", [])),
    }


def _ppe(result: dict[str, Any]) -> dict[str, Any]:
    return {"person_count": len(result.get("Persons", []))}


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """One configured operation, ready to call."""

    type: str
    api: str
    image_field: str
    params: dict[str, Any]
    summarize: Callable[[dict[str, Any]], dict[str, Any]]


def build_spec(op: Operation) -> OperationSpec:
    """The API call an operation config stands for. compare_faces' reference image is added
    by the pipeline, which loads it once per run."""
    match op:
        case DetectFacesOp():
            return OperationSpec(
                op.type, "DetectFaces", "Image", {"Attributes": list(op.attributes)}, _faces
            )
        case DetectLabelsOp():
            params: dict[str, Any] = {
                "MaxLabels": op.max_labels,
                "MinConfidence": op.min_confidence,
            }
            return OperationSpec(op.type, "DetectLabels", "Image", params, _labels)
        case CompareFacesOp():
            params = {"SimilarityThreshold": op.similarity_threshold}
            return OperationSpec(op.type, "CompareFaces", "TargetImage", params, compare_summary)
        case DetectTextOp():
            params = {}
            if op.min_confidence is not None:
                params["Filters"] = {"WordFilter": {"MinConfidence": op.min_confidence}}
            return OperationSpec(op.type, "DetectText", "Image", params, _text)
        case DetectModerationLabelsOp():
            params = {"MinConfidence": op.min_confidence}
            return OperationSpec(op.type, "DetectModerationLabels", "Image", params, _moderation)
        case DetectProtectiveEquipmentOp():
            ppe: dict[str, Any] = {"MinConfidence": op.min_confidence}
            if op.required_equipment:
                ppe["RequiredEquipmentTypes"] = list(op.required_equipment)
            params = {"SummarizationAttributes": ppe}
            return OperationSpec(op.type, "DetectProtectiveEquipment", "Image", params, _ppe)
        case _ if op.type == "recognize_celebrities":
            return OperationSpec(op.type, "RecognizeCelebrities", "Image", {}, _celebrities)
    raise ValueError(f"operation {op.type!r} is not a single-call operation")


# The summary of each single-call operation type's result, for readers of results.jsonl
# (the Parquet export) that have the operation type but not its config.
SUMMARIZERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "detect_faces": _faces,
    "detect_labels": _labels,
    "compare_faces": compare_summary,
    "detect_text": _text,
    "detect_moderation_labels": _moderation,
    "recognize_celebrities": _celebrities,
    "detect_protective_equipment": _ppe,
}


def summarize_result(operation: str, result: dict[str, Any] | None) -> dict[str, Any]:
    """The summary columns of one stored result; {} when there is none or no summarizer."""
    summarize = SUMMARIZERS.get(operation)
    if result is None or summarize is None:
        return {}
    return summarize(result)
