"""``python -m kvgevent``: the server (as ``run_server.py``); how --workers starts its workers."""

from kvgevent.serve.entry import main

main()
