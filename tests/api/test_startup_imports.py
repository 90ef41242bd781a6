"""The server listens before PyTorch loads: importing the HTTP layer must not import torch
(it loads in the background with the model, so /health answers at once)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_server_does_not_import_torch() -> None:
    code = "import sys, service.api.server; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
