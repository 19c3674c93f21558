"""The feedback half of the loop, end to end: a scripted rater's feedback over gRPC ->
export -> `rlhf-mesh train-rm` -> hot reload into the RewardService -> its scores rank
fresh pairs the way the rater would.

The rater's preference is one a person can read: a response that ends politely ("thank
you", "please", "politely") beats one that does not."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from rlhf_mesh.clients.feedback import FeedbackClient, feedback
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import RewardClient
from rlhf_mesh.tiny_models import prompts

from support import PYTHON, ROOT, ChildServer

pytestmark = pytest.mark.slow

POLITE = ["very politely.", "- thank you so much.", "? Please tell me.", "and says thank you."]
PLAIN = ["today.", "every morning.", "with care.", "again and again.", "before the rain.", "in the quiet evening."]
OBJECTS = ["the sun", "a good book", "the answer", "fresh bread", "the music", "the map", "warm tea", "the door"]


def _pair(rng: random.Random) -> tuple[str, str, str]:
    """A prompt, a polite response and a plain one."""
    prompt = rng.choice(prompts())

    def response(ending: str) -> str:
        return f"{rng.choice(OBJECTS)} {ending}"

    return prompt, response(rng.choice(POLITE)), response(rng.choice(PLAIN))


def _rate(rng: random.Random, rater: str, index: int):
    """The scripted rater's feedback on one prompt: a choice, a rating or a correction."""
    prompt, polite, plain = _pair(rng)
    responses = [polite, plain] if rng.random() < 0.5 else [plain, polite]
    kind = index % 4
    if kind == 3:
        return feedback(prompt, [plain], rater_id=rater, correction=(0, polite))
    if kind == 2:
        return feedback(prompt, responses, rater_id=rater, scores=[5 if r == polite else 2 for r in responses])
    return feedback(prompt, responses, rater_id=rater, choice=responses.index(polite))


def test_feedback_trains_a_reward_model_that_is_hot_reloaded(tiny_models, tmp_path):
    store = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{tmp_path / 'fb.db'}"],
                        tmp_path / "feedback.log")
    reward = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"rm={tiny_models['reward']}"],
                         tmp_path / "reward.log")
    try:
        for server in (store, reward):
            wait_until_serving(server.address, timeout_s=300, alive=server.alive)
        rng = random.Random(0)
        with FeedbackClient(store.address) as client:
            for i in range(400):
                client.submit(_rate(rng, f"rater-{i % 3}", i))
        pairs = tmp_path / "pairs.jsonl"
        cli = [PYTHON, "-m", "rlhf_mesh"]
        export = subprocess.run([*cli, "feedback", "export", "--addr", store.address, "--output", str(pairs)],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert export.returncode == 0, export.stderr
        assert "400 pairs from 400 feedback items (0 skipped" in export.stdout
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        assert all(any(p in row["chosen"] for p in POLITE) for row in rows)

        trained = tmp_path / "rm-v2"
        result = subprocess.run(
            [*cli, "train-rm", "--preferences", str(pairs), "--base", str(tiny_models["reward"]), "--out", str(trained),
             "--epochs", "3", "--learning-rate", "1e-3", "--eval-fraction", "0.2"],
            capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr
        metrics = json.loads((trained / "train_rm.json").read_text())
        print(result.stdout)
        assert metrics["held_out_pairs"] == 80 and metrics["held_out_accuracy"] >= 0.9, metrics

        fresh = [_pair(random.Random(1000 + i)) for i in range(50)]
        with RewardClient(reward.address) as client:
            before = client.scores([(p, a) for p, a, _ in fresh] + [(p, b) for p, _, b in fresh], model="rm")
            info = client.reload_model("rm", str(trained))
            after = client.score([(p, a) for p, a, _ in fresh] + [(p, b) for p, _, b in fresh], model="rm")
        assert {r.model_version for r in after.results} == {info.version}
        scores = [r.score for r in after.results]
        ranked = sum(scores[i] > scores[i + len(fresh)] for i in range(len(fresh))) / len(fresh)
        ranked_before = sum(before[i] > before[i + len(fresh)] for i in range(len(fresh))) / len(fresh)
        print(f"fresh pairs ranked as the rater would: {ranked_before:.2f} before the reload, {ranked:.2f} after")
        assert ranked >= 0.9, (ranked, ranked_before)
        assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    finally:
        store.stop()
        reward.stop()
