"""Reading a config's text as Xray does: JSON with `//`, `#` and `/* */` comments.

Bytes in, a config dict out (and whether the text had comments, since a rewrite drops them), or
an XrayConfigError naming the line and column of the original text. The size bound is
`bounds.MAX_XRAY_CONFIG_BYTES`; the caller reads the bytes.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.bounds import MAX_XRAY_CONFIG_BYTES
from daemon.xray.model import Config, XrayConfigError

# What Xray's own config reader does outside JSON strings:
# `//` and `#` comments run to the end of the line, `/* ... */` comments keep their newlines,
# strings (double or single quotes) and backslash escapes pass unchanged, and a `/` followed by
# anything else passes with that character. A block comment ends at the first `/` that follows
# a `*` with only `*` and newlines between (the reader stays "after a star" across newlines).
_CONFIG_TOKEN = re.compile(
    r"""(?P<keep>"(?:[^"\\]|\\[\s\S])*"?|'(?:[^'\\]|\\[\s\S])*'?|\\[\s\S]|/[^/*])"""
    r"""|(?P<line>(?:\#|//)[^\n]*)"""
    r"""|(?P<block>/\*[\s\S]*?\*[*\n]*/)"""
    r"""|(?P<open>/\*)"""
    r"""|(?P<drop>[/\\]\Z)"""
)


@dataclass(frozen=True, slots=True)
class ConfigText:
    """A config read from its text, and whether that text had comments (a rewrite drops them)."""

    config: Config
    comments: bool
    where: str = ""  # the file it was read from


def read_config_text(data: bytes, where: str) -> ConfigText:
    """Parse a config's bytes as Xray does, comments included; XrayConfigError names line and
    column (in the original text) of what is wrong. `where` names the file in messages."""
    if len(data) > MAX_XRAY_CONFIG_BYTES:
        raise XrayConfigError(too_large(where, len(data)))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8")
        line, column = _line_column(before, len(before))
        raise XrayConfigError(
            f"Xray config {where} is not UTF-8 text (line {line}, column {column})"
        ) from None
    try:
        return ConfigText(_json_object(text, where), False, where)
    except _JsonError as plain:
        stripped, shifts, comments = _strip_comments(text, where)
        if not comments and stripped == text:
            raise XrayConfigError(plain.message(text, [])) from None
    try:
        return ConfigText(_json_object(stripped, where), comments, where)
    except _JsonError as error:
        raise XrayConfigError(error.message(text, shifts)) from None


def too_large(where: str, size: int) -> str:
    """The message for a config beyond the size portmeter reads."""
    return f"Xray config {where} has {size} bytes; portmeter reads at most {MAX_XRAY_CONFIG_BYTES}"


class _JsonError(Exception):
    """json.loads failed at a position of the text it was given."""

    def __init__(self, where: str, reason: str, position: int | None) -> None:
        super().__init__(reason)
        self.where, self.reason, self.position = where, reason, position

    def message(self, original: str, shifts: Sequence[tuple[int, int]]) -> str:
        """One line naming the position in `original`, the text before comments were removed."""
        if self.position is None:
            return f"Xray config {self.where} is not valid JSON: {self.reason}"
        at = bisect_left(shifts, (self.position + 1,)) - 1
        offset = self.position + (shifts[at][1] if at >= 0 else 0)
        line, column = _line_column(original, offset)
        return (
            f"Xray config {self.where} is not valid JSON at line {line}, column {column}: "
            f"{self.reason}"
        )


def _json_object(text: str, where: str) -> Config:
    try:
        config = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _JsonError(where, exc.msg, exc.pos) from None
    except ValueError as exc:  # NaN or Infinity, which JSON (and Xray) do not have
        raise _JsonError(where, str(exc), None) from None
    except RecursionError:
        raise _JsonError(where, "nested too deeply", None) from None
    if not isinstance(config, dict):
        raise XrayConfigError(f"Xray config {where} is not a JSON object")
    return config


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _strip_comments(text: str, where: str) -> tuple[str, list[tuple[int, int]], bool]:
    """The text without comments (newlines kept, as Xray's reader does), the offsets needed to
    map a position back to `text`, and whether there were comments.

    Each shift is (offset in the result where a removal ends, characters removed up to there).
    """
    pieces: list[str] = []
    shifts: list[tuple[int, int]] = []
    last = removed = 0
    comments = False
    for match in _CONFIG_TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "keep":
            continue
        if kind == "open":
            line, column = _line_column(text, match.start())
            raise XrayConfigError(
                f"Xray config {where}: the comment opened at line {line}, column {column} "
                "never closes"
            )
        kept = "\n" * match.group().count("\n") if kind == "block" else ""
        pieces += [text[last : match.start()], kept]
        removed += match.end() - match.start() - len(kept)
        shifts.append((match.end() - removed, removed))
        last = match.end()
        comments = comments or kind != "drop"
    pieces.append(text[last:])
    return "".join(pieces), shifts, comments


def _line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of `offset` in `text`."""
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1
