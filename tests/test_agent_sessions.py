"""Training from sessions: an agent program written against the `openai` SDK runs as an
environment of the EnvironmentService and the learner trains it; ratings of live sessions
submitted to the FeedbackService become their rewards and a learner step trains on them.

Real servers: a GenerationService (vLLM on the tiny policy with a tool template, its
OpenAI-compatible port, tokens on), an EnvironmentService, a FeedbackService (SQLite).
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from rlhf_mesh.clients.environment import EnvironmentClient
from rlhf_mesh.clients.feedback import FeedbackClient
from rlhf_mesh.tiny_models import prompts
from rlhf_mesh.v1 import environment_pb2, feedback_pb2

from support import PYTHON, ROOT, ChildServer, free_port, start_generation_server, write_tokens

pytestmark = pytest.mark.slow  # a vLLM engine


@pytest.fixture(scope="module")
def services(tools_policy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("agents")
    tokens = write_tokens(folder / "tokens.yaml", learner=["generate", "admin"], harness=["generate", "feedback"],
                          feedback=["feedback"], app=["generate"], agent=["generate"])
    for name in ("learner", "harness", "feedback", "agent"):
        (folder / f"{name}.token").write_text(tokens[name])
    http_port = free_port()
    generation = start_generation_server(
        tools_policy, folder / "generation.log", "--http-port", str(http_port), "--tool-call-parser", "hermes",
        "--tokens-file", str(folder / "tokens.yaml"), max_model_len=1024)
    environment = ChildServer(
        [PYTHON, "-m", "rlhf_mesh", "serve", "environment", "--generation", generation.address,
         "--environment", "vowels=agents_for_tests:vowel_agent",
         "--environment", "silent=agents_for_tests:silent_agent",
         "--environment-timeout-s", "120", "--services-token-file", str(folder / "harness.token"),
         "--agent-token-file", str(folder / "agent.token")],
        folder / "environment.log", env={"PYTHONPATH": str(ROOT / "tests")})
    feedback = ChildServer(
        [PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{folder / 'feedback.db'}",
         "--no-rater-page", "--session-replicas", generation.address, "--services-token-file",
         str(folder / "feedback.token")], folder / "feedback.log")
    try:
        environment.wait_serving()
        feedback.wait_serving()
        generation.http_port, generation.tokens, generation.folder = http_port, tokens, folder
        generation.policy = tools_policy
        yield generation, environment, feedback
    finally:
        assert environment.stop() == 0
        assert feedback.stop() == 0
        assert generation.stop() == 0


def _learn(services, tmp_path, **settings):
    from rlhf_mesh.services.learner.run import Run
    from rlhf_mesh.services.learner.settings import LearnerSettings

    generation, environment, _ = services
    return Run(LearnerSettings(
        policy=str(generation.policy), generation=[generation.address],
        environment_service=environment.address, services_token_file=generation.folder / "learner.token",
        output_dir=tmp_path / "run", kl_coef=0.0, seed=0, report_to=[], **settings))


async def _run(run) -> list[dict]:
    try:
        await run.start()
        await run.loop()
    finally:
        await run.close()
    return run.trainer.history


def test_an_agent_that_never_calls_the_model_ends_its_episode_with_an_error(services):
    generation, environment, _ = services
    with EnvironmentClient(environment.address, token=generation.tokens["harness"]) as client:
        (episode,) = client.run_episodes("silent", [{"question": "Hi"}], max_tokens=8)
    assert episode.end == environment_pb2.EPISODE_END_ENVIRONMENT_ERROR and "no call" in episode.error


async def test_an_agent_program_trains_through_sessions_and_its_held_out_reward_rises(services, tmp_path):
    """GRPO on an unmodified `openai` agent (a tool call, the tool's answer, then its own answer;
    reward 1 when that starts with a vowel): every call is recorded in the episode's session,
    sampled as the learner asks, and the held-out reward, greedy on the same tasks, goes up."""
    questions = prompts()
    for name, chosen in (("train", questions[::2]), ("held_out", questions[1::2][:32])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"question": f"{q}."}) + "\n" for q in chosen))
    history = await _run(_learn(
        services, tmp_path, environment="vowels", prompts=tmp_path / "train.jsonl",
        eval_prompts=tmp_path / "held_out.jsonl", eval_steps=4, eval_before_training=True, eval_temperature=1.0,
        steps=8, batch_size=8, num_samples_per_prompt=4, response_length=80, learning_rate=3e-3,
        advantage_estimator="grpo", rollout_correction_level="token"))
    held_out = [h["eval/reward_mean"] for h in history if "eval/reward_mean" in h]
    trained = [h for h in history if "charts/reward_mean" in h]
    print(f"held-out reward {held_out}, training reward {[h['charts/reward_mean'] for h in trained]}")
    assert len(held_out) == 3 and held_out[-1] > held_out[0] + 0.2, held_out
    for step in trained:  # two calls a session, both sampled tokens, and no episode lost
        assert step["episodes/turns_mean"] == 2.0 and step["episodes/environment_error_rate"] == 0


async def test_ratings_on_the_feedback_service_are_the_rewards_a_learner_step_trains_on(services, tmp_path):
    """An app's users rate the replies they got (thumbs up or down, a session each) from the policy
    a learner serves: each rating, stored by the FeedbackService, closes its session with the rating
    as reward; the learner (rollout_source sessions) trains a step on exactly those sessions."""
    generation, _, feedback = services
    run = _learn(services, tmp_path, rollout_source="sessions", steps=1, batch_size=4,
                 advantage_estimator="reinforce_pp", sessions_wait_s=60)
    ratings = [1.0, 0.0, 1.0, 1.0]

    def users_rate() -> None:
        app = openai.OpenAI(base_url=f"http://127.0.0.1:{generation.http_port}/v1",
                            api_key=generation.tokens["app"], max_retries=0, timeout=120)
        model = app.models.list().data[0].id
        with FeedbackClient(feedback.address) as client:
            for i, score in enumerate(ratings):
                question = f"Question {i}: what is the capital of France?"
                reply = app.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                    max_tokens=8, seed=i, user=f"user-{i}",
                                                    extra_body={"ignore_eos": True})
                response = client.submit(feedback_pb2.Feedback(
                    rater_id=f"user-{i}", prompt=question,
                    responses=[reply.choices[0].message.content or "(empty)"],
                    rating=feedback_pb2.Rating(scores=[score], scale_min=0, scale_max=1), session_id=f"user-{i}",
                    call_id=reply.id))
                assert response.session_rewarded
            stored = sorted(f.session_id for f in client.list())
        assert stored == [f"user-{i}" for i in range(4)]

    try:
        await run.start()  # the learner's weights are served before the users come
        await asyncio.to_thread(users_rate)
        await run.loop()
    finally:
        await run.close()
    (step,) = run.trainer.history
    assert step["charts/reward_mean"] == pytest.approx(sum(ratings) / len(ratings))
    assert step["sessions/turns_mean"] == 1.0
