"""Real checkpoints: sharded safetensors, `.bin`-only folders and hub ids resolved through a
local Hugging Face cache (`HF_HUB_OFFLINE=1`), in every service and the learner; a wrong
path or id stops the start with one line naming it; `serve generation` starts in a clean
environment (no VLLM_CPU_KVCACHE_SPACE) on a 24 GiB machine."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_mesh.clients.generation import GenerationClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import RewardClient
from rlhf_mesh.hub import ModelNotFound, resolve_model
from rlhf_mesh.tiny_models import build
from rlhf_mesh.weights import CheckpointNames, checkpoint_files, checkpoint_layout, state_dict_of

from support import PYTHON, ROOT, ChildServer, perturbed, serves

REPO_ID = "tiny-org/tiny-qwen2"  # the policy, sharded
REWARD_ID = "tiny-org/tiny-qwen2-rm"  # the reward model, .bin only


def _reshard(model_dir: Path, out: Path, auto_class=AutoModelForCausalLM, *, bin_only: bool = False) -> Path:
    """`model_dir` written again: safetensors shards of at most 200 kB with their index, or one
    pytorch_model.bin."""
    model = auto_class.from_pretrained(model_dir)
    if bin_only:
        out.mkdir(parents=True)
        torch.save(state_dict_of(model), out / "pytorch_model.bin")
        model.config.save_pretrained(out)
    else:
        model.save_pretrained(out, max_shard_size="200kB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):  # as the hub has them
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out


def _hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """`model_dir` laid out as the hub's cache holds a download of `repo_id`: blobs, a snapshot of
    links to them, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> dict[str, Path]:
    """The tiny tied Qwen2 models, resharded, as .bin, and in a hub cache as REPO_ID and REWARD_ID."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = build(root / "built", arch="qwen2")
    sharded = _reshard(paths["policy"], root / "sharded")
    reward_bin = _reshard(paths["reward"], root / "reward-bin", AutoModelForSequenceClassification, bin_only=True)
    _hub_cache(root / "hub", REPO_ID, sharded)
    return {**paths, "sharded": sharded, "bin": _reshard(paths["policy"], root / "bin", bin_only=True),
            "reward_bin": reward_bin, "cache": _hub_cache(root / "hub", REWARD_ID, reward_bin)}


@pytest.fixture
def offline_cache(qwen2, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(qwen2["cache"]))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return qwen2["cache"]


def test_layout_and_tied_names_of_sharded_and_bin_checkpoints(qwen2):
    assert len(checkpoint_files(qwen2["sharded"])) > 1
    assert [p.name for p in checkpoint_files(qwen2["bin"])] == ["pytorch_model.bin"]
    expected = checkpoint_layout(qwen2["policy"])
    assert "lm_head.weight" not in expected
    for kind in ("sharded", "bin"):
        assert checkpoint_layout(qwen2[kind]) == expected, kind
        names = CheckpointNames(qwen2[kind])
        assert names.layout == expected and names.aliases == {"lm_head.weight": "model.embed_tokens.weight"}, kind


def test_hub_ids_resolve_through_the_local_cache(qwen2, offline_cache):
    folder = Path(resolve_model(REPO_ID))
    assert folder.is_relative_to(offline_cache) and checkpoint_layout(folder) == checkpoint_layout(qwen2["policy"])
    assert resolve_model(str(qwen2["policy"])) == str(qwen2["policy"])
    with pytest.raises(ModelNotFound, match="'tiny-org/missing': not a folder, and not in the Hugging Face cache"):
        resolve_model("tiny-org/missing")
    with pytest.raises(ModelNotFound, match="'/no/such/dir': no such folder"):
        resolve_model("/no/such/dir")


@pytest.mark.parametrize("command", [
    ["serve", "reward", "--model", "/no/such/dir"],
    ["serve", "reward", "--model", "rm=tiny-org/missing"],
    ["serve", "generation", "--model", "/no/such/dir"],
    ["train", "--policy", "tiny-org/missing", "--generation", "localhost:1", "--reward", "localhost:1",
     "--prompts", "PROMPTS"],
])
def test_a_wrong_model_stops_the_start_with_one_line_naming_it(command, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hello"}\n')
    command = [str(tmp_path / "prompts.jsonl") if arg == "PROMPTS" else arg for arg in command]
    result = subprocess.run([PYTHON, "-m", "rlhf_mesh", *command], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    name = command[command.index("--model" if "--model" in command else "--policy") + 1].split("=")[-1]
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and name in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr


@pytest.mark.slow
async def test_services_and_learner_on_hub_ids_in_a_clean_environment(qwen2, offline_cache, tmp_path):
    """`serve generation` on REPO_ID and `serve reward` on REWARD_ID with nothing in the environment
    but PATH, HOME and the offline cache: vLLM sizes its CPU KV cache by the service's default;
    pushes to the sharded tied policy are served exactly; the learner trains from the same id."""
    from rlhf_mesh.services.learner.run import Run
    from rlhf_mesh.services.learner.settings import LearnerSettings

    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
             "HF_HUB_CACHE": str(qwen2["cache"])}
    assert "VLLM_CPU_KVCACHE_SPACE" not in clean
    generation = ChildServer(["env", "-i", *(f"{k}={v}" for k, v in clean.items()), PYTHON, "-m", "rlhf_mesh",
                              "serve", "generation", "--model", REPO_ID, "--dtype", "float32",
                              "--max-model-len", "256"], tmp_path / "generation.log")
    reward = ChildServer(["env", "-i", *(f"{k}={v}" for k, v in clean.items()), PYTHON, "-m", "rlhf_mesh",
                          "serve", "reward", "--model", f"rm={REWARD_ID}"], tmp_path / "reward.log")
    try:
        wait_until_serving(generation.address, timeout_s=300, alive=generation.alive)
        wait_until_serving(reward.address, timeout_s=300, alive=reward.alive)
        assert "GiB for KV cache" in generation.log()
        with GenerationClient(generation.address, timeout_s=120) as client:
            assert client.model_info().model_id == REPO_ID
            serves(client, AutoModelForCausalLM.from_pretrained(qwen2["policy"]).eval(), 0)
            pushed = perturbed(qwen2["policy"], 1)
            client.push_weights(pushed, 1)
            serves(client, pushed, 1)

            reward_model = AutoModelForSequenceClassification.from_pretrained(qwen2["reward"]).eval()
            with RewardClient(reward.address, timeout_s=60) as scorer, torch.no_grad():
                assert scorer.scores([[5, 6, 7, 8]]) == pytest.approx(
                    [reward_model(torch.tensor([[5, 6, 7, 8]])).logits[0, 0].item()], abs=1e-4)

            run = Run(LearnerSettings(
                policy=REPO_ID, generation=[generation.address], reward=reward.address, prompts=qwen2["prompts"],
                output_dir=tmp_path / "run", steps=1, batch_size=2, num_samples_per_prompt=2, response_length=8,
            ))
            try:
                await run.start()
                await run.run_step()
            finally:
                await run.close()
            serves(client, run.trainer.models.policy, run.version)
    finally:
        assert generation.stop() == 0 and reward.stop() == 0


@pytest.mark.slow
def test_generation_serves_a_bin_only_checkpoint_and_takes_pushes(qwen2, tmp_path):
    from support import start_generation_server

    server = start_generation_server(qwen2["bin"], tmp_path / "generation.log")
    try:
        with GenerationClient(server.address, timeout_s=120) as client:
            serves(client, AutoModelForCausalLM.from_pretrained(qwen2["policy"]).eval(), 0)
            pushed = perturbed(qwen2["policy"], 2)
            client.push_weights(pushed, 1)
            serves(client, pushed, 1)
    finally:
        assert server.stop() == 0
