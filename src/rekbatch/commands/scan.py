"""``rekbatch scan``: a job from flags alone. The config it builds is written into the output
directory (``rekbatch.toml``), so the job can be run again, edited, or resumed."""

from __future__ import annotations

from typing import Any, get_args

from rekbatch.config.model import OperationType
from rekbatch.config.writing import toml_comment, toml_key, toml_value
from rekbatch.errors import ConfigError

CONFIG_FILE = "rekbatch.toml"

# What the part after "=" sets, per operation.
_ARGUMENT = {
    "compare_faces": "reference",
    "search_faces": "people",
    "detect_faces": "attributes",
    "detect_labels": "max_labels",
    "detect_text": "min_confidence",
    "detect_moderation_labels": "min_confidence",
    "detect_protective_equipment": "min_confidence",
    "index_faces": "collection_id",
}
_REQUIRED = {"compare_faces": "a reference image", "search_faces": "NAME:IMAGE[,NAME:IMAGE...]"}
OP_HELP = (
    "OP[=ARG], repeatable: compare_faces=REF, search_faces=NAME:REF[,NAME:REF], "
    "detect_faces[=ALL], detect_labels[=MAX_LABELS], detect_text[=MIN_CONFIDENCE], "
    "detect_moderation_labels[=MIN_CONFIDENCE], recognize_celebrities, "
    "detect_protective_equipment[=MIN_CONFIDENCE], index_faces[=COLLECTION_ID]"
)


def _number(op: str, raw: str) -> float | int:
    try:
        return int(raw) if raw.isdigit() else float(raw)
    except ValueError:
        raise ConfigError(f"--op {op}={raw}: {raw!r} is not a number") from None


def parse_op(spec: str) -> dict[str, Any]:
    """``compare_faces=ref.jpg`` to ``{"type": "compare_faces", "reference": "ref.jpg"}``."""
    op, has_arg, raw = spec.partition("=")
    op = op.strip()
    known = get_args(OperationType)
    if op not in known:
        import difflib

        close = difflib.get_close_matches(op, known, n=1)
        hint = (
            f"; did you mean {close[0]!r}?" if close else "; expected one of: " + ", ".join(known)
        )
        raise ConfigError(f"--op {spec}: unknown operation{hint}")
    entry: dict[str, Any] = {"type": op}
    if op in _REQUIRED and not (has_arg and raw):
        raise ConfigError(f"--op {op}: needs {_REQUIRED[op]} after '=' (--op {op}=...)")
    if not has_arg:
        return entry
    if op not in _ARGUMENT:
        raise ConfigError(f"--op {spec}: {op} takes no argument")
    key = _ARGUMENT[op]
    if key in ("reference", "collection_id"):
        entry[key] = raw
    elif key == "people":
        people: dict[str, list[str]] = {}
        for item in raw.split(","):
            name, colon, image = item.partition(":")
            if not colon or not name or not image:
                raise ConfigError(f"--op {spec}: expected NAME:IMAGE, got {item!r}")
            people.setdefault(name, []).append(image)
        entry[key] = people
    elif key == "attributes":
        entry[key] = [raw.upper()]
    else:
        entry[key] = _number(op, raw)
    return entry


def scan_data(
    uris: list[str],
    ops: list[str],
    *,
    output_dir: str,
    offline: bool,
    region: str | None,
) -> dict[str, Any]:
    """The config of a scan, as data for ``config_from_data``."""
    if not ops:
        raise ConfigError("scan: name at least one operation with --op (e.g. --op detect_labels)")
    data: dict[str, Any] = {
        "job": {"name": "scan", "output_dir": output_dir},
        "source": {"uris": list(uris)},
        "operations": [parse_op(spec) for spec in ops],
    }
    if offline:
        data["backend"] = {"kind": "local"}
    if region:
        data["aws"] = {"region": region}
    return data


def to_toml(data: dict[str, Any], *, command: str) -> str:
    """The config as TOML (null values left out), headed by the command that made it; every
    name in it encoded (``config.writing``), so none can add a line of its own."""
    lines = [
        toml_comment(f"Written by: {command}"),
        "# Run it again with `rekbatch run` on this file.",
    ]
    for section, values in data.items():
        if section == "operations":
            continue
        lines += ["", f"[{toml_key(section)}]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items() if v is not None]
    for op in data.get("operations", []):
        lines += ["", "[[operations]]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in op.items() if v is not None]
    return "\n".join(lines) + "\n"
