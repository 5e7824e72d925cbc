"""structlog set-up: readable on a terminal, JSON lines otherwise; secrets never logged."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

LogFormat = Literal["console", "json"]

_SECRET_KEYS = re.compile(r"(secret|token|password|credential|session_key|access_key)", re.I)
_SECRET_VALUES = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return _SECRET_VALUES.sub("[redacted]", value)
    if isinstance(value, dict):
        return {
            k: "[redacted]" if _SECRET_KEYS.search(str(k)) else _redact(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop anything that looks like an AWS credential from every log event."""
    for key in list(event):
        event[key] = "[redacted]" if _SECRET_KEYS.search(key) else _redact(event[key])
    return event


def _flat(key: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        if not value:
            into[key] = "-"
        for sub, inner in value.items():
            _flat(f"{key}.{sub}", inner, into)
    elif isinstance(value, list | tuple | set | frozenset):
        into[key] = ",".join(str(v) for v in value) or "-"
    else:
        into[key] = value


def flatten_for_console(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Nested values as ``key.sub=value`` and lists as ``a,b``: a terminal shows
    ``by_status.ok=7 operations=detect_faces,detect_labels``, never a Python repr."""
    flat: dict[str, Any] = {}
    for key, value in event.items():
        if key in ("event", "level", "timestamp"):
            flat[key] = value
        else:
            _flat(key, value, flat)
    return flat


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is at that moment, so a live progress
    display that redirects stderr can print log lines above itself."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = msg


def _stderr_logger(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(fmt: LogFormat | None = None, level: int = logging.INFO) -> LogFormat:
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderers: list[Any]
    if fmt == "json":
        renderers = [structlog.processors.JSONRenderer()]
    else:
        colors = sys.stderr.isatty()
        renderers = [flatten_for_console, structlog.dev.ConsoleRenderer(colors=colors)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    # botocore and aiobotocore log through the standard library; keep them quiet.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("aiobotocore").setLevel(logging.WARNING)
    return fmt
