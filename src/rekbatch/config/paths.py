"""The local paths of a config: where they sit, and making them absolute.

A config names local files in four places: ``job.output_dir``, local ``source.uris`` (folders,
single images, ``keys:`` lists on this machine), ``compare_faces.reference`` and the
references of ``search_faces.people``. Relative paths written in a config file are read from
the file's folder; those given in the environment or as flags from the current folder. A
job records them absolute, so it is the same job whatever folder a command runs in.

These functions work on the config as data (a parsed file, or a dump of a ``Config``), so
the file's values can be made absolute before the environment and the flags are applied.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rekbatch.config.model import Config, parse_s3_uri

KEYS = "keys:"
PathSlot = tuple[str, str]  # (the field as error lines name it, the location)


def _local(value: str) -> str | None:
    """The local path in a location (None for S3, inventories and non-paths)."""
    if value.startswith(KEYS):
        rest = value[len(KEYS) :]
        return None if rest.startswith("s3://") or not rest else rest
    if not value or "://" in value or value.startswith("inventory:"):
        return None
    if parse_s3_uri(value) is not None:
        return None
    return value


def _absolute(value: str, base: Path) -> str:
    """``value`` with its local path made absolute against ``base`` (``~`` expanded)."""
    path = _local(value)
    if path is None:
        return value
    expanded = os.path.expanduser(path)
    full = expanded if os.path.isabs(expanded) else os.path.normpath(base / expanded)
    return KEYS + full if value.startswith(KEYS) else full


def _slots(data: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """(field, container, index) of every string that may hold a local path."""
    job = data.get("job")
    if isinstance(job, dict) and isinstance(job.get("output_dir"), str):
        yield "job.output_dir", job, "output_dir"
    source = data.get("source")
    uris = source.get("uris") if isinstance(source, dict) else None
    if isinstance(uris, list):
        for i, uri in enumerate(uris):
            if isinstance(uri, str):
                yield f"source.uris[{i}]", uris, i
    ops = data.get("operations")
    for i, op in enumerate(ops if isinstance(ops, list) else []):
        if not isinstance(op, dict):
            continue
        if op.get("type") == "compare_faces" and isinstance(op.get("reference"), str):
            yield f"operations[{i}].reference", op, "reference"
        people = op.get("people") if op.get("type") == "search_faces" else None
        for name, refs in (people if isinstance(people, dict) else {}).items():
            for n, ref in enumerate(refs if isinstance(refs, list) else []):
                if isinstance(ref, str):
                    yield f"operations[{i}].people.{name}[{n}]", refs, n


def _copy(value: Any) -> Any:
    """A copy of config data deep enough for ``_slots`` to write into."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def absolute_data(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Config data with every relative local path made absolute against ``base``."""
    data = dict(_copy(data))
    for _, container, index in _slots(data):
        container[index] = _absolute(container[index], base)
    return data


def local_paths(cfg: Config) -> list[PathSlot]:
    """(field, value) of every local path of ``cfg`` (the output folder included)."""
    data = cfg.model_dump(mode="json")
    return [
        (field, container[index])
        for field, container, index in _slots(data)
        if _local(container[index]) is not None
    ]


def relative_paths(cfg: Config) -> list[PathSlot]:
    """The local paths of ``cfg`` not written absolute (``~`` included): a job made before
    jobs recorded their paths absolute took them as written, from the folder it ran in."""
    return [(field, value) for field, value in local_paths(cfg) if not is_absolute(value)]


def is_absolute(value: str) -> bool:
    return os.path.isabs(_local(value) or value)


def absolute(cfg: Config, base: Path) -> Config:
    """``cfg`` with its relative local paths read from ``base``."""
    return Config.model_validate(absolute_data(cfg.model_dump(mode="json"), base))


def with_paths_of(cfg: Config, other: Config) -> Config | None:
    """``cfg`` with the local paths (not the output folder) of ``other`` in their places,
    or None when the two do not have local paths in the same places."""
    data = cfg.model_dump(mode="json")
    theirs = {f: v for f, v in local_paths(other) if f != "job.output_dir"}
    ours = [(f, c, i) for f, c, i in _slots(data) if f != "job.output_dir"]
    ours = [(f, c, i) for f, c, i in ours if _local(c[i]) is not None]
    if {f for f, _, _ in ours} != set(theirs):
        return None
    for field, container, index in ours:
        container[index] = theirs[field]
    return Config.model_validate(data)
