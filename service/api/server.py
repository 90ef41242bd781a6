"""``gptserve serve``: flags mirroring the settings, logging setup, uvicorn with a drain on SIGTERM.

One process owns the model, so there is no multi-worker mode: scale out with
replicas behind a load balancer.

On SIGTERM (or SIGINT) readiness turns 503 at once and new requests are
refused while the listener stays open (so probes still get their 503);
requests in flight get ``drain_timeout`` seconds, the rest end with
``finish_reason: "abort"``; then uvicorn closes the connections and the
process exits 0. A second signal cuts the drain short.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import types
import typing
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.api.app import create_app
from service.api.protocol import guarded_protocol
from service.api.runtime import Runtime
from service.settings import Settings

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
GRACEFUL_CLOSE_S = 5.0  # after the drain: time for the last bytes to reach the clients


def configure_logging(level: str) -> None:
    """The one place that sets up logging for the service."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the engine before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._draining = False
        runtime.on_fatal = self.fatal

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        # Deliberately not uvicorn's handler: it records the signal and re-raises it after
        # shutdown, which would end the process with -SIGTERM instead of exit code 0.
        if self._loop is None:
            self.should_exit = True
        elif not self._draining:
            self._draining = True
            self._loop.call_soon_threadsafe(self._begin_drain)
        else:
            logger.warning("second exit signal: aborting the drain")
            self._loop.call_soon_threadsafe(self._cut_drain)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.runtime.drain()
        finally:
            self.should_exit = True

    def _cut_drain(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
        self.should_exit = True

    def fatal(self, code: int) -> None:
        self.exit_code = code
        self.should_exit = True


# -- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptserve serve",
        description="Serve a GPT model over HTTP. Every flag can also be set with its GPTSERVE_* "
        "environment variable; flags win.",
    )
    for name, field in Settings.model_fields.items():
        _add_flag(parser, name, field.annotation, field.description or "", field.default)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="must be 1: one process owns the model (scale out with replicas instead)",
    )
    return parser


def _add_flag(
    parser: argparse.ArgumentParser, name: str, annotation: Any, description: str, default: Any
) -> None:
    flag = "--" + name.replace("_", "-")
    shown = "unset" if default is None or name == "api_key" else default
    if isinstance(default, list):
        shown = ",".join(default) or "empty"
    help_text = f"{description} [env GPTSERVE_{name.upper()}; default: {shown}]".replace("%", "%%")
    kind = _flag_kind(annotation)
    if kind is bool:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
        )
        return
    choices = (
        typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
    )
    parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS, help=help_text)


def _flag_kind(annotation: Any) -> type:
    """bool, int, float or str (lists and secrets are given as strings)."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    first = options[0]
    if first in (bool, int, float):
        return typing.cast(type, first)
    return str


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**overrides)


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # h11 enforces the header-size limit below; the guard adds the request deadline
        # and the connection cap (service/api/protocol.py says why uvicorn's own don't do)
        http=guarded_protocol(settings.request_timeout, settings.max_connections),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        lifespan="on",
        access_log=False,  # one access-log line per request comes from our middleware
        log_config=None,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(GRACEFUL_CLOSE_S),
        server_header=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gptserve serve``; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.workers != 1:
            parser.error(
                "--workers must be 1: one process owns the model; run replicas to scale out"
            )
        settings = settings_from_args(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except ValidationError as exc:
        sys.stderr.write(f"gptserve serve: invalid settings:\n{exc}\n")
        return 2
    configure_logging(settings.log_level)
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app.state.runtime)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when startup fails
        return exc.code if isinstance(exc.code, int) else 1
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
