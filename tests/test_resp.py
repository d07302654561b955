"""The Redis store's wire encoding, byte for byte (no Redis needed): the bytes templates of
the data commands give exactly what hiredis.pack_command gives, whatever the key and value
hold (CR, LF, ':', NUL, non-ASCII, empty values, sizes across digit counts)."""

import random

import hiredis
import pytest

from kvgevent.stores.resp import ReplyMismatch, check_types, delete, lrange_all, rpush


def _samples() -> list[bytes]:
    rnd = random.Random(15)
    fixed = [b"", b"k", b"a:b", b"\r\n", b"\x00\xff", "clé".encode(), b"x" * 9, b"x" * 10, b"x" * 99999]
    return fixed + [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300))) for _ in range(50)]


@pytest.mark.parametrize("key", _samples()[:20])
def test_the_templates_are_what_hiredis_packs(key):
    for value in _samples():
        assert rpush(key, value) == hiredis.pack_command((b"RPUSH", key, value))
    assert lrange_all(key) == hiredis.pack_command((b"LRANGE", key, b"0", b"-1"))
    assert delete(key) == hiredis.pack_command((b"DEL", key))


def test_replies_are_checked_against_their_commands_types():
    assert check_types([[b"v"], 3, []], [list, int, list]) is False
    assert check_types([hiredis.ReplyError("NOSCRIPT No matching script"), 1], [int, int]) is True
    assert check_types([hiredis.ReplyError("OOM command not allowed")], [int]) is False
    with pytest.raises(ReplyMismatch):
        check_types([b"LRANGE"], [list])  # (what a socket connected to itself echoes)
    with pytest.raises(ReplyMismatch):
        check_types([[b"x"]], [int])
