"""Helpers for tests that start a server process on 127.0.0.1: a free port, and waiting for it to listen."""

import socket
import subprocess
import time


def free_port() -> int:
    """A local TCP port nobody listens on now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(process: subprocess.Popen, port: int, timeout: float) -> None:
    """Return once 127.0.0.1:`port` accepts connections; kill `process` and fail, with the end of its
    stderr when it is piped, if it exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                said = process.stderr.read().decode()[-2000:] if process.stderr else ""
                raise AssertionError(f"server on port {port} did not start: {said}") from None
            time.sleep(0.2)
