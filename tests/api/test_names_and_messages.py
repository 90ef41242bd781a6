"""Served names without host paths; 400 messages that name the field, say what it
accepts and state the configured bound; chat template errors mapped by fault."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.api.api_testlib import assert_error

MODEL = "smollm2-135m-instruct"  # the default served name


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("/srv/models/secret/SmolLM2-Q4.gguf", "SmolLM2-Q4"),
        ("/srv/models/tiny-llama/", "tiny-llama"),
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    ],
)
def test_default_served_name_is_the_file_stem(model, name):
    settings = Settings(model=model)
    assert settings.model_name == name
    assert Settings(model=model, served_model_name="alias").model_name == "alias"


def test_unknown_model_404_shows_no_path(make_client):
    with make_client(model="/srv/models/secret/tiny.gguf") as client:
        body = {"model": "other", "prompt": "a", "max_tokens": 1}
        error = assert_error(client.post("/v1/completions", json=body), 404)
        assert "/srv" not in error["message"] and "'tiny'" in error["message"]
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize(
    ("path", "body", "param", "accepted"),
    [
        (
            "/v1/completions",
            {"model": MODEL, "prompt": 5},
            "prompt",
            "a string, a list of strings, a list of integers, a list of lists of integers "
            "or a list of strings and lists of integers",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "a", "stop": 3},
            "stop",
            "a string or a list of strings",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": 7}]},
            "messages.0.content",
            "a string or a list of objects",
        ),
        ("/v1/embeddings", {"model": MODEL, "input": {"a": 1}}, "input", "a string"),
    ],
)
def test_union_field_messages_name_the_field_and_what_it_accepts(
    client, path, body, param, accepted
):
    error = assert_error(client.post(path, json=body), 400)
    assert error["param"] == param
    assert f"'{param}'" in error["message"] and accepted in error["message"], error
    for internal in ("constrained", "more errors", "function-", "[", "Input should"):
        assert internal not in error["message"], error


def test_a_union_member_that_fits_reports_its_own_problem(client):
    body = {"model": MODEL, "prompt": [1, -2]}
    error = assert_error(client.post("/v1/completions", json=body), 400)
    assert error["param"] == "prompt" and "prompt.1" in error["message"], error
    assert "greater than or equal to 0" in error["message"]


@pytest.mark.parametrize(
    ("path", "field", "value", "expected"),
    [
        ("/generate", "max_tokens", 2_000_000, "at most 64 on this server"),
        ("/v1/completions", "max_tokens", 2_000_000, "at most 64 on this server"),
        ("/v1/chat/completions", "max_completion_tokens", 2_000_000, "at most 64 on this"),
        ("/v1/completions", "stop", ["x"] * 70, "at most 3 items on this server, got 70"),
        ("/generate", "stop", ["x"] * 70, "at most 3 items on this server, got 70"),
        ("/v1/completions", "stop", ["x"] * 5, "at most 3 stop strings"),
        ("/v1/completions", "stop", ["x" * 5000], "at most 10 characters"),
        ("/generate", "stop", ["x" * 5000], "at most 10 characters"),
        ("/v1/completions", "n", 500, "at most 2 on this server"),
    ],
)
def test_bounds_in_messages_are_the_configured_ones(make_client, path, field, value, expected):
    body = {"model": MODEL, "prompt": "a", field: value}
    if path == "/generate":
        body.pop("model")
    if "chat" in path:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], field: value}
    settings = {"max_tokens_limit": 64, "default_max_tokens": 16}
    with make_client(max_stop=3, max_stop_length=10, max_n=2, **settings) as client:
        error = assert_error(client.post(path, json=body), 400)
    assert expected in error["message"], error
    assert error["param"].split(".")[0] == field
    for hard in ("1048576", "64 stop", "4096", "128"):
        assert hard not in error["message"], error


def test_chat_template_errors_map_by_fault(client):
    def chat(content):
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
        return client.post("/v1/chat/completions", json=body)

    refused = assert_error(chat("__template_error__"), 400)
    assert refused["code"] == "chat_template_rejected" and "of fake" in refused["message"]
    broken = assert_error(chat("__template_broken__"), 500)
    assert broken["code"] == "chat_template_error"
    assert "chat template of fake" in broken["message"]  # not the generic message
