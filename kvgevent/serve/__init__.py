"""``run_server.py``: its flags (:mod:`~kvgevent.serve.cli`), signals
(:mod:`~kvgevent.serve.signals`) and ``--workers`` supervision (:mod:`~kvgevent.serve.workers`).
The one place that imports both the server and the stores."""
