"""gptserve's HTTP server as a child process: start-up time, and a liveness probe
of ``/health`` while long prompts are being prefilled."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import httpx

from bench.loadgen import LoadSpec, Prompt, completion_payload, stream_completion
from bench.metrics import RequestRecord


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """``python -m service.cli serve`` (the ``gptserve serve`` command) on a free local port."""

    model: str
    args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None  # the server's output, shown when it fails

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> float:
        """Start the process; seconds from spawning it to ``/ready`` answering 200."""
        cmd = [sys.executable, "-m", "service.cli", "serve", "--model", self.model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *self.args]
        fd, name = tempfile.mkstemp(prefix="gptserve-bench-", suffix=".log")
        self.log_path = Path(name)
        start = time.perf_counter()
        with os.fdopen(fd, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() - start < timeout:
                if self.proc.poll() is not None:
                    self._fail(f"the server exited with {self.proc.returncode}")
                try:
                    if client.get(f"{self.base_url}/ready").status_code == 200:
                        return time.perf_counter() - start
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(0.02)
        self._fail(f"the server was not ready after {timeout:.0f} s")

    def _fail(self, why: str) -> NoReturn:
        output = self.output()
        self.stop()
        raise RuntimeError(f"{why}; its last output:\n{output}")

    def output(self) -> str:
        """The last few KB of the server's output."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-4000:].decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server drains and exits
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def max_model_len(base_url: str, model: str) -> int | None:
    """The context the server reports in ``/v1/models`` (gptserve and vLLM do), if any."""
    data = httpx.get(f"{base_url}/v1/models", timeout=10).json().get("data", [])
    for card in data:
        if card.get("id") == model and card.get("max_model_len"):
            return int(card["max_model_len"])
    return None


@dataclass
class ProbeResult:
    latencies_ms: list[float]  # of /health answers
    failures: int  # probes that got no 200
    finished: int  # long requests that completed inside the window (one token: their first)
    window_s: float


async def _probe(base_url: str, until: float, interval: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = 0
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.perf_counter() < until:
            sent = time.perf_counter()
            try:
                ok = (await client.get(f"{base_url}/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - sent) * 1000.0)
            failures += not ok
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - sent)))
    return latencies, failures


async def health_during_prefill(
    spec: LoadSpec, prompts: Sequence[Prompt], window_s: float = 15.0, interval: float = 0.05
) -> ProbeResult:
    """Probe ``/health`` every ``interval`` seconds for ``window_s`` while ``prompts``
    (asking for one token each) are in flight; unfinished ones are then cancelled,
    which closes their connections (the server aborts them)."""
    url = spec.base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=len(prompts) + 2)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        tasks = [
            asyncio.create_task(
                stream_completion(client, url, completion_payload(spec, p), p.num_tokens, {})
            )
            for p in prompts
        ]
        await asyncio.sleep(0.2)  # let the requests reach the server first
        start = time.perf_counter()
        latencies, failures = await _probe(spec.base_url, start + window_s, interval)
        done: list[RequestRecord] = [t.result() for t in tasks if t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finished = sum(1 for r in done if r.ok)
    return ProbeResult(latencies, failures, finished, time.perf_counter() - start)
