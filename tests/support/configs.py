"""Job configs for tests, built from keyword arguments and dicts rather than patched text.

``toml_tables`` renders tables (a dict per table; a dict inside one is a sub-table, a list
of dicts an array of tables); ``job_config`` is a job on the test servers: one S3 source or
folder, the fake Rekognition, ``detect_faces`` unless told otherwise, and any key of any
table added or overridden by keyword (``source={"sniff": False}``, ``limits={...}``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Table = Mapping[str, Any]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON's string escapes are TOML's
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _key(name: str) -> str:
    bare = name.replace("_", "").replace("-", "").isalnum()
    return name if bare else json.dumps(name)


def _table(name: str, table: Table, header: str) -> list[str]:
    lines = [header]
    subtables: list[tuple[str, Any]] = []
    for key, value in table.items():
        if value is None:
            continue  # left out: the config's default
        if isinstance(value, Mapping) or _is_array_of_tables(value):
            subtables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        lines += _tables_of(f"{name}.{_key(key)}", value)
    return lines


def _is_array_of_tables(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value)
    )


def _tables_of(name: str, value: Table | Sequence[Table]) -> list[str]:
    if isinstance(value, Mapping):
        return ["", *_table(name, value, f"[{name}]")]
    out: list[str] = []
    for item in value:
        out += ["", *_table(name, item, f"[[{name}]]")]
    return out


def toml_tables(**tables: Table | Sequence[Table]) -> str:
    """``toml_tables(job={"name": "x"}, operations=[{"type": "detect_faces"}])``."""
    lines: list[str] = []
    for name, value in tables.items():
        lines += _tables_of(_key(name), value)
    return "\n".join(lines).lstrip("\n") + "\n"


def operations(*types: str | Table) -> list[Table]:
    """``operations("detect_faces", {"type": "compare_faces", "reference": ...})``."""
    return [{"type": op} if isinstance(op, str) else op for op in types]


def job_config(
    *,
    uris: Sequence[str | Path],
    output_dir: Path,
    s3_endpoint: str | None = None,
    rek_endpoint: str | None = None,
    operations: str | Sequence[Table] = ({"type": "detect_faces"},),
    extra: str = "",
    job: Table | None = None,
    source: Table | None = None,
    aws: Table | None = None,
    **tables: Table,
) -> str:
    """A job's TOML: ``job``, ``source`` and ``aws`` are merged over the test defaults;
    other tables (``limits``, ``output``, ...) are written as given. ``operations`` and
    ``extra`` also take TOML text, for operations whose tables are easier read as TOML."""
    aws_defaults: dict[str, Any] = {"region": "eu-west-1"}
    if s3_endpoint is not None:
        aws_defaults["s3_endpoint_url"] = s3_endpoint
    if rek_endpoint is not None:
        aws_defaults["rekognition_endpoint_url"] = rek_endpoint
    text = toml_tables(
        job={"name": "test", "output_dir": output_dir, **(job or {})},
        source={"uris": [str(u) for u in uris], **(source or {})},
        aws={**aws_defaults, **(aws or {})},
        **tables,
    )
    ops = operations if isinstance(operations, str) else toml_tables(operations=operations)
    return f"{text}\n{extra}\n{ops}"


def write_job(path: Path, **settings: Any) -> Path:
    """``job_config(**settings)`` written to ``path``."""
    path.write_text(job_config(**settings), encoding="utf-8")
    return path
