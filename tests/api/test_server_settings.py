"""Settings from the environment, the ``gptserve serve`` flags, and the uvicorn configuration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.api import server
from service.api.protocol import GuardedH11Protocol
from service.settings import Settings, get_settings


def test_defaults():
    settings = Settings()
    assert (
        settings.model == "smollm2-135m-instruct" and settings.model_name == "smollm2-135m-instruct"
    )
    assert (settings.host, settings.port, settings.dtype, settings.device) == (
        "127.0.0.1",
        8000,
        "auto",
        "auto",
    )
    assert settings.max_body_bytes == 1 << 20 and settings.drain_timeout == 30.0
    assert settings.api_keys == [] and settings.cors_origins == [] and settings.log_prompts is False


def test_environment_with_prefix(monkeypatch):
    monkeypatch.setenv("GPTSERVE_PORT", "9001")
    monkeypatch.setenv("GPTSERVE_API_KEY", " k1 , k2 ,")
    monkeypatch.setenv("GPTSERVE_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("GPTSERVE_SERVED_MODEL_NAME", "smol")
    monkeypatch.setenv("GPTSERVE_ENABLE_PREFIX_CACHING", "false")
    settings = Settings()
    assert settings.port == 9001
    assert settings.api_keys == ["k1", "k2"]
    assert "k1" not in repr(settings)  # the key is a secret
    assert settings.cors_origins == ["http://a.example", "http://b.example"]
    assert settings.model_name == "smol"
    assert settings.engine_kwargs()["enable_prefix_caching"] is False


def test_get_settings_is_cached(monkeypatch):
    get_settings.cache_clear()
    monkeypatch.setenv("GPTSERVE_PORT", "9002")
    try:
        assert get_settings() is get_settings() and get_settings().port == 9002
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 0},
        {"port": 70000},
        {"dtype": "int8"},
        {"device": "tpu"},
        {"drain_timeout": float("nan")},
        {"drain_timeout": -1},
        {"max_n": 0},
        {"max_logprobs": 21},
        {"api_key": " , "},
        {"default_max_tokens": 5000},
        {"max_num_seqs": 600, "max_batched_tokens": 512},
    ],
)
def test_invalid_settings(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_help_documents_every_setting(capsys):
    assert server.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text
        assert f"GPTSERVE_{name.upper()}" in text


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("GPTSERVE_PORT", "9001")
    monkeypatch.setenv("GPTSERVE_MAX_N", "4")
    args = server.build_parser().parse_args(
        [
            "--port",
            "9100",
            "--no-enable-prefix-caching",
            "--cors-origins",
            "http://x",
            "--kv-cache-tokens",
            "1024",
        ]
    )
    settings = server.settings_from_args(args)
    assert settings.port == 9100 and settings.max_n == 4
    assert settings.enable_prefix_caching is False
    assert settings.cors_origins == ["http://x"] and settings.kv_cache_tokens == 1024


@pytest.mark.parametrize(
    "argv", [["--workers", "2"], ["--port", "x"], ["--dtype", "int8"], ["--port", "0"], ["--bogus"]]
)
def test_bad_command_lines_exit_2(argv):
    assert server.main(argv) == 2


def test_uvicorn_config_is_one_h11_process_without_access_log():
    settings = Settings(max_header_bytes=8192, port=8123)
    config = server.uvicorn_config(object(), settings)
    assert issubclass(config.http, GuardedH11Protocol)  # type: ignore[arg-type]
    assert config.http.request_timeout == 15.0 and config.http.max_connections == 512  # type: ignore[union-attr]
    assert config.h11_max_incomplete_event_size == 8192
    assert config.access_log is False and config.workers == 1 and config.port == 8123


# -- one source: EngineConfig -> Settings -> README ------------------------------------------


def test_engine_settings_come_from_engine_config():
    import typing

    from service.engine.config import EngineConfig, settings_fields

    engine = {f.name: f for f in settings_fields()}
    types = typing.get_type_hints(EngineConfig)
    section = [name for name in Settings.model_fields if name in engine]
    assert section == list(engine)  # every setting, in EngineConfig's order
    for name, spec in engine.items():
        field = Settings.model_fields[name]
        assert field.annotation == types[name], name
        assert field.default == spec.default, name
        assert field.description == spec.metadata["description"], name
    assert Settings().engine_kwargs() == {n: getattr(EngineConfig(), n) for n in engine}
    # The engine's bounds, checked once in EngineConfig, stop Settings too.
    with pytest.raises(ValidationError, match="max_num_seqs"):
        Settings(max_num_seqs=5000)


def _readme_table() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.startswith("| `GPTSERVE_")]


def _settings_table() -> list[str]:
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is None or name == "api_key":
            shown = "`unset`"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default}`"
        if field.default_factory is list:
            shown = "empty"
        flag = "--" + name.replace("_", "-")
        rows.append(f"| `GPTSERVE_{name.upper()}` | `{flag}` | {shown} | {field.description} |")
    return rows


def test_readme_settings_table_matches_settings():
    expected = _settings_table()
    assert _readme_table() == expected, "README settings table, from Settings:\n" + "\n".join(
        expected
    )
