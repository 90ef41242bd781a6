"""Where and when a benchmark ran: machine, software, date, commit; and the results file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The vector extensions that decide how fast a CPU runs matmuls, in the order shown.
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("fma", "FMA"),
    ("f16c", "F16C"),
    ("avx512f", "AVX-512F"),
    ("avx512bw", "AVX-512BW"),
    ("avx512vl", "AVX-512VL"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("avx_vnni", "AVX-VNNI"),
    ("amx_tile", "AMX"),
)


def cpu_isa(cpuinfo: str | None = None) -> list[str]:
    """The vector extensions in the first ``flags`` line of /proc/cpuinfo (empty if none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [name for flag, name in ISA_FLAGS if flag in flags]
    return []


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out + ("+dirty" if dirty else "")


def machine(device: str = "cpu") -> dict[str, Any]:
    mem = memory_gib()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "cores": usable_cores(),
        "memory_gib": round(mem, 1) if mem else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def header(argv: list[str], device: str = "cpu") -> dict[str, Any]:
    """The fields every results file starts with."""
    return {
        "command": " ".join(argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git_commit(),
        "machine": machine(device),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Results as JSON, with this machine's paths made portable (see ``portable``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(portable(json.loads(json.dumps(data, default=str))), indent=2)
    path.write_text(text + "\n", encoding="utf-8")


def portable(value: Any) -> Any:
    """Paths inside the checkout become relative to it; other absolute paths (the
    virtualenv, a wheel cache) keep only their file name. Committed results then say
    nothing about the machine's directories."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if not isinstance(value, str):
        return value
    value = value.replace(f"{REPO}{os.sep}", "").replace(str(REPO), ".")
    if value.startswith(os.sep) and " " not in value:
        return Path(value).name
    return value
