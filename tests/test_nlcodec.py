"""nlcodec: the fast object scanner decodes exactly what the general decoder does, falls back to it
for any layout it does not know, and encoded attributes decode back to themselves."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.nft import codec as nl

TABLE = "pmtest"
names = st.builds(
    lambda kind, port: f"{kind}_{port}",
    st.sampled_from(["rx", "tx", "drop", "q"]),
    st.integers(1, 65535),
)
u64 = st.integers(0, 2**64 - 1)
objects = st.lists(
    st.tuples(names, st.integers(1, 2**40), u64, u64), max_size=40, unique_by=lambda o: o[0]
)


def kernel_message(
    name: str, handle: int, first: int, second: int, seq: int, extra: bytes = b""
) -> bytes:
    """An object as the kernel dumps it: its data nest carries no NLA_F_NESTED flag."""
    quota = name.startswith("q_")
    if quota:
        data = nl.attr(nl.QUOTA_BYTES, nl.be64(first)) + nl.attr(nl.QUOTA_FLAGS, nl.be32(1))
        data += nl.attr(nl.QUOTA_CONSUMED, nl.be64(second))
    else:
        data = nl.attr(nl.COUNTER_BYTES, nl.be64(second)) + nl.attr(
            nl.COUNTER_PACKETS, nl.be64(first)
        )
    attrs = (
        nl.attr(nl.OBJ_TABLE, nl.text(TABLE))
        + nl.attr(nl.OBJ_NAME, nl.text(name))
        + nl.attr(nl.OBJ_TYPE, nl.be32(nl.OBJECT_QUOTA if quota else nl.OBJECT_COUNTER))
        + nl.attr(nl.OBJ_HANDLE, nl.be64(handle))
        + nl.attr(5, nl.be32(1))
        + nl.attr(nl.OBJ_DATA, data)
        + extra
    )
    return nl.message(nl.NEWOBJ, nl.MULTI, seq, attrs)


def general(dump: bytes) -> list[nl.KernelObject]:
    return [nl.kernel_object(m.body) for m in nl.messages(dump)]


@given(objects)
def test_scanner_equals_general_decoder(found: list[tuple[str, int, int, int]]) -> None:
    dump = b"".join(kernel_message(*obj, seq=7) for obj in found)
    scanner = nl.ObjectScanner(TABLE)
    first = scanner.scan(dump)
    assert first == general(dump)
    assert scanner.scan(dump) == first
    assert not found or scanner.scan(dump) is first  # unchanged dump: nothing decoded again


@given(objects.filter(bool), st.data())
def test_unknown_layout_falls_back_to_the_general_decoder(
    found: list[tuple[str, int, int, int]], data: st.DataObject
) -> None:
    odd = data.draw(st.integers(0, len(found) - 1))
    dump = b"".join(
        kernel_message(*obj, seq=7, extra=nl.attr(8, b"note") if i == odd else b"")
        for i, obj in enumerate(found)
    )
    assert nl.ObjectScanner(TABLE).scan(dump) == general(dump)


@given(objects, objects)
def test_changed_objects_are_decoded_again(
    before: list[tuple[str, int, int, int]], after: list[tuple[str, int, int, int]]
) -> None:
    scanner = nl.ObjectScanner(TABLE)
    scanner.scan(b"".join(kernel_message(*obj, seq=1) for obj in before))
    dump = b"".join(kernel_message(*obj, seq=2) for obj in after)
    assert scanner.scan(dump) == general(dump)


@given(st.dictionaries(st.integers(1, 0x3FFF), st.binary(max_size=40), max_size=10))
def test_attributes_round_trip(values: dict[int, bytes]) -> None:
    assert nl.attrs(b"".join(nl.attr(kind, payload) for kind, payload in values.items())) == values


def test_dump_part_stops_at_done_and_error_and_sees_interrupted_dumps() -> None:
    body = kernel_message("rx_1", 1, 2, 3, seq=5)
    done = nl.HEADER.pack(20, nl.NLMSG_DONE, nl.MULTI, 5, 0) + b"\0" * 4
    end, last, interrupted = nl.dump_part(body + done)
    assert end == len(body) and last is not None and last.kind == nl.NLMSG_DONE and not interrupted
    assert nl.dump_part(body) == (len(body), None, False)
    error = nl.HEADER.pack(20, nl.NLMSG_ERROR, 0, 5, 0) + (-2).to_bytes(4, "little", signed=True)
    end, last, _ = nl.dump_part(error)
    assert end == 0 and last is not None and nl.error_code(last.body)[0] == 2
    # The kernel flags the message it was filling when the ruleset changed under the dump.
    marked = nl.HEADER.pack(20, nl.NLMSG_DONE, nl.MULTI | nl.DUMP_INTERRUPTED, 5, 0) + b"\0" * 4
    assert nl.dump_part(body + marked)[2] is True
