"""`gptserve-bench` without the bench extra says what to install instead of failing on an import."""

from __future__ import annotations

import importlib.util

import pytest

from bench import __main__ as entry


def test_missing_extra_is_a_clear_message(monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert entry.main(["--help"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err
    assert "pip install 'gptserve[bench]'" in err


def test_with_the_extra_it_runs_the_bench_cli(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        entry.main(["--help"])
    assert exc.value.code == 0
    assert "gptserve-bench" in capsys.readouterr().out
