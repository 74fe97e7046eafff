"""The documented bounds of every number portmeter accepts, and the text every store holds, in
one place.

Each bound lies well inside what every store of the number can hold: nf_tables (u64 quota and
counter bytes, encoded by `nft/codec.py`), SQLite and PostgreSQL (signed 64-bit integers, also when
summed over many keys and hours), JSON readers in browsers (exact up to 2^53). The API refuses a
value outside them with 422, the CLI with one line, and `portmeter state check` calls a state file
holding one damaged. README "Bounds and names" lists them for operators.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

# A data limit: up to 1 EB (10^18 bytes). 2^63 is 9.2 * 10^18: 9 keys at the bound still sum
# without overflow in SQLite or PostgreSQL, and no link carries 1 EB in a reset period.
MAX_LIMIT_BYTES: Final = 10**18

# Usage counted for one key in one direction since its last reset: the same ceiling, which a
# 100 Gbit/s link would need 2.5 years of saturation to reach.
MAX_USAGE_BYTES: Final = 10**18

# The bytes one report (one key, one server, one delivery) may carry: 1 PB, 22 hours of a
# saturated 100 Gbit/s link. A report never covers more than a few poll intervals.
MAX_REPORT_BYTES: Final = 10**15

# Ports.
MIN_PORT: Final = 1
MAX_PORT: Final = 65535

# A key's note.
MAX_NOTE_CHARS: Final = 256

# Dates: expiry and reset times between 2000 and 9998, so "+Nd" arithmetic and time zones never
# leave what Python's datetime holds (year 1 to 9999).
EARLIEST_MOMENT: Final = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_MOMENT: Final = datetime(9998, 12, 31, tzinfo=UTC)

# Resets of one key so far.
MAX_EPOCH: Final = 10**9

# What nf_tables holds: counters, object handles and a quota's `used` are u64; a quota's limit is
# at most 2^63 - 1 (the kernel refuses more with EOVERFLOW). nft/codec.py and nft/layout.py refuse
# a value outside these before it reaches the kernel.
MAX_U64: Final = 2**64 - 1
MAX_KERNEL_QUOTA: Final = 2**63 - 1

# Saves of the state so far (its generation): history and fleet reports store it as a signed
# 64-bit integer.
MAX_GENERATION: Final = 2**63 - 1

# Key names: characters in the kept (NFC) form. A key reference (id, uuid, or a name in any
# normal form, which may be longer than its NFC form) is at most MAX_REF_CHARS.
MAX_NAME_CHARS: Final = 64
MAX_REF_CHARS: Final = 256

# Sizes and dates as typed ("50GB", "+30d", an ISO date-time): at most this many characters.
MAX_SIZE_CHARS: Final = 32
MAX_MOMENT_CHARS: Final = 64

# Pages of GET /api/traffic/ports/exact: a page holds at most MAX_PAGE_LIMIT keys; there are
# never more keys than ports, so an offset past MAX_PORT is a mistake.
MAX_PAGE_LIMIT: Final = 10000
MAX_OFFSET: Final = MAX_PORT

# Pages of the users of GET /api/admin/usage: users are this server's keys plus every user other
# servers reported, so their offset may pass the port count; `search` is at most a name's length.
MAX_USER_OFFSET: Final = 10**7
MAX_SEARCH_CHARS: Final = MAX_NAME_CHARS

# Request bodies of the API: at most this many bytes and levels of JSON nesting, refused before
# they are parsed (413, 400). A batch of usage reports holds one report per key that moved: up to
# a whole port range.
MAX_BODY_BYTES: Final = 64 * 1024
MAX_BODY_DEPTH: Final = 16
MAX_REPORT_BATCH: Final = 65536

# `portmeter traffic --watch`: seconds between redraws, and how many redraws at most.
MIN_WATCH_SECONDS: Final = 0.1
MAX_WATCH_SECONDS: Final = 3600
MAX_WATCH_COUNT: Final = 10**6


def limit_bytes(value: int) -> int:
    """`value` if it is a data limit within the bounds; ValueError saying which one otherwise."""
    if value < 0:
        raise ValueError("must not be negative")
    if value > MAX_LIMIT_BYTES:
        raise ValueError(f"at most {MAX_LIMIT_BYTES} bytes (1 EB)")
    return value


MOMENT_RANGE: Final = f"not between {EARLIEST_MOMENT:%Y-%m-%d} and {LATEST_MOMENT:%Y-%m-%d}"


def moment(value: datetime) -> datetime:
    """`value` (time zone aware) if it lies within the bounds; ValueError otherwise."""
    if not EARLIEST_MOMENT <= value <= LATEST_MOMENT:
        raise ValueError(f"{value.isoformat()} is {MOMENT_RANGE}")
    return value


# An Xray config file portmeter reads (the managed file or a migration source): 40 MB, about
# five times the file of 10,000 keys and room for some 50,000 key inbounds. Larger is refused
# before it is read.
MAX_XRAY_CONFIG_BYTES: Final = 40 * 10**6

# The TCP listener (README "Usage history, the Traffic Manager page, a fleet, Prometheus"):
# connections held at once, in total and per client address (an IPv6 client counts by its /64),
# and how long a request's head and body may take to arrive. OPEN_FILES is the daemon's open-file
# budget (the unit's LimitNOFILE=, and the soft limit raised at start when the hard one allows):
# the largest listener cap plus room for the Unix socket's clients, state, history and netlink
# sockets.
MAX_HTTP_CONNECTIONS: Final = 10_000
MIN_HTTP_TIMEOUT: Final = 0.1
MAX_HTTP_TIMEOUT: Final = 600.0
OPEN_FILES: Final = 16_384

# Events that can repeat thousands of times a second (refused connections and requests, accept
# failures) are logged at most once per this many seconds, with a count.
MIN_LOG_REPEAT_INTERVAL: Final = 0.1
MAX_LOG_REPEAT_INTERVAL: Final = 3600.0

# An API key (PORTMETER_API_KEY, PORTMETER_REPORT_API_KEYS): long enough not to be guessed.
MIN_API_KEY_CHARS: Final = 16
MAX_API_KEY_CHARS: Final = 256

# Kernel limits of one key (README "Speed, connection and device limits"): a speed in bits per
# second per direction (the kernel's rate is in bytes, so a multiple of 8 is exact), concurrent
# TCP connections, distinct client addresses within PORTMETER_IP_WINDOW seconds.
MIN_SPEED_BPS: Final = 8_000
MAX_SPEED_BPS: Final = 100 * 10**9
MAX_CONNECTIONS: Final = 100_000
MAX_IPS: Final = 1000
MIN_IP_WINDOW: Final = 1
MAX_IP_WINDOW: Final = 7 * 24 * 3600


def speed_bps(value: int) -> int:
    """`value` if it is a speed limit within the bounds; ValueError saying which one otherwise."""
    if not MIN_SPEED_BPS <= value <= MAX_SPEED_BPS:
        raise ValueError(
            f"a speed of {value} bit/s is outside {MIN_SPEED_BPS}..{MAX_SPEED_BPS} (100 Gbit)"
        )
    return value


# A whole number as typed (a CSV cell, a CLI option, a JSON number of an import file): ASCII
# digits, at most MAX_DIGITS of them. Every bound is below 10^20, and Python refuses to convert a
# number of more than 4,300 digits (sys.get_int_max_str_digits) with an error of its own.
MAX_DIGITS: Final = 20


def whole_number(text: str) -> int:
    """`text` as a whole number if it is ASCII digits (`int("\u0665")` would be 5), at most
    MAX_DIGITS of them; ValueError saying which otherwise."""
    digits = text.removeprefix("-")
    if len(digits) > MAX_DIGITS and digits.isascii() and digits.isdecimal():
        raise ValueError(f"a number of {len(digits)} digits: no field takes more than {MAX_DIGITS}")
    if not text.isascii() or not text.isdecimal() or len(text) > MAX_DIGITS:
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


# Text every store holds: PostgreSQL's `text` cannot hold U+0000 (NUL), and a lone surrogate
# (which JSON can spell, "\ud800") is no Unicode text, so no UTF-8 store holds it. Every text
# value of every request body (keyfields.RequestBody) and every setting passes `stored_text`.
UNSTORABLE_TEXT: Final = re.compile(r"[\x00\ud800-\udfff]")


def stored_text(value: str) -> str:
    """`value` if every store can hold it; ValueError naming the first character none can."""
    found = UNSTORABLE_TEXT.search(value)
    if found is not None:
        code = ord(found.group())
        what = "NUL" if code == 0 else "a lone surrogate"
        raise ValueError(f"may not contain U+{code:04X} ({what}): no store can hold it")
    return value


def stored_texts(value: object) -> object:
    """`value` if it is text every store holds, or a list or tuple whose text items are; any
    other value as it is (its own checks judge it). ValueError as `stored_text`."""
    for text in value if isinstance(value, list | tuple) else (value,):
        if isinstance(text, str):
            stored_text(text)
    return value


# Fleet groups (README "Keys created once"): PORTMETER_SERVER_GROUPS and a key's `groups`, short
# lower-case words, a handful per key.
MAX_GROUPS: Final = 16
GROUP_PATTERN: Final = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
# At start a node waits at most this long for the fleet database before it follows the keys
# there and declares itself ready; a database that is down never holds start-up longer.
FLEET_START_WAIT: Final = 3.0
# Seconds a start may spend applying the fleet's keys before READY; the rest follows after it
# (systemd's TimeoutStartSec is 120 s in the unit).
FLEET_CONVERGE_BUDGET: Final = 60.0
# Every node writes `servers.last_seen` at least this often (seconds); a server silent for longer
# than SERVER_SILENT is left out of the fleet's subscriptions and shows as `silent` in a key's
# servers (a stopped node must not keep links to it in every subscription).
SERVER_HEARTBEAT: Final = 60.0
SERVER_SILENT: Final = 300.0
# Resets in the fleet database are stamped by its clock (README "A fleet in PostgreSQL"): one
# later than its now() by more than this many seconds is damage, read as no reset.
FLEET_RESET_SLACK: Final = 300
# Choosing a new key's port asks the kernel which of this many ports from the candidate on are
# bound by other processes (one filtered sock_diag dump), never the whole range.
PORT_PROBE: Final = 64
# Keys one batch request creates (README "Batch create"): all or nothing, in one save.
MAX_BATCH_KEYS: Final = 1000
# The body of one batch (POST /api/keys/batch): MAX_BATCH_KEYS keys with every field at its
# longest (a 64-character name, a 256-character note, 16 groups), JSON-escaped, fit in 4 MiB.
MAX_BATCH_BODY_BYTES: Final = 4 * 1024 * 1024
BATCH_PATH: Final = "/api/keys/batch"
# Inbounds one `xray api adi` command adds (README "Xray"): a process start is 10+ ms, so a
# batch of keys is added a few hundred at a time, while a command line stays far below its limit.
XRAY_API_BATCH: Final = 200
