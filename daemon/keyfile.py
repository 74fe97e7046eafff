"""The files `portmeter keys import` reads (README "Batch create"): CSV with a header row, or JSON
lines, each row one key as `POST /api/keys` takes it. Pure: text in, request bodies out, every
problem as a KeyFileError naming its line, so a bad file is refused before anything is created.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from daemon import names
from daemon.http.keyfields import NewKey, describe_errors

Format = Literal["csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl")
EXTENSIONS: dict[str, Format] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
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


def format_of(path: str, text: str, chosen: Format | None) -> Format:
    """`chosen` (--format), else by the file's extension, else by the first character: JSON
    lines start with `{`."""
    if chosen is not None:
        return chosen
    for extension, found in EXTENSIONS.items():
        if path.lower().endswith(extension):
            return found
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def read_rows(text: str, form: Format) -> list[Row]:
    """Every key of the file, checked as the daemon checks a new key (http/schemas.py NewKey)
    and for names the file holds twice; KeyFileError for the first bad line."""
    rows = _csv_rows(text) if form == "csv" else _json_rows(text)
    if not rows:
        raise KeyFileError(1, "the file holds no keys")
    seen: dict[str, int] = {}
    for row in rows:
        _check(row)
        folded = names.fold(row.body["name"])
        if folded in seen:
            raise KeyFileError(
                row.line, f"{row.body['name']!r} has the same name as line {seen[folded]}"
            )
        seen[folded] = row.line
    return rows


def _check(row: Row) -> None:
    try:
        NewKey.model_validate(row.body)
    except ValidationError as exc:
        raise KeyFileError(row.line, describe_errors(exc.errors())) from None


def _json_rows(text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KeyFileError(number, f"not JSON ({exc.msg})") from None
        except RecursionError:
            raise KeyFileError(number, "not a key: JSON nested too deeply") from None
        if not isinstance(body, dict):
            raise KeyFileError(number, 'each line must be one JSON object, e.g. {"name": "alice"}')
        rows.append(Row(number, body))
    return rows


def _csv_rows(text: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [cell.strip() for cell in next(reader, [])]
        if not header:
            return []
        if "name" not in header:
            raise KeyFileError(1, "the header row must name the columns, `name` among them")
        rows, start = [], reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                rows.append(Row(start, _csv_body(start, header, cells)))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise KeyFileError(reader.line_num, f"not CSV ({exc})") from None
    return rows


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
        if not cell.isascii() or not cell.isdecimal():
            raise KeyFileError(line, f"{column}: {cell!r} is not a whole number")
        return int(cell)
    if column == "enabled":
        if cell.lower() not in TRUE | FALSE:
            raise KeyFileError(line, f"enabled: {cell!r} is not true or false")
        return cell.lower() in TRUE
    if column == "groups":
        return [group for group in GROUP_SEPARATORS.split(cell) if group]
    return cell
