"""Config values written as TOML (the counterpart of ``loading``), for configs rekbatch writes
itself: ``scan``'s ``rekbatch.toml`` and ``init``'s starter config.

Names come from outside (folders, keys, people), so nothing is written as it is: strings are
TOML basic strings with every character that is not printable escaped (a newline can end
neither a string nor a comment), keys are bare only when TOML allows it, and comments escape
the same way. A string TOML cannot hold (a file name that was not UTF-8, which Python decodes
to lone surrogates) is refused rather than written wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rekbatch.errors import ConfigError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHORT = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def _escaped(text: str, *, quote: bool) -> str:
    out = []
    for char in text:
        if char in _SHORT and (quote or char not in '"\\'):
            out.append(_SHORT[char])
        elif "\ud800" <= char <= "\udfff":
            raise ConfigError(f"{text!r} cannot be written as TOML (it is not valid Unicode)")
        elif not char.isprintable() and char != " ":
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return "".join(out)


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string, quotes included."""
    return '"' + _escaped(text, quote=True) + '"'


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_comment(text: str) -> str:
    """``text`` as one comment line: nothing in it can start a line of its own."""
    return "# " + _escaped(text, quote=False)
