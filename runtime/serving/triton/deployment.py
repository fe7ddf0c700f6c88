"""What `trimode serve --api triton` runs: tritonserver, the HTTP guard in front of it, and an orderly shutdown.

Start: the public HTTP socket is bound first (a taken port is a clear error before anything loads),
tritonserver starts with its HTTP endpoint on a loopback port, and the guard (http_guard.py, on uvicorn with
the header/body deadlines of http_limits.py) serves the public socket from a thread of this process.

Shutdown (`stop`): the guard refuses new inference requests; `STOP` is written into the drain folder the
models watch (model.py), with the seconds in-flight requests may still take; once every model instance has
written `done-...` (or that time and a margin have passed), tritonserver is stopped - with nothing left in
flight it exits at once - and then the guard, whose streams have all ended with their final responses.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..http_limits import HttpLimits, guarded_protocol
from .http_guard import INT_RANGES, TritonHttpGuard
from .repo import INPUTS
from .server import TritonServer

DRAIN_MARGIN_S = 10.0  # beyond the shutdown timeout, for the last step and the final responses


@dataclass
class TritonDeployment:
    """tritonserver plus (when `http_socket` is given) the guard serving that socket."""

    server: TritonServer
    http_socket: socket.socket | None = None
    limits: HttpLimits = field(default_factory=HttpLimits)
    drain_dir: Path | None = None
    shutdown_timeout_s: float = 10.0
    model_names: tuple[str, ...] = ()  # trimode's models in the repository (their integer inputs are checked)
    guard: TritonHttpGuard | None = None
    _guard_server: object | None = None
    _guard_thread: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        """host:port clients use for HTTP (the guard's, or tritonserver's own without a guard)."""
        if self.http_socket is None:
            return self.server.http_url
        host, port = self.http_socket.getsockname()[:2]
        return f"{host}:{port}"

    def start(self, timeout_s: float = 300.0) -> TritonDeployment:
        if self.http_socket is not None:
            self.server.http_host = "127.0.0.1"
        self.server.start(wait=True, timeout_s=timeout_s)
        if self.http_socket is not None:
            try:
                self._start_guard()
            except BaseException:
                self.server.stop()
                raise
        return self

    def _start_guard(self) -> None:
        import uvicorn

        ranges = {name: INT_RANGES[kind] for name, kind, _ in INPUTS if kind in INT_RANGES}
        self.guard = TritonHttpGuard(f"http://{self.server.http_url}", self.limits,
                                     {model: ranges for model in self.model_names})
        config = uvicorn.Config(self.guard, log_level="warning", access_log=False, lifespan="on",
                                timeout_keep_alive=5, timeout_graceful_shutdown=5,
                                http=guarded_protocol(self.limits))
        server = uvicorn.Server(config)
        self._guard_server = server
        sock = self.http_socket
        self._guard_thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                              name="trimode-http-guard", daemon=True)
        self._guard_thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self._guard_thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP endpoint in front of tritonserver did not start")
            time.sleep(0.02)

    def running(self) -> bool:
        process = self.server.process
        return process is not None and process.poll() is None

    def stop(self) -> int | None:
        """The orderly shutdown of the module docstring; returns tritonserver's exit status."""
        if self.guard is not None:
            self.guard.draining = True
        if self.drain_dir is not None and self.running():
            self._drain()
        if self.guard is not None:
            self.guard.close_upstream()
        code = self.server.stop()
        if self._guard_server is not None:
            self._guard_server.should_exit = True  # type: ignore[attr-defined]
            if self._guard_thread is not None:
                self._guard_thread.join(15)
            self._guard_server = None
        return code

    def _drain(self) -> None:
        assert self.drain_dir is not None
        self.drain_dir.mkdir(parents=True, exist_ok=True)
        (self.drain_dir / "STOP.tmp").write_text(f"{self.shutdown_timeout_s}\n")
        (self.drain_dir / "STOP.tmp").replace(self.drain_dir / "STOP")
        deadline = time.monotonic() + self.shutdown_timeout_s + DRAIN_MARGIN_S
        while time.monotonic() < deadline and self.running():
            live = {p.name[len("live-"):] for p in self.drain_dir.glob("live-*")}
            done = {p.name[len("done-"):] for p in self.drain_dir.glob("done-*")}
            if live <= done:
                break
            time.sleep(0.05)
        # the final responses are sent; let them reach the clients before tritonserver goes
        settle = time.monotonic() + 5.0
        while self.guard is not None and self.guard.active and time.monotonic() < settle:
            time.sleep(0.05)
        time.sleep(0.2)
