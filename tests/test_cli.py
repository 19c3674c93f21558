"""The `rlhf-mesh` console script."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

CLI = [str(Path(sys.executable).parent / "rlhf-mesh")]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_unknown_service_is_a_usage_error():
    result = _run("serve", "nonsense")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_models_build_is_deterministic_for_a_seed(tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        result = _run("models", "build", str(tmp_path / name), "--seed", seed)
        assert result.returncode == 0, result.stderr
        assert f"policy: {tmp_path / name / 'policy'}" in result.stdout
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b
    assert a["policy/model.safetensors"] != c["policy/model.safetensors"]
    assert a["policy/tokenizer.json"] == c["policy/tokenizer.json"]
    assert set(a) >= {"policy/config.json", "reward/config.json", "reward/tokenizer.json", "models.json"}
