"""The `gptserve` command line: generate and info on the default model."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_info_prints_config_and_parameter_count() -> None:
    proc = run_cli("info", "--model", "smollm2-135m-instruct")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"]["n_layer"] == 30
    assert info["config"]["n_kv_head"] == 3
    assert 130e6 < info["parameters"] < 140e6
    assert info["dtype"] == "float32"


def test_generate_streams_greedy_text_matching_the_engine_free_loop() -> None:
    from model.generate import generate
    from model.loading import load_model
    from model.tokenizer import Tokenizer

    proc = run_cli("generate", "--prompt", "The capital of France is", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    loaded = load_model("smollm2-135m-instruct")
    tok = Tokenizer.from_path(loaded.path)
    ids = list(generate(loaded.model, tok.encode("The capital of France is"), 8))
    stop = [i for i, t in enumerate(ids) if t in tok.eos_token_ids]
    expected = tok.decode(ids[: stop[0]] if stop else ids)
    assert proc.stdout.rstrip("\n") == expected
    assert expected.strip()


def test_generate_chat_with_seeded_sampling_is_reproducible() -> None:
    args = ("generate", "--prompt", "Say hi", "--chat", "--max-tokens", "6")
    first = run_cli(*args, "--temperature", "0.9", "--seed", "7")
    second = run_cli(*args, "--temperature", "0.9", "--seed", "7")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_unknown_model_fails_with_a_message() -> None:
    proc = run_cli("info", "--model", "no-such-model")
    assert proc.returncode == 2
    assert "no-such-model" in proc.stderr
    assert "Traceback" not in proc.stderr
