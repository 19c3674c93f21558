"""EnvironmentService: multi-turn episodes against a real GenerationService (vLLM on CPU), token-exact,
with loss masks; environments as user code in worker processes; the learner training on episodes.

The policy is the tiny one with a chat template that rewrites history as Qwen3's does: earlier
assistant messages lose everything up to `</think>` and are trimmed, so re-rendering an
episode's messages does not give the ids the model saw.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_mesh.clients.environment import EnvironmentClient, episodes_request
from rlhf_mesh.services.environment.builtin import Calculator, evaluate
from rlhf_mesh.services.learner.models import forward, make_batch
from rlhf_mesh.tiny_models import prompts
from rlhf_mesh.v1 import environment_pb2

from support import PYTHON, ROOT, ChildServer, start_generation_server, write_tokens

HISTORY_REWRITING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and not loop.last -%}"
    "{{ '<|assistant|>\n' + (message['content'].split('</think>')[-1] | trim) + '<|end|>\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif -%}"
)
END = environment_pb2.EpisodeEnd


@pytest.fixture(scope="module")
def policy(tiny_models, tmp_path_factory) -> Path:
    """The tiny policy with the history-rewriting chat template."""
    folder = tmp_path_factory.mktemp("history") / "policy"
    shutil.copytree(tiny_models["policy"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = HISTORY_REWRITING_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def services(policy, tiny_models, tmp_path_factory):
    """A generation replica, a reward service with the tiny reward model, and an EnvironmentService
    (tokens on) with the built-ins and the test environments."""
    folder = tmp_path_factory.mktemp("environment")
    tokens = write_tokens(folder / "tokens.yaml", learner=["generate", "admin"], scorer=["score"])
    (folder / "learner.token").write_text(tokens["learner"])
    reward = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"rm={tiny_models['reward']}"],
                         folder / "reward.log")
    generation = start_generation_server(policy, folder / "generation.log")
    reward.wait_serving()
    environment = ChildServer(
        [PYTHON, "-m", "rlhf_mesh", "serve", "environment", "--generation", generation.address, "--reward",
         reward.address,
         "--environment", "retry", "--environment", "calculator",
         "--environment", "chatty=environments_for_tests:Chatty",
         "--environment", "faulty=environments_for_tests:Faulty",
         "--environment-timeout-s", "3", "--max-turns", "8", "--tokens-file", str(folder / "tokens.yaml")],
        folder / "environment.log", env={"PYTHONPATH": str(ROOT / "tests")})
    try:
        environment.wait_serving()
        yield generation, environment, tokens, folder, reward
    finally:
        assert environment.stop() == 0
        assert generation.stop() == 0
        assert reward.stop() == 0


@pytest.fixture(scope="module")
def client(services):
    _, environment, tokens, _, _ = services
    with EnvironmentClient(environment.address, token=tokens["learner"], timeout_s=300) as client:
        yield client


def test_episode_ids_are_what_the_model_saw_and_the_mask_covers_exactly_its_samples(client, policy):
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    questions = prompts()[:4]
    episodes = list(client.run_episodes("chatty", [{"question": q} for q in questions], n=2, max_tokens=6,
                                        temperature=1.0, seed=3, max_turns=3))
    assert sorted((e.task_index, e.episode_index) for e in episodes) == [(t, j) for t in range(4) for j in range(2)]
    observation = tokenizer("\n<|user|>\nTell me more.<|end|>\n<|assistant|>\n", add_special_tokens=False).input_ids
    end_of_message = tokenizer.convert_tokens_to_ids("<|end|>")
    rewritten = 0
    for episode in episodes:
        ids, mask = list(episode.token_ids), list(episode.loss_mask)
        question = questions[episode.task_index]
        assert episode.end == END.EPISODE_END_MAX_TURNS and len(episode.turns) == 3
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        assert ids[:episode.prompt_length] == prompt
        # The episode is the prompt, then each turn's sampled ids, the end-of-message token where the
        # turn was cut (not sampled), and the observation rendered on its own; nothing re-rendered.
        expected, expected_mask, position = list(prompt), [0] * len(prompt), len(prompt)
        for number, turn in enumerate(episode.turns):
            assert turn.start == position
            sampled = ids[turn.start:turn.sampled_end]
            # (vLLM's text holds back the bytes of a character the turn's last token did not finish)
            assert 1 <= len(sampled) <= 6
            assert tokenizer.decode(sampled, skip_special_tokens=True).rstrip("\ufffd") == turn.text
            expected += sampled
            expected_mask += [1] * len(sampled)
            if turn.truncated:
                expected += [end_of_message]
                expected_mask += [0]
            if number < 2:
                expected += observation
                expected_mask += [0] * len(observation)
            position = len(expected)
            assert turn.end == position
        assert ids == expected and mask == expected_mask
        assert [m.role for m in episode.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        # Re-rendering the conversation for the last turn's prompt would not give what the model saw.
        naive = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in episode.messages[:5]],
                                              add_generation_prompt=True, tokenize=True, return_dict=False)
        rewritten += naive != ids[:episode.turns[2].start]
        # The sampler's log-probs equal the learner's forward pass and a plain transformers one at the mask.
        start = episode.prompt_length
        batch = make_batch([ids[:start]], [ids[start:]], 0, [mask[start:]])
        with torch.no_grad():
            learner = forward(model, batch, 1.0).logprobs
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        plain = torch.log_softmax(logits[start - 1:-1], -1).gather(1, torch.tensor(ids[start:])[:, None])[:, 0]
        sampled_at = torch.tensor(mask[start:]) == 1
        torch.testing.assert_close(learner[0][sampled_at], plain[sampled_at], atol=1e-5, rtol=0)
        served = torch.tensor(list(episode.logprobs[start:]))[sampled_at]
        assert (learner[0][sampled_at] - served).abs().max() < 1e-2
        assert (learner[0][sampled_at] - served).abs().mean() < 1e-3
        assert all(v == 0 for v, m in zip(episode.logprobs, mask, strict=True) if not m)
        assert all(v == 0 for v, m in zip(episode.policy_versions, mask, strict=True) if not m)
    assert rewritten > 0, "the template's re-render matched every episode: it does not test what it should"


def test_an_environment_that_raises_hangs_or_kills_its_worker_ends_only_its_episode(client):
    faults = ["raise", "hang", "kill", "none"]
    episodes = {e.task_index: e for e in client.run_episodes("faulty", [{"fault": f} for f in faults], max_tokens=4,
                                                             seed=0)}
    for index in range(3):
        assert episodes[index].end == END.EPISODE_END_ENVIRONMENT_ERROR, faults[index]
    assert "raised ZeroDivisionError" in episodes[0].error and "secret" not in episodes[0].error
    assert "ran past its 3 s timeout" in episodes[1].error
    assert "killed its worker process" in episodes[2].error
    assert episodes[3].end == END.EPISODE_END_DONE and episodes[3].reward == 1.0
    # A built-in's message about a task reaches the caller.
    (bad,) = client.run_episodes("retry", [{"question": "Hi."}], max_tokens=4)
    assert bad.end == END.EPISODE_END_ENVIRONMENT_ERROR and "needs a string 'question' and an 'answer'" in bad.error
    # The service goes on, with a replaced worker.
    (again,) = client.run_episodes("faulty", [{"fault": "none"}], max_tokens=4, seed=0)
    assert again.end == END.EPISODE_END_DONE and again.reward == 1.0


def test_a_reward_model_scores_the_whole_conversation_beside_the_environments_reward(client, services):
    from rlhf_mesh.clients.reward import RewardClient

    reward = services[4]
    episodes = list(client.run_episodes("faulty", [{"fault": "none"}], n=2, max_tokens=4, seed=0, reward_model="rm"))
    with RewardClient(reward.address) as scorer:
        for episode in episodes:
            conversation = [{"role": m.role, "content": m.content} for m in episode.messages]
            (expected,) = scorer.scores([conversation], model="rm")
            assert episode.reward_model_score == pytest.approx(expected, abs=1e-6)
            assert episode.environment_reward == 1.0
            assert episode.reward == pytest.approx(1.0 + expected, abs=1e-6)


def test_limits_end_and_mark_episodes(client):
    task = [{"question": "Tell me a long story."}]
    (two,) = client.run_episodes("chatty", task, max_tokens=4, max_turns=2, seed=1)
    assert two.end == END.EPISODE_END_MAX_TURNS and len(two.turns) == 2
    (short,) = client.run_episodes("chatty", task, max_tokens=8, max_episode_tokens=20, seed=1)
    assert short.end == END.EPISODE_END_MAX_TOKENS and len(short.token_ids) <= 20
    # The model length (256 tokens) ends an episode that max_turns would let go on.
    (long,) = client.run_episodes("chatty", task, max_tokens=64, max_turns=8, seed=1)
    assert long.end == END.EPISODE_END_MAX_TOKENS and len(long.token_ids) <= 256 and len(long.turns) < 8
    assert len(long.token_ids) > 256 - 64  # no room was left for another turn and its observation


def test_bad_requests_are_refused_naming_the_field(client, services):
    _, environment, tokens, _, _ = services
    task = {"question": "Hi."}
    cases = [
        (dict(environment="nope", tasks=[task]), "environment"),
        (dict(environment="chatty", tasks=[task], n=0), "n:"),
        (dict(environment="chatty", tasks=[task], n=65), "n:"),
        (dict(environment="chatty", tasks=["x" * 70000]), "tasks_json[0]"),
        (dict(environment="chatty", tasks=["[1, 2]"]), "tasks_json[0]"),
        (dict(environment="chatty", tasks=["{" * 100000]), "tasks_json[0]"),
        (dict(environment="chatty", tasks=['{"a": ' + "[" * 2000 + "]" * 2000 + "}"]), "tasks_json[0]"),
        (dict(environment="chatty", tasks=['{"question": ' + "9" * 5000 + "}"]), "tasks_json[0]"),
        (dict(environment="chatty", tasks=[task], max_turns=9), "max_turns"),
        (dict(environment="chatty", tasks=[task], max_episode_tokens=257), "max_episode_tokens"),
        (dict(environment="chatty", tasks=[task], reward_model="nope"), "reward_model"),
        (dict(environment="chatty", tasks=[]), "tasks_json"),
    ]
    for arguments, field in cases:
        with pytest.raises(grpc.RpcError) as refused:
            list(client.run_episodes(arguments.pop("environment"), arguments.pop("tasks"), **arguments))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, arguments
        assert field in refused.value.details(), (field, refused.value.details())
    # A lone surrogate (UTF-8 no encoder writes) in a task: the request is no valid message.
    raw = episodes_request("chatty", ["x"]).SerializeToString().replace(b"x", b"\xed\xa0\x80")
    with pytest.raises(grpc.RpcError) as refused:
        list(client.channel.unary_stream("/rlhf_mesh.v1.EnvironmentService/RunEpisodes")(raw, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (tokens["scorer"], grpc.StatusCode.PERMISSION_DENIED),
                        ("x" * 4096, grpc.StatusCode.UNAUTHENTICATED)):
        with EnvironmentClient(environment.address, token=token) as stranger, pytest.raises(grpc.RpcError) as refused:
            list(stranger.run_episodes("chatty", [task]))
        assert refused.value.code() == code
        assert token is None or token not in refused.value.details()


def test_the_calculator_exposes_its_tool_and_runs_it_without_eval(client):
    served = {e.name: e for e in client.list_environments().environments}
    assert set(served) == {"retry", "calculator", "chatty", "faulty"}
    (tool,) = served["calculator"].tools
    assert tool.name == "calculator" and json.loads(tool.parameters_json)["required"] == ["expression"]
    calculator = Calculator()
    first = calculator.reset({"question": "What is 12 * 7?", "answer": 84})
    assert first[-1] == {"role": "user", "content": "What is 12 * 7?"}
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7 + 2 ** 3"}}</tool_call>'
    step = calculator.step(call)
    assert (step.observation, step.tool_calls, step.done) == ([{"role": "tool", "content": "92"}], 1, False)
    bad = calculator.step('<tool_call>{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}'
                          "</tool_call>")
    assert bad.observation[0]["content"].startswith("error:") and not bad.done
    assert calculator.step("It is \\boxed{84}.").reward == 1.0
    assert Calculator().reset({"question": "q", "answer": 1}) and evaluate("7 // 2") == 3
    with pytest.raises(ValueError):
        evaluate("9 ** 9 ** 9")


async def test_the_learner_trains_on_episodes_and_the_held_out_episode_reward_rises(services, policy, tmp_path):
    """GRPO on the `retry` environment (up to three tries to answer with a word that starts with a
    vowel; 1, 0.5, 0.25 for a right answer at the first, second, third try): the held-out episode
    reward, greedy, on the same tasks at each evaluation, goes up."""
    from rlhf_mesh.services.learner.run import Run
    from rlhf_mesh.services.learner.settings import LearnerSettings

    generation, environment, _, folder, _ = services
    pattern = r"^\s*[aeiouAEIOU]"
    questions = prompts()
    for name, chosen in (("train", questions[::2]), ("held_out", questions[1::2][:32])):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"{q}.", "answer": pattern, "check": "regex"}) + "\n" for q in chosen))
    run = Run(LearnerSettings(
        policy=str(policy), generation=[generation.address], environment="retry",
        environment_service=environment.address, services_token_file=folder / "learner.token",
        prompts=tmp_path / "train.jsonl", eval_prompts=tmp_path / "held_out.jsonl", eval_steps=4,
        eval_before_training=True, eval_temperature=0.0, output_dir=tmp_path / "run", steps=8, batch_size=16,
        num_samples_per_prompt=4, response_length=6, max_turns=3, learning_rate=3e-3, kl_coef=0.0,
        advantage_estimator="grpo", seed=0, report_to=[],
    ))
    try:
        await run.start()
        await run.loop()
    finally:
        await run.close()
    history = run.trainer.history
    held_out = [h["eval/reward_mean"] for h in history if "eval/reward_mean" in h]
    trained = [h["charts/reward_mean"] for h in history if "charts/reward_mean" in h]
    print(f"held-out episode reward {held_out}, training reward {trained}")
    assert len(held_out) == 3 and held_out[-1] > held_out[0] + 0.2, held_out
    steps = [h for h in history if "charts/reward_mean" in h]
    assert all(1.0 <= h["episodes/turns_mean"] <= 3.0 and h["episodes/environment_error_rate"] == 0 for h in steps)
    assert max(abs(h["rollout_correction/kl"]) for h in steps) < 1e-3
