"""How the Redis store is doing: outages of its nodes and error replies, each logged once per
episode, and when an unreachable node is worth trying again. Pure: no I/O, no gevent; the
clock and the jitter are parameters.

An outage of a node begins with the first command that could not reach it (``store_unavailable``,
with the node and the error). Until the node answers, the store tries it again only RETRY_MIN
seconds after the failure, doubling up to RETRY_MAX (with jitter), and fails the commands for
it at once otherwise: a dead node costs neither a connect per command nor a log line per
command. One call is the try (one of reads only, and one with writes: a Redis that holds
writes answers reads); the others fail at once until its outcome (or ``try_limit`` seconds): a
stalled Redis accepts connections and answers nothing, so each try lasts a whole timeout, and
every command that came meanwhile waited with it. The first command it answers lets every
command through again; the outage is over (``store_recovered``, with how long the node failed
and how many commands failed meanwhile) once it has answered for ``settle`` seconds with no
command failing. A failure before then is the same outage going on, not a new one: a Redis
whose writes are paused (``CLIENT PAUSE WRITE``, as in a failover) answers reads at once and
times each write out, and each answered read would otherwise end an outage that the next
timed-out write began again. With Redis Cluster each node has its own outage. A connection
lost in a round trip (``lost``) is no outage by itself: Redis may serve on (a ``CLIENT
KILL``); if it is gone, the next connect fails and begins one.

Error replies (Redis answered, but refused: ``OOM`` at its maxmemory, ``READONLY`` from a
replica, ``NOSCRIPT`` after a SCRIPT FLUSH, ``NOPERM`` from an ACL, a script error...) become
fixed phrases, ``store out of memory``, ``store unavailable`` or ``store error``; each kind is
logged once (``store_error``) until none of it came for ERROR_QUIET seconds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvgevent.errors import StoreError
from kvgevent.logs import Logger

RETRY_MIN = 0.05
"""Seconds after a failed command before the node is tried again (then doubled)."""

RETRY_MAX = 2.0
"""Most seconds between two tries of an unreachable node."""

ERROR_QUIET = 10.0
"""Seconds without an error reply of a kind after which the next one is logged again."""

NOT_NOW = ("CLUSTERDOWN", "LOADING", "TRYAGAIN", "MASTERDOWN", "BUSY")
"""Error replies that mean "this node cannot serve now": ERR store unavailable."""

READ_ONLY = "READONLY"
"""The error reply of a replica to a write (kvgevent pointed at a replica, or at a master a
failover demoted): ERR store unavailable too, but an error-reply episode, not an outage: the
node goes on answering reads, and each would end an outage that the next write began again."""

NO_SCRIPT = "NOSCRIPT"
"""The error reply to an UPDATE's EVALSHA once Redis lost the script (SCRIPT FLUSH; a user
who may not SCRIPT LOAD). The store sends such an UPDATE again as EVAL; one it cannot (a
write of its key ran after it) gets ERR store unavailable: an error-reply episode, the node
serves on."""

ERR_UNAVAILABLE = StoreError("store unavailable")
ERR_STORE_OUT_OF_MEMORY = StoreError("store out of memory")
ERR_STORE = StoreError("store error")
_PHRASES = {"OOM": ERR_STORE_OUT_OF_MEMORY, READ_ONLY: ERR_UNAVAILABLE, NO_SCRIPT: ERR_UNAVAILABLE}
"""The phrase of an error reply by its code word (any other: ERR_STORE)."""


@dataclass(slots=True)
class Outage:
    since: float
    error: str
    failed: int = 0  # commands that failed for it
    delay: float = RETRY_MIN
    retry_at: float = 0.0
    answered: float = 0.0  # when the node first answered since its last failure (0: not yet)
    trying_until: float = 0.0  # a try is on its way until its outcome, or this time at most
    reading_until: float = 0.0  # the same for a try of reads only (see RedisHealth.trying)
    passing: bool = False  # it answered other calls as one failed: every command goes (no tries)


class RedisHealth:
    """Outages by node name, error-reply episodes by phrase, and their counts (STATS).
    ``settle``: seconds a node in an outage must answer, with no command failing, for the
    outage to be over (0: at its first answer). ``aside``: a name that is not one node (a
    cluster's, for the calls that reach any of its nodes: the bookkeeping), counted among
    the nodes down only when no node is (one node down counted as two, an attacker's pass)."""

    def __init__(
        self,
        log: Logger,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[float, float], float] = random.uniform,
        settle: float = 0.0,
        try_limit: float = 10.0,
        aside: str | None = None,
    ) -> None:
        self.log = log
        self.aside = aside
        self.settle = settle
        self.try_limit = try_limit  # (the store's timeout: a try has its outcome by then)
        self.clock = clock
        self.jitter = jitter
        self.outages: dict[str, Outage] = {}
        self._errors: dict[str, float] = {}  # phrase -> when the last one came
        self._lost: dict[str, float] = {}  # node -> when a connection to it was last lost
        self.unavailable = 0  # commands failed because a node was unreachable
        self.errors = 0  # commands failed with an error reply

    def waiting(self, node: str, reads_only: bool = False) -> bool:
        """True while ``node`` is in an outage, has not answered since it failed, and is not
        due for another try, or a call of the same kind (``reads_only`` or not) is that try
        (:meth:`trying`)."""
        outage = self.outages.get(node)
        if outage is None or outage.answered or outage.passing:
            return False
        now = self.clock()
        return now < outage.retry_at or now < (outage.reading_until if reads_only else outage.trying_until)

    def trying(self, nodes: set[str], reads_only: bool = False) -> None:
        """A call to ``nodes`` goes now (none of them :meth:`waiting`): for a node in an
        outage it is the try of its kind, and the calls of that kind after it fail at once
        until :meth:`tried` (or ``try_limit`` seconds). Reads have a try of their own: a
        Redis that holds writes (CLIENT PAUSE WRITE, as in a failover) answers them, and
        their answer lets every command through."""
        now = self.clock()
        for node in nodes:
            outage = self.outages.get(node)
            if outage is None or outage.answered or outage.passing:
                continue
            if reads_only:
                outage.reading_until = now + self.try_limit
            else:
                outage.trying_until = now + self.try_limit

    def tried(self, nodes: set[str], reads_only: bool = False) -> None:
        """A call to ``nodes`` ended (the try of one in an outage, perhaps): the next call
        of its kind due is the next try (whatever the outcome: a failure set when, an answer
        let all in)."""
        for node in nodes:
            outage = self.outages.get(node)
            if outage is None:
                continue
            if reads_only:
                outage.reading_until = 0.0
            else:
                outage.trying_until = 0.0

    def skipped(self, node: str, commands: int) -> None:
        """``commands`` failed at once, unsent: ``node`` is not due for another try."""
        self.unavailable += commands
        self.outages[node].failed += commands

    def down(self, node: str, error: str, commands: int, answering: bool = False) -> None:
        """A try of ``node`` failed for ``commands`` commands: begin or go on with its outage
        and set its next try. ``answering``: the node answered other calls since this one
        was sent (it timed out while Redis held writes only: ``CLIENT PAUSE WRITE``, as in a
        failover): the outage goes on, but commands are not failed unsent meanwhile (the
        reads would get ERR for what Redis answers)."""
        now = self.clock()
        self.unavailable += commands
        outage = self.outages.get(node)
        if outage is None:
            outage = self.outages[node] = Outage(now, error)
            self.log.error("store_unavailable", node=node, error=error[:200])
        elif outage.answered:  # failing again before the outage was over: the same one, begun anew
            outage.answered, outage.delay, outage.retry_at = 0.0, RETRY_MIN, 0.0
        outage.failed += commands
        outage.trying_until = outage.reading_until = 0.0
        outage.passing = answering
        if answering:  # (no next try to wait for: every command is sent)
            outage.retry_at = 0.0
            return
        if now < outage.retry_at:  # (a call on its way when another failed: that one set the next try)
            return
        if outage.retry_at:  # a try that failed (0: the outage begins now): wait twice as long
            outage.delay = min(outage.delay * 2, RETRY_MAX)
        outage.retry_at = now + outage.delay * self.jitter(0.5, 1.0)

    def up(self, node: str, asked: float | None = None) -> None:
        """``node`` answered a call made at ``asked`` (this clock; None: now): its outage, if
        any, lets every command through, and is over once the node has answered for
        ``settle`` seconds with no failure; unless the call was made before the outage began.
        (A reply read late, to a round trip sent before Redis died, says nothing about Redis
        now.) ``outage_s`` in the log: from the first failure to the first answer after the
        last one."""
        outage = self.outages.get(node)
        if outage is None or (asked is not None and asked < outage.since):
            return
        now = self.clock()
        if not outage.answered:
            outage.answered = now
        if now - outage.answered >= self.settle:
            self._over(node, outage)

    def settled(self) -> None:
        """End each outage whose node answered ``settle`` seconds ago or more, with no
        failure since (called once a second: an idle store sends nothing that would end it;
        a cluster's nodes other than the store's own get no PING)."""
        now = self.clock()
        for node, outage in list(self.outages.items()):
            if outage.answered and now - outage.answered >= self.settle:
                self._over(node, outage)

    def _over(self, node: str, outage: Outage) -> None:
        del self.outages[node]
        self.log.info(
            "store_recovered",
            node=node,
            outage_s=round(outage.answered - outage.since, 3),
            failed_commands=outage.failed,
        )

    def lost(self, node: str, error: str, commands: int) -> StoreError:
        """A connection to ``node`` was lost in a round trip of ``commands`` commands: ERR
        store unavailable for them, but no outage: the other connections go on (after a
        ``CLIENT KILL``, Redis serves on; if it is gone, the next connect fails and begins
        the outage). Logged once (``store_connection_lost``) until none was lost for
        ERROR_QUIET seconds."""
        self.unavailable += commands
        if _first_in_a_while(self._lost, node, self.clock()):
            self.log.warning("store_connection_lost", node=node, error=error[:200], commands=commands)
        return ERR_UNAVAILABLE

    def error_reply(self, text: str, commands: int = 1) -> StoreError:
        """Redis refused ``commands`` with the error ``text``: the StoreError to answer."""
        self.errors += commands
        error = _PHRASES.get(text.split(" ", 1)[0], ERR_STORE)  # (by the reply's code word)
        if _first_in_a_while(self._errors, error.reason, self.clock()):
            self.log.warning("store_error", reply=error.reason, error=text[:200])
        return error

    def stats(self) -> dict[str, int]:
        return {
            "store_unavailable": self.unavailable,
            "store_errors": self.errors,
            "store_nodes_down": self._nodes_down(),
        }

    def _nodes_down(self) -> int:
        down = {node for node, outage in self.outages.items() if not outage.answered}
        if self.aside in down and len(down) > 1:  # (the same failure, seen through the cluster)
            down.discard(self.aside)
        return len(down)


def _first_in_a_while(last_seen: dict[str, float], kind: str, now: float) -> bool:
    """Note one of ``kind`` at ``now`` in ``last_seen``; True if it is the first since none
    came for ERROR_QUIET seconds (an episode begins: log it)."""
    last = last_seen.get(kind)
    last_seen[kind] = now
    return last is None or now - last >= ERROR_QUIET


def not_now(text: str) -> bool:
    """True for an error reply that means the node cannot serve now (not: cannot serve this)."""
    return text.startswith(NOT_NOW)
