"""JSON schemas that structured-output tests and benchmarks share, each with a valid instance.

They cover what clients send most: objects with required fields and
``additionalProperties: false``, enums, arrays with min/max items, nested
objects, bounded integers, strings with ``maxLength``, ``$ref`` and ``anyOf``.
Strings are bounded so that a sampled output ends within a small ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "maxLength": 24}

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": _NAME,
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "member": {"type": "boolean"},
        },
        "required": ["name", "age", "member"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["color", "size", "count"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1,
                "maxItems": 3,
            },
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 2,
                "maxItems": 4,
            },
        },
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 100000},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": _NAME,
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "address"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "bounded": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 16},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "rating": {"type": "number", "minimum": 0, "maximum": 10},
            "note": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
        },
        "required": ["title", "year", "rating", "note"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -100, "maximum": 100},
                    "y": {"type": "integer", "minimum": -100, "maximum": 100},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "start": {"$ref": "#/$defs/point"},
            "end": {"$ref": "#/$defs/point"},
            "label": {"type": "string", "maxLength": 10},
        },
        "required": ["start", "end", "label"],
        "additionalProperties": False,
    },
    "tool_call": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": "get_weather"},
                    "arguments": {
                        "type": "object",
                        "properties": {
                            "city": _NAME,
                            "unit": {"enum": ["celsius", "fahrenheit"]},
                        },
                        "required": ["city", "unit"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "name": {"const": "add"},
                    "arguments": {
                        "type": "object",
                        "properties": {
                            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                            "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
                        },
                        "required": ["a", "b"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
        ]
    },
}

# One valid instance per schema, as json.dumps writes it (and the engine emits it).
INSTANCES: dict[str, str] = {
    "person": '{"name": "Ada Lovelace", "age": 36, "member": true}',
    "enums": '{"color": "green", "size": "XL", "count": 3}',
    "array": '{"tags": ["alpha", "beta"], "scores": [1, -2, 3]}',
    "nested": '{"user": {"id": 42, "address": {"city": "Paris", "zip": "75001"}}, "active": false}',
    "bounded": '{"title": "Dune", "year": 1965, "rating": 8.5, "note": null}',
    "refs": '{"start": {"x": 1, "y": 2}, "end": {"x": -3, "y": 4}, "label": "edge"}',
    "tool_call": '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',
}
