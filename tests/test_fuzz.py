"""Property-based fuzzing (hypothesis) of the sans-I/O protocol: any bytes, in any chunking,
never raise, never hold more than the line bound, and give what one-shot parsing gives."""

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgevent.errors import InvalidArgument, ProtocolError
from kvgevent.protocol import ERR_LINE_TOO_LONG, Auth, LineBuffer, Ping, Stats, encode, parse

EXAMPLES = 1500
"""Examples per property; each example is a whole stream cut into random chunks."""

FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that matter to the protocol are over-represented, so edges get hit often.
interesting = st.sampled_from(
    [
        b"\n",
        b"\r",
        b":",
        b"\r\n",
        b"PUT",
        b"get",
        b"UPDATE",
        b"Delete",
        b"PING",
        b"STATS",
        b"AUTH",
        b"\x00",
        b"\xff",
        b"k",
        b"v",
    ]
)
streams = st.lists(st.one_of(interesting, st.binary(max_size=40)), max_size=60).map(b"".join)


def reference_lines(data: bytes, max_line: int) -> list[bytes | ProtocolError]:
    """The specification, written plainly: complete lines, a trailing \\r dropped, lines over
    the bound (not counting that \\r) replaced by the too-long marker; the unterminated tail
    is held back, unless it is already over the bound and a \\r (then its marker comes at
    once)."""
    out: list[bytes | ProtocolError] = []
    *lines, tail = data.split(b"\n")
    for line in lines:
        line = line[:-1] if line.endswith(b"\r") else line
        out.append(ERR_LINE_TOO_LONG if len(line) > max_line else line)
    if len(tail) > max_line + 1:
        out.append(ERR_LINE_TOO_LONG)
    return out


@FUZZ
@given(
    data=streams,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    max_line=st.integers(min_value=1, max_value=64),
)
def test_any_chunking_gives_the_same_lines_as_one_shot(data, cuts, max_line):
    """Feeding a stream in arbitrary chunks never raises, never holds more than max_line
    bytes and a \\r, and yields exactly the lines of one-shot feeding (and of the plain
    reference)."""
    one_shot = LineBuffer(max_line).feed(data)
    buffer = LineBuffer(max_line)
    lines: list[bytes | ProtocolError] = []
    positions = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(positions):
        lines += buffer.feed(data[start:end])
        assert buffer.pending <= max_line + 1
    assert lines == one_shot == reference_lines(data, max_line)


@FUZZ
@given(line=st.one_of(streams, st.binary(max_size=200)).map(lambda b: b.replace(b"\n", b"")))
def test_parse_never_raises_and_round_trips(line):
    """Any line parses to a command or a ProtocolError; a command that can be encoded comes
    back unchanged from parsing its encoding."""
    result = parse(line)
    assert isinstance(result, ProtocolError) or type(result).__name__ in (
        "Put",
        "Get",
        "Update",
        "Delete",
        "Ping",
        "Stats",
        "Auth",
    )
    if isinstance(result, ProtocolError):
        assert result.reply.startswith(b"ERR ") and b":" not in result.reply
        return
    try:
        encoded = encode(result)
    except InvalidArgument:
        return  # e.g. a value ending in \r: parseable, but a client may not send it
    assert parse(encoded[:-1]) == result
    if not isinstance(result, Ping | Stats | Auth):
        assert result.key and b":" not in result.key


@FUZZ
@given(data=st.binary(max_size=3000), size=st.integers(min_value=1, max_value=512))
def test_random_bytes_in_fixed_chunks_never_break_the_buffer(data, size):
    buffer = LineBuffer(100)
    for start in range(0, len(data), size):
        for item in buffer.feed(data[start : start + size]):
            assert item is ERR_LINE_TOO_LONG or (isinstance(item, bytes) and len(item) <= 100)
            if isinstance(item, bytes):
                parse(item)
        assert buffer.pending <= 100
