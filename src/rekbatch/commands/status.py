"""``rekbatch status``: read a job's ledger, also while a run writes it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from rekbatch.display.lines import listing_line, queue_line
from rekbatch.errors import EXIT_DONE
from rekbatch.sinks.summary import record_counts
from rekbatch.store.jobdir import existing_ledger, state_dir
from rekbatch.store.jobdir import ledger_path as jobdir_ledger
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
    queues = queue_status(stats.get("queues", {}), last, now=now)
    # A queue is never "listed": the listing is about the other sources.
    sources_listed = [s for s in sources if s["uri"] not in queues]
    calls_made = sum(stats.get("calls", {}).values())
    # No rate without calls: elapsed time alone says nothing about the speed.
    rate = float(stats.get("calls_per_second", 0.0)) if calls_made else None
    throttles = sum(stats.get("throttles", {}).values())
    n_ops = max(1, len(config.get("operations", [])))
    listed = sum(s["listed"] for s in sources)
    done_objects = sum(by_status.values()) // n_ops
    # The ledger marks a source done once every object it listed is finished; while a run
    # is active its heartbeat says when the listing itself has ended.
    finished = all(s["listing_done"] for s in sources_listed)
    if finished or (active and stats.get("listing_complete")):
        listing = "complete"
    elif active:
        listing = "in progress"
    else:
        listing = "unfinished; resume to go on" if last else "not started"
    eta = None
    if listing == "complete" and rate is not None:
        remaining = max(0, listed - done_objects)
        eta = 0.0 if remaining == 0 else (remaining * n_ops / rate if rate > 0 else None)
    elif listing == "complete" and listed <= done_objects:
        eta = 0.0
    return {
        "directory": str(directory),
        "job": config.get("job", {}).get("name"),
        "active": active,
        "by_status": by_status,
        "by_operation": by_operation,
        "sources": sources,
        "objects_listed": listed,
        "objects_done": done_objects,
        "listing": listing,
        "calls_last_run": calls_made,
        "calls_per_second": rate,
        "throttles_last_run": throttles,
        "regions": _regions(stats.get("regions", {})),
        "errors": errors,
        "eta_seconds": None if eta is None else round(eta, 1),
        "runs": len(runs),
        "last_heartbeat_age_seconds": round(now - last["heartbeat_at"], 1) if last else None,
        "last_exit_code": last["exit_code"] if last else None,
        "queues": queues,
    }


def _regions(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per Region (several calling Regions only): calls, rate, throttles, and which APIs
    were out of the rotation."""
    if len(stats) < 2:
        return {}
    return {
        region: {
            "calls": int(one.get("calls", 0)),
            "calls_per_second": float(one.get("calls_per_second", 0.0)),
            "throttles": int(one.get("throttles", 0)),
            "out_of_rotation": list(one.get("out_of_rotation", [])),
        }
        for region, one in stats.items()
    }


def queue_status(
    queues: dict[str, dict[str, Any]], last: Any, *, now: float
) -> dict[str, dict[str, Any]]:
    """The queue sources as the run's last heartbeat saw them: the backlog SQS reported
    (``ApproximateNumberOfMessages`` and friends), and ages from the messages the run had in
    hand, since SQS itself tells the age of its oldest message only to CloudWatch."""
    out: dict[str, dict[str, Any]] = {}
    beat = float(last["heartbeat_at"]) if last else now
    for uri, q in queues.items():
        entry = dict(q)
        at = q.get("backlog_at")
        entry["backlog_age_seconds"] = round(now - float(at), 1) if at else None
        held_age = q.get("oldest_held_age_seconds")
        # The heartbeat's ages were measured then; they have grown since.
        if held_age is not None and q.get("held"):
            entry["oldest_held_age_seconds"] = round(float(held_age) + (now - beat), 1)
        out[uri] = entry
    return out


def render_status(report: dict[str, Any]) -> str:
    state = "running" if report["active"] else "not running"
    if "shards" in report:
        state = (
            f"{report['shard_count']} shards: {report['shards_running']} running, "
            f"{report['shards_finished']} finished, "
            f"{len(report['shards_not_started'])} not started"
        )
    lines = [f"job {report['job']} in {report['directory']}: {state}"]
    lines.append(
        f"objects: {report['objects_done']} done of {report['objects_listed']} listed "
        f"(listing {report['listing']})"
    )
    for source in report["sources"]:
        line = listing_line(source["uri"], source.get("listing"))
        if line and not source["listing_done"]:
            lines.append(f"  {line}")
    for uri, queue in report.get("queues", {}).items():
        lines.append(f"  {queue_line(uri, queue)}")
    for op, counts in sorted(report["by_operation"].items()):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"  {op}: {parts}")
    run = "this run" if report["active"] else "last run"
    if report["calls_per_second"] is None:
        lines.append(f"rate: no calls made ({run})")
    else:
        lines.append(
            f"rate: {report['calls_per_second']:.1f} calls/s ({run}, {report['calls_last_run']} "
            f"calls); throttles: {report['throttles_last_run']}"
        )
    for region, one in sorted((report.get("regions") or {}).items()):
        out = one.get("out_of_rotation")
        lines.append(
            f"  {region}: {one['calls']} calls, {one['calls_per_second']:.1f}/s, "
            f"{one['throttles']} throttles"
            + (f"; out of the rotation: {', '.join(out)}" if out else "")
        )
    if report["eta_seconds"] is not None:
        lines.append(f"estimated time left: {report['eta_seconds']:.0f} s")
    for err in report["errors"]:
        lines.append(f"  error {err['operation']} {err['error_code']}: {err['count']}")
    return "\n".join(lines)


def any_status(directory: Path, *, now: float) -> dict[str, Any]:
    """The status of a job's directory: one job, or the shards of one (added up)."""
    from rekbatch.engine.shards import shard_folders

    folders = shard_folders(directory)
    if not folders:
        return job_status(directory, now=now)
    counts = {shard.count for shard in folders}
    count = max(counts)
    shards: list[dict[str, Any]] = []
    by_status: Counter[str] = Counter()
    by_operation: dict[str, Counter[str]] = {}
    errors: Counter[tuple[str, str]] = Counter()
    regions: dict[str, Counter[str]] = {}
    rates: dict[str, float] = {}
    total = {"objects_listed": 0, "objects_done": 0, "calls_per_second": 0.0, "throttles": 0}
    job = None
    listing_done = True
    for shard, folder in folders.items():
        if not jobdir_ledger(folder).exists():
            continue
        one = job_status(folder, now=now)
        job = job or one["job"]
        shards.append(
            {
                "shard": shard.index,
                "of": shard.count,
                "active": one["active"],
                "objects_done": one["objects_done"],
                "objects_listed": one["objects_listed"],
                "last_exit_code": one["last_exit_code"],
            }
        )
        by_status.update(one["by_status"])
        for op, c in one["by_operation"].items():
            by_operation.setdefault(op, Counter()).update(c)
        for err in one["errors"]:
            errors[(err["operation"], err["error_code"])] += err["count"]
        total["objects_listed"] += one["objects_listed"]
        total["objects_done"] += one["objects_done"]
        total["throttles"] += one["throttles_last_run"]
        for region, counts in one["regions"].items():
            regions.setdefault(region, Counter()).update(
                calls=counts["calls"], throttles=counts["throttles"]
            )
            if one["active"]:
                rates[region] = rates.get(region, 0.0) + counts["calls_per_second"]
        if one["active"]:
            total["calls_per_second"] += one["calls_per_second"]
        listing_done = listing_done and all(s["listing_done"] for s in one["sources"])
    started = {s["shard"] for s in shards if s["of"] == count}
    finished = [s for s in shards if s["last_exit_code"] in EXIT_DONE and not s["active"]]
    return {
        "directory": str(directory),
        "job": job,
        "active": any(s["active"] for s in shards),
        "shards": shards,
        "shard_count": count,
        "shards_running": sum(1 for s in shards if s["active"]),
        "shards_finished": len(finished),
        "shards_not_started": [k for k in range(count) if k not in started],
        "by_status": dict(by_status),
        "by_operation": {op: dict(c) for op, c in by_operation.items()},
        "sources": [
            {"listing_done": listing_done and not [k for k in range(count) if k not in started]}
        ],
        "objects_listed": total["objects_listed"],
        "objects_done": total["objects_done"],
        "calls_per_second": round(float(total["calls_per_second"]), 2),
        "throttles_last_run": total["throttles"],
        "regions": {
            region: {
                "calls": c["calls"],
                "calls_per_second": round(rates.get(region, 0.0), 2),
                "throttles": c["throttles"],
                "out_of_rotation": [],
            }
            for region, c in regions.items()
        },
        "errors": [
            {"operation": op, "error_code": code, "count": n, "example": None}
            for (op, code), n in errors.most_common(5)
        ],
        "eta_seconds": None,
        "runs": None,
        "last_heartbeat_age_seconds": None,
        "last_exit_code": None,
    }
