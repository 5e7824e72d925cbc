"""A job's output directory: where its state lives, which job it holds, the config it ran
with."""

from __future__ import annotations

import shutil
from pathlib import Path

from rekbatch.config import Config
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


def claim(output_dir: Path, cfg: Config, *, fresh: bool, config_path: str) -> bool:
    """Make ``output_dir`` hold the job of ``cfg``: a new job, the same job (resumed), or,
    with ``fresh``, a new job in place of another one. Another job without ``fresh`` is a
    ``SetupError``. Returns True when the directory already held this job's work."""
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
        if existing is not None and (existing != fingerprint or fresh):
            if not fresh:
                raise SetupError(
                    f"{output_dir}: holds a different job (its sources or operations differ "
                    "from this config); use another --output, or --fresh to discard it"
                )
            db.close()
            _discard(output_dir)
            db = LedgerDB(path)
            existing = None
        if existing is None:
            db.set_meta(
                {
                    "fingerprint": fingerprint,
                    "config": cfg.model_dump_json(),
                    "config_path": config_path,
                    "created_at": utc_now(),
                }
            )
        else:
            # Rates, caps and endpoints may change between runs; keep the latest for resume.
            db.set_meta({"config": cfg.model_dump_json()})
        db.register_sources(cfg.source.uris)
        return existing is not None
    finally:
        db.close()


def _discard(output_dir: Path) -> None:
    for name in RESULT_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for child in state_dir(output_dir).iterdir():
        if child.name != "lock":
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
