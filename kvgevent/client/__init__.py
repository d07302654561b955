"""The client wing: the client library (:class:`Client`) and ``run_client.py``'s modes (the
REPL, one-shot commands, ``--pipe``, ``--stat``, ``--latency``, ``bench``).

It imports only the root wing (:mod:`kvgevent.protocol`, :mod:`kvgevent.errors`,
:mod:`kvgevent.config`, :mod:`kvgevent.tls`, :mod:`kvgevent.args`): no gevent, no structlog,
nothing of the server or the stores. Its sockets are plain ones, cooperative in a
gevent-monkey-patched process.
"""

from kvgevent.client.client import Client, Pipeline

__all__ = ["Client", "Pipeline"]
