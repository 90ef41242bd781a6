"""Chat templates in a bounded sandbox, and the template's own markers kept apart
from the text a user supplies.

A chat template ships inside a model file: it is untrusted code. It renders in
Jinja's immutable sandbox (no attribute writes, no private attributes), and on
top of that every resource it can spend is bounded (``TemplateLimits``):

- time: a trace function on the rendering thread checks the deadline on every
  line and call the template executes, so a loop over ``range`` or nested loops
  over a long string stop at the deadline instead of running on;
- size: ``'a' * 2**40``, ``range(10**9)``, ``[0] * 10**9``, huge widths passed
  to string methods or filters (``center``, ``indent``, ``format``, ...) and
  joins or replacements whose result would be too long are refused before they
  allocate; results of calls and filters are checked after; the output is
  counted as it is produced;
- depth: macro recursion is counted and bounded.

Errors come back as ``TemplateRaised`` (the template called ``raise_exception``
on purpose: the conversation is at fault) or ``TemplateFailed`` (anything else:
the template is at fault), both ``TemplateError``s naming the template.

Control tokens: ``mark_user_text`` replaces every special-token spelling inside
the strings a client sent with a sentinel before rendering, and ``unmark``
restores them in the rendered text while recording where they lie, so the
tokenizer can encode them as plain text (see ``Tokenizer.encode_chat``).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILENAME = "<chat template>"


@dataclass(frozen=True)
class TemplateLimits:
    """What one rendering may spend. The defaults leave real templates (a few
    hundred lines, conversations up to the request body limit) far inside."""

    seconds: float = 2.0
    max_output_chars: int = 16 << 20  # 16 Mi characters
    max_value_len: int = 16 << 20  # any one string or list the template builds
    max_total_len: int = 64 << 20  # all strings and lists it builds, together
    max_int_arg: int = 1 << 16  # an integer passed to a call or filter (widths, counts)
    max_range: int = 100_000  # items of one range()
    max_depth: int = 64  # nested macro calls


DEFAULT_LIMITS = TemplateLimits()


class FinalMessageNotShown(ValueError):
    """continue_final_message, but the template does not show the final message's text."""


class TemplateError(ValueError):
    """A chat template failed; the message names the template."""


class TemplateRaised(TemplateError):
    """The template refused the conversation on purpose (``raise_exception``)."""


class TemplateFailed(TemplateError):
    """The template broke or exceeded a limit: the template is at fault, not the request."""


class _Refused(Exception):
    """Raised inside the sandbox when a template exceeds a bound."""


class _Raised(Exception):
    """``raise_exception`` from the template."""


# -- the sandbox ----------------------------------------------------------------------


def _raise_exception(message: str) -> NoReturn:
    raise _Raised(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & for HTML, which would change prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_BIG_WIDTH = re.compile(r"\d{6,}")  # a width or precision of 100000 or more


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every operation that builds a value bounded."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def __init__(self, limits: TemplateLimits) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.limits = limits
        self._spent = threading.local()
        self.filters = {name: self._bounded(f) for name, f in self.filters.items()}
        self.filters["tojson"] = self._bounded(_tojson)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals["range"] = self._range

    def start(self) -> None:
        """A rendering starts on this thread: its budget is full again."""
        self._spent.total = 0

    def check_len(self, value: Any) -> Any:
        """``value``, counted against the per-value and the per-rendering budget."""
        if isinstance(value, (str, list, tuple, dict)):
            n = len(value)
            if n > self.limits.max_value_len:
                raise _Refused(f"a value of {n} items exceeds {self.limits.max_value_len}")
            total = getattr(self._spent, "total", 0) + n
            self._spent.total = total
            if total > self.limits.max_total_len:
                raise _Refused(f"the template built more than {self.limits.max_total_len} items")
        return value

    def check_args(self, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> None:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and abs(arg) > self.limits.max_int_arg:
                raise _Refused(f"argument {arg} exceeds {self.limits.max_int_arg}")

    def _range(self, *args: int) -> range:
        r = range(*args)
        if len(r) > self.limits.max_range:
            raise _Refused(f"range of {len(r)} items exceeds {self.limits.max_range}")
        return r

    def concat(self, parts: Iterable[str]) -> str:  # block sets and macro bodies
        return str(self.check_len("".join(self._joined(parts))))

    def str_join(self, parts: Iterable[Any]) -> str:
        return str(self.check_len("".join(self._joined(map(str, parts)))))

    def _joined(self, parts: Iterable[str]) -> list[str]:
        out, size = [], 0
        for part in parts:
            size += len(part)
            if size > self.limits.max_value_len:
                raise _Refused(f"a string longer than {self.limits.max_value_len} characters")
            out.append(part)
        return out

    def _bounded(self, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.check_args(args[1:], kwargs)
            return self.check_len(f(*args, **kwargs))

        return bounded

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        cap = self.limits.max_value_len
        if op == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, Sized) and isinstance(n, int) and len(seq) * n > cap:
                raise _Refused(f"repeating {len(seq)} items {n} times exceeds {cap}")
        elif op == "+":
            if (
                isinstance(left, Sized)
                and isinstance(right, Sized)
                and len(left) + len(right) > cap
            ):
                raise _Refused(f"a concatenation exceeds {cap}")
        elif op == "**":
            if isinstance(right, (int, float)) and abs(right) > 1024:
                raise _Refused(f"exponent {right} exceeds 1024")
        elif op == "%" and isinstance(left, str):
            self.check_args(right if isinstance(right, tuple) else (right,), {})
            if _BIG_WIDTH.search(left):
                raise _Refused("a format width of 100000 or more")
        return self.check_len(super().call_binop(context, op, left, right))

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        return self.check_len(value) if isinstance(argument, slice) else value  # a slice is new

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.check_args(args, kwargs)
        name = getattr(__obj, "__name__", "")
        owner = getattr(__obj, "__self__", None)
        cap = __self.limits.max_value_len
        if isinstance(owner, str):
            if name in ("format", "format_map") and _BIG_WIDTH.search(owner):
                raise _Refused("a format width of 100000 or more")
            if name == "replace" and len(args) >= 2 and isinstance(args[0], str):
                count = owner.count(args[0]) if args[0] else len(owner) + 1
                if len(owner) + count * len(str(args[1])) > cap:
                    raise _Refused(f"a replacement longer than {cap}")
            if name == "join" and args and isinstance(args[0], (list, tuple)):
                items = args[0]
                total = sum(len(x) for x in items if isinstance(x, str))
                if total + len(owner) * len(items) > cap:
                    raise _Refused(f"a join longer than {cap}")
        return __self.check_len(super().call(__context, __obj, *args, **kwargs))


# -- rendering ------------------------------------------------------------------------


class ChatTemplate:
    """One compiled template, rendered under ``limits``. ``origin`` names it in errors."""

    def __init__(self, source: str, origin: str, limits: TemplateLimits = DEFAULT_LIMITS) -> None:
        self.origin = origin
        self.limits = limits
        self._env = _BoundedSandbox(limits)
        try:
            code = self._env.compile(source, filename=TEMPLATE_FILENAME)
            self._template = self._env.template_class.from_code(
                self._env, code, self._env.make_globals(None), None
            )
            # ``a ~ b`` compiles to a call of the module-level str_join: bound it too.
            self._template.root_render_func.__globals__["str_join"] = self._env.str_join
        except jinja2.TemplateError as e:
            raise TemplateFailed(f"the chat template of {origin} does not compile: {e}") from e
        except (RecursionError, MemoryError, ValueError, TypeError) as e:
            raise TemplateFailed(f"the chat template of {origin} does not compile: {e!r}") from e

    def render(self, **context: Any) -> str:
        """The rendered text; raises ``TemplateRaised`` or ``TemplateFailed``."""
        watch = _Watch(time.monotonic() + self.limits.seconds, self.limits.max_depth)
        previous = sys.gettrace()
        self._env.start()
        sys.settrace(watch.trace)
        try:
            return self._collect(self._template.generate(**context))
        except _Raised as e:
            raise TemplateRaised(f"the chat template of {self.origin} refused: {e}") from None
        except _Refused as e:
            raise TemplateFailed(
                f"the chat template of {self.origin} exceeded a limit: {e}"
            ) from None
        except RecursionError:
            raise TemplateFailed(
                f"the chat template of {self.origin} recursed too deeply"
            ) from None
        except MemoryError:
            raise TemplateFailed(f"the chat template of {self.origin} ran out of memory") from None
        except (jinja2.TemplateError, TypeError, LookupError, AttributeError, ValueError) as e:
            raise TemplateFailed(f"the chat template of {self.origin} failed: {e}") from None
        except ArithmeticError as e:
            raise TemplateFailed(f"the chat template of {self.origin} failed: {e!r}") from None
        finally:
            sys.settrace(previous)

    def _collect(self, chunks: Iterator[str]) -> str:
        out: list[str] = []
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > self.limits.max_output_chars:
                raise _Refused(f"output longer than {self.limits.max_output_chars} characters")
            out.append(chunk)
        return "".join(out)


class _Watch:
    """The trace function of one rendering: only the template's own frames are traced
    line by line (the deadline), and its macro calls are counted (the depth)."""

    def __init__(self, deadline: float, max_depth: int) -> None:
        self.deadline = deadline
        self.max_depth = max_depth
        self.depth = 0

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > self.deadline:
            raise _Refused("rendering took longer than the time limit")
        if frame.f_code.co_filename != TEMPLATE_FILENAME:
            return None
        if event == "call":
            self.depth += 1
            if self.depth > self.max_depth:
                raise _Refused(f"calls nested deeper than {self.max_depth}")
        return self.local

    def local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "return":
            self.depth -= 1
        elif time.monotonic() > self.deadline:
            raise _Refused("rendering took longer than the time limit")
        return self.local


# -- user text and the template's markers --------------------------------------------


@dataclass
class Marked:
    """Client strings with each special-token spelling replaced by a sentinel."""

    value: Any
    originals: list[str]
    sentinel: str


def special_pattern(specials: list[str]) -> re.Pattern[str] | None:
    """A regex matching any special token's spelling, longest first; None if there are none."""
    tokens = sorted({s for s in specials if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def mark_user_text(value: Any, pattern: re.Pattern[str] | None, avoid: str = "") -> Marked:
    """``value`` (messages, tools: nested dicts and lists) with every special-token
    spelling in its strings replaced by ``<S><k><S>`` (``S`` a private-use character
    found nowhere in the input or ``avoid``, ``k`` its index in ``originals``)."""
    if pattern is None or not _any_match(value, pattern):
        return Marked(value, [], "")
    used = set(avoid) | set(json.dumps(value, ensure_ascii=False, default=str))
    sentinel = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used)
    originals: list[str] = []

    def sub(match: re.Match[str]) -> str:
        originals.append(match.group(0))
        return f"{sentinel}{len(originals) - 1}{sentinel}"

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return pattern.sub(sub, v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return Marked(walk(value), originals, sentinel)


def unmark(text: str, marked: Marked) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text with the sentinels restored, and the spans (start, end) of
    the restored client text: special-token spellings that are not the template's."""
    if not marked.originals:
        return text, []
    s = re.escape(marked.sentinel)
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = size = 0
    for m in re.finditer(f"{s}(\\d+){s}", text):
        index = int(m.group(1))
        original = marked.originals[index] if index < len(marked.originals) else m.group(0)
        out.append(text[pos : m.start()])
        size += m.start() - pos
        spans.append((size, size + len(original)))
        out.append(original)
        size += len(original)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), spans


def _any_match(value: Any, pattern: re.Pattern[str]) -> bool:
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, dict):
        return any(_any_match(v, pattern) for v in value.values())
    if isinstance(value, list):
        return any(_any_match(v, pattern) for v in value)
    return False


__all__ = [
    "DEFAULT_LIMITS",
    "ChatTemplate",
    "Marked",
    "TemplateError",
    "TemplateFailed",
    "TemplateLimits",
    "TemplateRaised",
    "mark_user_text",
    "special_pattern",
    "unmark",
]
