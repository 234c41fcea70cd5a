"""Run the real Cog HTTP server (coglet) on 127.0.0.1 for tests, as the image runs it.

`start_server(env)` starts ``python -m cog.server.http`` from the repository root with the
venv's bin first on PATH (coglet spawns its worker with the ``python`` it finds there),
``COG_PREDICT_TYPE_STUB=predict.py:Runner``, a free port, the given extra environment and
optionally ``--upload-url``; it waits until ``/health-check`` leaves STARTING and returns a
:class:`CogServer`. `cog_server(...)` is the same as a context manager that always stops
the server. The server's stdout and stderr go to a log file (`server.logs()`); the server
runs in its own process group, which `stop()` ends.

The server validates inputs against ``.cog/openapi_schema.json`` in its working directory
(scripts/write_cog_schema.py writes it), exactly as the built image does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNER_REF = "predict.py:Runner"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll `predicate` every 50 ms until it returns something truthy (returned), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self):
        return json.loads(self.body)


def http(method: str, url: str, payload=None, headers: Mapping[str, str] | None = None, timeout: float = 60) -> Response:
    """One HTTP request with the standard library; error statuses are returned, not raised."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Response(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as exc:
        with exc:
            return Response(exc.code, exc.read(), dict(exc.headers))


@dataclass
class CogServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        return http("GET", f"{self.url}/health-check", timeout=10).json()

    def wait_for_health(self, wanted: set[str], timeout: float) -> dict:
        """Poll /health-check until its status is in `wanted`; raise with the logs otherwise."""
        deadline = time.monotonic() + timeout
        last: dict | str = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cog server exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
            try:
                last = self.health()
                if last.get("status") in wanted:
                    return last
            except (OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(f"cog server health is {last} after {timeout:.0f} s, wanted {sorted(wanted)}:\n{self.logs()[-4000:]}")

    def predict(
        self, payload: dict, headers: Mapping[str, str] | None = None, timeout: float = 120, wait_ready: bool = True
    ) -> Response:
        # coglet 0.23.1 answers a prediction a moment before it frees its slot, so a request sent
        # straight after can get 409 "At capacity": wait until it reports READY again (unless
        # the caller wants to hit a busy server on purpose).
        if wait_ready:
            self.wait_for_health({"READY"}, timeout=30)
        return http("POST", f"{self.url}/predictions", payload, headers, timeout=timeout)

    def cancel(self, prediction_id: str) -> Response:
        return http("POST", f"{self.url}/predictions/{prediction_id}/cancel", timeout=10)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the server's process group (server and worker), SIGKILL what is left."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the worker, should it outlive the server
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)


def start_server(
    env: Mapping[str, str] | None = None,
    *,
    upload_url: str | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    ready_timeout: float = 120,
    wait: bool = True,
) -> CogServer:
    """Start the server with `env` added to this process's environment; with `wait`, return
    once health is READY or SETUP_FAILED (the caller checks which)."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    full_env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PORT": str(port),
        "COG_PREDICT_TYPE_STUB": RUNNER_REF,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    full_env.pop("PYTEST_CURRENT_TEST", None)  # audio-separator relaxes its checks when it sees this
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="cogserver-"))
    log_path = log_dir / f"cog-server-{port}.log"
    command = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
    if upload_url:
        command += ["--upload-url", upload_url]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = CogServer(f"http://127.0.0.1:{port}", process, log_path)
    if wait:
        try:
            server.wait_for_health({"READY", "SETUP_FAILED"}, ready_timeout)
        except BaseException:
            server.stop()
            raise
    return server


@contextlib.contextmanager
def cog_server(env: Mapping[str, str] | None = None, **kwargs) -> Iterator[CogServer]:
    server = start_server(env, **kwargs)
    try:
        yield server
    finally:
        server.stop()
