"""What the command line prints once a run is over: the summary and the answers on stdout;
on stderr what the operator should not miss (a failure, notes, warnings, how to resume)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rekbatch.errors import EXIT_BUDGET, EXIT_INTERRUPTED

if TYPE_CHECKING:
    from rekbatch.engine.run import RunOutcome

_EMPTY_ANSWER = re.compile(r" in 0 of 0 images$")


def after_run(outcome: RunOutcome, out: Path, *, follow: bool) -> list[tuple[bool, str]]:
    """The lines to print, in order, each with whether it goes to stderr."""
    if outcome.failure is not None:
        return [
            (
                True,
                f"rekbatch: {outcome.failure}; what finished is kept, resume with: "
                f"rekbatch resume {out}{outcome.resume_args}",
            )
        ]
    lines = [(False, render_summary(outcome.summary))]
    lines += [(True, f"rekbatch: {note}") for note in outcome.notes]
    lines += [(True, f"rekbatch: warning: {w}") for w in summary_warnings(outcome.summary)]
    for line in outcome.answers:
        if _EMPTY_ANSWER.search(line):
            lines.append((True, f"rekbatch: warning: {line} (no image was analysed)"))
        else:
            lines.append((False, line))
    if outcome.exit_code == EXIT_INTERRUPTED:
        again = " --follow" if follow else ""
        lines.append((True, f"interrupted; resume with: rekbatch resume {out}{again}"))
    elif outcome.exit_code == EXIT_BUDGET:
        lines.append(
            (
                True,
                f"stopped at a budget cap ({outcome.stop_reason}); raise it and run "
                f"`rekbatch resume {out}`",
            )
        )
    return lines


def render_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary printed on stdout (summary.json holds the same and more)."""
    statuses = summary["counts"]["by_status"]
    calls = summary["calls"]
    shown = ["ok", "failed", "skipped"] + (["removed"] if statuses.get("removed") else [])
    counts = ", ".join(f"{k} {statuses.get(k, 0)}" for k in shown)
    lines = [f"records: {counts}"]
    done = sum(statuses.values())
    if done and not sum(summary.get("records_this_run", {}).values()):
        lines.append(f"nothing new: {done} records already done")
    lines.append(
        f"calls: {calls['total']} in {summary['elapsed_seconds']:.1f} s "
        f"({summary['calls_per_second']:.1f}/s); throttled {calls['throttles']}, "
        f"retried {calls['retries']}"
    )
    cost = f"cost: ${summary['estimated_cost_usd']:.4f} this run"
    if summary.get("backend") == "local":
        cost += " (offline backend: nothing is billed)"
    else:
        job_cost = float(summary.get("job_estimated_cost_usd", 0.0))
        cost += f", ${job_cost:.4f} for the whole job (list prices; an estimate)"
    lines.append(cost)
    lines.append("outputs: " + ", ".join(summary.get("outputs", [])))
    return "\n".join(lines)


def summary_warnings(summary: dict[str, Any]) -> list[str]:
    """What a run that exits 0 should not leave unsaid: sources without images."""
    statuses = summary["counts"]["by_status"]
    if summary.get("stopped"):
        return []  # stopped before the listing was done: nothing to say about the sources
    if not sum(statuses.values()):
        return ["the sources listed no objects; check source.uris (and source.include)"]
    if not statuses.get("ok") and not statuses.get("failed") and not statuses.get("removed"):
        reasons = summary["counts"].get("by_reason", {})
        why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        return [f"no image to analyse: every record was skipped ({why})"]
    return []
