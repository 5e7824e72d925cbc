"""Reading a config: TOML or YAML, environment overrides, CLI overrides, validation.

Precedence: command-line flags over ``REKBATCH_<SECTION>__<KEY>`` environment variables over
the file. Every validation failure becomes one ``ConfigError`` line naming the file and field.

Relative local paths (the output folder, local sources, reference images) written in the file
are read from the file's folder; those from the environment or flags from the current folder
(``config.paths``). A loaded config holds absolute paths only.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from rekbatch.config.model import (
    OPERATION_MODELS,
    PATTERN_WORDS,
    Config,
    JobSection,
    OperationType,
)
from rekbatch.config.paths import absolute_data, relative_paths
from rekbatch.errors import ConfigError, ConfigErrors


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if path.suffix.lower() in {".yaml", ".yml"}:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a table of sections")
    return data


def _parse_env_value(raw: str) -> Any:
    """Environment values are TOML values when they parse as one (numbers, booleans,
    arrays), plain strings otherwise."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


EnvOrigins = dict[tuple[str, str], str]


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> EnvOrigins:
    """Set the ``REKBATCH_<SECTION>__<KEY>`` values; returns which variable set which key,
    so that an invalid value is blamed on the variable, not on the file."""
    origins: EnvOrigins = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith("REKBATCH_") or "__" not in name:
            continue
        section, _, key = name[len("REKBATCH_") :].partition("__")
        section, key = section.lower(), key.lower()
        if not section or not key:
            continue
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"environment {name}: [{section}] is not a table")
        table[key] = _parse_env_value(raw)
        origins[(section, key)] = name
    return origins


def _split_loc(
    loc: tuple[int | str, ...], data: dict[str, Any], kind: str
) -> tuple[tuple[int | str, ...], int | None, str | None]:
    """``loc`` as a path in the file (without the tags pydantic adds for the members of a
    union), where the first member tag of a plain union stands in ``loc`` and that tag."""
    parts: list[int | str] = []
    node: Any = data
    union_at: int | None = None
    tag: str | None = None
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(item)
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        in_file = isinstance(node, dict) and item in node
        absent_key = i == len(loc) - 1 and kind in ("missing", "extra_forbidden")
        if not in_file and not absent_key:
            is_discriminator = isinstance(node, dict) and node.get("type") == item
            if not is_discriminator and union_at is None:
                union_at, tag = i, str(item)
            continue  # a tag, not a key of the file
        parts.append(item)
        node = node.get(item) if isinstance(node, dict) else None
    return tuple(parts), union_at, tag


def _path_text(parts: tuple[int | str, ...]) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return text.lstrip(".") or "(top level)"


_PLURAL = {"a number": "numbers", "a whole number": "whole numbers", "text": "texts"}


def _expected(tag: str) -> str:
    """A union member's tag (pydantic's name for its type) in plain words."""
    simple = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "text"}
    if tag in simple:
        return simple[tag]
    inner = tag[tag.find("[") + 1 : -1] if tag.endswith("]") else ""
    if tag.startswith("literal["):
        return " or ".join(v.strip() for v in inner.split(","))
    if tag.startswith(("dict[", "list[")):
        value = _expected(inner.rsplit(",", 1)[-1].strip())
        many = _PLURAL.get(value, "values")
        return f"a table of {many}" if tag.startswith("dict[") else f"a list of {many}"
    return tag


def _got(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _value_at(parts: tuple[int | str, ...], data: Any) -> Any:
    for part in parts:
        indexed = isinstance(part, int) and isinstance(data, list) and part < len(data)
        if not indexed and not (isinstance(data, dict) and part in data):
            return None
        data = data[part]
    return data


def _known_keys(loc: tuple[int | str, ...], data: dict[str, Any]) -> list[str]:
    """The keys allowed where the unknown key at ``loc`` sits, for "did you mean"."""
    parent = loc[:-1]
    if not parent:
        return list(Config.model_fields)
    if parent[0] == "operations" and len(parent) in (2, 3) and isinstance(parent[1], int):
        ops = data.get("operations")
        entry = ops[parent[1]] if isinstance(ops, list) and parent[1] < len(ops) else None
        model = OPERATION_MODELS.get(str(entry.get("type"))) if isinstance(entry, dict) else None
        return list(model.model_fields) if model is not None else []
    if len(parent) == 1:
        field = Config.model_fields.get(str(parent[0]))
        annotation = field.annotation if field is not None else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return list(annotation.model_fields)
    return []


def _one_line(
    err: Mapping[str, Any],
    parts: tuple[int | str, ...],
    data: dict[str, Any],
    path: Path,
    origins: EnvOrigins,
    message: str | None = None,
) -> str:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    if message is None:
        message = str(err.get("msg", "invalid"))
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if kind == "extra_forbidden":
            message = "unknown key"
            if loc:
                close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc, data), n=1)
                if close:
                    message += f"; did you mean {close[0]!r}?"
        elif kind == "missing":
            message = "required but missing"
        elif kind == "string_pattern_mismatch":
            pattern = str((err.get("ctx") or {}).get("pattern", ""))
            value = err.get("input")
            shown = f"{value!r}: " if isinstance(value, str) and len(value) <= 80 else ""
            message = shown + PATTERN_WORDS.get(pattern, "not in the expected form")
        elif kind == "union_tag_invalid":
            allowed = ", ".join(get_args(OperationType))
            message = f"unknown operation type; expected one of: {allowed}"
    where = str(path)
    if len(parts) >= 2 and (str(parts[0]), str(parts[1])) in origins:
        where = f"environment {origins[(str(parts[0]), str(parts[1]))]}"
    if not loc:
        return f"{where}: {message}"
    return f"{where}: {_path_text(parts)}: {message}"


def _error_lines(
    errors: list[Any], data: dict[str, Any], path: Path, origins: EnvOrigins
) -> tuple[list[str], set[str]]:
    """One line per problem, and the fields they name. A value that fits no member of a
    union (``max_tps = "fast"``) is one line saying what would fit; where it fits a member
    but for something inside, only that is said."""
    lines: list[str] = []
    fields: set[str] = set()
    unions: dict[tuple[int | str, ...], list[tuple[Any, tuple[int | str, ...], str]]] = {}
    for err in errors:
        loc = tuple(err.get("loc", ()))
        parts, union_at, tag = _split_loc(loc, data, str(err.get("type", "")))
        if union_at is not None and tag is not None:
            at = _split_loc(loc[:union_at], data, "")[0]
            unions.setdefault(at, []).append((err, parts, tag))
            continue
        lines.append(_one_line(err, parts, data, path, origins))
        fields.add(_path_text(parts))
    for at, members in unions.items():
        deeper = [(err, parts) for err, parts, _ in members if len(parts) > len(at)]
        if deeper:
            for err, parts in deeper:
                lines.append(_one_line(err, parts, data, path, origins))
                fields.add(_path_text(parts))
            continue
        words = list(dict.fromkeys(_expected(tag) for _, _, tag in members))
        joiner = ", or " if any(" or " in w for w in words) else " or "
        message = f"expected {joiner.join(words)}; got {_got(_value_at(at, data))}"
        lines.append(_one_line(members[0][0], at, data, path, origins, message))
        fields.add(_path_text(at))
    return lines, fields


def load_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read, merge and validate a config. ``overrides`` are the CLI flags, by section."""
    path = Path(path)
    data = _read_file(path)
    job = data.setdefault("job", {})
    if isinstance(job, dict):
        # The default output folder is a relative path of the file too.
        job.setdefault("output_dir", JobSection().output_dir)
    data = absolute_data(data, Path(os.path.abspath(path)).parent)
    return config_from_data(data, path, environ=environ, overrides=overrides)


def config_from_data(
    data: dict[str, Any],
    where: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    resolve_paths: bool = True,
) -> Config:
    """Validate a config given as data (``rekbatch scan`` builds one from flags); ``where``
    names it in the error lines. Environment and ``overrides`` apply as for a file; relative
    paths still left are read from the current folder."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    origins = _apply_env(data, os.environ if environ is None else environ)
    for section, values in (overrides or {}).items():
        table = data.setdefault(section, {})
        if isinstance(table, dict):
            given = {k: v for k, v in values.items() if v is not None}
            table.update(given)
            for key in given:  # a flag's value is checked by the flag's own parser
                origins.pop((section, key), None)
    if resolve_paths:
        data = absolute_data(data, Path.cwd())
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines, fields = _error_lines(exc.errors(), data, Path(where), origins)
    # What the schema could not say, still said: a misspelt key must not hide a missing
    # folder or reference (the checks that need a valid config run on the raw data).
    from rekbatch.config.checks import local_problems_in

    for field, problem in local_problems_in(data):
        if field not in fields:
            lines.append(f"{where}: {field}: {problem}")
    raise ConfigErrors(list(dict.fromkeys(lines)))


def output_dir_as_written(path: Path) -> str | None:
    """The file's ``job.output_dir`` as it is written (None when it has none)."""
    job = _read_file(path).get("job")
    value = job.get("output_dir") if isinstance(job, dict) else None
    return value if isinstance(value, str) else None


def with_environment(
    cfg: Config, directory: Path, environ: Mapping[str, str] | None = None
) -> Config:
    """The config a job recorded, with the ``REKBATCH_*`` variables over it (``resume``).
    Endpoints, profile, concurrency, rates and limits may change; a variable that would
    make it another job (its sources, operations or folder) is a ``ConfigError`` naming it."""
    environ = os.environ if environ is None else environ
    variables = {n: v for n, v in environ.items() if n.startswith("REKBATCH_") and "__" in n}
    data = cfg.model_dump(mode="json")
    where = f"{directory} (the job's recorded config)"
    # A job made before paths were recorded absolute keeps its paths as written.
    resolve = not relative_paths(cfg)
    fingerprint = cfg.fingerprint()
    for name in sorted(variables):
        one = config_from_data(data, where, environ={name: variables[name]}, resolve_paths=resolve)
        if one.fingerprint() != fingerprint or one.job.output_dir != cfg.job.output_dir:
            raise ConfigError(
                f"environment {name}: would change the job in {directory} (its sources, "
                "operations or folder); resume goes on with the job as it was made: unset "
                "it, or start another job with rekbatch run"
            )
    return config_from_data(data, where, environ=variables, resolve_paths=resolve)
