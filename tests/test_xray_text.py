"""Reading Xray configs as Xray does: comments, strings, positions of errors, size.

The reference is a transliteration of Xray's own comment filter (the state machine of
infra/conf/json/reader.go in Xray-core), one character at a time; portmeter's reader is a
regular expression and must agree with it wherever the result can be JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.bounds import MAX_XRAY_CONFIG_BYTES
from daemon.xray.model import XrayConfigError, XrayOptions
from daemon.xray.text import read_config_text
from daemon.xray_sync import XrayFiles

CORPUS = Path(__file__).parent / "xray_corpus"


def xray_reader(text: str) -> tuple[str, str, bool]:
    """What Xray's reader passes to the JSON decoder, its final state, and whether it met a
    `/` followed by anything but `/` or `*` outside strings (never valid JSON; Xray then stays
    in its slash state, which no JSON can come out of)."""
    out: list[str] = []
    state, stray = "content", False
    for x in text:
        if state == "content":
            if x in "\"'":
                state = "dq" if x == '"' else "sq"
                out.append(x)
            elif x == "\\":
                state = "escape"
            elif x == "#":
                state = "comment"
            elif x == "/":
                state = "slash"
            else:
                out.append(x)
        elif state == "escape":
            out.append("\\" + x)
            state = "content"
        elif state in ("dq", "sq"):
            if x == ('"' if state == "dq" else "'"):
                state = "content"
                out.append(x)
            elif x == "\\":
                state += "-escape"
            else:
                out.append(x)
        elif state in ("dq-escape", "sq-escape"):
            out.append("\\" + x)
            state = state.removesuffix("-escape")
        elif state == "comment":
            if x == "\n":
                state = "content"
                out.append("\n")
        elif state == "slash":
            if x == "/":
                state = "comment"
            elif x == "*":
                state = "block"
            else:
                out.append("/" + x)
                stray = True
        elif state == "block":
            if x == "*":
                state = "star"
            elif x == "\n":
                out.append("\n")
        elif state == "star":
            if x == "/":
                state = "content"
            elif x == "\n":
                out.append("\n")
            elif x != "*":
                state = "block"
    return "".join(out), state, stray


def parsed(text: str) -> Any:
    return read_config_text(text.encode(), "test.json").config


# --- the comment forms Xray accepts --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1} # hash', {"a": 1}),
        ('{"a": 1, // slashes\n"b": 2}', {"a": 1, "b": 2}),
        ('{"a": /* inline */ 1}', {"a": 1}),
        ('/* several\n lines\n */ {"a": 1}', {"a": 1}),
        ('{"a": 1 /* stars ** inside **/}', {"a": 1}),
        ('{"a": 1 /* a star, a newline, then the slash: *\n/}', {"a": 1}),
        ('{"u": "http://example.com/#x"}', {"u": "http://example.com/#x"}),
        ('{"u": "/* kept */ // kept # kept"}', {"u": "/* kept */ // kept # kept"}),
        ('{"q": "say \\"hi\\" // in a string"} // a comment', {"q": 'say "hi" // in a string'}),
        ('{"p": "C:\\\\dir\\\\"} # backslash at the end of a string', {"p": "C:\\dir\\"}),
        ('{"a": 1}\n# a last line without a newline', {"a": 1}),
    ],
)
def test_comments_are_read_as_xray_reads_them(text: str, value: Any) -> None:
    read = read_config_text(text.encode(), "t.json")
    assert read.config == value
    assert read.comments == (xray_reader(text)[0] != text)


def test_plain_json_has_no_comments_and_strings_keep_their_markers() -> None:
    read = read_config_text(b'{"a": "# not // a /* comment */"}', "t.json")
    assert read.config == {"a": "# not // a /* comment */"} and read.comments is False


tokens = st.sampled_from(list("{}[]:, a1\"'\\/*#\n"))


@given(st.lists(tokens, max_size=60).map("".join))
@settings(max_examples=3000, deadline=None)
def test_agrees_with_xrays_state_machine(text: str) -> None:
    filtered, state, stray = xray_reader(text)
    try:
        expected: Any = json.loads(filtered)
    except ValueError:
        expected = None
    unclosed = state in ("block", "star") and not stray
    try:
        got: Any = parsed(text)
    except XrayConfigError as exc:
        got = None
        assert "\n" not in str(exc)
        if unclosed:
            assert "never closes" in str(exc)
    if unclosed or stray:
        return  # Xray's result is not JSON either (or ends inside a comment): refused
    assert got == (expected if isinstance(expected, dict) else None)


object_keys = st.text(alphabet="ab/#*'\"\\ \n", max_size=6)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-1000, 1000)
    | st.text(alphabet="xy/#*'\"\\ \n", max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(object_keys, inner, max_size=3),
    max_leaves=12,
)
comments = st.sampled_from(
    ["", " ", "\n", "// c\n", "# c '\"\n", "/* c */", "/* \n*\n*/", "/* // # */"]
)


@given(st.dictionaries(object_keys, values, max_size=4), st.data())
@settings(max_examples=300, deadline=None)
def test_any_object_with_comments_between_tokens_reads_back(
    config: dict[str, Any], data: Any
) -> None:
    text = json.dumps(config, indent=1)
    pieces, in_string, escaped = [], False, False
    for char in text:  # a comment may follow a structural character, a space or a string
        pieces.append(char)
        if in_string:
            closed = char == '"' and not escaped
            escaped = char == "\\" and not escaped
            in_string = not closed
            if closed:
                pieces.append(data.draw(comments))
        elif char == '"':
            in_string = True
        elif char in "{}[],: \n":
            pieces.append(data.draw(comments))
    with_comments = "".join(pieces)
    assert parsed(with_comments) == config
    assert json.loads(xray_reader(with_comments)[0]) == config


# --- errors: one line, with the position in the file as written ---------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1,\n  "b": }', "not valid JSON at line 2, column 8: Expecting value"),
        ('# intro\n/* two\nlines */ {"a": 1 "b": 2}', "at line 3, column 18: Expecting ','"),
        ('{"a": /* x */ 1 /* y */ 2}', "not valid JSON at line 1, column 25: Expecting ','"),
        ('{"a": 1} {"b": 2}', "not valid JSON at line 1, column 10: Extra data"),
        ("{'a': 1}", "not valid JSON at line 1, column 2: Expecting property name"),
        ('{"a": NaN}', "not valid JSON: NaN is not a JSON number"),
        ("[1, 2]", "is not a JSON object"),
        ("", "not valid JSON at line 1, column 1: Expecting value"),
        ('{"a": 1}\n/* never\nclosed', "the comment opened at line 2, column 1 never closes"),
        ('{"a": "x"} /* closed? */ /* no', "the comment opened at line 1, column 26 never closes"),
    ],
)
def test_errors_name_line_and_column(text: str, message: str) -> None:
    with pytest.raises(XrayConfigError) as caught:
        parsed(text)
    assert str(caught.value).startswith("Xray config test.json")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bytes_that_are_not_utf8_are_refused_with_their_position() -> None:
    with pytest.raises(XrayConfigError, match=r"not UTF-8 text \(line 2, column 10\)"):
        read_config_text('{\n"ключ": "\xff"}'.encode().replace(b"\xc3\xbf", b"\xff"), "x")


def test_a_config_over_the_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    with path.open("wb") as handle:  # sparse: 50 MB that take no disk
        handle.truncate(50 * 10**6)
    files = XrayFiles(XrayOptions(config_path=path, xray_bin=tmp_path / "none"))
    most = f"has 50000000 bytes; portmeter reads at most {MAX_XRAY_CONFIG_BYTES}"
    with pytest.raises(XrayConfigError, match=most):
        files.read()
    with pytest.raises(XrayConfigError, match="has 40000001 bytes"):
        read_config_text(b" " * (MAX_XRAY_CONFIG_BYTES + 1), "big.json")
    assert MAX_XRAY_CONFIG_BYTES == 40 * 10**6


def test_every_corpus_config_reads_like_its_plain_json_twin() -> None:
    files = sorted(CORPUS.glob("*.jsonc"))
    assert len(files) >= 8
    for path in files:
        text = path.read_text()
        filtered, state, stray = xray_reader(text)
        assert state == "content" and not stray, path.name
        read = read_config_text(text.encode(), path.name)
        assert read.config == json.loads(filtered), path.name
        assert read.comments == (filtered != text), path.name
