"""The client library against a real in-process server."""

import pytest

from kvgevent.client import Client
from kvgevent.errors import ConnectionLost, InvalidArgument, ServerError


@pytest.fixture
def client(server):
    with Client(port=server.port, timeout=10) as kv:
        yield kv


def test_every_command(client):
    """put/get/update/delete/ping/stats each do what the protocol says."""
    client.put("k", b"a")
    client.put(b"k", "b")
    assert client.get("k") == [b"a", b"b"]
    client.update("k", b"a", b"c")
    assert client.get("k") == [b"b", b"c"]
    client.delete("k")
    assert client.get("k") == []
    assert client.ping() is True
    stats = client.stats()
    assert stats["active"] == 1 and stats["keys"] == 0


def test_values_with_colons_and_binary_bytes_round_trip(client):
    value = b"a:b\x00\xff\r c"
    client.put("bin", value)
    assert client.get("bin") == [value]


def test_write_is_applied_when_the_call_returns(server, client):
    """Every call returns only after the server applied it (the PING barrier)."""
    client.put("seen", b"1")
    assert server.store.get(b"seen") == [b"1"]


def test_pipeline_returns_results_in_order(client):
    """10,000 commands in one pipeline: one write, results in order."""
    with client.pipeline() as pipe:
        for i in range(10_000):
            pipe.put("p", b"%d" % i)
        pipe.get("p")
        pipe.ping()
    assert pipe.results[:3] == [None, None, None]
    assert pipe.results[10_000] == [b"%d" % i for i in range(10_000)]
    assert pipe.results[10_001] is True


def test_err_reply_raises_server_error_with_reason(make_server):
    """An ERR is a typed exception carrying the reason; the connection stays usable."""
    server = make_server(max_line=50)
    with Client(port=server.port, timeout=10) as kv:
        with pytest.raises(ServerError) as info:
            kv.put("k", b"x" * 100)
        assert info.value.reason == "line too long"
        assert kv.send_raw([b"BOGUS", b"PUT:k:v", b"GET:k"]) == [[b"ERR unknown command"], [], [b"k:v"]]
        assert kv.get("k") == [b"v"]


def test_pipeline_keeps_going_past_an_error(make_server):
    """With raise_on_error=False the ERR takes its command's place and the rest still apply."""
    server = make_server(max_line=50)
    with Client(port=server.port, timeout=10) as kv:
        pipe = kv.pipeline().put("k", b"1").put("k", b"x" * 100).put("k", b"2").get("k")
        results = pipe.execute(raise_on_error=False)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], ServerError)
        assert results[3] == [b"1", b"2"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("", b"v"), ("a:b", b"v"), ("a\nb", b"v"), ("k", b"v\nw"), ("k", b"trailing\r")],
)
def test_unsendable_arguments_are_refused_before_sending(server, client, key, value):
    """Keys with ':' or newlines, empty keys, newlines in values: InvalidArgument, nothing sent."""
    before = server.stats()["commands"]
    with pytest.raises(InvalidArgument):
        client.put(key, value)
    assert server.stats()["commands"] == before


def test_server_gone_raises_connection_lost(make_server):
    server = make_server()
    kv = Client(port=server.port, timeout=5)
    kv.put("k", b"v")
    server.close(flush_timeout=0)
    with pytest.raises(ConnectionLost):
        kv.get("k")
    with pytest.raises(ConnectionLost):
        kv.ping()


def test_no_server_raises_connection_lost():
    from conftest import free_port

    with pytest.raises(ConnectionLost):
        Client(port=free_port(), timeout=5)
