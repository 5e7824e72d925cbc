"""The command line: a thin layer that builds settings, hands them to the engine, and turns
the outcome into an exit code."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from rekbatch import __version__
from rekbatch.errors import ConfigError, RekbatchError, SetupError
from rekbatch.logs import LogFormat, configure_logging

app = typer.Typer(
    name="rekbatch",
    help="Run Amazon Rekognition over whole S3 buckets: fast, cheap, resumable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_UNEXPECTED = 1


def _fail(exc: BaseException) -> typer.Exit:
    if isinstance(exc, RekbatchError):
        typer.echo(f"rekbatch: {exc}", err=True)
        return typer.Exit(exc.exit_code)
    typer.echo(f"rekbatch: unexpected error: {type(exc).__name__}: {exc}", err=True)
    return typer.Exit(EXIT_UNEXPECTED)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Any failure below a command becomes one line on stderr and its exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        raise _fail(exc) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rekbatch {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """rekbatch runs Rekognition operations over S3 buckets or local folders."""


def _load(config: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    from rekbatch.config import load_config

    return load_config(config, overrides=overrides)


def _check_backend(cfg: Any) -> None:
    if cfg.backend.kind != "local":
        return
    try:
        from rekbatch.backends.local.backend import (
            LOCAL_SUPPORTED_OPERATIONS,
            local_backend_available,
        )
    except ImportError:  # pragma: no cover - the module ships with the package
        raise ConfigError("backend.kind: the local backend is not available") from None
    for index, op in enumerate(cfg.operations):
        if op.type not in LOCAL_SUPPORTED_OPERATIONS:
            supported = ", ".join(sorted(LOCAL_SUPPORTED_OPERATIONS))
            raise ConfigError(
                f"operations[{index}].type: {op.type!r} is not available with backend.kind = "
                f"'local' (it supports {supported})"
            )
    missing = local_backend_available()
    if missing:
        raise SetupError(f"backend.kind = 'local': {missing}")


def _run_job(cfg: Any, options: Any) -> int:
    from rekbatch.engine import run_job

    if os.environ.get("REKBATCH_BENCH_NO_CHECKPOINT") == "1":
        options.checkpoint = False
        typer.echo("rekbatch: checkpointing off (benchmarks only); a crash loses results", err=True)

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(name: str, job: Any) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                job.request_stop(f"interrupted by {name}")
            else:
                # The ledger only ever holds fsynced results: stopping here stays resumable.
                sys.stderr.write("rekbatch: stopped at once; resume with the same command\n")
                sys.stderr.flush()
                os._exit(130)

        def install(job: Any) -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig.name, job)

        return await run_job(cfg, options, on_job=install)

    outcome = asyncio.run(main())
    out = options.output_dir
    if outcome.failure is not None:
        typer.echo(
            f"rekbatch: {outcome.failure}; what finished is kept, resume with: "
            f"rekbatch resume {out}",
            err=True,
        )
        return int(outcome.exit_code)
    typer.echo(render_summary(outcome.summary))
    for note in outcome.notes:
        typer.echo(f"rekbatch: {note}", err=True)
    for line in outcome.answers:
        typer.echo(line)
    if outcome.exit_code == 130:
        typer.echo(f"interrupted; resume with: rekbatch resume {out}", err=True)
    elif outcome.exit_code == 4:
        typer.echo(
            f"stopped at a budget cap ({outcome.stop_reason}); raise it and run "
            f"`rekbatch resume {out}`",
            err=True,
        )
    return int(outcome.exit_code)


def render_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary printed on stdout (summary.json holds the same and more)."""
    statuses = summary["counts"]["by_status"]
    calls = summary["calls"]
    counts = ", ".join(f"{k} {statuses.get(k, 0)}" for k in ("ok", "failed", "skipped"))
    lines = [
        f"records: {counts}",
        f"calls: {calls['total']} in {summary['elapsed_seconds']:.1f} s "
        f"({summary['calls_per_second']:.1f}/s); throttled {calls['throttles']}, "
        f"retried {calls['retries']}",
        f"estimated cost: ${summary['estimated_cost_usd']:.4f} (list prices; an estimate)",
        "outputs: " + ", ".join(summary.get("outputs", [])),
    ]
    return "\n".join(lines)


def _progress(fmt: str) -> bool:
    from rekbatch.commands.progress import progress_wanted

    return progress_wanted(fmt, sys.stderr)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="The job's config file (TOML or YAML).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output directory (job.output_dir).")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Consumers (limits.concurrency).")
    ] = None,
    max_tps: Annotated[
        float | None, typer.Option("--max-tps", min=0.001, help="Rate ceiling per operation.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan only: list, filter, estimate; no calls.")
    ] = False,
    log_format: Annotated[
        LogFormat | None, typer.Option("--log-format", help="console or json.")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Discard the job already in the output directory.")
    ] = False,
) -> None:
    """Run a job; resumes by itself when the output directory holds the same job."""
    fmt = configure_logging(log_format)
    from rekbatch.engine import RunOptions

    overrides: dict[str, dict[str, Any]] = {
        "job": {"output_dir": str(output) if output else None},
        "limits": {"concurrency": concurrency, "max_tps": max_tps},
    }
    with _one_line_errors():
        cfg = _load(config, overrides)
        _check_backend(cfg)
        if dry_run:
            raise typer.Exit(_plan(cfg, as_json=False))
        options = RunOptions(
            output_dir=Path(cfg.job.output_dir),
            fresh=fresh,
            config_path=str(config),
            progress=_progress(fmt),
        )
        code = _run_job(cfg, options)
    raise typer.Exit(code)


@app.command()
def resume(
    directory: Annotated[Path, typer.Argument(help="The job's output directory.")],
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Attempt failed records again.")
    ] = False,
    codes: Annotated[
        str | None,
        typer.Option("--codes", help="With --retry-failed: only these error codes (comma list)."),
    ] = None,
    log_format: Annotated[
        LogFormat | None, typer.Option("--log-format", help="console or json.")
    ] = None,
) -> None:
    """Continue the job whose output directory is DIRECTORY."""
    fmt = configure_logging(log_format)
    from rekbatch.engine import RunOptions
    from rekbatch.store.jobdir import job_config

    with _one_line_errors():
        cfg = job_config(directory)
        _check_backend(cfg)
        options = RunOptions(
            output_dir=directory,
            retry_failed=retry_failed,
            retry_codes={c.strip() for c in codes.split(",") if c.strip()} if codes else None,
            progress=_progress(fmt),
        )
        code = _run_job(cfg, options)
    raise typer.Exit(code)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="The config file to check.")],
) -> None:
    """Check a config and exit: 0 when valid, 2 with the field at fault otherwise."""
    with _one_line_errors():
        cfg = _load(config)
        _check_backend(cfg)
    ops = ", ".join(op.type for op in cfg.operations)
    typer.echo(f"{config}: valid ({len(cfg.source.uris)} source(s); operations: {ops})")


def _plan(cfg: Any, *, as_json: bool, sample: int | None = 2000) -> int:
    from rekbatch.commands.plan import plan_job, render_plan

    plan = asyncio.run(plan_job(cfg, sample=sample))
    typer.echo(json.dumps(plan, indent=2) if as_json else render_plan(plan))
    return 0


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="The job's config file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    sample: Annotated[
        str,
        typer.Option(
            "--sample", help="Sniff a random sample of N objects (default 2000), or 'all'."
        ),
    ] = "2000",
) -> None:
    """The dry run: list and filter, then print counts, calls, estimated cost and time."""
    configure_logging("json" if as_json else None, level=30)
    with _one_line_errors():
        size = _sample_size(sample)
        cfg = _load(config)
        _check_backend(cfg)
        code = _plan(cfg, as_json=as_json, sample=size)
    raise typer.Exit(code)


def _sample_size(value: str) -> int | None:
    from rekbatch.errors import ConfigError

    if value.strip().lower() == "all":
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"--sample: a number of objects (at least 1) or 'all', not {value!r}")
    return size


@app.command()
def status(
    directory: Annotated[Path, typer.Argument(help="The job's output directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Counts, rate and errors of a job, also while it runs."""
    from rekbatch.commands.status import job_status, render_status

    with _one_line_errors():
        report = job_status(directory, now=time.time())
    typer.echo(json.dumps(report, indent=2) if as_json else render_status(report))


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="The job's output directory.")],
    max_per_person: Annotated[
        int | None, typer.Option("--max-per-person", min=1, help="Best N matches per person.")
    ] = None,
) -> None:
    """Write DIRECTORY/report.html: each person's matched images with the face boxed."""
    from rekbatch.commands.report import build_report
    from rekbatch.store.jobdir import job_config

    with _one_line_errors():
        cfg = job_config(directory)
        path = asyncio.run(build_report(directory, cfg, max_per_person=max_per_person))
    typer.echo(f"report: {path}")


def main() -> None:
    app()
