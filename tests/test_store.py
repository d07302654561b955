"""Unit tests of MemoryStore: the original's operations, byte-exact."""

import gevent
from conftest import WrappedStore
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgevent import Delete, Get, KVStore, MemoryStore, Put, StoreError, Update


def test_get_of_absent_key_is_empty():
    assert MemoryStore().get(b"nope") == []


def test_put_appends_in_order():
    """PUT appends; GET returns every value in stored order, duplicates included."""
    store = MemoryStore()
    for value in (b"1", b"2", b"1", b""):
        store.put(b"k", value)
    assert store.get(b"k") == [b"1", b"2", b"1", b""]


def test_update_of_absent_key_creates_it_with_new():
    store = MemoryStore()
    store.update(b"k", b"old", b"new")
    assert store.get(b"k") == [b"new"]


def test_update_removes_first_match_and_appends_new():
    """p0 semantics: the FIRST value equal to old is removed, new is appended at the end."""
    store = MemoryStore()
    for value in (b"a", b"b", b"a", b"c"):
        store.put(b"k", value)
    store.update(b"k", b"a", b"z")
    assert store.get(b"k") == [b"b", b"a", b"c", b"z"]


def test_update_without_match_still_appends_new():
    store = MemoryStore()
    store.put(b"k", b"a")
    store.update(b"k", b"missing", b"z")
    assert store.get(b"k") == [b"a", b"z"]


def test_delete_removes_key_and_values():
    store = MemoryStore()
    store.put(b"k", b"a")
    store.put(b"other", b"b")
    store.delete(b"k")
    store.delete(b"never-there")
    assert store.get(b"k") == []
    assert store.get(b"other") == [b"b"]
    assert store.count_keys() == 1


def test_get_returns_a_snapshot():
    """The list GET returns is the caller's: later mutations do not change it."""
    store = MemoryStore()
    store.put(b"k", b"a")
    values = store.get(b"k")
    store.put(b"k", b"b")
    store.delete(b"k")
    assert values == [b"a"]


def test_str_keys_are_the_same_as_utf8_bytes():
    store = MemoryStore()
    store.put("clé", b"v")
    assert store.get("clé".encode()) == [b"v"]


def test_values_are_binary_safe():
    store = MemoryStore()
    value = bytes(range(256)).replace(b"\n", b"")
    store.put(b"\xff\x00key", value)
    assert store.get(b"\xff\x00key") == [value]


def test_mutations_take_the_semaphore():
    """A mutation waits while another holder has the store's lock."""
    store = MemoryStore()
    assert isinstance(store, KVStore)
    store.lock.acquire()
    writer = gevent.spawn(store.put, b"k", b"v")
    gevent.idle()  # the writer has run as far as it can
    assert store.get(b"k") == [] and not writer.dead
    store.lock.release()
    writer.join(timeout=5)
    assert store.get(b"k") == [b"v"]


class OneByOne(WrappedStore):
    """The reference: the interface's default apply(), one MemoryStore call per command."""

    def get(self, key):
        return super().get(key) or None  # apply() reports a GET without values as None


keys = st.sampled_from([b"a", b"b", b"c"])
values = st.sampled_from([b"", b"1", b"2", b"x:y"])
commands = st.lists(
    st.one_of(
        st.builds(Put, keys, values),
        st.builds(Get, keys),
        st.builds(Update, keys, values, values),
        st.builds(Delete, keys),
    ),
    max_size=40,
)


@settings(max_examples=500, deadline=None)
@given(batches=st.lists(commands, max_size=5))
def test_batched_apply_equals_one_call_per_command(batches):
    """MemoryStore.apply (one lock, no method calls) gives the same results and leaves the
    same data as applying each command on its own."""
    fast, reference = MemoryStore(), OneByOne()
    for batch in batches:
        assert fast.apply(batch) == reference.apply(batch)
    for key in (b"a", b"b", b"c"):
        assert fast.get(key) == reference.inner.get(key)


def test_default_apply_reports_errors_per_command():
    """A failing command gets its error; the commands around it still run."""

    class Flaky(OneByOne):
        def get(self, key):
            if key == b"bad":
                raise StoreError("store unavailable")
            return super().get(key)

    store = Flaky()
    results = store.apply([Put(b"k", b"1"), Get(b"bad"), Get(b"k")])
    assert results[0] is None and isinstance(results[1], StoreError) and results[2] == [b"1"]


def test_serve_plain_serves_the_usual_lines_and_stops_where_its_contract_says():
    """MemoryStore.serve_plain (the session's fast path): the leading well-formed PUT, GET and
    DELETE lines in order (a GET sees the PUT before it), their small GET replies, counts
    and cost-model bytes as apply() on the same commands; it stops at anything else."""
    from kvgevent.protocol import ERR_LINE_TOO_LONG

    store, reference = MemoryStore(), MemoryStore()
    out: list[bytes] = []
    lines = [b"PUT:k:a:b", b"put:k:", b"Get:k", b"get:nope", b"DELETE:k", b"GET:k", b"Put:j:v"]
    served = store.serve_plain([*lines, b"UPDATE:j:v:w", b"PUT:j:x"], out, 10**9, True)
    assert served == (7, 4)  # work: a GET and a DELETE of two values each
    assert out == [b"k:a:b\n", b"k:\n"]
    reference.apply([Put(b"k", b"a:b"), Put(b"k", b""), Get(b"k"), Get(b"nope"), Delete(b"k")])
    reference.apply([Get(b"k"), Put(b"j", b"v")])
    assert (store.data, store.used_bytes) == (reference.data, reference.used_bytes)
    assert store.applied == reference.applied
    for stop in (b"PUT::v", b"GET:", b"GET:a:b", b"DELETE:a:b", b"pUT:k:v", b"PING", b"", ERR_LINE_TOO_LONG):
        assert store.serve_plain([b"GET:j", stop, b"GET:j"], [], 10**9, True)[0] == 1, stop
        # what it served before the stop is counted as apply() counts it (PUTs are not
        # counted one by one: from where it stopped)
        fresh, reference = MemoryStore(), MemoryStore()
        fresh.serve_plain(
            [b"PUT:a:1", b"Put:a:2", b"DELETE:zz", b"PUT:b:3", stop, b"PUT:a:4"], [], 10**9, True
        )
        reference.apply([Put(b"a", b"1"), Put(b"a", b"2"), Delete(b"zz"), Put(b"b", b"3")])
        assert (fresh.data, fresh.used_bytes, fresh.applied) == (
            reference.data,
            reference.used_bytes,
            reference.applied,
        ), stop
    # puts=False (over --max-memory): it stops before a PUT, not before a GET or DELETE
    assert store.serve_plain([b"GET:j", b"DELETE:x", b"PUT:j:w", b"GET:j"], [], 10**9, False)[0] == 2
    # a budget: it stops after the command whose work reaches it (two values here)
    store.serve_plain([b"PUT:j:w"], [], 10**9, True)
    assert store.serve_plain([b"GET:j", b"PUT:j:x"], [], 2, True) == (1, 2)
    assert store.serve_plain([b"DELETE:j", b"PUT:j:y"], [], 2, True) == (1, 2)
    # a GET whose reply is too big to build with its batch is left to the caller
    store.serve_plain([b"PUT:big:" + b"x" * 5000], [], 10**9, True)
    assert store.serve_plain([b"GET:big"], [], 10**9, True) == (0, 0)
