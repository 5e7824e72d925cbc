"""summary.json and the printed answers, built from the ledger's aggregates."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rekbatch.config import Config
from rekbatch.pricing import SPREAD_PRICES_AS_OF, estimate_cost, spread_cost
from rekbatch.store.ledger import LedgerDB

if TYPE_CHECKING:
    from rekbatch.operations import Operation


def record_counts(db: LedgerDB) -> dict[str, dict[str, Any]]:
    """The ledger's records by status, by operation and status, by skip reason, and the
    images billed per operation (for summary.json and ``rekbatch status``)."""
    by_status: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    by_operation: dict[str, Counter[str]] = {}
    billed: Counter[str] = Counter()
    for row in db.counts():
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


def build_summary(
    db: LedgerDB,
    cfg: Config,
    operations: Sequence[Operation],
    live: dict[str, Any],
    failures: dict[str, str],
) -> dict[str, Any]:
    counts = record_counts(db)
    billed = counts.pop("billed")
    calls = live.get("calls", {})
    aws = cfg.backend.kind == "aws"
    # Paid calls no record holds (reference checks, collection searches): "this run" counts
    # them from the run's own calls, the job from the ledger, so both count the same calls.
    unrecorded = db.unrecorded_calls()
    job_billed = Counter(billed) + Counter(unrecorded)
    summary: dict[str, Any] = {
        "job": cfg.job.name,
        "backend": cfg.backend.kind,
        "counts": counts,
        # Records this run wrote (the rest of ``counts`` was done by earlier runs).
        "records_this_run": dict(live.get("records", {})),
        "calls": {
            "total": sum(calls.values()),
            "by_api": calls,
            "throttles": sum(live.get("throttles", {}).values()),
            "retries": sum(live.get("retries", {}).values()),
        },
        "elapsed_seconds": live.get("elapsed_seconds", 0.0),
        "calls_per_second": live.get("calls_per_second", 0.0),
        # images this run converted before sending them (formats, sizes Rekognition refuses)
        "images_converted": live.get("images_converted", 0),
        "limiters": live.get("limiters", {}),
        # calls, rate and throttles per Region (aws.regions)
        "regions": live.get("regions", {}),
        # The offline backend calls no service: nothing is billed.
        "estimated_cost_usd": estimate_cost(live.get("ok", {}), region=cfg.aws.region)
        if aws
        else 0.0,
        "job_estimated_cost_usd": estimate_cost(job_billed, region=cfg.aws.region) if aws else 0.0,
        "job_calls_outside_records": unrecorded,
        "errors": [
            {"operation": r["operation"], "error_code": r["error_code"], "count": r["n"]}
            for r in db.top_errors()
        ],
    }
    regions = live.get("regions", {})
    if len(regions) > 1:
        # What sending images to other Regions than their buckets' added, besides the calls.
        reads = sum(r.get("objects_read", 0) for r in regions.values())
        sent = sum(r.get("bytes_received_from_other_regions", 0) for r in regions.values())
        summary["spreading"] = {
            "objects_read": reads,
            "bytes_to_other_regions": sent,
            "estimated_cost_usd": spread_cost(reads, sent),
            "prices_as_of": SPREAD_PRICES_AS_OF,
        }
    for op in operations:
        answer = op.answer(db)
        if answer is not None:
            if op.type in failures:
                answer["complete"] = False
                answer["error"] = failures[op.type]
            summary[op.type] = answer
    return summary


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write summary.json whole or not at all."""
    path = out / "summary.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def answer_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    answer = summary.get("compare_faces")
    if answer:
        no_face = answer.get("images_no_face_local", 0)
        lines.append(
            f"compare_faces: reference face found in {answer['images_matched']} of "
            f"{answer['images_compared'] + no_face} images{_prefiltered(no_face)}"
        )
    search = summary.get("search_faces")
    if search:
        no_face = search.get("images_no_face_local", 0)
        for person, found in search["people"].items():
            lines.append(
                f"search_faces: {person} found in {found['images_matched']} of "
                f"{search['images_searched'] + no_face} images{_prefiltered(no_face)}"
            )
    index = summary.get("index_faces")
    if index:
        where = index.get("output_dir") or "OUTPUT_DIR"
        lines.append(
            f"index_faces: {index['faces_indexed']} faces of {index['images_indexed']} images "
            f"in the face index; look anyone up with: rekbatch find {where} --person NAME=PHOTO"
        )
    return lines


def _prefiltered(no_face: int) -> str:
    """What prefilter = "faces" left out of the count's calls."""
    if not no_face:
        return ""
    return f" ({no_face} with no face found locally, not sent)"
