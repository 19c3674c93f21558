"""The GPU check script, where there is no GPU: it stops at once with a clear message."""

from __future__ import annotations

import subprocess

from support import PYTHON, ROOT


def test_gpu_check_refuses_cleanly_without_cuda():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env={"PATH": "/usr/bin:/bin",
                            "PYTHON": PYTHON}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gpu_check: no CUDA device visible to torch" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
