"""The one Prefect API a ``deltatune`` process talks to.

    api = PrefectAPI.start()     # before the heavy imports: the server boots while they load
    ...
    with api.session():          # every flow of this process reports to api.url
        finetune(...)

When ``PREFECT_API_URL`` is set (in the environment or the active Prefect profile), that server is used
and nothing is started: a running ``prefect server start`` or Prefect Cloud. Otherwise this process starts
one temporary local server (Prefect's ephemeral server: SQLite under ``PREFECT_HOME``, no UI), as its own
child that the kernel kills when this process dies, SIGKILL included (``PR_SET_PDEATHSIG``). Prefect's
own ephemeral server is stopped only by an ``atexit`` hook, which SIGTERM and SIGKILL skip, so a killed
run used to leave it running (docs/environment.md, "Prefect"). SIGTERM becomes ``SystemExit`` so that the
flow run is marked crashed and the training process group is killed before this process exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.process import set_pdeathsig

STARTUP_TIMEOUT_S = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))


class PrefectAPIError(RuntimeError):
    """The Prefect API cannot be reached or started; the message says which and what to do."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _server_child() -> None:
    """In the server's child process, before exec: die with the deltatune process that started it."""
    set_pdeathsig(signal.SIGTERM)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class PrefectAPI:
    """The API this process uses: ``url``, and ``proc`` when it is our own temporary server."""

    def __init__(self, url: str | None, proc: subprocess.Popen | None = None, log: Path | None = None):
        self.url, self.proc, self.log = url, proc, log

    @classmethod
    def start(cls) -> PrefectAPI:
        """Start a temporary server unless ``$PREFECT_API_URL`` names one; return without waiting for it.

        The active Prefect profile may also name a server: ``session()`` finds out (that needs Prefect's
        settings, a 3 s import) and stops the temporary one unused.
        """
        if os.environ.get("PREFECT_API_URL"):
            return cls(os.environ["PREFECT_API_URL"].rstrip("/"))
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        home.mkdir(parents=True, exist_ok=True)
        log = home / "deltatune-api.log"
        port = _free_port()
        import importlib.util

        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None, "prefect is a dependency"
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(spec.origin).parents[1]),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        # The environment Prefect's own ephemeral server runs with (prefect.server.api.server.
        # SubprocessASGIServer): no UI, ephemeral services only.
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
        env["PREFECT__SERVER_FINAL"] = "1"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_server_child,
            )
        return cls(f"http://127.0.0.1:{port}/api", proc, log)

    def wait(self, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
        """Block until the API answers its health check; return its URL."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if _healthy(self.url):
                return self.url
            if self.proc is not None and self.proc.poll() is not None:
                raise PrefectAPIError(
                    f"the temporary Prefect server exited with code {self.proc.returncode} before it "
                    f"answered; its log is {self.log}"
                )
            time.sleep(0.1)
        if self.proc is None:
            raise PrefectAPIError(
                f"PREFECT_API_URL={self.url} does not answer {self.url}/health: start that server "
                "(`prefect server start`) or unset PREFECT_API_URL to run on a temporary local one"
            )
        raise PrefectAPIError(
            f"the temporary Prefect server did not answer within {timeout_s:g}s "
            f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); its log is {self.log}"
        )

    def stop(self) -> None:
        """Stop our temporary server (SIGTERM, then SIGKILL after 10 s); a server we did not start stays."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @contextmanager
    def session(self) -> Iterator[str]:
        """Run the block against this API; stop our server at the end.

        ``PREFECT_API_URL`` is set in the environment and in Prefect's global settings, not only in a
        settings context: Prefect's log and event workers run in threads of their own, which see the
        global settings, and start a second ephemeral server when those name no API. Their queues are
        drained before our server stops. SIGTERM raises ``SystemExit`` in the block, so the flow engine
        records the run as crashed and the training supervisor kills its process group first.
        """
        import prefect.context
        from prefect.settings import (
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            get_current_settings,
            temporary_settings,
        )

        configured = get_current_settings().api.url
        if self.proc is not None and configured:  # the profile names a server: use it, not ours
            self.stop()
            self.url, self.proc = configured.rstrip("/"), None
        try:
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        saved = os.environ.get("PREFECT_API_URL")
        try:
            url = self.wait()
            os.environ["PREFECT_API_URL"] = url
            prefect.context.refresh_global_settings_context()
            # Flow-run heartbeats let a server that outlives the process mark a dead run crashed; our
            # temporary server dies with the process, and the heartbeat thread costs each flow up to 1 s
            # at its end (it sleeps in 1 s steps). A server named by PREFECT_API_URL keeps them.
            heartbeats = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None} if self.proc is not None else {}
            with temporary_settings(updates=heartbeats):
                yield url
        finally:
            _drain_prefect_workers()
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved
            prefect.context.refresh_global_settings_context()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.stop()


def _drain_prefect_workers(timeout_s: float = 10.0) -> None:
    """Send the logs and events Prefect still holds in its background workers (as
    prefect.testing.utilities.prefect_test_harness does before it stops its server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception:  # a worker that never started, or a server already gone: nothing to send
            pass
