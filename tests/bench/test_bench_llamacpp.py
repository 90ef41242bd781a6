"""llama-cpp-python made importable without building it (a fake pip), and the child's figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import llamacpp

# A stand-in for pip: logs its arguments; "wheel" writes a wheel unless told to fail.
FAKE_PIP = """\
import pathlib, sys
args = sys.argv[1:]
log = pathlib.Path(__file__).with_name("calls.txt")
log.write_text(log.read_text() + " ".join(args) + "\\n" if log.exists() else " ".join(args) + "\\n")
if pathlib.Path(__file__).with_name("fail").exists():
    print("error: command 'cmake' failed: No such file or directory", file=sys.stderr)
    sys.exit(1)
if args[0] == "wheel":
    out = pathlib.Path(args[args.index("-w") + 1])
    (out / "llama_cpp_python-0.3.0-cp311-cp311-linux_x86_64.whl").write_text("")
"""


@pytest.fixture
def fake_pip(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "pip" / "fake_pip.py"
    script.parent.mkdir()
    script.write_text(FAKE_PIP)
    return [sys.executable, str(script)], script.parent


def calls(folder: Path) -> list[str]:
    log = folder / "calls.txt"
    return log.read_text().splitlines() if log.exists() else []


class Probe:
    """Says llama_cpp is missing until ``after`` calls have been made."""

    def __init__(self, after: int) -> None:
        self.after, self.count = after, 0

    def __call__(self) -> str | None:
        self.count += 1
        return "0.3.0" if self.count > self.after else None


def test_an_importable_llama_cpp_is_used_as_it_is(tmp_path, fake_pip):
    pip, folder = fake_pip
    got = llamacpp.ensure_installed(tmp_path / "cache", pip, probe=lambda: "0.3.0")
    assert (got.ok, got.how, got.version) == (True, "installed", "0.3.0")
    assert calls(folder) == []


def test_first_run_builds_the_wheel_from_source_and_the_second_reuses_it(tmp_path, fake_pip):
    pip, folder = fake_pip
    cache = tmp_path / "cache"
    first = llamacpp.ensure_installed(cache, pip, probe=Probe(after=1))
    assert first.ok and first.how == "built" and first.build_s is not None
    build = calls(folder)[0].split()
    assert build[:2] == ["wheel", "--no-deps"] and "--no-binary" in build
    assert build[-2:] == ["-w", str(cache)]
    assert (cache / "build.log").exists()
    assert any(c.startswith("install --no-deps") for c in calls(folder))

    (folder / "calls.txt").unlink()
    second = llamacpp.ensure_installed(cache, pip, probe=Probe(after=1))
    assert second.ok and second.how == "cached wheel"
    assert not any(c.startswith("wheel") for c in calls(folder))  # no rebuild


def test_a_failed_build_is_a_reason_not_an_exception(tmp_path, fake_pip):
    pip, folder = fake_pip
    (folder / "fail").write_text("")
    got = llamacpp.ensure_installed(tmp_path / "cache", pip, probe=Probe(after=99))
    assert not got.ok and got.how == "failed"
    assert "exit 1" in got.reason and "cmake" in got.reason


def test_a_missing_pip_or_an_import_that_still_fails_is_reported(tmp_path, fake_pip):
    missing = llamacpp.ensure_installed(tmp_path / "a", ["/nonexistent/pip"], probe=Probe(after=99))
    assert not missing.ok and "exit 127" in missing.reason
    pip, _ = fake_pip
    broken = llamacpp.ensure_installed(tmp_path / "b", pip, probe=Probe(after=99))
    assert not broken.ok and "still does not import" in broken.reason


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.CACHE_ENV, str(tmp_path))
    assert llamacpp.wheel_cache() == tmp_path
    monkeypatch.delenv(llamacpp.CACHE_ENV)
    assert llamacpp.wheel_cache() == llamacpp.REPO / ".cache" / "wheels"


def test_a_run_times_prompt_evaluation_and_decode_apart():
    # Call at t=10; first token at 10.05, then one token every 10 ms.
    times = [10.05 + 0.01 * i for i in range(128)]
    run = llamacpp.Run.from_times(64, 10.0, times)
    assert run.prompt_ms == pytest.approx(50.0)
    assert run.decode_tps == pytest.approx(100.0)  # 127 tokens in 1.27 s: the first excluded
    assert run.output_tps == pytest.approx(128 / 1.32)
    with pytest.raises(ValueError):
        llamacpp.Run.from_times(64, 10.0, [10.1])


def test_prompt_ids_round_trip_through_the_command_line():
    prompts = [[1, 2, 3], [40, 50]]
    text = llamacpp.format_prompt_ids(prompts)
    assert llamacpp.parse_prompt_ids(text) == prompts
    with pytest.raises(ValueError):
        llamacpp.parse_prompt_ids(";")


def test_the_build_leaves_out_amx_where_the_cpu_lists_it(monkeypatch):
    """llama.cpp's AMX matmul traps on VMs that list AMX without letting it run; the
    baseline is built without it there, and a caller's own CMAKE_ARGS wins."""
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    amx = llamacpp.build_env({"avx512f", "amx_tile", "amx_int8"})["CMAKE_ARGS"]
    assert "-mno-amx-tile" in amx and "-mno-amx-int8" in amx and "CMAKE_CXX_FLAGS" in amx
    assert "CMAKE_ARGS" not in llamacpp.build_env({"avx2", "fma"})
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_NATIVE=OFF")
    assert llamacpp.build_env({"amx_tile"})["CMAKE_ARGS"] == "-DGGML_NATIVE=OFF"
