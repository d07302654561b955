"""The server wing: the gevent I/O. :class:`~kvgevent.server.server.KeyValueServer` accepts
clients; each is a :class:`~kvgevent.server.connection.Connection` (its reply queue and writer)
read by one greenlet that hands parsed requests to the sans-I/O
:class:`~kvgevent.server.session.Session`; :mod:`~kvgevent.fastio` does the socket I/O,
:mod:`~kvgevent.server.turns` the fair turns, :mod:`~kvgevent.server.memory` the
``--max-memory`` rule, :mod:`~kvgevent.server.auth_throttle` password throttling and
:mod:`~kvgevent.server.counters` the counters STATS reads."""
