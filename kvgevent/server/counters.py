"""The server-wide counters STATS reads. One instance per server, shared by the server (clients
accepted, dropped, rejected, idle), its connections (replies dropped) and its session
(commands, errors, AUTH failures, long lines); nothing else writes them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Counters:
    accepted: int = 0  # clients accepted
    dropped: int = 0  # clients gone, for any reason
    rejected: int = 0  # clients turned away over --max-clients
    accept_failures: int = 0  # accept() calls failed for want of file descriptors or memory
    messages_dropped: int = 0  # replies dropped for clients that do not read
    commands: int = 0  # request lines received (ERR ones too)
    errors: int = 0  # requests answered ERR
    auth_failures: int = 0  # wrong passwords
    auth_throttled: int = 0  # AUTHs delayed or refused by the throttle
    idle_closed: int = 0  # clients closed by --idle-timeout
    lines_too_long: int = 0  # request lines over the line bound
    dropped_by: dict[str, int] = field(default_factory=dict)  # clients gone, by reason
    errors_by: dict[str, int] = field(default_factory=dict)  # ERR replies, by phrase
    verbs: dict[str, int] = field(default_factory=dict)  # PING, STATS, AUTH served (data: the store's)

    def count_error(self, reason: str, count: int = 1) -> None:
        """``count`` requests answered ``ERR <reason>``."""
        self.errors += count
        self.errors_by[reason] = self.errors_by.get(reason, 0) + count
