"""daemon/names.py without a daemon: which new names are taken, and when two names are one.

Each known attack on key names is an example here (alice/Alice, NFC and NFD café, a
zero-width joiner, Cyrillic а in a Latin name, fullwidth letters, id- and uuid-shaped names);
the properties say the same for every name hypothesis finds.
"""

from __future__ import annotations

import unicodedata
import uuid

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from daemon.names import NameRefused, find, fold, normalise, same_as, script, usable, validate

fast = settings(max_examples=300, deadline=None, database=None)

# Letters of one script each, with and without accents; names draw from one of them.
SCRIPTS = {
    "LATIN": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéüßøÅçñ",
    "CYRILLIC": "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЖЯ",
    "GREEK": "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΩ",
    "JAPANESE": "日本語漢字あいうえおアイウエオー々",
}
INSIDE = "0123456789 _.@+-"
# Look-alikes of Latin letters from other scripts: Cyrillic а е о р с х, Greek ο ν.
HOMOGLYPHS = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441",
              "x": "\u0445", "v": "\u03bd"}
INVISIBLE = ["\u200d", "\u200c", "\u200b", "\u2060", "\ufeff", "\u00ad", "\x00", "\x1b", "\x07",
             "\x7f", "\u202e", "\u00a0", "\u3000", "\u2028", "\u034f", "\ufe0f", "\u3164",
             "\u180b", "\U0001d173"]


@st.composite
def good_names(draw: st.DrawFn, letters: str | None = None) -> str:
    """A name the rule takes: letters of one script, then letters, digits and punctuation."""
    alphabet = letters or draw(st.sampled_from(sorted(SCRIPTS.values())))
    first = draw(st.sampled_from(alphabet))
    rest = draw(st.text(alphabet=alphabet + INSIDE, max_size=62))
    name = (first + rest).rstrip(" ")
    assume(not set(fold(name)) <= set("0123456789abcdef-"))  # not shaped like an id or a uuid
    return name


def test_the_attacks_of_issue_17() -> None:
    assert same_as("Alice", ["bob", "alice"]) == "alice"
    assert same_as("ALICE", ["alice"]) == "alice"
    assert same_as("ａｌｉｃｅ", ["alice"]) == "alice"  # fullwidth
    assert same_as("cafe\u0301", ["caf\u00e9"]) == "caf\u00e9"  # NFD and NFC
    assert same_as("alicia", ["alice"]) is None
    assert validate("cafe\u0301") == "caf\u00e9"  # kept in NFC
    with pytest.raises(NameRefused, match=r"invisible or control characters \(U\+200D\)"):
        validate("ali\u200dce")
    with pytest.raises(NameRefused, match=r"mixes letters of several scripts \(CYRILLIC, LATIN\)"):
        validate("\u0430lice")
    with pytest.raises(NameRefused, match="may not look like a key id"):
        validate("deadbeef")
    with pytest.raises(NameRefused, match="may not look like a key id"):
        validate("ＤＥＡＤＢＥＥＦ")
    with pytest.raises(NameRefused, match="may not look like a uuid"):
        validate("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
    with pytest.raises(NameRefused, match=r"digits must be 0-9, not '٥'"):
        validate("alice٥")


@pytest.mark.parametrize("char", ["\u034f", "\ufe0f", "\u3164", "\uffa0", "\U000e0100"])
def test_default_ignorable_characters_make_no_other_name(char: str) -> None:
    """Drawn as nothing, though some are marks or letters: `alice` with one is `alice`."""
    assert same_as("alice" + char, ["alice"]) == "alice"
    assert fold("al" + char + "ice") == "alice"
    for name in ("alice" + char, char, "\u3164" + char):
        with pytest.raises(NameRefused, match=r"invisible or control characters \(U\+"):
            validate(name)


@pytest.mark.parametrize(
    "name",
    ["alice", "Alice Smith", "bob.2@example.org", "_x", "a+b-c", "café", "日本語テスト", "हिन्दी",
     "Ελένη", "Наталья", "ａｌｉｃｅ", "x" * 64, "deadbee", "deadbeef0", "1234-5678"],
)
def test_names_the_rule_takes(name: str) -> None:
    assert validate(name) == unicodedata.normalize("NFC", name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must be 1-64 characters, not 0"),
        ("x" * 65, "must be 1-64 characters, not 65"),
        (" alice", "must start with a letter, a digit or _"),
        ("alice ", "may not end with a space"),
        ("-alice", "must start with"),
        ("\u0301alice", "must start with"),
        ("semi;colon", r"may not contain ';' \(U\+003B\)"),
        ("smile☺", r"may not contain '☺'"),
        ("price€", r"may not contain '€'"),
        ("12345678", "may not look like a key id"),
        ("CafeBabe", "may not look like a key id"),
        ("6BA7B8109DAD11D180B400C04FD430C8", "may not look like a uuid"),
        ("Ελένη Smith", r"mixes letters of several scripts \(GREEK, LATIN\)"),
        ("テスト한국어", r"mixes letters of several scripts \(HANGUL, KATAKANA\)"),
    ],
)
def test_names_the_rule_refuses(name: str, reason: str) -> None:
    with pytest.raises(NameRefused, match=reason):
        validate(name)


def test_scripts_come_from_unicode_names() -> None:
    assert [script(c) for c in "aаα中あアー한"] == [
        "LATIN", "CYRILLIC", "GREEK", "HAN", "HIRAGANA", "KATAKANA", "KATAKANA", "HANGUL",
    ]


@fast
@given(st.text(max_size=80))
def test_validate_refuses_only_with_a_reason(text: str) -> None:
    """Any text: taken (in NFC, checked again the same) or refused with NameRefused, never
    another exception (an exception in a pydantic validator would be a 500)."""
    try:
        kept = validate(text)
    except NameRefused as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert kept == unicodedata.normalize("NFC", text) == normalise(kept)
    assert validate(kept) == kept


@fast
@given(st.text(max_size=40))
def test_fold_is_one_key_per_name(text: str) -> None:
    folded = fold(text)
    assert fold(folded) == folded
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        assert fold(unicodedata.normalize(form, text)) == folded


@fast
@example(name="alice")
@given(good_names())
def test_case_width_and_normal_form_make_the_same_name(name: str) -> None:
    kept = validate(name)
    for variant in (name.upper(), name.lower(), name.swapcase(), name.casefold(),
                    unicodedata.normalize("NFD", name), _fullwidth(name)):
        assert same_as(variant, ["somebody", kept]) == kept, variant
        assert find(variant, [("somebody", 1), (kept, 2)], lambda item: item[0]) == (kept, 2)


@fast
@given(good_names(), st.sampled_from(INVISIBLE), st.integers(min_value=0, max_value=64))
def test_invisible_characters_are_refused_anywhere(name: str, char: str, at: int) -> None:
    spliced = name[:at] + char + name[at:]
    with pytest.raises(NameRefused, match="invisible or control characters"):
        validate(spliced)


@fast
@given(good_names(SCRIPTS["LATIN"]), st.data())
def test_a_look_alike_letter_from_another_script_is_refused(name: str, data: st.DataObject) -> None:
    letters = [i for i, c in enumerate(name) if c in HOMOGLYPHS]
    assume(letters)
    at = data.draw(st.sampled_from(letters))
    spoofed = name[:at] + HOMOGLYPHS[name[at]] + name[at + 1:]
    assume(any(c.isalpha() and script(c) == "LATIN" for c in spoofed))  # a Latin letter is left
    with pytest.raises(NameRefused, match="mixes letters of several scripts"):
        validate(spoofed)


@fast
@given(st.uuids(), st.booleans())
def test_ids_and_uuids_are_no_names(value: uuid.UUID, upper: bool) -> None:
    for shaped in (str(value), value.hex, value.hex[:8]):
        with pytest.raises(NameRefused, match="may not look like"):
            validate(shaped.upper() if upper else shaped)


def test_find_prefers_the_exact_spelling_and_refuses_to_guess() -> None:
    """A state saved before the rule may hold `alice` and `Alice`: each is found by its own
    spelling, `ALICE` by neither (no guessing which one is meant)."""
    keys = [("alice", 1), ("Alice", 2), ("bob", 3), ("cafe\u0301", 4)]
    assert find("alice", keys, lambda item: item[0]) == ("alice", 1)
    assert find("Alice", keys, lambda item: item[0]) == ("Alice", 2)
    assert find("ALICE", keys, lambda item: item[0]) is None
    assert find("BOB", keys, lambda item: item[0]) == ("bob", 3)
    assert find("caf\u00e9", keys, lambda item: item[0]) == ("cafe\u0301", 4)
    assert find("carol", keys, lambda item: item[0]) is None


def _fullwidth(text: str) -> str:
    """ASCII letters and digits as their fullwidth forms (U+FF01 onwards)."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in text)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("ivan@vpn-2", "ivan@vpn-2"),
        ("o'brien /* x */", "o-brien-x"),
        ("\u200dzz", "zz"),
        ("deadbeef", "client-1"),  # an id's shape
        ("\u0430lice", "client-1"),  # Cyrillic а with Latin letters
        ("", "client-1"),
    ],
)
def test_migrated_texts_become_usable_names(text: str, name: str) -> None:
    assert usable(text, "client-1") == name


@given(st.text(max_size=120))
def test_any_text_becomes_a_name_the_rule_takes(text: str) -> None:
    made = usable(text, "client-1")
    assert validate(made) == made
