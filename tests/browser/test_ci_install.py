"""CI installs the browser that tests/browser drives (without it they would fail under CI)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "install-tools.sh"


def test_install_tools_installs_chromium_quietly_and_only_when_missing():
    text = SCRIPT.read_text(encoding="utf-8")
    assert "command -v chromium" in text  # idempotent: skipped when present
    assert "packages+=(chromium)" in text
    assert 'apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null' in text
    assert "chromium --version" in text  # fails CI early when it does not run
    assert "playwright install" not in text  # never Playwright's own browser download
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
