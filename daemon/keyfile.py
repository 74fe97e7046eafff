"""The files `portmeter keys import` reads (README "Batch create"): CSV with a header row, or JSON
lines, each row one key as `POST /api/keys` takes it. Pure: lines in, request bodies out, every
problem as a KeyFileError naming its line, so a bad file is refused before anything is created.

A file may be far larger than memory should hold as objects (50 MB of CSV were 700 MB of rows),
so rows are parsed one at a time from the file's lines: `check` reads every row once and keeps
only the folded names (for names the file holds twice), then `batches` reads the file again and
hands out MAX_BATCH_KEYS rows at a time. Lines end at "\\n" alone ("\\r\\n" too), as iterating a
binary file splits them: a raw U+2028 or U+0085 inside a JSON string is part of its line.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

from pydantic import ValidationError

from daemon import bounds, names
from daemon.http.keyfields import NewKey, describe_errors

Format = Literal["csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl")
EXTENSIONS: dict[str, Format] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
BOM = b"\xef\xbb\xbf"
JSON_SPACE = " \t\r\n"
# CSV cells are text; these columns become JSON numbers, booleans and lists as the API takes them.
WHOLE_COLUMNS = frozenset({"port", "max_connections", "max_ips"})
GROUP_SEPARATORS = re.compile(r"[,;\s]+")
TRUE, FALSE = frozenset({"true", "yes", "1"}), frozenset({"false", "no", "0"})


class KeyFileError(Exception):
    """A row the import refuses: `line` (1-based) and what is wrong with it."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line


@dataclass(frozen=True, slots=True)
class Row:
    """One key to create: the request body and the line it starts on."""

    line: int
    body: dict[str, Any]


def format_of(path: str, head: bytes, chosen: Format | None) -> Format:
    """`chosen` (--format), else by the file's extension, else by the first character of the
    file's `head` (its first bytes): JSON lines start with `{`."""
    if chosen is not None:
        return chosen
    for extension, found in EXTENSIONS.items():
        if path.lower().endswith(extension):
            return found
    return "jsonl" if head.removeprefix(BOM).lstrip().startswith(b"{") else "csv"


def rows(lines: Iterable[bytes], form: Format) -> Iterator[Row]:
    """The keys of a file given as its lines (bytes, each ending at "\\n"), one at a time, parsed
    but not checked (`check`); KeyFileError for a line that is not UTF-8, CSV or JSON."""
    text = _decoded(lines)
    return _csv_rows(text) if form == "csv" else _json_rows(text)


def check(keys: Iterable[Row]) -> int:
    """Check every key as the daemon checks a new key (http/keyfields.py NewKey) and for names
    the file holds twice; the number of keys, or KeyFileError for the first bad line (or for a
    file without any)."""
    seen: dict[str, int] = {}
    for row in keys:
        _check(row)
        folded = names.fold(row.body["name"])
        if folded in seen:
            raise KeyFileError(
                row.line, f"{row.body['name']!r} has the same name as line {seen[folded]}"
            )
        seen[folded] = row.line
    if not seen:
        raise KeyFileError(1, "the file holds no keys")
    return len(seen)


def batches(keys: Iterable[Row], size: int = bounds.MAX_BATCH_KEYS) -> Iterator[list[Row]]:
    """The keys `size` at a time, as the import sends them."""
    found = iter(keys)
    while chunk := list(islice(found, size)):
        yield chunk


def _check(row: Row) -> None:
    try:
        NewKey.model_validate(row.body)
    except ValidationError as exc:
        raise KeyFileError(row.line, describe_errors(exc.errors())) from None


def _decoded(lines: Iterable[bytes]) -> Iterator[str]:
    for number, line in enumerate(lines, start=1):
        try:
            yield (line.removeprefix(BOM) if number == 1 else line).decode("utf-8")
        except UnicodeDecodeError:
            raise KeyFileError(number, "not UTF-8 text") from None


def _json_rows(lines: Iterable[str]) -> Iterator[Row]:
    for number, line in enumerate(lines, start=1):
        if not line.strip(JSON_SPACE):
            continue
        try:
            body = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as exc:
            raise KeyFileError(number, f"not JSON ({exc.msg})") from None
        except ValueError as exc:  # a number of too many digits (_json_int)
            raise KeyFileError(number, str(exc)) from None
        except RecursionError:
            raise KeyFileError(number, "not a key: JSON nested too deeply") from None
        if not isinstance(body, dict):
            raise KeyFileError(number, 'each line must be one JSON object, e.g. {"name": "alice"}')
        yield Row(number, body)


def _json_int(text: str) -> int:
    """A JSON integer, refused past bounds.MAX_DIGITS digits (before Python's int() refuses one
    of thousands of digits with an error of its own)."""
    value = bounds.whole_number(text.removeprefix("-"))
    return -value if text.startswith("-") else value


def _csv_rows(lines: Iterable[str]) -> Iterator[Row]:
    reader = csv.reader(lines, strict=True)
    try:
        header = [cell.strip() for cell in next(reader, [])]
        if not header:
            return
        if "name" not in header:
            raise KeyFileError(1, "the header row must name the columns, `name` among them")
        start = reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield Row(start, _csv_body(start, header, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise KeyFileError(reader.line_num, f"not CSV ({exc})") from None


def _csv_body(line: int, header: list[str], cells: list[str]) -> dict[str, Any]:
    """A row's cells as the API's fields; an empty cell is a field not sent."""
    if len(cells) != len(header):
        raise KeyFileError(line, f"{len(cells)} cells, but the header names {len(header)}")
    body: dict[str, Any] = {}
    for column, cell in zip(header, cells, strict=True):
        if cell.strip():
            body[column] = _csv_value(line, column, cell.strip())
    return body


def _csv_value(line: int, column: str, cell: str) -> Any:
    if column in WHOLE_COLUMNS:
        try:
            return bounds.whole_number(cell)
        except ValueError as exc:
            raise KeyFileError(line, f"{column}: {exc}") from None
    if column == "enabled":
        if cell.lower() not in TRUE | FALSE:
            raise KeyFileError(line, f"enabled: {cell!r} is not true or false")
        return cell.lower() in TRUE
    if column == "groups":
        return [group for group in GROUP_SEPARATORS.split(cell) if group]
    return cell
