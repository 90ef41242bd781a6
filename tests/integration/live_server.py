"""Start the real server as a subprocess (``python -m service.api.server``) and stop it by its pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
# A small KV cache keeps each test server light; the context is clamped to it.
DEFAULT_FLAGS = ("--kv-cache-tokens", "4096", "--log-level", "info")
# The second shared server (``keyed_server``): two API keys, one request at a time.
KEYS = ("integration-key-8c1e", "second-key")
KEYED_FLAGS = ("--max-num-seqs", "1", "--max-batched-tokens", "64", "--max-queue-requests", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the server was not ready within {timeout} s:\n{self.log()[-4000:]}")

    def terminate(self) -> None:
        """SIGTERM: the server drains, then exits."""
        os.kill(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return int(self.process.returncode)


def start_server(*flags: str, env: dict[str, str] | None = None, wait: bool = True) -> LiveServer:
    """A server on a free port with ``DEFAULT_FLAGS`` plus ``flags``; ``env`` adds variables."""
    port = free_port()
    command = [
        sys.executable, "-m", "service.api.server",
        "--model", MODEL, "--host", "127.0.0.1", "--port", str(port),
        *DEFAULT_FLAGS, *flags,
    ]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPTSERVE_")}
    full_env.update(env or {})
    log_file = tempfile.NamedTemporaryFile(prefix=f"gptserve-{port}-", suffix=".log", delete=False)
    process = subprocess.Popen(
        command, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
    )
    key = full_env.get("GPTSERVE_API_KEY", "").split(",")[0].strip() or None
    server = LiveServer(process, port, Path(log_file.name), api_key=key)
    if key:
        server.headers = {"Authorization": f"Bearer {key}"}
    if wait:
        server.wait_ready()
    return server
