"""A job's output directory: where its state lives, which job it holds, the config it ran
with."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rekbatch.config import Config, paths
from rekbatch.errors import SetupError
from rekbatch.records import utc_now
from rekbatch.store.ledger import LedgerDB

STATE_DIR = ".rekbatch"
RESULT_FILES = ("results.jsonl", "results.csv", "summary.json")
MERGED = "merged_shards"  # in a merged job's ledger: how many shards it was made of


def state_dir(output_dir: Path) -> Path:
    return output_dir / STATE_DIR


def ledger_path(output_dir: Path) -> Path:
    return state_dir(output_dir) / "ledger.sqlite"


def make_output(output_dir: Path) -> bool:
    """Make ``output_dir`` and its state folder; True when the output folder is new. A path
    that is a file, or a folder that cannot be written, is a ``SetupError`` naming it."""
    hint = "choose another output folder (job.output_dir or --output)"
    if output_dir.exists() and not output_dir.is_dir():
        raise SetupError(f"{output_dir}: is a file, not a folder; {hint}")
    created = not output_dir.exists()
    state = state_dir(output_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"{output_dir}: cannot be made ({exc.strerror or exc}); {hint}") from None
    files = [output_dir / name for name in RESULT_FILES] + [ledger_path(output_dir), state / "lock"]
    for path in [output_dir, state, *files]:
        if path.exists() and not os.access(path, os.W_OK):
            raise SetupError(f"{path}: cannot be written (read-only); {hint}")
    return created


def existing_ledger(output_dir: Path) -> Path:
    """The ledger of the job in ``output_dir``; a one-line error when there is none."""
    path = ledger_path(output_dir)
    if not path.exists():
        raise SetupError(f"{output_dir}: no rekbatch job here (no {path})")
    return path


def job_config(output_dir: Path) -> Config:
    """The config the job in ``output_dir`` last ran with, as its ledger recorded it."""
    db = LedgerDB(existing_ledger(output_dir), readonly=True)
    try:
        raw = db.get_meta("config")
    finally:
        db.close()
    if raw is None:
        raise SetupError(f"{output_dir}: the job's ledger holds no config")
    return Config.model_validate_json(raw)


def claim(output_dir: Path, cfg: Config, *, fresh: bool, config_path: str) -> tuple[bool, Config]:
    """Make ``output_dir`` hold the job of ``cfg``: a new job, the same job (resumed), or,
    with ``fresh``, a new job in place of another one. Another job without ``fresh`` is a
    ``SetupError``. Returns whether the directory already held this job's work, and the
    config to run it with (``cfg``, or for a job that recorded relative paths, ``cfg`` with
    those paths as the job wrote them in its rows)."""
    path = ledger_path(output_dir)
    db = LedgerDB(path)
    try:
        merged = db.get_meta(MERGED)
        if merged is not None and not fresh:
            raise SetupError(
                f"{output_dir}: holds the merge of {merged} shards; run a shard with "
                f"--shard K/{merged}, or --fresh to discard the merged results"
            )
        fingerprint = cfg.fingerprint()
        existing = db.get_meta("fingerprint")
        if existing is not None and existing != fingerprint and not db.has_records():
            existing = None  # an earlier run stopped before any work: nothing to keep
        if existing is not None and existing != fingerprint and not fresh:
            cfg = _same_job(output_dir, cfg, db.get_meta("config"), existing)
            fingerprint = existing
        if existing is not None and (existing != fingerprint or fresh):
            db.close()
            _discard(output_dir)
            db = LedgerDB(path)
            existing = None
        if existing is None:
            db.set_meta(
                {
                    "fingerprint": fingerprint,
                    "config": cfg.model_dump_json(),
                    "config_path": _absolute(config_path),
                    "created_at": utc_now(),
                }
            )
        else:
            # Rates, caps and endpoints may change between runs; keep the latest for resume.
            db.set_meta({"config": cfg.model_dump_json()})
        db.register_sources(cfg.source.uris)
        return existing is not None, cfg
    finally:
        db.close()


def _absolute(config_path: str) -> str:
    return os.path.abspath(config_path) if config_path else ""


def _same_job(output_dir: Path, cfg: Config, recorded_json: str | None, existing: str) -> Config:
    """``cfg`` differs from the job in ``output_dir``: the config to run the job with when
    only how its paths were written differs, else a ``SetupError`` saying what differs."""
    recorded = None if recorded_json is None else Config.model_validate_json(recorded_json)
    swapped = None if recorded is None else paths.with_paths_of(cfg, recorded)
    if recorded is None or swapped is None or swapped.fingerprint() != existing:
        raise SetupError(
            f"{output_dir}: holds a different job (its sources or operations differ from "
            "this config); use another --output, or --fresh to discard it"
        )
    ours = dict(paths.local_paths(cfg))
    theirs = paths.local_paths(recorded)
    if paths.relative_paths(recorded):
        # Made before jobs recorded absolute paths: its paths were read from the folder it
        # ran in. From that folder they are this config's paths; its rows name them as
        # written, so the run goes on naming them so.
        here = paths.local_paths(paths.absolute(recorded, Path.cwd()))
        if all(ours.get(f) == v for f, v in here if f != "job.output_dir"):
            return swapped
    differing = [(f, v) for f, v in theirs if f != "job.output_dir" and ours.get(f) != v]
    field, was = differing[0]
    if not paths.is_absolute(was):
        was += " (as written, from the folder its first run started in)"
    raise SetupError(
        f"{output_dir}: {field} is {ours.get(field)} in this config (relative paths are read "
        f"from the config file's folder), but the job here recorded {was}; make the config "
        "point there, or use another --output"
    )


def refuse_job_left_behind(config_file: Path, output_dir: Path) -> None:
    """Before relative paths in a config were read from its folder, they were read from the
    current one. When this config's job is in the folder its ``output_dir`` names from
    here, and nothing is in the one it names now, stop rather than start the job again."""
    from rekbatch.config.loading import output_dir_as_written

    written = output_dir_as_written(config_file)
    if written is None or os.path.isabs(os.path.expanduser(written)):
        return
    before = Path(os.path.abspath(written))
    if before == output_dir or ledger_path(output_dir).exists():
        return
    if not ledger_path(before).exists():
        return
    db = LedgerDB(ledger_path(before), readonly=True)
    try:
        made_by = db.get_meta("config_path") or ""
    finally:
        db.close()
    if not made_by or os.path.abspath(made_by) != os.path.abspath(config_file):
        return
    fixed = os.path.relpath(before, os.path.abspath(config_file.parent))
    raise SetupError(
        f"{config_file}: job.output_dir {written!r} is now read from the config's folder "
        f"({output_dir}), but the job this config made is in {before}; set output_dir = "
        f"{fixed!r} (or an absolute path), or run with --output {before}"
    )


def _discard(output_dir: Path) -> None:
    for name in RESULT_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for child in state_dir(output_dir).iterdir():
        if child.name != "lock":
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
