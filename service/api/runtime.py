"""The app's lifecycle: load and warm the engine, serve, drain, stop.

``Runtime`` owns the engine. The lifespan starts loading in the background so
that the server listens at once: ``/health`` answers while the model loads and
``/ready`` says 503 until the engine is warm. A drain (SIGTERM) flips readiness
at once and refuses new work while requests in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from service.api.errors import APIError
from service.api.serving import Limits
from service.engine.types import EngineClient, EngineDead, GenerateRequest, SamplingParams
from service.settings import Settings

logger = logging.getLogger(__name__)

Phase = Literal["loading", "ready", "draining", "stopped", "failed"]
WATCHDOG_INTERVAL_S = 1.0


class ServedEngine(EngineClient, Protocol):
    """What the HTTP layer needs beyond ``EngineClient``: facts for /info and /metrics."""

    registry: CollectorRegistry
    model_config: Any
    device: Any
    dtype: Any


EngineFactory = Callable[[Settings], ServedEngine]


def load_engine(settings: Settings) -> ServedEngine:
    """The production factory: ``Engine.from_pretrained`` with the settings' knobs."""
    import torch

    from service.engine.config import EngineConfig
    from service.engine.engine import Engine

    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    device = None if settings.device == "auto" else settings.device
    config = EngineConfig(**settings.engine_kwargs())
    engine: ServedEngine = Engine.from_pretrained(
        settings.model,
        config=config,
        dtype=dtype,
        device=device,
        weights=settings.weights,
        model_name=settings.model_name,
    )
    return engine


@dataclass(frozen=True)
class Served:
    """What a request handler gets once the engine is ready."""

    engine: ServedEngine
    limits: Limits
    settings: Settings


class Runtime:
    def __init__(self, settings: Settings, factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.factory: EngineFactory = factory or load_engine
        self.engine: ServedEngine | None = None
        self.limits: Limits | None = None
        self.phase: Phase = "loading"
        self.dead = False
        # Called with an exit code when the process should end (load failure, dead engine).
        self.on_fatal: Callable[[int], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_lock = asyncio.Lock()

    # -- request-facing ---------------------------------------------------------------

    def served(self) -> Served:
        if self.phase == "ready" and self.engine is not None and self.limits is not None:
            return Served(self.engine, self.limits, self.settings)
        reasons = {
            "loading": ("the model is loading", "not_ready"),
            "draining": ("the server is shutting down", "draining"),
            "stopped": ("the server is shutting down", "draining"),
            "failed": ("the model failed to load", "not_ready"),
        }
        message, code = reasons.get(self.phase, ("the engine has stopped", "engine_dead"))
        raise APIError(503, message, code=code, headers={"Retry-After": "1"})

    def healthy(self) -> bool:
        if self.phase == "failed" or self.dead:
            return False
        if self.engine is None or self.phase == "stopped":
            return True  # alive, and loading or on its way out
        try:
            self.engine.check_health()
        except EngineDead:
            self.dead = True
            return False
        return True

    # -- lifecycle -------------------------------------------------------------------

    def begin(self) -> None:
        """Starts loading in the background (call from the lifespan)."""
        self._tasks.append(asyncio.create_task(self._load(), name="gptserve-load"))

    async def _load(self) -> None:
        try:
            with _frozen_when_loaded():
                engine = await asyncio.to_thread(self.factory, self.settings)
                self.engine = engine
                # blocks until the engine's own warm-up is done
                await asyncio.to_thread(engine.start)
                await self._warm(engine)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("loading the model failed")
            self.phase = "failed"
            self._fatal(1)
            return
        self.limits = Limits.build(self.settings, engine.max_model_len, engine.tokenizer.vocab_size)
        if self.phase == "loading":
            self.phase = "ready"
            logger.info(
                "ready: serving %s (context %d)", self.settings.model_name, engine.max_model_len
            )
        self._tasks.append(asyncio.create_task(self._watch(), name="gptserve-watchdog"))

    async def _warm(self, engine: ServedEngine) -> None:
        """One short greedy request through the whole path before readiness."""
        ids = await engine.encode("Hello")
        request = GenerateRequest(ids or [0], SamplingParams(max_tokens=2, temperature=0.0))
        async for _ in engine.generate(request):
            pass

    async def _watch(self) -> None:
        while self.phase == "ready":
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self.phase == "ready" and not self.healthy():
                logger.error(
                    "the engine loop died; exiting so that the supervisor restarts the server"
                )
                self._fatal(1)
                return

    def _fatal(self, code: int) -> None:
        if self.on_fatal is not None:
            self.on_fatal(code)

    async def drain(self) -> None:
        """Refuses new requests, lets those in flight finish within ``drain_timeout``, aborts the rest."""
        if self.phase in ("draining", "stopped"):
            return
        logger.info("draining: up to %.1fs for requests in flight", self.settings.drain_timeout)
        self.phase = "draining"
        await self._stop_engine(self.settings.drain_timeout)

    async def shutdown(self) -> None:
        """Lifespan end: stop whatever still runs."""
        if self.phase not in ("draining", "stopped"):
            self.phase = "draining"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_engine(0.0)

    async def _stop_engine(self, drain_timeout: float) -> None:
        async with self._stop_lock:
            if self.engine is not None and self.phase != "stopped":
                try:
                    await self.engine.stop(drain_timeout=drain_timeout)
                except Exception:
                    logger.exception("stopping the engine failed")
            self.phase = "stopped"


@contextlib.contextmanager
def _frozen_when_loaded() -> Iterator[None]:
    """No garbage collection inside; on a clean exit, every object alive is moved out
    of the collector's sight (``gc.freeze``).

    Importing PyTorch and loading a model create ~3x10^5 objects that live as long as
    the process. The collector's full passes over them while they were being made took
    ~0.27 s of the default server's start-up, and any later full pass would stall every
    stream for ~0.15 s. What loading leaves as garbage is frozen with them rather than
    paying one more full pass: for the default model ~7,000 objects, ~1 MB, no tensors.
    """
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        gc.enable()


@functools.cache
def package_version() -> str:
    try:
        return version("gptserve")
    except PackageNotFoundError:
        return "unknown"


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def served(request: Request) -> Served:
    """FastAPI dependency: the ready engine, or 503."""
    return get_runtime(request).served()


ServedDep = Annotated[Served, Depends(served)]
