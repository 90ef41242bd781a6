"""Chat tool calling: the tools in the prompt, the constraint on the output, calls parsed back.

Prompt. A chat template that mentions ``tools`` gets them (``tools=`` as in
transformers) and renders ``tool`` messages and assistant ``tool_calls`` itself.
Otherwise the fallback: a system message (``FALLBACK_PROMPT``) lists the tools as
JSON and asks for calls as a JSON array; earlier assistant calls are rendered as that
array, and ``tool`` results as user messages ``Result of NAME (call ID): CONTENT``.

Output. With ``tool_choice`` ``required`` or a named function, the output is
constrained to a JSON array of calls ``[{"name": ..., "arguments": {...}}]``: names
from the list (or the named one), arguments valid against the function's
``parameters``, one call when ``parallel_tool_calls`` is false or a function is
named, else at most one per tool (16 at most). With ``auto``
the model writes freely; a reply that is such an array, one such object, or
``<tool_call>{...}</tool_call>`` blocks (what tool-aware templates teach) becomes
``tool_calls``; anything else stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from service.engine.types import Constraint

MAX_PARALLEL_CALLS = 16

FALLBACK_PROMPT = (
    "You can call these functions (JSON schema of each):\n{tools}\n"
    "To call functions, reply with only a JSON array of calls, "
    'e.g. [{{"name": "function_name", "arguments": {{"arg": "value"}}}}]. '
    "Otherwise reply normally.{force}"
)
_FORCE = {
    "required": " You must call at least one function.",
    "named": " You must call the function {name}.",
}
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolPlan:
    """How one chat request uses its tools."""

    tools: list[dict[str, Any]]  # OpenAI tool definitions, as sent
    mode: str  # "auto", "required" or "named"
    forced_name: str | None = None  # the named function
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def forced(self) -> bool:
        return self.mode != "auto"

    def constraint(self) -> Constraint | None:
        """The output constraint: a valid list of calls, when a call is required."""
        if not self.forced:
            return None
        allowed = [
            t["function"]
            for t in self.tools
            if self.forced_name is None or t["function"]["name"] == self.forced_name
        ]
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    "arguments": f.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in allowed
        ]
        # A named function is called once; otherwise at most one call per tool: a small
        # model left free to append calls repeats them until max_tokens cuts the array.
        most = min(len(allowed), MAX_PARALLEL_CALLS) if self.parallel else 1
        schema = {
            "type": "array",
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
            "minItems": 1,
            "maxItems": most,
        }
        return Constraint("json_schema", json.dumps(schema, sort_keys=True), "tools")

    def system_prompt(self) -> str:
        listing = "\n".join(
            json.dumps(
                {
                    "name": t["function"]["name"],
                    "description": t["function"].get("description") or "",
                    "parameters": t["function"].get("parameters") or {"type": "object"},
                }
            )
            for t in self.tools
        )
        force = _FORCE.get(self.mode, "").format(name=self.forced_name)
        return FALLBACK_PROMPT.format(tools=listing, force=force)


def template_supports_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def fallback_messages(
    messages: list[dict[str, Any]], plan: ToolPlan | None
) -> list[dict[str, Any]]:
    """The conversation for a template without tool support (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            name = message.get("name") or "the function"
            call = message.get("tool_call_id") or "?"
            content = f"Result of {name} (call {call}): {message.get('content') or ''}"
            out.append({"role": "user", "content": content})
        elif role == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in message["tool_calls"]
            ]
            text = message.get("content") or ""
            out.append({"role": "assistant", "content": (text + json.dumps(calls)).strip()})
        else:
            out.append({k: v for k, v in message.items() if k in ("role", "content")})
    if plan is not None:
        prompt = plan.system_prompt()
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0].get('content') or ''}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# -- parsing calls out of the output --------------------------------------------------------


def parse_tool_calls(text: str, plan: ToolPlan) -> list[dict[str, Any]] | None:
    """The calls in a reply, in OpenAI's form, or None when the reply is text."""
    stripped = text.strip()
    if not stripped:
        return None
    raw: list[Any] = []
    tagged = _TAGGED.findall(stripped)
    if tagged and not _TAGGED.sub("", stripped).strip():
        for block in tagged:
            value = _loads(block)
            if value is None:
                return None
            raw.extend(value if isinstance(value, list) else [value])
    else:
        value = _loads(stripped)
        if value is None:
            return None
        raw = value if isinstance(value, list) else [value]
    calls = []
    for item in raw:
        call = _call(item, plan.names)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(item: Any, names: list[str]) -> dict[str, Any] | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = _loads(args)
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def may_become_call(text: str) -> bool:
    """Whether a reply that starts with ``text`` could still turn out to be calls (streaming
    holds it back until it is known)."""
    head = text.lstrip()
    if not head:
        return True
    if head[0] in "[{":
        return True
    tag = "<tool_call>"
    return head.startswith(tag) or tag.startswith(head)
