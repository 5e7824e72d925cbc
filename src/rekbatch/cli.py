"""The command line: a thin layer that builds settings, hands them to the engine, and turns
the outcome into an exit code."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from rekbatch import __version__
from rekbatch.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNEXPECTED,
    ConfigError,
    ConfigErrors,
    RekbatchError,
    SetupError,
)
from rekbatch.logs import LogFormat, configure_logging

app = typer.Typer(
    name="rekbatch",
    help="Run Amazon Rekognition over whole S3 buckets: fast, cheap, resumable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Engine(StrEnum):
    process = "process"
    ray = "ray"


def _fail(exc: BaseException) -> typer.Exit:
    if isinstance(exc, RekbatchError):
        for line in str(exc).splitlines() or [type(exc).__name__]:
            typer.echo(f"rekbatch: {line}", err=True)
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
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """rekbatch runs Rekognition operations over S3 buckets or local folders."""


def _load(config: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    """The config, checked as far as it can be without the network: every problem found is
    one line of the ``ConfigErrors`` raised."""
    from rekbatch.config import load_config
    from rekbatch.config.checks import local_problems

    cfg = load_config(config, overrides=overrides)
    problems = local_problems(cfg)
    if problems:
        raise ConfigErrors([f"{config}: {line}" for line in problems])
    return cfg


def _check_backend(cfg: Any) -> None:
    """The offline backend's packages are installed (``pip install 'rekbatch[local]'``)."""
    if cfg.backend.kind != "local":
        return
    from rekbatch.backends.local.backend import local_backend_available

    missing = local_backend_available()
    if missing:
        raise SetupError(f"backend.kind = 'local': {missing}")


def run_and_report(cfg: Any, options: Any, *, progress: bool = False) -> int:
    """Run a job in this process as ``rekbatch run`` does (signals, the collector, the
    progress display), print what follows it; the exit code."""
    from rekbatch.display.progress import show_progress
    from rekbatch.display.summary import after_run
    from rekbatch.engine import run_job

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
                from rekbatch.engine.children import kill_children

                kill_children()
                sys.stderr.write("rekbatch: stopped at once; resume with the same command\n")
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)

        def install(job: Any) -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig.name, job)
            job.side_tasks.append(("collector", _collector_frozen))
            if progress:
                job.side_tasks.append(("progress", show_progress))

        return await run_job(cfg, options, on_job=install)

    outcome = asyncio.run(main())
    for to_stderr, line in after_run(outcome, options.output_dir, follow=options.follow):
        typer.echo(line, err=to_stderr)
    return int(outcome.exit_code)


async def _collector_frozen(job: Any) -> None:
    """Beside the run's work, until it ends: what exists when it starts (modules, clients,
    the config) stays out of the collector's passes, which took about a third of the hot
    path (BENCHMARKS.md); objects in flight are few and short-lived."""
    gc.freeze()
    try:
        await asyncio.Event().wait()
    finally:
        gc.unfreeze()


def _progress(fmt: str) -> bool:
    from rekbatch.display.progress import progress_wanted

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
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="Run shard K (from 0) of N only: K/N, e.g. 3/16."),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            "--shards", help="The job's number of shards (with --shard-index-env or --engine ray)."
        ),
    ] = None,
    shard_index_env: Annotated[
        str | None,
        typer.Option(
            "--shard-index-env",
            help="Read K from this environment variable (JOB_COMPLETION_INDEX, "
            "AWS_BATCH_JOB_ARRAY_INDEX).",
        ),
    ] = None,
    engine: Annotated[
        Engine,
        typer.Option("--engine", help="process: this process; ray: the shards as Ray tasks."),
    ] = Engine.process,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Ray cluster to join (e.g. auto).")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", help="After the listing, keep reading the queue sources until stopped."
        ),
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
        which = _shard_choice(shard, shards, shard_index_env, engine, ray_address)
        cfg = _load(config, overrides)
        _check_backend(cfg)
        if output is None and "REKBATCH_JOB__OUTPUT_DIR" not in os.environ:
            from rekbatch.store.jobdir import refuse_job_left_behind

            refuse_job_left_behind(config, Path(cfg.job.output_dir))
        if dry_run:
            raise typer.Exit(_plan(cfg, as_json=False))
        if engine is Engine.ray:
            assert shards is not None
            code = _run_ray(cfg, shards, ray_address, fresh=fresh, config_path=str(config))
            raise typer.Exit(code)
        job_cfg = cfg
        if which is not None:
            from rekbatch.engine.shards import shard_config

            cfg = shard_config(cfg, which)
        options = RunOptions(
            output_dir=Path(cfg.job.output_dir),
            fresh=fresh,
            config_path=str(config),
            shard=which,
            job_config=job_cfg if which is not None else None,
            follow=follow,
        )
        code = run_and_report(cfg, options, progress=_progress(fmt))
    raise typer.Exit(code)


def _shard_choice(
    shard: str | None,
    shards: int | None,
    index_env: str | None,
    engine: Engine,
    ray_address: str | None,
) -> Any:
    """The shard this process runs (None: the whole job); a ``ConfigError`` for flags that
    do not go together."""
    from rekbatch.engine.shards import parse_shard, shard_from_env

    if ray_address is not None and engine is not Engine.ray:
        raise ConfigError("--ray-address: only with --engine ray")
    if engine is Engine.ray:
        if shard is not None or index_env is not None:
            raise ConfigError("--engine ray: runs all shards; give --shards N, not --shard")
        if shards is None:
            raise ConfigError("--engine ray: needs --shards N")
        if shards < 1:
            raise ConfigError(f"--shards: must be at least 1, got {shards}")
        return None
    if shard is not None:
        if index_env is not None:
            raise ConfigError("--shard: give --shard K/N or --shards N --shard-index-env VAR")
        which = parse_shard(shard)
        if shards is not None and shards != which.count:
            raise ConfigError(f"--shards {shards} disagrees with --shard {shard}")
        return which
    if index_env is not None:
        if shards is None:
            raise ConfigError("--shard-index-env: needs --shards N")
        return shard_from_env(index_env, shards)
    if shards is not None:
        raise ConfigError("--shards: needs --shard-index-env VAR (or --engine ray)")
    return None


def _run_ray(cfg: Any, shards: int, address: str | None, *, fresh: bool, config_path: str) -> int:
    from rekbatch.commands.merge import merge_job
    from rekbatch.engine.ray_shards import run_shards_on_ray

    merged = run_shards_on_ray(cfg, shards, address=address, fresh=fresh, config_path=config_path)
    return _print_merge(merge_job(*merged))


def _print_merge(outcome: Any) -> int:
    from rekbatch.display.summary import render_summary

    typer.echo(render_summary(outcome.summary))
    for line in outcome.answers:
        typer.echo(line)
    return int(outcome.exit_code)


@app.command()
def merge(
    directory: Annotated[
        str, typer.Argument(help="The job's output directory, or the s3:// upload_uri.")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the merge of an s3:// job."),
    ] = None,
) -> None:
    """Merge the shards of a job into one set of results, one summary and one answer."""
    configure_logging(None, level=30)
    from rekbatch.commands.merge import merge_job

    with _one_line_errors():
        outcome = merge_job(directory, output)
        code = _print_merge(outcome)
    raise typer.Exit(code)


@app.command()
def init(
    path: Annotated[
        Path, typer.Argument(help="Where to write the config.", show_default=True)
    ] = Path("rekbatch.toml"),
    offline: Annotated[
        bool, typer.Option("--offline", help="The offline backend (local face models, no AWS).")
    ] = False,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="A source URI or folder (repeatable)."),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="A photo of a person to find (compare_faces)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite PATH.")] = False,
) -> None:
    """Write a commented starter config (offline or AWS) to PATH."""
    from rekbatch.commands.init import starter_config

    with _one_line_errors():
        if path.exists() and not force:
            raise SetupError(f"{path}: already exists; choose another PATH, or --force")
        text = starter_config(
            offline=offline, sources=source, reference=reference, folder=path.parent
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {path}; next: rekbatch validate {path} && rekbatch plan {path}")


@app.command()
def scan(
    uris: Annotated[
        list[str], typer.Argument(help="S3 prefixes (s3://bucket/prefix), folders or images.")
    ],
    op: Annotated[list[str], typer.Option("--op", help="OP[=ARG], repeatable (see below).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output directory (default out/scan).")
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="The offline backend (local face models, no AWS).")
    ] = False,
    region: Annotated[str | None, typer.Option("--region", help="AWS region.")] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Consumers (limits.concurrency).")
    ] = None,
    max_tps: Annotated[
        float | None, typer.Option("--max-tps", min=0.001, help="Rate ceiling per operation.")
    ] = None,
    log_format: Annotated[
        LogFormat | None, typer.Option("--log-format", help="console or json.")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Discard the job already in the output directory.")
    ] = False,
) -> None:
    """Run a job from flags alone; the config it used is written to DIR/rekbatch.toml.

    --op: compare_faces=REF, search_faces=NAME:REF[,NAME:REF], detect_faces[=ALL],
    detect_labels[=MAX_LABELS], detect_text[=MIN_CONFIDENCE],
    detect_moderation_labels[=MIN_CONFIDENCE], recognize_celebrities,
    detect_protective_equipment[=MIN_CONFIDENCE], index_faces[=COLLECTION_ID].
    """
    fmt = configure_logging(log_format)
    from rekbatch.commands.scan import CONFIG_FILE, scan_data, to_toml
    from rekbatch.config import config_from_data
    from rekbatch.config.checks import local_problems
    from rekbatch.engine import RunOptions

    with _one_line_errors():
        out = str(output) if output else "out/scan"
        data = scan_data(uris, op, output_dir=out, offline=offline, region=region)
        overrides = {"limits": {"concurrency": concurrency, "max_tps": max_tps}}
        cfg = config_from_data(data, "scan", overrides=overrides)
        problems = local_problems(cfg)
        if problems:
            raise ConfigErrors([f"scan: {line}" for line in problems])
        _check_backend(cfg)
        command = "rekbatch scan " + " ".join([*uris, *(f"--op {spec}" for spec in op)])
        written = cfg.model_dump(mode="json", exclude_none=True)
        options = RunOptions(
            output_dir=Path(cfg.job.output_dir),
            fresh=fresh,
            config_path=str(Path(cfg.job.output_dir) / CONFIG_FILE),
            config_text=to_toml(written, command=command),
            config_file=CONFIG_FILE,
        )
        code = run_and_report(cfg, options, progress=_progress(fmt))
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
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", help="After the listing, keep reading the queue sources until stopped."
        ),
    ] = False,
) -> None:
    """Continue the job whose output directory is DIRECTORY."""
    fmt = configure_logging(log_format)
    from rekbatch.config.loading import with_environment
    from rekbatch.engine import RunOptions
    from rekbatch.engine.shards import read_job_file
    from rekbatch.store.jobdir import job_config

    with _one_line_errors():
        cfg = with_environment(job_config(directory), directory)
        _check_backend(cfg)
        sharded = read_job_file(directory)
        options = RunOptions(
            output_dir=directory,
            shard=sharded[1] if sharded else None,
            job_config=sharded[0] if sharded else None,
            retry_failed=retry_failed,
            retry_codes={c.strip() for c in codes.split(",") if c.strip()} if codes else None,
            follow=follow,
        )
        code = run_and_report(cfg, options, progress=_progress(fmt))
    raise typer.Exit(code)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="The config file to check.")],
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="Also check buckets, S3 references and credentials (no billed call).",
        ),
    ] = False,
) -> None:
    """Check a config and exit: 0 when valid, 2 with every problem found, one line each."""
    with _one_line_errors():
        cfg = _load(config)
        _check_backend(cfg)
        if online:
            from rekbatch.config.checks import online_problems

            problems = asyncio.run(online_problems(cfg))
            if problems:
                raise ConfigErrors([f"{config}: {line}" for line in problems])
    ops = ", ".join(op.type for op in cfg.operations)
    checked = "; buckets and credentials checked" if online else ""
    typer.echo(f"{config}: valid ({len(cfg.source.uris)} source(s); operations: {ops}{checked})")


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
    from rekbatch.commands.status import any_status, render_status

    with _one_line_errors():
        report = any_status(directory, now=time.time())
    typer.echo(json.dumps(report, indent=2) if as_json else render_status(report))


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="The job's output directory.")],
    max_per_person: Annotated[
        int | None, typer.Option("--max-per-person", min=1, help="Best N matches per person.")
    ] = None,
) -> None:
    """Write DIRECTORY/report.html: people found, faces, labels, text, moderation."""
    from rekbatch.commands.report import build_report
    from rekbatch.engine.shards import shard_folders
    from rekbatch.store.jobdir import job_config

    with _one_line_errors():
        if shard_folders(directory):
            from rekbatch.commands.merge import merge_job

            merge_job(str(directory), None)  # the report is of the whole job
        cfg = job_config(directory)
        path = asyncio.run(build_report(directory, cfg, max_per_person=max_per_person))
    typer.echo(f"report: {path}")


@app.command()
def find(
    directory: Annotated[Path, typer.Argument(help="The job's output directory (index_faces).")],
    person: Annotated[
        list[str],
        typer.Option("--person", help="NAME=PHOTO: someone to look for (repeatable)."),
    ],
    threshold: Annotated[
        float, typer.Option("--threshold", min=0, max=100, help="Similarity, as compare_faces.")
    ] = 80.0,
) -> None:
    """Who is where, from a job's face index, without analysing its images again; writes
    DIRECTORY/find/NAME.jsonl."""
    configure_logging(None, level=30)
    from rekbatch.commands.find import find_command

    with _one_line_errors():
        lines = find_command(directory, person, threshold)
    for line in lines:
        typer.echo(line)


def main() -> None:
    # aiohttp warns about any body over 1 MiB passed as bytes; images sent as bytes (up to
    # 5 MB, 6.7 MB as base64 JSON) are such bodies by design, written in one go.
    warnings.filterwarnings(
        "ignore", message="Sending a large body directly", category=ResourceWarning
    )
    app()
