"""Code style: ruff over the whole repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import ROOT


def test_ruff():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
