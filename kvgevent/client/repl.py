"""The interactive client (``python run_client.py`` on a terminal): line editing and
persistent history through readline, words or protocol lines, results shown for people, and
a reconnect when the connection is lost."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TextIO

from kvgevent.client.client import Client
from kvgevent.client.commands import (
    HELP,
    Request,
    error_message,
    parse_request,
    reply_error,
    show_raw_reply,
    show_result,
)
from kvgevent.errors import ConnectionLost, InvalidArgument, NotSent, ServerError

HISTORY_FILE = "~/.kvgevent_history"
"""Where the REPL keeps its history, unless KVGEVENT_HISTFILE says otherwise."""

HISTORY_LENGTH = 1000
"""Lines of history kept."""


def history_path() -> Path:
    return Path(os.environ.get("KVGEVENT_HISTFILE", HISTORY_FILE)).expanduser()


class Repl:
    """Read a request, send it, show the result; until ``quit``, ``exit`` or end of input."""

    def __init__(self, client: Client, out: TextIO = sys.stdout, history: Path | None = None) -> None:
        self.client = client
        self.out = out
        self.history = history
        self._readline = _load_readline(history)

    @property
    def prompt(self) -> str:
        where = f"{self.client.host}:{self.client.port}"
        return f"{where}> " if self.client.connected else f"{where} (not connected)> "

    def run(self) -> int:
        if not self.client.connected:
            self._connect()
        while True:
            try:
                text = input(self.prompt)
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:
                self.say("^C")
                continue
            self._remember(text)
            word = text.strip().lower()
            if not word:
                continue
            if word in ("quit", "exit"):
                return 0
            if word in ("help", "?"):
                self.say(HELP)
                continue
            self.handle(text)

    def handle(self, text: str) -> None:
        """Run one typed request and show what came of it. Whatever came from the server is
        shown escaped (values, protocol reply lines, ERR reasons): a stored value cannot
        send the terminal a control sequence."""
        try:
            request = parse_request(text)
        except InvalidArgument as exc:
            self.say(f"(error) {exc}")
            return
        if not self.client.connected and not self._connect():
            return
        try:
            try:
                lines = self._run(request)
            except NotSent as exc:  # (closed while the prompt waited: an idle timeout perhaps)
                self.say(f"(error) connection lost: {exc}")
                if not self._connect():
                    return
                self.say("reconnected; the command had not been sent: sending it now")
                lines = self._run(request)
            for line in lines:
                self.say(line.decode("utf-8", "backslashreplace"))
        except ServerError as exc:
            self.say(error_message(exc))
        except InvalidArgument as exc:
            self.say(f"(error) {exc}")
        except ConnectionLost as exc:
            self.say(f"(error) connection lost: {exc}")
            if self._connect():
                self.say("reconnected; the last command may or may not have been applied")

    def _run(self, request: Request) -> list[bytes]:
        """The reply lines to show for ``request`` (a parsed typed request)."""
        if request.command is not None:
            (result,) = self.client.execute([request.command])
            return show_result(request.command, result, tty=True)
        assert request.raw is not None
        (lines,) = self.client.send_raw([request.raw])
        if error := reply_error(lines):
            raise error
        return show_raw_reply(lines, tty=True)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _connect(self) -> bool:
        try:
            self.client.connect()
            return True
        except ConnectionLost as exc:
            self.say(f"(error) {exc}; will retry on the next command")
            return False

    def _remember(self, text: str) -> None:
        """Append ``text`` to the history file; an AUTH (its password) to no history at all,
        as redis-cli does: the history file outlives the session, and up-arrow shows it."""
        if self._readline is None or not text.strip():
            return
        if _is_auth(text):
            self._readline.remove_history_item(self._readline.get_current_history_length() - 1)
            return
        if self.history is None:
            return
        try:
            self._readline.append_history_file(1, str(self.history))
        except OSError:
            pass


def _is_auth(text: str) -> bool:
    """Whether a typed request is an AUTH, as words (``auth pw``) or a protocol line."""
    return re.match(r"\s*auth(\s|:|$)", text, re.IGNORECASE) is not None


def _load_readline(history: Path | None):
    """Import readline (line editing for input()) and load the history; None if unavailable."""
    try:
        import readline
    except ImportError:  # pragma: no cover - not on this platform
        return None
    readline.set_history_length(HISTORY_LENGTH)
    if history is not None:
        try:
            if history.exists():
                readline.read_history_file(str(history))
                readline.write_history_file(str(history))  # trims it to HISTORY_LENGTH
            else:
                history.touch(mode=0o600)
        except OSError:
            pass
    return readline


def run_repl(client: Client) -> int:
    return Repl(client, history=history_path()).run()
