"""Tunables: every number the server or the CLI uses, named and documented in one place.

The command-line programs read their defaults from here, so ``--help`` always shows
the value the code really uses.
"""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"
"""Address the server binds and the client connects to: loopback unless told otherwise."""

DEFAULT_PORT = 9999
"""TCP port of the original p0 server, kept for compatibility with its clients."""

DEFAULT_QUEUE_SIZE = 500
"""Reply lines queued for one client before further replies to it are dropped (the p0 rule)."""

DEFAULT_QUEUE_BYTES = 16 << 20
"""Reply bytes queued for one client before further replies are dropped: far above what 500
ordinary replies need, yet one stuck client reading huge values cannot take the server's memory."""

DEFAULT_MAX_CLIENTS = 10_000
"""Clients served at once; one more gets ``ERR max clients reached`` and is closed."""

REJECTED_QUIET = 1.0
"""Seconds without a client refused over --max-clients after which the episode of refusals is
over (one ``client_rejected`` when it begins, one ``client_rejected_ended`` then): not when a
client is accepted again, or one freeing a slot and reconnecting in a loop logs two per turn."""

FD_RESERVE = 32
"""File descriptors kept for what is not a client (the listening socket, the log and
append-only files, a compaction's, the Redis store's connections, the metrics port, the
refused clients kept open for their ERR): the server lowers --max-clients to its open files
limit less these, as Redis does."""

REFUSED_LINGER = 0.5
"""Seconds a client refused over --max-clients is kept open after its ``ERR max clients
reached`` (its write side shut), for its request to come and be thrown away: a socket closed
with input unread, or receiving input after, is reset, and the reset throws away the ERR in
the client's kernel (an attacker's pass: 5 to 11 of 20 clients that send as they connect)."""

REFUSED_LINGER_MAX = 4
"""Refused clients kept open at once (REFUSED_LINGER); more are closed at once, their input
read first: a flood over --max-clients holds no more of the files FD_RESERVE keeps."""

METRICS_CONNECTIONS = 8
"""HTTP connections the metrics port serves at once (a scraper and a few probes): more wait in
its listen backlog, holding no file of the server's (FD_RESERVE counts these)."""

METRICS_BACKLOG = 1024
"""The metrics port's listen backlog: connections waiting there for a place cost the server no
file, and when it is full the kernel drops a scraper's connect, which tries again 1 s and 3 s
later (with gevent's 128, 150 connections coming back as soon as closed made scrapes take 3 s)."""

METRICS_TIMEOUT = 2.0
"""Seconds a connection to the metrics port has to send a whole request (its line and
headers), from when it came or from its last answer (kept alive), and to take its answer
(and send the body it declared) once the answer is ready: one idle, kept alive, sending a
byte now and then or not reading is closed, so that a scraper waits at most this long for a
place. A scraper sends its request at once and reads its answer."""

METRICS_GRACE = 0.25
"""Seconds a metrics connection may wait on its client (for its request, or for its answer to
be taken) before it gives way to one in the backlog when every place is taken: a scraper
sends at once and reads at once, though a busy process may take a while to; the attacker's
cost, a place turned over every this long (about 0.25 s for each 8 connections ahead)."""

METRICS_REQUESTS = 10
"""Requests one metrics connection may make: after the answer to that many it is closed, so a
client pipelining requests (each answered at once, the deadline armed anew) cannot keep one
of METRICS_CONNECTIONS places for itself. A scrape costs the loop about a millisecond: 100
let 20 pipelining connections ahead of a scraper hold it up a second (a scraper keeping its
connection alive reconnects every this many scrapes)."""

METRICS_STOP = 1.0
"""At shutdown, seconds a metrics answer on its way gets to finish (a scrape is no reason to
hold up the exit longer; connections waiting for a request are closed at once)."""

ACCEPT_FAILED_QUIET = 2.0
"""Seconds without accept() failing for want of files or memory after which the episode is
over (one ``accept_failed``, one ``accept_failed_ended``): longer than gevent's longest pause
between two tries (1 s), so an episode still going on is not ended between them; and not at
the first accept that works, or a server at its limit would log an episode per client (the
accept() after it fails at once, the kernel finding no free descriptor for the next one)."""

DEFAULT_IDLE_TIMEOUT = 0.0
"""Seconds a client may send nothing before it is closed; 0 = never (as in Redis)."""

TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS client has to complete its handshake."""

MAX_AUTH_FAILURES = 10
"""Wrong passwords one connection may send before it is closed."""

AUTH_MAX_LINE = 4096
"""Longest request line, in bytes, before a connection has authenticated (or the password's
AUTH line, if longer): an AUTH line is short, and a stranger may not hold a --max-line buffer."""

PRE_AUTH_LINE_COST = 64
"""Bytes of a turn each line costs before AUTH, however short: lines before AUTH are served one
at a time, so a turn of thousands of one-byte lines would hold the loop (bench/OPTIMISATIONS.md,
"lines before AUTH")."""

AUTH_THROTTLE_AFTER = 10
"""Wrong passwords from one client address (across its connections) after which each further
AUTH from that address waits its turn (reconnecting no longer buys fresh guesses)."""

AUTH_FAILURE_WINDOW = 60.0
"""Seconds without a wrong password after which an address's failures are forgotten (and a
throttling episode ends)."""

AUTH_DELAY_MIN = 0.25
"""Seconds between two AUTHs of a throttled address at first; doubled after each one."""

AUTH_DELAY_MAX = 4.0
"""Most seconds between two AUTHs of a throttled address: at most one guess per this long."""

AUTH_MAX_WAIT = 4.0
"""Most seconds one AUTH waits for its turn; later ones from the address (guesses sent in
parallel) get ``ERR auth throttled`` at once, unchecked, instead of queueing without end."""

AUTH_SWEEP_INTERVAL = 1.0
"""Seconds between two looks for addresses whose wrong passwords can be forgotten."""

AUTH_TRACKED_ADDRESSES = 100_000
"""Addresses whose wrong passwords are remembered at once (the oldest are forgotten first):
bounds the table's memory when guesses come from very many addresses."""

DEFAULT_MAX_LINE = 1 << 20
"""Longest request line accepted, in bytes before the newline; longer lines get ``ERR line too long``."""

DEFAULT_BACKLOG = 1024
"""Listen backlog. gevent's default of 128 refuses connections during bursts of connects."""

RECV_SIZE = 64 * 1024
"""Bytes asked of one ``recv``: large reads let one wake-up parse many pipelined requests."""

TURN_BYTES = 4096
"""Bytes of requests one client may have applied before the others get a turn (a few hundred
GETs, under a millisecond); a whole read per turn let flooding clients starve a polite one
(bench/OPTIMISATIONS.md, "turn sizes")."""

TLS_RECORDS_PER_TURN = 64
"""TLS records one read may decrypt before its requests wait for a turn, as a backlog's do:
each costs a call into the TLS engine (about 3 us), and 64 KiB of one-byte records is about
2,800 of them, 10 ms for 3 KB of requests: eight clients sending such records held a polite
one for 0.8 to 5.5 s, before AUTH too (an attacker's pass). Ordinary records carry up to
16 KiB: a read of them is a few records."""

HEAVY_TURN = 0.001
"""Seconds a client's turn may hold the event loop before its next request waits for its
turn behind the ready clients, as a backlog does: a request or two costs microseconds, so
clients that send one expensive command per round trip (an UPDATE scanning a million values)
cannot, fifty at once, hold every other client for fifty of them per round
(bench/OPTIMISATIONS.md, "heavy turns")."""

HEAVY_HOST_MEMORY = 1.0
"""Seconds the address of a client whose connection ended heavy (HEAVY_TURN) is remembered:
a new connection from it starts heavy, so a client that reconnects for each expensive batch
queues for its turn as one that stays connected does (an attacker's pass: 300 such clients
held a polite client's round trips at 0.55 to 0.79 s at the median)."""

HEAVY_HOSTS_MAX = 10_000
"""Most addresses remembered that way (past it, the expired ones are forgotten, then all)."""

TURN_BUDGET = 0.002
"""Seconds per event-loop iteration given to clients with a backlog of requests, after all
ready I/O was served (see kvgevent.server.turns)."""

REPLY_CHUNK = 256
"""Reply lines collected before they are handed to the writer as one queue item."""

ROUND_TRIP_GETS = 32
"""Most GETs of one client's batch fetched from a store kept elsewhere (Redis) in one call:
their values are all in this process until their replies are queued, and the next call waits
until the client's queue has room (a client that does not read holds back its own fetches).
A pipeline of small GETs still takes one round trip per 32 of them."""

MAX_SEND_BATCH = 1 << 20
"""Most bytes the writer joins into one ``sendall``; bounds the memory a stalled client pins."""

DROP_GRACE = 2.0
"""Seconds without progress in sending to a client, while its queue is full, after which it
counts as not reading and replies to it are dropped (once per episode, not per reply). Long
enough for a client that reads slowly: its kernel reopens a full receive window only once a
good part of its buffer is free (about 100 kB with Linux's defaults), so its progress comes
in steps, half a second apart at 200 kB/s (0.25 s here cut such a reader off)."""

ROOM_WAIT_LIMIT = 2.5
"""Most seconds a reply waits for room in a full queue, even if the writer never got to run."""

EOF_FLUSH_STALL = DROP_GRACE
"""After a client half-closes: seconds without write progress before queued replies are
abandoned (as long as a client that reads may take between two steps of progress)."""

LINGER_POLL = 0.2
"""While a closing client's last replies wait in the kernel: seconds between two looks at how
many it has acknowledged (no event says so), reading and discarding what it still sends."""

DEFAULT_SHUTDOWN_FLUSH = 2.0
"""On SIGINT/SIGTERM or ``close()``: seconds allowed for flushing queued replies to clients."""

DEFAULT_CLIENT_TIMEOUT = 10.0
"""Seconds the client library waits for a connection or a reply before giving up."""

REPORT_INTERVAL = 1.0
"""Seconds between two reports of a worker's client counts to a shared store."""

FINAL_REPORT_TIMEOUT = 0.5
"""Seconds a stopping server gives its last report to a shared store (this worker leaving the
table): a Redis that stalled would hold the shutdown for all of ``--redis-timeout``; a live one
answers in milliseconds, and an entry left behind stops counting after the store's WORKER_TTL."""

WRITER_IDLE = 0.1
"""Seconds after which a client's writer greenlet and reply queue, idle (nothing to send), are
released (one to two such periods after its last reply): they are most of what a client that
was answered once costs, and making them again costs more than a small request does
(bench/OPTIMISATIONS.md, "an idle writer"): far longer than a busy client's round trip."""

READER_IDLE = 0.5
"""Seconds between two looks for readers to release: a client's reader greenlet parked in
``recv`` with nothing queued through its patience (below) of such periods is released; a
parked greenlet is most of what an idle client costs, and the next request makes one again."""

READER_PATIENCE_MAX = 64
"""A client's patience starts at one READER_IDLE and doubles each time a request woke its
released reader, up to this many (32 s): a client pausing about as long between requests
would otherwise pay a greenlet made and ended per request (30 % more CPU at one a second)."""

WRITER_TRIM_MIN = 256
"""Writers (or readers) released in one pass after which freed memory is given back to the OS
at once."""

TURN_WORK = 200_000
"""Work one client may do before the others get a turn, in units of about 10 ns: one per
value a store scans or copies, 18 per reply line built, one per 8 reply bytes (calibrated:
bench/OPTIMISATIONS.md, "work units"). About 2 ms: a client working on huge keys cannot hold
the event loop for longer than one command."""

INLINE_REPLY_BYTES = 4096
"""A GET reply of at most this many value bytes (and INLINE_REPLY_VALUES values) is built at
once with the other replies of its batch; a bigger one is built and queued in pieces."""

INLINE_REPLY_VALUES = 64
"""See INLINE_REPLY_BYTES. p0 keys gather values (the load generator's hold up to 32): a reply
of 64 small lines is built in a few µs, less than queueing it in pieces costs
(bench/OPTIMISATIONS.md, "plain batches")."""

DEFAULT_MAX_MEMORY = 0
"""Memory the server may use, in bytes, before writes are refused and clients holding big
buffers are disconnected; 0 = no limit (as in Redis)."""

DEFAULT_WORKER_TIMEOUT = 10.0
"""With --workers: seconds a worker may send no heartbeat (its event loop stopped, SIGSTOP, or
stuck) before the supervisor kills it and starts another: the kernel keeps handing such a
worker its share of new connections, and they would hang. 0 = never."""

MIN_WORKER_TIMEOUT = 1.0
"""The least --worker-timeout but 0: the supervisor checks the heartbeats five times a second,
and a worker beats at least four times per timeout; below this, a worker whose event loop is busy for a
moment (a big reply being built) is killed, and below the check interval an idle one too."""

HEARTBEAT_INTERVAL = 1.0
"""Seconds between two heartbeats of a worker (a quarter of --worker-timeout if that is less):
a few chances to beat per timeout, one cheap write each."""

SUPERVISOR_CHECK = 0.5
"""Seconds between a worker's looks at whether its supervisor is still its parent; when it is
not (killed, even by SIGKILL), the worker shuts down as on SIGTERM (its clients flushed)."""

FIRST_HEARTBEAT_TIMEOUT = 30.0
"""Seconds a new worker may take to send its first heartbeat (if --worker-timeout is less): it
imports, connects to the store and binds first, which a busy machine can make slow."""

GC_YOUNG_THRESHOLD = 10_000
"""Container objects allocated (net of those freed) before the cyclic collector's youngest
generation is collected (Python's default: 700). Over Redis, when hiredis made a list per
reply (the list layout, before the lines layout) and a shared round trip's replies were alive
at once: at 700, about 220 collections a second took 4% of a worker's CPU at 50 x 16 GETs; at
5,000 almost none ran. The server is built to free what it drops by reference counting, so
few cycles wait longer for it."""

MEMORY_CHECK_INTERVAL = 0.1
"""Seconds between two checks of the memory in use, while over --max-memory or near it."""

MEMORY_CHECK_STEP = 1 << 20
"""Growth of all clients' buffers, in bytes, after which memory is checked at once rather than
at the next MEMORY_CHECK_INTERVAL (so a burst of input overshoots the limit by about this)."""

MEMORY_OK_QUIET = 1.0
"""Seconds under --max-memory with no write refused and no client disconnected for memory
after which the episode is over (logged once: a store sitting at the limit does not log an
event per refused write)."""

PRESSED_QUEUE_BYTES = 1 << 20
"""Reply bytes queued ahead of a client for a big GET reply while the server is over
--max-memory (instead of --queue-bytes): a prompt reader of a big value out of a full store
is then not the biggest holder, disconnected first (bench/OPTIMISATIONS.md, "pressed queues")."""

EVICT_DRAINING = 0.5
"""Seconds since a byte of a client's queued replies last left within which its writer counts
as draining them, at the first check of memory that sees it (then EVICT_DRAIN_RATE): eviction
for --max-memory then counts its queue as no more than PRESSED_QUEUE_BYTES, what it holds
once drained under the limit (a prompt reader whose queue filled to --queue-bytes just
before the server went over was disconnected first)."""

EVICT_DRAIN_RATE = 1 << 20
"""Bytes a second a client's writer must have sent since the last check of memory for its
queue to count as draining: one that reads a byte now and then to look alive keeps what it
holds counted (a 16 MiB queue drains in 16 s at this rate)."""

EVICT_DRAIN_WINDOW = 1.0
"""Most seconds between two looks at a client's writer for their difference to say at what
rate it drains (a look older than that, from an earlier episode, says nothing of now)."""

EVICT_MIN_BYTES = 4096
"""Clients holding fewer buffered bytes than this are never disconnected for memory: a
polite client holds a request or two; a higher floor let many clients just under it fill the
memory, none evictable (bench/OPTIMISATIONS.md, "eviction floor")."""

CLIENT_ALLOWANCE = 16
"""Client buffers may hold 1/CLIENT_ALLOWANCE of --max-memory before any client is
disconnected for memory: with the store full, a client can still read a big value out."""

CONNECTION_COST = 16 * 1024
"""Bytes one connection costs beyond its buffers (greenlets, socket, queue), counted in the
memory in use (bench/OPTIMISATIONS.md, "a connection's cost")."""

TLS_CONNECTION_COST = 48 * 1024
"""Bytes a TLS connection costs beyond CONNECTION_COST (its SSLObject, two MemoryBIOs and
OpenSSL's record buffers), counted in the memory in use: 59 kB each idle after the handshake,
measured with 1,000 clients (more after a client sent megabytes: the buffers keep their size)."""

DEFAULT_PREFIX = "kvgevent:"
"""Namespace of kvgevent's keys in a Redis that others may share."""

DEFAULT_REDIS_TIMEOUT = 2.0
"""Seconds a Redis call may take before its commands get ``ERR store unavailable``."""
