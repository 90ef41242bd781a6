"""Structured output and tool calling fields of the request bodies.

Kept apart from the rest of the schemas: each body mixes in the class it needs.

* ``NativeConstraintFields`` (``/generate``): ``json_schema``, ``regex``, ``choice``,
  ``grammar``, one at most.
* ``GuidedFields`` (both OpenAI routes): vLLM's extra-body names ``guided_json``,
  ``guided_regex``, ``guided_choice``, ``guided_grammar``, ``guided_decoding_backend``
  (accepted, ignored), and their newer ``structured_outputs`` object; plus OpenAI's
  ``response_format``.
* ``ToolFields`` (chat): ``tools``, ``tool_choice``, ``parallel_tool_calls``.

Each mixin's ``engine_constraint`` is the engine's ``Constraint`` or None; the body's
``to_sampling_params`` puts it on the request.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from service.api.errors import bad_request
from service.api.schemas.common import StrictModel
from service.engine.types import Constraint

MAX_CONSTRAINT_CHARS = 64 * 1024
MAX_CHOICES = 256
MAX_TOOLS = 128

ConstraintText = Annotated[str, Field(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]
ChoiceText = Annotated[str, Field(min_length=1, max_length=1024)]
ChoiceList = Annotated[list[ChoiceText], Field(min_length=1, max_length=MAX_CHOICES)]
JsonSchema = dict[str, Any]
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


def schema_text(schema: JsonSchema | str, param: str) -> str:
    """A schema given as an object or as JSON text, as canonical JSON text (the cache key)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise bad_request(f"'{param}' is not valid JSON: {exc}", param) from exc
        if not isinstance(schema, dict):
            raise bad_request(f"'{param}' must be a JSON schema object", param)
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise bad_request(f"'{param}' may have at most {MAX_CONSTRAINT_CHARS} characters", param)
    return text


def one_constraint(found: list[Constraint]) -> Constraint | None:
    if len(found) > 1:
        names = ", ".join(f"'{c.param}'" for c in found)
        raise bad_request(f"at most one output constraint per request, got {names}", found[1].param)
    return found[0] if found else None


# -- /generate ---------------------------------------------------------------------------


class NativeConstraintFields(StrictModel):
    """Constrained decoding on ``/generate``: the output matches one of these."""

    json_schema: JsonSchema | None = Field(
        None, description="a JSON schema the output must validate against"
    )
    regex: ConstraintText | None = Field(None, description="a regular expression to match")
    choice: ChoiceList | None = Field(None, description="the output is one of these strings")
    grammar: ConstraintText | None = Field(
        None, description="a context-free grammar in Lark syntax (llguidance's dialect)"
    )

    def engine_constraint(self) -> Constraint | None:
        found = []
        if self.json_schema is not None:
            found.append(
                Constraint(
                    "json_schema", schema_text(self.json_schema, "json_schema"), "json_schema"
                )
            )
        if self.regex is not None:
            found.append(Constraint("regex", self.regex, "regex"))
        if self.choice is not None:
            found.append(Constraint("choice", json.dumps(self.choice), "choice"))
        if self.grammar is not None:
            found.append(Constraint("grammar", self.grammar, "grammar"))
        return one_constraint(found)


# -- OpenAI: response_format and vLLM's guided_* ------------------------------------------


class ResponseFormatText(StrictModel):
    type: Literal["text"]


class ResponseFormatJsonObject(StrictModel):
    type: Literal["json_object"]


class JsonSchemaFormat(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
    description: Annotated[str | None, Field(max_length=8192)] = None
    # "schema" would shadow a BaseModel attribute: stored as schema_, spelled "schema".
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(StrictModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class StructuredOutputs(StrictModel):
    """vLLM's ``structured_outputs`` object: one of its fields at most."""

    json_: JsonSchema | str | None = Field(None, alias="json")
    regex: ConstraintText | None = None
    choice: ChoiceList | None = None
    grammar: ConstraintText | None = None
    json_object: bool | None = None


class GuidedFields(StrictModel):
    """OpenAI's ``response_format`` and vLLM's guided decoding extra-body fields."""

    response_format: ResponseFormat | None = None
    guided_json: JsonSchema | ConstraintText | None = None
    guided_regex: ConstraintText | None = None
    guided_choice: ChoiceList | None = None
    guided_grammar: ConstraintText | None = None
    guided_decoding_backend: Annotated[
        str | None, Field(max_length=64, description="accepted and ignored")
    ] = None
    structured_outputs: StructuredOutputs | None = None

    def guided_constraints(self) -> list[Constraint]:
        found: list[Constraint] = []
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJsonObject):
            found.append(Constraint("json_object", '{"type":"object"}', "response_format"))
        elif isinstance(fmt, ResponseFormatJsonSchema):
            param = "response_format.json_schema.schema"
            schema = fmt.json_schema.schema_
            if schema is None:  # no schema: any JSON object
                found.append(Constraint("json_object", '{"type":"object"}', param))
            else:
                found.append(Constraint("json_schema", schema_text(schema, param), param))
        if self.guided_json is not None:
            text = schema_text(self.guided_json, "guided_json")
            found.append(Constraint("json_schema", text, "guided_json"))
        if self.guided_regex is not None:
            found.append(Constraint("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            found.append(Constraint("choice", json.dumps(self.guided_choice), "guided_choice"))
        if self.guided_grammar is not None:
            found.append(Constraint("grammar", self.guided_grammar, "guided_grammar"))
        so = self.structured_outputs
        if so is not None:
            inner: list[Constraint] = []
            if so.json_ is not None:
                param = "structured_outputs.json"
                inner.append(Constraint("json_schema", schema_text(so.json_, param), param))
            if so.regex is not None:
                inner.append(Constraint("regex", so.regex, "structured_outputs.regex"))
            if so.choice is not None:
                inner.append(
                    Constraint("choice", json.dumps(so.choice), "structured_outputs.choice")
                )
            if so.grammar is not None:
                inner.append(Constraint("grammar", so.grammar, "structured_outputs.grammar"))
            if so.json_object:
                inner.append(
                    Constraint("json_object", '{"type":"object"}', "structured_outputs.json_object")
                )
            found.extend(inner)
        return found

    def engine_constraint(self) -> Constraint | None:
        return one_constraint(self.guided_constraints())


# -- OpenAI chat: tools -------------------------------------------------------------------


class FunctionDef(StrictModel):
    name: FunctionName
    description: Annotated[str | None, Field(max_length=8192)] = None
    parameters: JsonSchema | None = None
    strict: bool | None = None


class ToolDef(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(StrictModel):
    name: FunctionName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolFields(StrictModel):
    """Chat tool calling: OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``."""

    tools: Annotated[list[ToolDef] | None, Field(max_length=MAX_TOOLS)] = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_mode(self) -> str:
        """none, auto, required or the named function's name (checked by ``check_tools``)."""
        if not self.tools:
            return "none"
        choice = self.tool_choice
        if choice is None:
            return "auto"
        if isinstance(choice, NamedToolChoice):
            return choice.function.name
        return choice

    def check_tools(self) -> None:
        choice = self.tool_choice
        if not self.tools:
            if choice is not None and choice != "none":
                raise bad_request("tool_choice needs a non-empty 'tools' list", "tool_choice")
            return
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise bad_request("tool function names must be unique", "tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise bad_request(
                f"tool_choice names the function '{choice.function.name}', which is not in 'tools'",
                "tool_choice",
            )
        for i, tool in enumerate(self.tools):
            if tool.function.parameters is not None:
                schema_text(tool.function.parameters, f"tools.{i}.function.parameters")
