"""Request validation errors as one line a client can act on.

Pydantic reports a field typed as a union (``prompt``: a string, a list of
strings, token ids, lists of token ids) with one error per member, located at
internal tags (``prompt.constrained-str``). The message here names the field and
says what it accepts instead. A bound that the server configures below the
schema's hard cap (``max_tokens``, the number of stop strings) is reported as the
configured one, which is what the client must meet.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_SCALARS = {
    "str": "a string",
    "constrained-str": "a string",
    "int": "an integer",
    "constrained-int": "an integer",
    "float": "a number",
    "constrained-float": "a number",
    "bool": "a boolean",
    "none": "null",
    "dict": "an object",
}
_PLURALS = {"a string": "strings", "an integer": "integers", "a number": "numbers",
            "a boolean": "booleans", "an object": "objects", "null": "nulls"}  # fmt: skip

# field -> the setting that caps it; "items": a list's length, "chars": its strings' length
CONFIGURED_CAPS: dict[str, tuple[str, str]] = {
    "max_tokens": ("max_tokens_limit", "value"),
    "max_completion_tokens": ("max_tokens_limit", "value"),
    "n": ("max_n", "value"),
    "best_of": ("max_n", "value"),
    "logprobs": ("max_logprobs", "value"),
    "top_logprobs": ("max_logprobs", "value"),
    "stop": ("max_stop", "items"),
    "stop_token_ids": ("max_stop", "items"),
}


def _is_tag(part: Any) -> bool:
    """A union member's tag in an error location, as opposed to a field name or index."""
    return isinstance(part, str) and (
        part in _SCALARS or "[" in part or "-" in part or part[:1].isupper()
    )


def describe(tag: str) -> str:
    """``list[constrained-int]`` -> "a list of integers"."""
    inner = re.fullmatch(r"(?:list|tuple)\[(.*)\]", tag)
    if inner:
        items = [describe(t) for t in _members(inner.group(1))]
        return "a list of " + " and ".join(
            _PLURALS.get(item, item.replace("a list of", "lists of", 1)) for item in items
        )
    if tag.startswith("function-"):  # function-after[validator(), type]
        found = re.search(r",\s*(.*)\]$", tag)
        return describe(found.group(1)) if found else "a valid value"
    if tag in _SCALARS:
        return _SCALARS[tag]
    if tag[:1].isupper():
        return "an object"
    if tag.startswith("literal["):
        return "one of " + tag[len("literal[") : -1]
    return "a valid value"


def _members(tag: str) -> list[str]:
    """``union[a,list[b]]`` -> ["a", "list[b]"] (split at top-level commas); else [tag]."""
    found = re.fullmatch(r"union\[(.*)\]", tag)
    if not found:
        return [tag]
    parts, depth, start, body = [], 0, 0, found.group(1)
    for i, ch in enumerate(body):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[start:i].strip())
            start = i + 1
    parts.append(body[start:].strip())
    return parts


def _one_of(options: list[str]) -> str:
    unique = list(dict.fromkeys(options))
    return unique[0] if len(unique) == 1 else ", ".join(unique[:-1]) + " or " + unique[-1]


def _field(loc: Sequence[Any]) -> tuple[list[str], Any]:
    """The field path before the first union tag, and that tag (None if there is none)."""
    path: list[str] = []
    for part in loc:
        if part == "body":
            continue
        if _is_tag(part):
            return path, part
        path.append(str(part))
    return path, None


def validation_message(errors: Sequence[Any], settings: Any = None) -> tuple[str, str | None]:
    """A one-line message naming the first bad field, and that field as ``param``."""
    first = dict(errors[0]) if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return f"malformed JSON body: {detail}", None
    path, tag = _field(first.get("loc", ()))
    param = ".".join(path) or None
    if param is None:
        return f"invalid request body: {first.get('msg', 'invalid request')}", None
    same = [dict(e) for e in errors if _field(e.get("loc", ()))[0] == path]
    configured = _configured_bound(path, same, settings)
    if configured is not None:
        return configured, param
    if tag is None:
        extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        return f"invalid value for '{param}': {first.get('msg', 'invalid value')}{extra}", param
    return _union_message(param, same), param


def _union_message(param: str, errors: list[dict[str, Any]]) -> str:
    """The member the value had the type of explains the problem; without one, what
    the field accepts."""
    tags = [_field(e.get("loc", ()))[1] for e in errors]
    accepted = _one_of([describe(str(t)) for t in tags if t is not None])
    fitting = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    if len(fitting) == 1:
        inner = [str(p) for p in fitting[0].get("loc", ()) if not _is_tag(p) and p != "body"]
        where = ".".join(inner)
        return f"invalid value for '{where}': {fitting[0].get('msg')}"
    return f"invalid value for '{param}': expected {accepted}"


def _configured_bound(path: list[str], errors: list[dict[str, Any]], settings: Any) -> str | None:
    """The message for a value over the schema's hard cap, stated with the configured cap."""
    name = path[0]
    if settings is None or name not in CONFIGURED_CAPS:
        return None
    setting, kind = CONFIGURED_CAPS[name]
    cap = getattr(settings, setting)
    for e in errors:
        error = e.get("type")
        if kind == "value" and error in ("less_than_equal", "less_than"):
            return f"'{name}' may be at most {cap} on this server, got {e.get('input')}"
        if kind == "items" and error == "too_long":
            got = len(e["input"]) if isinstance(e.get("input"), list) else "more"
            return f"'{name}' may have at most {cap} items on this server, got {got}"
        if name == "stop" and error == "string_too_long":
            return f"stop strings may have at most {settings.max_stop_length} characters"
    return None


def settings_of(state: Any) -> Any:
    """The settings of the app's runtime, when there is one (tests may have none)."""
    runtime = getattr(state, "runtime", None)
    return getattr(runtime, "settings", None)
