"""A job's output directory: where its state lives, and the config it ran with."""

from __future__ import annotations

from pathlib import Path

from rekbatch.config import Config
from rekbatch.errors import SetupError
from rekbatch.store.ledger import Ledger

STATE_DIR = ".rekbatch"


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
    ledger = Ledger(existing_ledger(output_dir), readonly=True)
    try:
        raw = ledger.get_meta("config")
    finally:
        ledger.close()
    if raw is None:
        raise SetupError(f"{output_dir}: the job's ledger holds no config")
    return Config.model_validate_json(raw)
