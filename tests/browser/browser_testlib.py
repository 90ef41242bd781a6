"""Helpers for the browser tests: a page whose requests and console errors are recorded."""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True  # never leaves the page
    return parts.scheme in ("http", "https") and parts.hostname in LOCAL_HOSTS


class Watch:
    """A Playwright page that remembers every request it made and every console error.

    A request to another host is recorded and aborted, so that a test never reaches out
    even when the page would."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.context.route("**/*", self._route)
        page.on(
            "console",
            lambda message: (
                self.errors.append(f"console {message.type}: {message.text}")
                if message.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    @staticmethod
    def _route(route: Any) -> None:
        if is_local(route.request.url):
            route.continue_()
        else:
            route.abort("blockedbyclient")

    def foreign_requests(self) -> list[str]:
        """Requests to anything but this host."""
        return [url for url in self.requests if not is_local(url)]

    def assert_clean(self, ignore: tuple[str, ...] = ()) -> None:
        """No request left the host and the console has no error (``ignore``: regexes of
        errors a test provoked on purpose, such as a 400 it asked for)."""
        assert self.requests, "the page made no request at all"
        assert self.foreign_requests() == [], self.foreign_requests()
        errors = [e for e in self.errors if not any(re.search(p, e) for p in ignore)]
        assert errors == [], errors


def gauge(base_url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """The sum of a /metrics series over its labels."""
    text = httpx.get(f"{base_url}/metrics", headers=headers or {}, timeout=10).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]
    assert values, f"{name} is not in /metrics"
    return sum(values)


def wait_for_gauge(base_url: str, name: str, value: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    current = gauge(base_url, name)
    while current != value and time.monotonic() < deadline:
        time.sleep(0.1)
        current = gauge(base_url, name)
    return current
