"""kvgevent as an installable package (issue 14), and the README's table of log events kept
complete. The package is built from a copy of the checkout and installed into a fresh venv,
offline: no index, no build isolation (the running environment's setuptools builds it), its
dependencies seen through a .pth file pointing at the running environment's site-packages."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the package is built from the files git tracks")
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with kvgevent installed from a copy of the checkout; its bin directory."""
    pytest.importorskip("setuptools.command.bdist_wheel", reason="building needs setuptools >= 70.1")
    base = tmp_path_factory.mktemp("package")
    source = base / "source"
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    target = base / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index"]
    install += ["--no-deps", "--no-build-isolation", "--disable-pip-version-check", "-q", str(source)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=300, cwd=base)
    assert result.returncode == 0, result.stderr[-2000:]
    return target / "bin"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_the_installed_commands_run(installed, tmp_path):
    """kvgevent-server, kvgevent-cli and python -m kvgevent, from outside the checkout."""
    server = run([str(installed / "kvgevent-server"), "--help"], tmp_path)
    assert server.returncode == 0 and server.stdout.startswith("usage: kvgevent-server")
    assert "--metrics-port" in server.stdout
    client = run([str(installed / "kvgevent-cli"), "--help"], tmp_path)
    assert client.returncode == 0 and client.stdout.startswith("usage: kvgevent-cli")
    module = run([str(installed / "python"), "-m", "kvgevent", "--help"], tmp_path)
    assert module.returncode == 0 and "--store" in module.stdout
    where = run([str(installed / "python"), "-c", "import kvgevent; print(kvgevent.__file__)"], tmp_path)
    assert str(ROOT) not in where.stdout  # the installed copy, not the checkout


def test_the_installed_server_serves(installed, tmp_path):
    """kvgevent-server on a free port answers kvgevent-cli, then stops on SIGTERM (exit 0)."""
    from tests.conftest import free_port, wait_until

    port = free_port()
    server = subprocess.Popen(
        [str(installed / "kvgevent-server"), "--port", str(port), "--log-format", "json"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    try:
        cli = [str(installed / "kvgevent-cli"), "--port", str(port)]
        wait_until(lambda: run([*cli, "ping"], tmp_path).returncode == 0, 20, "not serving")
        assert run([*cli, "put", "fruit", "apple"], tmp_path).returncode == 0
        assert run([*cli, "get", "fruit"], tmp_path).stdout == "apple\n"
    finally:
        server.terminate()
        assert server.wait(timeout=20) == 0


# --- the README's table of log events --------------------------------------------------------

LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def _is_logger(node: ast.expr) -> bool:
    """``log``, ``self.log``, ``conn.log``, ``shared.log``, ``self._log``, ``self.logger()``,
    ``get_logger()``: what kvgevent calls its loggers."""
    if isinstance(node, ast.Call):
        called = node.func
        name = called.id if isinstance(called, ast.Name) else getattr(called, "attr", "")
        return name in ("logger", "get_logger")
    if isinstance(node, ast.Name):
        return node.id == "log"
    return isinstance(node, ast.Attribute) and node.attr in ("log", "_log")


def emitted_events() -> set[str]:
    """Every event name the code can log: literal first arguments of logger calls, and the
    values of FAILURE_EVENTS (the one place an event name is chosen at run time)."""
    from kvgevent.stores.aof_log import FAILURE_EVENTS

    events = set(FAILURE_EVENTS.values())
    for path in (ROOT / "kvgevent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in LOG_METHODS or not _is_logger(node.func.value) or not node.args:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                events.add(first.value)
            else:
                assert ast.unparse(first) == "FAILURE_EVENTS[kind]", (
                    f"{path}:{node.lineno}: a computed event name"
                )
    return events


def documented_events() -> set[str]:
    """The events of the README's "Reading the logs" table (first column, in backticks)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reading the logs") :]
    section = section[: section.index("\n## ", 4)] if "\n## " in section[4:] else section
    names: set[str] = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            names.update(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    return names


def test_every_event_the_code_can_log_is_in_the_readme():
    emitted = emitted_events()
    assert {"client_connected", "client_dropped", "aof_write_failed", "metrics_listening"} <= emitted
    missing = emitted - documented_events()
    assert not missing, f"events missing from the README's table: {sorted(missing)}"


# --- the public names ------------------------------------------------------------------------

PUBLIC_NAMES_CHECK = """
import kvgevent
import kvgevent.client
import kvgevent.errors
from kvgevent import KeyValueServer, MemoryStore, configure_logging  # (the README's lines)
from kvgevent.client import Client
from kvgevent.errors import ConnectionLost, InvalidArgument, ServerError

names = {}
exec("from kvgevent import *", names)
names.pop("__builtins__")
assert sorted(names) == sorted(kvgevent.__all__), sorted(set(kvgevent.__all__) ^ set(names))
missing = [name for name, value in names.items() if value is None]
assert not missing, missing
assert set(kvgevent.__all__) <= set(dir(kvgevent)), set(kvgevent.__all__) - set(dir(kvgevent))
documented = {"KeyValueServer", "MemoryStore", "KVStore", "Client", "configure_logging",
              "Put", "Get", "Update", "Delete", "Ping", "Stats",
              "ConnectionLost", "InvalidArgument", "ServerError"}
assert documented <= set(kvgevent.__all__), documented - set(kvgevent.__all__)
assert kvgevent.Client is Client and kvgevent.client.Client is Client
for error in (ConnectionLost, InvalidArgument, ServerError):
    assert getattr(kvgevent, error.__name__) is error, error
assert (kvgevent.KeyValueServer, kvgevent.MemoryStore) == (KeyValueServer, MemoryStore)
assert kvgevent.configure_logging is configure_logging
assert not hasattr(kvgevent, "NoSuchName")
print("ok", len(names))
"""


def test_the_public_names_are_importable_from_the_package_root():
    """README, Library: ``from kvgevent import KeyValueServer, MemoryStore, configure_logging``,
    ``from kvgevent.client import Client``, ``from kvgevent.errors import ConnectionLost,
    InvalidArgument, ServerError``; and (Layout) "`kvgevent/__init__.py` re-exports the public
    names (`KeyValueServer`, `MemoryStore`, `KVStore`, `Client`, `configure_logging`, the
    commands and errors) and imports each on first use". Real: a fresh interpreter (so no
    name was imported before, as in a user's program) runs the README's imports and ``from
    kvgevent import *``: every name of ``__all__`` is bound, none missing, all in ``dir()``,
    the documented ones among them, and each is the very object of the module the README
    imports it from (an ``except kvgevent.ConnectionLost`` catches what the client raises).
    Nothing is injected. Under half a second."""
    result = subprocess.run(
        [sys.executable, "-c", PUBLIC_NAMES_CHECK], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok ")
