"""``rekbatch status``: read a job's ledger, also while a run writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rekbatch.sinks.summary import record_counts
from rekbatch.store.jobdir import existing_ledger, state_dir
from rekbatch.store.ledger import LedgerDB
from rekbatch.store.lock import JobLock


def job_status(directory: Path, *, now: float) -> dict[str, Any]:
    ledger = LedgerDB(existing_ledger(directory), readonly=True)
    try:
        counts = record_counts(ledger)
        by_status, by_operation = counts["by_status"], counts["by_operation"]
        sources = [
            {
                "uri": s["uri"],
                "listed": s["listed"],
                "listing_done": bool(s["listing_done"]),
                "watermark": s["watermark"],
            }
            for s in ledger.sources()
        ]
        runs = ledger.runs()
        errors = [
            {
                "operation": r["operation"],
                "error_code": r["error_code"],
                "count": r["n"],
                "example": r["example"],
            }
            for r in ledger.top_errors()
        ]
        config = json.loads(ledger.get_meta("config") or "{}")
    finally:
        ledger.close()
    active = JobLock.is_held(state_dir(directory) / "lock")
    last = runs[-1] if runs else None
    stats = json.loads(last["stats"]) if last else {}
    listing = stats.get("listing", {})
    for source in sources:
        source["listing"] = listing.get(source["uri"])
    rate = float(stats.get("calls_per_second", 0.0))
    throttles = sum(stats.get("throttles", {}).values())
    n_ops = max(1, len(config.get("operations", [])))
    listed = sum(s["listed"] for s in sources)
    done_objects = sum(by_status.values()) // n_ops
    eta = None
    if sources and all(s["listing_done"] for s in sources):
        remaining = max(0, listed - done_objects)
        eta = 0.0 if remaining == 0 else (remaining * n_ops / rate if rate > 0 else None)
    return {
        "directory": str(directory),
        "job": config.get("job", {}).get("name"),
        "active": active,
        "by_status": by_status,
        "by_operation": by_operation,
        "sources": sources,
        "objects_listed": listed,
        "objects_done": done_objects,
        "calls_per_second": rate,
        "throttles_last_run": throttles,
        "errors": errors,
        "eta_seconds": None if eta is None else round(eta, 1),
        "runs": len(runs),
        "last_heartbeat_age_seconds": round(now - last["heartbeat_at"], 1) if last else None,
        "last_exit_code": last["exit_code"] if last else None,
    }


def render_status(report: dict[str, Any]) -> str:
    state = "running" if report["active"] else "not running"
    lines = [f"job {report['job']} in {report['directory']}: {state}"]
    listing = "complete" if all(s["listing_done"] for s in report["sources"]) else "in progress"
    lines.append(
        f"objects: {report['objects_done']} done of {report['objects_listed']} listed "
        f"(listing {listing})"
    )
    for source in report["sources"]:
        line = listing_line(source["uri"], source.get("listing"))
        if line and not source["listing_done"]:
            lines.append(f"  {line}")
    for op, counts in sorted(report["by_operation"].items()):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"  {op}: {parts}")
    lines.append(
        f"rate: {report['calls_per_second']:.1f} calls/s; throttles (last run): "
        f"{report['throttles_last_run']}"
    )
    if report["eta_seconds"] is not None:
        lines.append(f"estimated time left: {report['eta_seconds']:.0f} s")
    for err in report["errors"]:
        lines.append(f"  error {err['operation']} {err['error_code']}: {err['count']}")
    return "\n".join(lines)


def listing_line(uri: str, listing: dict[str, Any] | None) -> str | None:
    """``listing URI: N keys (R/s), P% ETA T`` from a run's listing stats of a source."""
    if not listing:
        return None
    text = f"listing {uri}: {listing['listed']} keys ({listing['per_second']:.0f}/s)"
    if listing.get("percent") is not None:
        text += f", {listing['percent']:.1f}%"
        if listing.get("eta_seconds") is not None:
            text += f" ETA {listing['eta_seconds']:.0f} s"
    elif listing.get("ranges"):
        text += f", ranges {listing['ranges_listed']}/{listing['ranges']}"
    return text
