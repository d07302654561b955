"""AuthThrottle, the pure part of password-guess throttling, on a clock the test moves."""

from __future__ import annotations

import pytest

from kvgevent.server.auth_throttle import AuthThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def throttle(clock: Clock, **options: float) -> AuthThrottle:
    settings = {"after": 3, "window": 60.0, "first_delay": 0.25, "max_delay": 4.0, "max_wait": 4.0}
    settings.update(options)
    return AuthThrottle(clock=clock, **settings)  # type: ignore[arg-type]


def fail(limiter: AuthThrottle, host: str, times: int) -> list[bool]:
    """``times`` wrong passwords from ``host``, each checked at once; which began an episode."""
    began = []
    for _ in range(times):
        assert limiter.admit(host) == 0.0
        began.append(limiter.failed(host) is not None)
    return began


def test_an_address_is_throttled_after_the_threshold_and_others_never(clock):
    limiter = throttle(clock)
    assert fail(limiter, "10.0.0.1", 3) == [False, False, True]
    assert limiter.admit("10.0.0.1") == 0.25
    assert limiter.admit("10.0.0.2") == 0.0  # another address: never delayed
    assert limiter.throttled() == 1


def test_each_wrong_password_doubles_the_time_between_turns_up_to_the_cap(clock):
    limiter = throttle(clock, max_wait=100.0)
    fail(limiter, "h", 3)
    waits = []
    for _ in range(7):
        wait = limiter.admit("h")
        assert wait is not None
        waits.append(wait)
        clock.now += wait  # the AUTH waits for its turn, then its password is wrong
        assert limiter.failed("h") is None  # the episode began once, not again
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_parallel_guesses_are_checked_in_turns_and_the_excess_refused(clock):
    """Many AUTHs at once from one address: each reserves the next turn, twice as far from
    the one before; those whose turn would be more than max_wait away are refused unchecked."""
    limiter = throttle(clock, max_wait=1.0)
    fail(limiter, "h", 3)
    waits = [limiter.admit("h") for _ in range(8)]
    assert waits == [0.25, 0.75, None, None, None, None, None, None]
    assert limiter._addresses["h"].refused == 6
    assert limiter._addresses["h"].delayed == 2


def test_a_correct_password_from_a_throttled_address_also_waits_its_turn(clock):
    limiter = throttle(clock)
    fail(limiter, "h", 3)
    assert limiter.admit("h") == 0.25  # whatever the password: checked only in its turn


def test_quiet_addresses_are_forgotten_and_their_episode_reported_once(clock):
    limiter = throttle(clock)
    fail(limiter, "h", 3)
    fail(limiter, "quiet", 1)
    clock.now += 30
    assert limiter.sweep() == []
    clock.now += 31
    (ended,) = limiter.sweep()
    assert (ended.host, ended.failures, ended.ended_at - ended.throttled_since) == ("h", 3, 61.0)
    assert limiter.sweep() == []
    assert limiter.admit("h") == 0.0  # a fresh start
    assert fail(limiter, "h", 3) == [False, False, True]


def test_failures_further_apart_than_the_window_never_add_up(clock):
    limiter = throttle(clock)
    for _ in range(10):
        assert fail(limiter, "slow", 1) == [False]
        clock.now += 61
    assert limiter.admit("slow") == 0.0


def test_the_table_is_bounded_and_forgets_the_oldest_first(clock):
    limiter = throttle(clock, capacity=100)
    fail(limiter, "first", 3)
    for index in range(150):
        clock.now += 0.001
        fail(limiter, f"10.0.{index // 256}.{index % 256}", 1)
    assert len(limiter._addresses) == 100
    assert limiter.admit("first") == 0.0  # forgotten...
    assert [a.host for a in limiter.sweep()] == ["first"]  # ...and its episode reported as over
