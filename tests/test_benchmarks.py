"""The benchmarks' own logic: the GPU check script where there is no GPU, how rows are read from children."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from support import PYTHON, ROOT


def test_gpu_check_refuses_cleanly_without_cuda():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env={"PATH": "/usr/bin:/bin",
                            "PYTHON": PYTHON}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gpu_check: no CUDA device visible to torch" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def _benchmark(name: str):
    if str(ROOT / "benchmarks") not in sys.path:  # as when run as a script: its folder first, for `common`
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learner_memory_takes_each_row_from_rank_0_whatever_rank_prints_first():
    merge_ranks = _benchmark("learner_memory").merge_ranks
    rank0 = {"rank": 0, "peak_mib": 900.0, "seconds": 2.5}
    rank1 = {"rank": 1, "peak_mib": 1000.0}
    for reports in ([rank0, rank1], [rank1, rank0]):
        row = merge_ranks(reports)
        assert row == {"rank": 0, "peak_mib": 1000.0, "seconds": 2.5, "peaks_mib": [900.0, 1000.0]}
    with pytest.raises(ValueError, match="no figures from rank 0 among ranks \\[1\\]"):
        merge_ranks([rank1])
