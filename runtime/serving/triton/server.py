"""Finding, starting, health-checking and stopping a `tritonserver` process (`trimode serve`, the tests).

The binary comes from PATH (a Triton container: backends in /opt/tritonserver/backends) or from the
nvidia-pytriton wheel, which bundles `tritonserver`, its libraries and the Python backend with one stub per
Python version. For the wheel we assemble a backends folder the way pytriton itself does - the backend
library and utils linked in, the stub built for this interpreter's version copied next to them - and put
this interpreter's lib folder first on LD_LIBRARY_PATH: the stub links `libpython3.X.so`, and without that it
loads the system's libpython, whose standard library then fails inside multiprocessing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# A model's load error as Triton logs it: `failed to load 'NAME' version N: Internal: MESSAGE\n\nAt: ...`.
LOAD_FAILURE = re.compile(r"(failed to load '[^']+' version \d+: .*?)(?:\\n|\"$)", re.MULTILINE)


class TritonUnavailable(RuntimeError):
    """No usable tritonserver on this machine (the message says what was looked for)."""


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with the tail of its log."""


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary, its backends folder and the library folders it needs."""

    binary: Path
    backend_dir: Path | None
    lib_dirs: tuple[Path, ...] = ()
    bundled_stub: Path | None = None  # the pytriton wheel's stub for this Python (needs a backends folder)


def _pytriton_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent


def find_tritonserver() -> TritonInstall:
    """tritonserver from PATH (or $TRITONSERVER), else the one bundled in the nvidia-pytriton wheel."""
    explicit = os.environ.get("TRITONSERVER") or shutil.which("tritonserver")
    if explicit:
        binary = Path(explicit).resolve()
        backends = Path(os.environ.get("TRITON_BACKEND_DIR", binary.parent.parent / "backends"))
        return TritonInstall(binary, backends if backends.is_dir() else None)
    root = _pytriton_root()
    if root is None:
        raise TritonUnavailable("no tritonserver on PATH and nvidia-pytriton is not installed "
                                "(pip install 'trimode[triton]', or use a Triton container)")
    dist = root / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file():
        raise TritonUnavailable(f"nvidia-pytriton is installed but {binary} is missing")
    if not stub.is_file():
        raise TritonUnavailable(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, dist / "backends", (libs,) if libs.is_dir() else (), stub)


def prepare_backends(install: TritonInstall, workdir: Path) -> Path | None:
    """The backends folder to pass to tritonserver (for the wheel: assembled under `workdir`)."""
    if install.bundled_stub is None:
        return install.backend_dir
    assert install.backend_dir is not None
    python_dir = workdir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (install.backend_dir / "python").iterdir():
        if item.is_file() and not (python_dir / item.name).exists():
            (python_dir / item.name).symlink_to(item)
    stub = python_dir / "triton_python_backend_stub"
    if not stub.exists():
        shutil.copy2(install.bundled_stub, stub)
    return workdir / "backends"


def server_environment(install: TritonInstall) -> dict[str, str]:
    """This environment plus the library folders the server and the Python-backend stub need."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    dirs = ([libdir] if libdir else []) + [str(d) for d in install.lib_dirs]
    if env.get("LD_LIBRARY_PATH"):
        dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(dirs)
    # The stub finds its Python by name on PATH: make that this interpreter.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _die_with_parent() -> None:
    """In the child before exec (Linux): a session of its own, and SIGTERM when the parent thread dies.

    The own session keeps a terminal's Ctrl-C away from the server (we stop it in order); the death signal
    means a SIGKILLed `trimode serve` or test run does not leave an orphaned server holding its ports.
    """
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class TritonServer:
    """One tritonserver process serving `repo`; use as a context manager or call start()/stop().

    Ports of 0 are replaced by free ones at start. The server binds `host` only (loopback by default), its HTTP
    endpoint `http_host` when given (`trimode serve` keeps it on loopback behind its guard). Its log goes to
    `log_path` (a temporary file unless given).
    """

    repo: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    log_verbose: int = 0
    exit_timeout_s: int = 10
    extra_args: list[str] = field(default_factory=list)
    http_host: str | None = None
    install: TritonInstall | None = None
    process: subprocess.Popen | None = None
    _workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{self.http_host or self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backend_dir: Path | None) -> list[str]:
        install = self.install or find_tritonserver()
        args = [str(install.binary), f"--model-repository={self.repo}",
                f"--http-address={self.http_host or self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--strict-readiness=true",
                f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.log_verbose}",
                # A unique shared-memory prefix: several servers (tests, users) may share one machine.
                f"--backend-config=python,shm-region-prefix-name=trimode{os.getpid()}_{self.http_port}_"]
        if backend_dir is not None:
            args.append(f"--backend-directory={backend_dir}")
        return args + list(self.extra_args)

    def start(self, wait: bool = True, timeout_s: float = 180.0) -> TritonServer:
        self.install = self.install or find_tritonserver()
        self._workdir = Path(tempfile.mkdtemp(prefix="trimode-triton-"))
        for name in ("http_port", "grpc_port", "metrics_port"):
            if getattr(self, name) == 0:
                setattr(self, name, free_port(self.http_host or self.host if name == "http_port" else self.host))
        if self.log_path is None:
            self.log_path = self._workdir / "tritonserver.log"
        backend_dir = prepare_backends(self.install, self._workdir)
        with open(self.log_path, "ab") as log:
            # Tied to the thread that starts it (see _die_with_parent): start it from a long-lived thread.
            self.process = subprocess.Popen(self.command(backend_dir), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_environment(self.install),
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                                            start_new_session=sys.platform != "linux")
        if wait:
            try:
                self.wait_ready(timeout_s)
            except BaseException:
                self.stop()
                raise
        return self

    def log_tail(self, lines: int = 40) -> str:
        """Why a model failed to load when the log says so (one line per model), else the log's last lines."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        failures = [match.group(1).replace('\\"', '"') for match in LOAD_FAILURE.finditer(text)]
        return "\n".join(failures) if failures else "\n".join(text.splitlines()[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Poll the readiness endpoint until every model is loaded; a dead process fails at once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise TritonStartError(f"tritonserver exited with status {code} (log: {self.log_path}):\n"
                                       f"{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f}s (log: {self.log_path}):\n"
                               f"{self.log_tail()}")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests up to exit_timeout_s), then SIGKILL; returns the status."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout_s if timeout_s is not None else self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the server's own session: it and its stubs
                code = process.wait(10)
        if self._workdir is not None:  # a log that lives there is kept only when the server failed
            keep_log = code != 0 and self.log_path is not None and self._workdir in self.log_path.parents
            shutil.rmtree(self._workdir / "backends" if keep_log else self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
