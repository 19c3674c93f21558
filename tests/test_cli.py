"""The `rlhf-mesh` console script."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_mesh.cli import parser

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


def test_train_rm_reads_a_config_file_and_flags_override_it(tmp_path, tiny_models):
    """train-rm takes its settings as every command does: YAML, RLHF_MESH_TRAIN_RM_*, flags."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say hi {i}", "chosen": "Hi, thank you!", "rejected": "Go away."})
                             + "\n" for i in range(8)))
    config = tmp_path / "train-rm.yaml"
    config.write_text(f"preferences: {pairs}\nbase: {tiny_models['reward']}\nout: {tmp_path / 'from-yaml'}\n"
                      "epochs: 1\neval_fraction: 0.25\nlearning_rate: 1.0e-3\n")
    result = _run("train-rm", "--config", str(config), "--out", str(tmp_path / "rm"), "--seed", "3")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "rm" / "train_rm.json").read_text())
    assert (written["epochs"], written["learning_rate"], written["seed"], written["held_out_pairs"]) == (1, 1e-3, 3, 2)
    assert not (tmp_path / "from-yaml").exists()
    config.write_text("epochs: 0\n")
    result = _run("train-rm", "--config", str(config), "--preferences", str(pairs), "--base", "x", "--out", "y")
    assert result.returncode == 2 and "epochs: Input should be greater than or equal to 1" in result.stderr


def test_campaign_flags_are_campaign_and_the_old_id_still_works_with_a_warning():
    for command in ("create", "stats"):
        args = parser().parse_args(["feedback", "campaign", command, "--addr", "x", "--campaign", "helpful-v1"])
        assert args.campaign == "helpful-v1"
        with pytest.warns(FutureWarning, match="--id is deprecated and will be removed in the next release: use "
                                               "--campaign"):
            args = parser().parse_args(["feedback", "campaign", command, "--addr", "x", "--id", "helpful-v1"])
        assert args.campaign == "helpful-v1"
