"""Key names: which names a new key may take, and when two names are the same name.

A name is read and typed by people, and every key reference (`/api/keys/{key}`, the CLI) may be
an id, a uuid or a name. So names a person cannot tell apart are one name, and no name reads as
an id or a uuid. The rule, as README "Bounds and names" states it:

- two names are the same name when they are equal after NFKC normalisation and case folding
  (`alice`, `Alice`, `ALICE` and fullwidth `ａｌｉｃｅ`; `café` in NFC and in NFD);
- a name is 1 to 64 characters; after NFKC each is a letter, a combining mark, a digit 0-9, a
  space or one of `_ . @ + -`; it starts with a letter, a digit or `_` and does not end with a
  space; control, format (such as the zero-width joiner), invisible space and
  default-ignorable characters (variation selectors, Hangul fillers) are refused;
- its letters come from one script (Latin with Cyrillic or Greek is refused: Cyrillic `а` looks
  like Latin `a`); Han ideographs may join Hiragana and Katakana, Hangul or Bopomofo. A letter's
  script is the first word of its Unicode name (LATIN, CYRILLIC, GREEK, ARABIC, ...);
- it is not shaped like a key id (8 hex digits) or a uuid (32 hex digits, hyphens aside), in
  any case.

Names saved before the rule existed keep working: only new names are checked.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

from daemon.bounds import MAX_NAME_CHARS

RULE: Final = (
    f"1-{MAX_NAME_CHARS} letters of one script, combining marks, digits 0-9, spaces or _ . @ + -, "
    "starting with a letter, digit or _; not shaped like a key id or a uuid"
)
SAME: Final = "case, width and Unicode normal form do not count"
PUNCTUATION: Final = frozenset("_.@+- ")
# Invisible or control: control, format, surrogate, private use, unassigned, line and paragraph
# separators. Spaces other than U+0020 are refused too.
INVISIBLE: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
# Unicode's Default_Ignorable_Code_Point ranges: drawn as nothing, whatever their category (the
# combining grapheme joiner, variation selectors, Hangul fillers, ...). A name may not hold them
# and the "same name" key drops them, so `alice` with one is still `alice`.
IGNORABLE: Final = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
# The same, as one character class: a name is scanned in C, not character by character (a batch
# of 1,000 new names is folded several times each).
IGNORABLE_CHARS: Final = re.compile(
    "["
    + "".join(f"{re.escape(chr(first))}-{re.escape(chr(last))}" for first, last in IGNORABLE)
    + "]"
)
# Scripts a letter's Unicode name gives under another first word.
SCRIPT_ALIASES: Final = {"CJK": "HAN", "IDEOGRAPHIC": "HAN", "KATAKANA-HIRAGANA": "KATAKANA"}
# Scripts written together: Japanese, Korean, Chinese with Bopomofo.
SCRIPT_FAMILIES: Final = (
    frozenset({"HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"HAN", "HANGUL"}),
    frozenset({"HAN", "BOPOMOFO"}),
)
KEY_ID_SHAPE: Final = re.compile(r"[0-9a-f]{8}")
UUID_SHAPE: Final = re.compile(r"[0-9a-f]{32}")

T = TypeVar("T")


class NameRefused(ValueError):
    """A new name breaks the rule; the message says how, in one line."""


def normalise(name: str) -> str:
    """The form a new name is kept in: NFC, which changes no character's look."""
    return unicodedata.normalize("NFC", name)


def fold(name: str) -> str:
    """The "same name" key: without default-ignorable characters, NFKC, case folded, NFKC again
    (folding can undo normalisation). No character's NFKC or case fold is default-ignorable."""
    visible = IGNORABLE_CHARS.sub("", name)
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", visible).casefold())


def validate(name: str) -> str:
    """`name` in its kept form (NFC) if a new key may take it; raises NameRefused otherwise."""
    kept = normalise(name)
    if not 1 <= len(kept) <= MAX_NAME_CHARS:
        raise NameRefused(f"must be 1-{MAX_NAME_CHARS} characters, not {len(kept)}")
    for char in kept:
        if _invisible(char):
            raise NameRefused(f"may not contain invisible or control characters ({_code(char)})")
    compatible = unicodedata.normalize("NFKC", kept)
    for char in compatible:
        _check_character(char)
    if not _starts_well(compatible[0]) or compatible[-1] == " ":
        raise NameRefused("must start with a letter, a digit or _ and may not end with a space")
    _check_scripts(compatible)
    _check_shape(fold(kept))
    return kept


def usable(text: str, fallback: str) -> str:
    """A name a new key may take, made from `text` that was not typed as one (a migrated
    client's email or id): characters the rule refuses become `-`; `fallback` (itself a valid
    name) when even that is refused (a mix of scripts, an id's shape, nothing left)."""
    kept = "".join(char if _allowed(char) else "-" for char in normalise(text))
    if kept != normalise(text):  # one dash where refused characters (and spaces) were
        kept = re.sub(r"\s*-[\s-]*", "-", kept)
    kept = kept[: MAX_NAME_CHARS - 6]  # room for the "-N" a clash with another name adds
    try:
        return validate(kept.strip(" -.+@"))
    except NameRefused:
        return validate(fallback)


def _allowed(char: str) -> bool:
    try:
        for part in unicodedata.normalize("NFKC", char):
            _check_character(part)
    except NameRefused:
        return False
    return not _invisible(char)


def _invisible(char: str) -> bool:
    """Control, format, a space other than U+0020, or default-ignorable."""
    return (unicodedata.category(char) in INVISIBLE and char != " ") or _ignorable(char)


def _ignorable(char: str) -> bool:
    return IGNORABLE_CHARS.fullmatch(char) is not None


def same_as(name: str, existing: Iterable[str]) -> str | None:
    """The first of `existing` that is the same name as `name`, if any."""
    wanted = fold(name)
    return next((other for other in existing if fold(other) == wanted), None)


def find(ref: str, items: Iterable[T], name_of: Callable[[T], str]) -> T | None:
    """The item named `ref` exactly, else the one item with the same name; None when there is
    none, or several (a state saved before the rule may hold `alice` and `Alice`)."""
    listed = list(items)
    exact = [item for item in listed if name_of(item) == ref]
    if exact:
        return exact[0]
    wanted = fold(ref)
    same = [item for item in listed if fold(name_of(item)) == wanted]
    return same[0] if len(same) == 1 else None


def _code(char: str) -> str:
    return f"U+{ord(char):04X}"


def _check_character(char: str) -> None:
    category = unicodedata.category(char)
    if category[0] in "LM" or char in PUNCTUATION or "0" <= char <= "9":
        return
    if category == "Nd":
        raise NameRefused(f"digits must be 0-9, not {char!r} ({_code(char)})")
    raise NameRefused(f"may not contain {char!r} ({_code(char)}): use {RULE}")


def _starts_well(char: str) -> bool:
    return unicodedata.category(char)[0] == "L" or char == "_" or "0" <= char <= "9"


def script(char: str) -> str:
    """A letter's script, as the first word of its Unicode name says (CJK... is HAN)."""
    word = unicodedata.name(char, "UNNAMED").split(" ", 1)[0]
    return SCRIPT_ALIASES.get(word, word)


def _check_scripts(text: str) -> None:
    scripts = {script(char) for char in text if unicodedata.category(char)[0] == "L"}
    if len(scripts) <= 1 or any(scripts <= family for family in SCRIPT_FAMILIES):
        return
    listed = ", ".join(sorted(scripts))
    raise NameRefused(f"mixes letters of several scripts ({listed}): use letters of one script")


def _check_shape(folded: str) -> None:
    if KEY_ID_SHAPE.fullmatch(folded):
        raise NameRefused("may not look like a key id (8 hex digits)")
    if UUID_SHAPE.fullmatch(folded.replace("-", "")):
        raise NameRefused("may not look like a uuid (32 hex digits)")


HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def host_problem(host: str) -> str | None:
    """Why `host` cannot be the host of a share link (None: it can): an IP address (IPv6 also
    in brackets), or a DNS name of labels of letters, digits, `-` and `_` (an internationalised
    name in its Unicode or ASCII form), at most 253 characters. Anything else, a space, a
    newline, `/`, `@` or `#`, would make a link point elsewhere or carry a second link."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return None
    except ValueError:
        pass
    try:
        ascii_name = host.removesuffix(".").encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    if 0 < len(ascii_name) <= 253 and all(map(HOST_LABEL.fullmatch, ascii_name.split("."))):
        return None
    return f"{host[:64]!r} is not a host name or an IP address"
