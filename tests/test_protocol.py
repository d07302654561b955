"""Byte-exact unit tests of the sans-I/O protocol: line buffer, parser, encoders."""

import pytest

from kvgevent.errors import InvalidArgument, ProtocolError
from kvgevent.protocol import (
    ERR_EMPTY_KEY,
    ERR_EMPTY_LINE,
    ERR_FIELDS,
    ERR_LINE_TOO_LONG,
    ERR_UNKNOWN,
    PING,
    STATS,
    Delete,
    Get,
    LineBuffer,
    Put,
    ReplyKind,
    Update,
    classify_reply,
    encode,
    parse,
    parse_stats,
    parse_value,
    stats_line,
    value_line,
)

# --- LineBuffer ------------------------------------------------------------------------------


def test_feed_returns_complete_lines_without_newline():
    """Complete lines come out in order, stripped of their newline."""
    assert LineBuffer().feed(b"a\nbb\nccc\n") == [b"a", b"bb", b"ccc"]


def test_partial_line_waits_for_its_newline():
    """Bytes after the last newline are held until the newline arrives."""
    buf = LineBuffer()
    assert buf.feed(b"PUT:k") == []
    assert buf.pending == 5
    assert buf.feed(b":v") == []
    assert buf.feed(b"\nGET") == [b"PUT:k:v"]
    assert buf.feed(b":k\n") == [b"GET:k"]
    assert buf.pending == 0


def test_byte_at_a_time_gives_the_same_lines():
    """Any chunking, down to one byte at a time, yields the same lines as one feed."""
    stream = b"PUT:a:1\r\nGET:a\n\nUPDATE:a:1:2\r\n"
    buf = LineBuffer()
    lines = []
    for i in range(len(stream)):
        lines += buf.feed(stream[i : i + 1])
    assert lines == LineBuffer().feed(stream) == [b"PUT:a:1", b"GET:a", b"", b"UPDATE:a:1:2"]


def test_carriage_return_before_newline_is_dropped_but_kept_elsewhere():
    """Only a \\r right before \\n is a line ending; a \\r inside a line is data."""
    assert LineBuffer().feed(b"a\r\nb\rc\nd\r\r\n") == [b"a", b"b\rc", b"d\r"]


def test_carriage_return_split_from_its_newline():
    """A \\r at the end of one chunk and its \\n at the start of the next still end the line."""
    buf = LineBuffer()
    assert buf.feed(b"GET:k\r") == []
    assert buf.feed(b"\n") == [b"GET:k"]


def test_line_at_the_limit_is_accepted():
    """A line of exactly max_line bytes is a line."""
    assert LineBuffer(max_line=5).feed(b"12345\n") == [b"12345"]


def test_line_over_the_limit_in_one_chunk_becomes_one_error():
    """A too-long line inside a chunk is replaced by one ERR marker; its neighbours survive."""
    assert LineBuffer(max_line=5).feed(b"ok\n123456\nok2\n") == [b"ok", ERR_LINE_TOO_LONG, b"ok2"]


def test_line_over_the_limit_across_chunks_is_reported_once_and_not_buffered():
    """A long partial line is reported as soon as it passes the limit, then discarded
    chunk by chunk without being held, and the next line parses normally."""
    buf = LineBuffer(max_line=8)
    assert buf.feed(b"PUT:k:") == []
    assert buf.feed(b"abcdef") == [ERR_LINE_TOO_LONG]
    assert buf.pending == 0
    assert buf.feed(b"x" * 1000) == []
    assert buf.pending == 0
    assert buf.feed(b"yyy\nGET:k\n") == [b"GET:k"]


def test_partial_then_completion_over_the_limit():
    """A partial line under the limit that its completion takes over the limit is an error."""
    buf = LineBuffer(max_line=6)
    assert buf.feed(b"abcd") == []
    assert buf.feed(b"efg\nok\n") == [ERR_LINE_TOO_LONG, b"ok"]


def test_pending_never_exceeds_the_limit():
    """Whatever is fed, the buffer holds at most max_line bytes and one more (room for the
    \\r of a \\r\\n)."""
    buf = LineBuffer(max_line=10)
    for chunk in (b"a" * 7, b"b" * 3, b"c", b"c", b"\n" + b"d" * 10, b"e", b"e"):
        buf.feed(chunk)
        assert buf.pending <= 11


@pytest.mark.parametrize(
    "chunks",
    [[b"0123456789\r\n"], [b"0123456789", b"\r\n"], [b"0123456789\r", b"\n"], [b"01234", b"56789\r", b"\n"]],
    ids=["one chunk", "crlf apart", "lf apart", "three chunks"],
)
def test_a_crlf_line_at_the_limit_is_accepted_as_an_lf_one_is(chunks):
    """The \\r of a \\r\\n is not counted: a line of max_line bytes ends in either, however
    the bytes arrive (before, with \\r\\n the longest line was one byte shorter); one byte
    more is too long either way."""
    buf = LineBuffer(max_line=10)
    assert [line for chunk in chunks for line in buf.feed(chunk)] == [b"0123456789"]
    assert buf.feed(b"0123456789X\r\nok\r\n") == [ERR_LINE_TOO_LONG, b"ok"]
    assert buf.feed(b"0123456789X\n") == [ERR_LINE_TOO_LONG]
    assert buf.feed(b"0123456789X") == [] and buf.feed(b"\n") == [ERR_LINE_TOO_LONG]
    assert buf.feed(b"0123456789\rX") == [ERR_LINE_TOO_LONG]  # (a \\r inside: counted)
    assert buf.feed(b"\nok\n") == [b"ok"]


def test_invalid_max_line_is_refused():
    with pytest.raises(ValueError):
        LineBuffer(max_line=0)


# --- parse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"PUT:k:v", Put(b"k", b"v")),
        (b"Put:k:v", Put(b"k", b"v")),
        (b"put:k:", Put(b"k", b"")),
        (b"PUT:k:a:b:c", Put(b"k", b"a:b:c")),
        (b"PUT:k: spaces \x00\xff\r ", Put(b"k", b" spaces \x00\xff\r ")),
        (b"GET:k", Get(b"k")),
        (b"Get:k", Get(b"k")),
        (b"gEt:\xffkey with space", Get(b"\xffkey with space")),
        (b"UPDATE:k:old:new", Update(b"k", b"old", b"new")),
        (b"Update:k::", Update(b"k", b"", b"")),
        (b"UPDATE:k:o:n:e:w", Update(b"k", b"o", b"n:e:w")),
        (b"DELETE:k", Delete(b"k")),
        (b"delete:k", Delete(b"k")),
        (b"PING", PING),
        (b"ping", PING),
        (b"STATS", STATS),
        (b"Stats", STATS),
    ],
)
def test_parse_valid_commands(line, command):
    """Each verb, in any case, parses into its command with byte-exact fields."""
    assert parse(line) == command
    assert type(parse(line)) is type(command)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"", ERR_EMPTY_LINE),
        (b"HELLO", ERR_UNKNOWN),
        (b"HELLO:k:v", ERR_UNKNOWN),
        (b" PUT:k:v", ERR_UNKNOWN),
        (b"PUTS:k:v", ERR_UNKNOWN),
        (b"PUT", ERR_FIELDS["PUT"]),
        (b"PUT:k", ERR_FIELDS["PUT"]),
        (b"PUT::v", ERR_EMPTY_KEY),
        (b"GET", ERR_FIELDS["GET"]),
        (b"GET:", ERR_EMPTY_KEY),
        (b"GET:a:b", ERR_FIELDS["GET"]),
        (b"UPDATE:k:old", ERR_FIELDS["UPDATE"]),
        (b"UPDATE:k", ERR_FIELDS["UPDATE"]),
        (b"UPDATE::a:b", ERR_EMPTY_KEY),
        (b"DELETE", ERR_FIELDS["DELETE"]),
        (b"DELETE:", ERR_EMPTY_KEY),
        (b"DELETE:a:b", ERR_FIELDS["DELETE"]),
        (b"PING:x", ERR_FIELDS["PING"]),
        (b"STATS:", ERR_FIELDS["STATS"]),
    ],
)
def test_parse_invalid_lines_return_their_error(line, error):
    """Bad lines are returned (not raised) as the ProtocolError to reply with."""
    assert parse(line) is error


def test_error_replies_are_fixed_phrases_without_colon():
    """Every ERR reply is 'ERR <phrase>\\n' with no ':' so clients never take it for a value."""
    errors = [ERR_EMPTY_LINE, ERR_UNKNOWN, ERR_EMPTY_KEY, ERR_LINE_TOO_LONG, *ERR_FIELDS.values()]
    for error in errors:
        assert isinstance(error, ProtocolError)
        assert error.reply.startswith(b"ERR ")
        assert error.reply.endswith(b"\n")
        assert b":" not in error.reply
    assert ERR_UNKNOWN.reply == b"ERR unknown command\n"
    assert ERR_LINE_TOO_LONG.reply == b"ERR line too long\n"
    assert ERR_FIELDS["PUT"].reply == b"ERR wrong number of fields for PUT\n"


# --- replies and encoding --------------------------------------------------------------------


def test_value_line_and_parse_value_round_trip():
    """A GET reply line is key:value, and the value is everything after the first ':'."""
    line = value_line(b"k", b"a:b\x00")
    assert line == b"k:a:b\x00\n"
    assert parse_value(line[:-1]) == b"a:b\x00"


def test_stats_line_round_trip():
    """STATS is space-separated name=value pairs with no ':'."""
    line = stats_line({"active": 2, "dropped": 5})
    assert line == b"active=2 dropped=5\n"
    assert parse_stats(line[:-1]) == {"active": 2, "dropped": 5}
    with pytest.raises(ValueError):
        parse_stats(b"k:v")


@pytest.mark.parametrize(
    ("command", "line"),
    [
        (Put(b"k", b"v:w"), b"PUT:k:v:w\n"),
        (Get(b"k"), b"GET:k\n"),
        (Update(b"k", b"o", b"n:n"), b"UPDATE:k:o:n:n\n"),
        (Delete(b"k"), b"DELETE:k\n"),
        (PING, b"PING\n"),
        (STATS, b"STATS\n"),
    ],
)
def test_encode_then_parse_round_trips(command, line):
    """What a client encodes is exactly what the server parses back."""
    assert encode(command) == line
    assert parse(line[:-1]) == command


@pytest.mark.parametrize(
    "command",
    [
        Put(b"", b"v"),
        Put(b"a:b", b"v"),
        Put(b"a\nb", b"v"),
        Put(b"k", b"v\nw"),
        Put(b"k", b"ends in cr\r"),
        Update(b"k", b"o:ld", b"new"),
        Update(b"k", b"old", b"new\n"),
        Get(b"k:"),
        Delete(b""),
    ],
)
def test_encode_refuses_what_cannot_round_trip(command):
    """Keys with ':' or newlines, empty keys, newlines in values, a trailing \\r: refused."""
    with pytest.raises(InvalidArgument):
        encode(command)


def test_too_long_line_and_crlf_line_in_one_chunk():
    """Found by fuzzing: a too-long line next to a \\r\\n line in one chunk (this crashed)."""
    assert LineBuffer(max_line=3).feed(b"toolong\r\nok\r\n") == [ERR_LINE_TOO_LONG, b"ok"]


# --- classifying reply lines -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"k:v", ReplyKind.VALUE),
        (b"ERR x:hello", ReplyKind.VALUE),  # the key "ERR x": a value, not an error
        (b"ERR unknown command:", ReplyKind.VALUE),
        (b"PONG:", ReplyKind.VALUE),  # the key "PONG", an empty value
        (b"OK:OK", ReplyKind.VALUE),
        (b"k:", ReplyKind.VALUE),
        (b":", ReplyKind.VALUE),
        (b"k:\x00\xff\r", ReplyKind.VALUE),
        (b"PONG", ReplyKind.PONG),
        (b"OK", ReplyKind.OK),
        (b"ERR unknown command", ReplyKind.ERROR),
        (b"ERR ", ReplyKind.ERROR),
        (b"active=1 dropped=0 keys=3", ReplyKind.OTHER),
        (b"", ReplyKind.OTHER),
        (b"ERR", ReplyKind.OTHER),  # no space, no reason: not an ERR line
        (b"ERRx", ReplyKind.OTHER),
        (b"pong", ReplyKind.OTHER),  # status lines are exact, case included
        (b"PONG ", ReplyKind.OTHER),
        (b" OK", ReplyKind.OTHER),
        (b"err unknown command", ReplyKind.OTHER),
    ],
)
def test_classify_reply_by_the_colon_rule(line, kind):
    """A line with ':' is a value whatever it starts with; status lines are matched exactly."""
    assert classify_reply(line) is kind


def test_every_err_reply_the_server_sends_is_an_error_line():
    """Every ERR phrase (the parser's, the server's and the store's, as listed in the README)
    classifies as ERROR: no fixed phrase contains ':'."""
    from kvgevent import protocol

    phrases = [e.reason for e in vars(protocol).values() if isinstance(e, ProtocolError)]
    phrases += [e.reason for e in ERR_FIELDS.values()]
    phrases += [
        "max clients reached",
        "out of memory",
        "store unavailable",
        "store error",
        "store out of memory",
        "persistence failed",
    ]
    assert len(phrases) > 10
    for phrase in phrases:
        line = ProtocolError(phrase).reply
        assert line.endswith(b"\n") and classify_reply(line[:-1]) is ReplyKind.ERROR, phrase


@pytest.mark.parametrize("key", [b"k", b"ERR x", b"ERR", b"PONG", b"OK", b"active=1", b" "])
@pytest.mark.parametrize("value", [b"", b"v", b"PONG", b"ERR x", b"\x1b[2J\x00"])
def test_every_value_line_is_a_value(key, value):
    """Whatever the key and value, the server's value line classifies as VALUE."""
    assert classify_reply(value_line(key, value)[:-1]) is ReplyKind.VALUE


def test_the_servers_status_lines_are_classified():
    """The server's own reply constants and its STATS line, as it encodes them."""
    from kvgevent import protocol

    assert classify_reply(protocol.PONG[:-1]) is ReplyKind.PONG
    assert classify_reply(protocol.OK[:-1]) is ReplyKind.OK
    assert classify_reply(stats_line({"active": 1, "keys": 2, "uptime_s": 3})[:-1]) is ReplyKind.OTHER


def test_allocated_counts_what_an_incomplete_line_takes_in_memory():
    """What --max-memory counts for an incomplete line: its allocation, which grows ahead of
    its length (a line received 8 KiB at a time holds up to an eighth more); nothing once the
    line is complete."""
    buf = LineBuffer()
    for _ in range(64):
        buf.feed(b"x" * 8192)
    assert buf.pending == 64 * 8192
    assert buf.pending <= buf.allocated <= buf.pending * 9 // 8 + 64
    assert buf.feed(b"\n") == [b"x" * 64 * 8192]
    assert buf.pending == buf.allocated == 0
