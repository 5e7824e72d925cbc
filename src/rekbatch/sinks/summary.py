"""summary.json and the printed answers, built from the ledger."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rekbatch.config import CompareFacesOp, Config, SearchFacesOp
from rekbatch.operations.search import Strategy, strategy_calls
from rekbatch.pricing import estimate_cost
from rekbatch.store.ledger import Ledger


def record_counts(ledger: Ledger) -> dict[str, dict[str, Any]]:
    """The ledger's records by status, by operation and status, by skip reason, and the
    images billed per operation (for summary.json and ``rekbatch status``)."""
    by_status: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    by_operation: dict[str, Counter[str]] = {}
    billed: Counter[str] = Counter()
    for row in ledger.counts():
        by_status[row["status"]] += row["n"]
        by_operation.setdefault(row["operation"], Counter())[row["status"]] += row["n"]
        if row["reason"]:
            by_reason[row["reason"]] += row["n"]
        billed[row["operation"]] += row["billed"] or 0
    return {
        "by_status": dict(by_status),
        "by_operation": {op: dict(c) for op, c in by_operation.items()},
        "by_reason": dict(by_reason),
        "billed": dict(billed),
    }


def build_summary(ledger: Ledger, cfg: Config, live: dict[str, Any]) -> dict[str, Any]:
    counts = record_counts(ledger)
    billed = counts.pop("billed")
    elapsed = live.get("elapsed_seconds", 0.0)
    calls = sum(live["calls"].values())
    summary: dict[str, Any] = {
        "job": cfg.job.name,
        "counts": counts,
        "calls": {
            "total": calls,
            "by_api": live["calls"],
            "throttles": sum(live["throttles"].values()),
            "retries": sum(live["retries"].values()),
        },
        "elapsed_seconds": elapsed,
        "calls_per_second": live.get("calls_per_second", 0.0),
        "limiters": live.get("limiters", {}),
        # The offline backend calls no service: nothing is billed.
        "estimated_cost_usd": (
            estimate_cost(billed, region=cfg.aws.region) if cfg.backend.kind == "aws" else 0.0
        ),
        "errors": [
            {"operation": r["operation"], "error_code": r["error_code"], "count": r["n"]}
            for r in ledger.top_errors()
        ],
    }
    for op in cfg.operations:
        if isinstance(op, CompareFacesOp):
            summary["compare_faces"] = compare_answer(ledger, op)
    return summary


def compare_answer(ledger: Ledger, op: CompareFacesOp) -> dict[str, Any]:
    rows = ledger.operation_rows("compare_faces")
    matched = [r for r in rows if r["matched"]]
    return {
        "reference": op.reference,
        "similarity_threshold": op.similarity_threshold,
        "images_compared": len(rows),
        "images_matched": len(matched),
        "matched_keys": [r["key"] for r in matched],
        "matches": [
            {
                "bucket": r["bucket"],
                "key": r["key"],
                "similarity": r["similarity"],
                "bounding_box": _box_dict(r["match_box"]),
            }
            for r in matched
        ],
    }


def _box_dict(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    left, top, width, height = (float(v) for v in text.split(","))
    return {"Left": left, "Top": top, "Width": width, "Height": height}


def answer_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    answer = summary.get("compare_faces")
    if answer:
        lines.append(
            f"compare_faces: reference face found in {answer['images_matched']} of "
            f"{answer['images_compared']} images"
        )
    search = summary.get("search_faces")
    if search:
        for person, found in search["people"].items():
            lines.append(
                f"search_faces: {person} found in {found['images_matched']} of "
                f"{search['images_searched']} images"
            )
    return lines


def search_answer(ledger: Ledger, op: SearchFacesOp, strategy: Strategy) -> dict[str, Any]:
    searched = len(ledger.operation_rows("search_faces"))
    by_person: dict[str, list[dict[str, Any]]] = {person: [] for person in op.people}
    for row in ledger.person_matches():
        if row["person"] in by_person:
            by_person[row["person"]].append(
                {
                    "bucket": row["bucket"],
                    "key": row["key"],
                    "similarity": round(row["similarity"], 3),
                    "bounding_box": _box_dict(row["box"]),
                }
            )
    references = sum(len(refs) for refs in op.people.values())
    return {
        "strategy": strategy,
        "collection_id": op.collection_id if strategy == "collection" else None,
        "similarity_threshold": op.similarity_threshold,
        "images_searched": searched,
        "calls_by_strategy": strategy_calls(searched, references),
        "people": {
            person: {
                "references": op.people[person],
                "images_matched": len(matches),
                "matched_keys": [m["key"] for m in matches],
                "matches": matches,
            }
            for person, matches in by_person.items()
        },
    }
