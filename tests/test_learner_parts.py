"""The learner's parts that need no service: prompts, batching, log-probs, settings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_mesh.services.learner.data import DatasetError, PromptDataset
from rlhf_mesh.services.learner.models import forward, make_batch, token_logprobs

from support import PYTHON, ROOT, wait_for

ROWS = [{"prompt": f"prompt {i}", "messages": [{"role": "user", "content": f"chat {i}"}]} for i in range(5)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_give_the_same_prompts(tmp_path):
    jsonl = _write_jsonl(tmp_path / "p.jsonl", ROWS)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    assert PromptDataset.load(jsonl).prompts == PromptDataset.load(parquet).prompts == [r["prompt"] for r in ROWS]
    chats = PromptDataset.load(parquet, messages_field="messages").prompts
    assert chats == [r["messages"] for r in ROWS]


def test_each_pass_is_a_seeded_permutation(tmp_path):
    data = PromptDataset.load(_write_jsonl(tmp_path / "p.jsonl", ROWS), seed=3)
    steps = [data.batch(step, 2) for step in range(5)]  # 10 prompts: exactly two passes over 5
    flat = [p for batch in steps for p in batch]
    assert sorted(flat[:5]) == sorted(flat[5:]) == sorted(r["prompt"] for r in ROWS)
    assert flat[:5] != flat[5:]  # each pass has its own order
    again = PromptDataset.load(_write_jsonl(tmp_path / "q.jsonl", ROWS), seed=3)
    assert [again.batch(step, 2) for step in (4, 0)] == [steps[4], steps[0]]  # a pure function of the step


@pytest.mark.parametrize(
    ("rows", "field", "message"),
    [
        ([{"text": "x"}], None, "row 0: no field 'prompt'"),
        ([{"prompt": "a"}, {"prompt": ""}], None, "row 1: 'prompt' must be a non-empty string"),
        ([{"messages": [{"role": "user"}]}], "messages", "row 0: 'messages' must be a non-empty list"),
        ([], None, "the prompt dataset is empty"),
    ],
)
def test_bad_datasets_are_refused_naming_the_row(tmp_path, rows, field, message):
    with pytest.raises(DatasetError, match=message):
        PromptDataset.load(_write_jsonl(tmp_path / "p.jsonl", rows), messages_field=field)


def test_padded_batch_log_probs_equal_each_sequence_alone(tiny_models):
    policy = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32).eval()
    prompts, responses = [[1, 7, 9], [1, 20, 21, 22, 23, 24]], [[30, 31, 32, 33], [40, 2]]
    batch = make_batch(prompts, responses, pad_id=0)
    assert batch.mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    with torch.no_grad():
        logprobs = forward(policy, batch, temperature=0.7).logprobs
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            logits = policy(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1] / 0.7
            alone = token_logprobs(logits, torch.tensor(response))
            torch.testing.assert_close(logprobs[row, : len(response)], alone, atol=1e-5, rtol=1e-5)
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kl-estimator", "k7"], "kl_estimator"),
        (["--batch-size", "3", "--num-mini-batches", "2"], "must be divisible by num_mini_batches"),
        (["--advantage-estimator", "grpo"], "grpo needs num_samples_per_prompt >= 2"),
        (["--prompts", "p.csv"], "prompts: p.csv is neither .jsonl nor .parquet"),
    ],
)
def test_a_config_that_does_not_validate_fails_at_start_naming_the_key(tmp_path, flags, message):
    config = tmp_path / "ppo.yaml"
    config.write_text("policy: /nowhere\ngeneration: [localhost:1]\nreward: localhost:2\nprompts: p.jsonl\n")
    result = subprocess.run([PYTHON, "-m", "rlhf_mesh", "train", "--config", str(config), *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_unknown_config_keys_are_refused(tmp_path):
    config = tmp_path / "ppo.yaml"
    config.write_text("policy: p\ngeneration: [a:1]\nreward: b:2\nprompts: p.jsonl\nkl_coeff: 0.1\n")
    result = subprocess.run([PYTHON, "-m", "rlhf_mesh", "train", "--config", str(config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "kl_coeff" in result.stderr


def _weights_of(model_dir):
    """A publisher's source of weights: a model's, as a push sends them."""
    from rlhf_mesh.weights import state_dict_of

    tensors = state_dict_of(AutoModelForCausalLM.from_pretrained(model_dir))
    return lambda: (tensors, None)


def _rollout(version: int, prompt_index: int):
    from rlhf_mesh.services.learner.rollouts import Rollout

    return Rollout(prompt_index=prompt_index, sample_index=0, prompt_ids=[1, 7, 9], response_ids=[30, 31],
                   sampler_logprobs=[-6.0, -6.0], text="x", finished=True, policy_version_start=version,
                   policy_version_end=version)


async def test_rollouts_older_than_the_staleness_bound_are_never_trained_on(tiny_models, tmp_path, monkeypatch):
    from rlhf_mesh.services.learner import run as run_module
    from rlhf_mesh.services.learner.errors import LearnerError
    from rlhf_mesh.services.learner.publisher import PolicyPublisher, PushReport
    from rlhf_mesh.services.learner.rollouts import Collected
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.services.learner.trainer import Trainer

    settings = LearnerSettings(policy=str(tiny_models["policy"]), generation=["localhost:1"], reward="localhost:2",
                               prompts=tiny_models["prompts"], batch_size=2, steps=4, async_generation=True,
                               max_policy_lag=1, output_dir=tmp_path)
    run = run_module.Run(settings)  # with its data and models, without services
    run.dataset = PromptDataset.load(settings.prompts)
    run.trainer = Trainer(settings)
    run.publisher = PolicyPublisher(settings, run.trainer.push_weights, keep_snapshots=True)
    run.trainer.step = 3  # the last step: nothing is prefetched after it
    served_versions = iter([1, 2])  # step 3 may use version 2 (lag 1), never version 1 (lag 2)

    class FakeCollector:
        def __init__(self, generators, reward, prompts, *, min_policy_version, **_):
            assert min_policy_version == 2  # the generator is told the bound too
            self.prompts = prompts

        async def run(self):
            version = next(served_versions)
            return Collected([_rollout(version, i) for i in range(len(self.prompts))], generate_s=0.0,
                             score_tail_s=0.0)

    async def published(version):
        return PushReport()

    trained = []
    monkeypatch.setattr(run_module, "RolloutCollector", FakeCollector)
    monkeypatch.setattr(run.trainer, "train", lambda rollouts: trained.append(rollouts) or {})
    monkeypatch.setattr(run.publisher, "publish", published)
    with pytest.raises(LearnerError, match=r"policy versions \[1\] at version 3: outside max_policy_lag=1"):
        await run.run_step()
    assert trained == [] and run.step == 3
    scalars = await run.run_step()
    assert [r.policy_version_start for r in trained[0]] == [2, 2] and run.step == 4
    assert scalars["async/lag_max"] == 1 and scalars["async/lag_1_share"] == 1.0
    await run.close()


class _FlakyGenerator:
    """Streams samples like a GenerationClient; fails with UNAVAILABLE after `fail_after` samples."""

    def __init__(self, address: str, fail_after: int | None = None) -> None:
        self.address = address
        self.fail_after = fail_after
        self.requests: list[tuple[list[str], int]] = []

    async def generate(self, prompts, *, n, seed, **_):
        from rlhf_mesh.v1 import generation_pb2

        self.requests.append((list(prompts), seed))
        sent = 0
        for i, prompt in enumerate(prompts):
            for j in range(n):
                if self.fail_after is not None and sent == self.fail_after:
                    self.fail_after = None  # the replica comes back
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                               "connection reset")
                sent += 1
                yield generation_pb2.Sample(prompt_index=i, sample_index=j, completion_token_ids=[seed + i * n + j],
                                            text=f"{prompt}/{seed + i * n + j}", policy_version_start=3)


class _Reward:
    address = "reward:1"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.scored: list[str] = []

    async def score(self, inputs, **_):
        from rlhf_mesh.v1 import reward_pb2

        if self.failures:
            self.failures -= 1
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        self.scored += [text for _, text in inputs]
        return reward_pb2.ScoreResponse(results=[reward_pb2.ScoreResult(score=float(len(t))) for _, t in inputs])


async def test_rollouts_survive_replica_failures_without_losing_or_repeating_a_sample():
    """A replica failing mid-stream: its undelivered prompts go to the next replica (repaired
    first) with the same seeds; a failing Score call is retried; every sample is kept once."""
    from rlhf_mesh.services.learner.retry import Retry
    from rlhf_mesh.services.learner.rollouts import RolloutCollector

    prompts = [f"p{i}" for i in range(6)]
    flaky, steady, reward = _FlakyGenerator("a:1", fail_after=3), _FlakyGenerator("b:1"), _Reward(failures=2)
    repaired = []

    async def repair(client):
        repaired.append(client.address)

    collected = await RolloutCollector(
        [flaky, steady], reward, prompts, n=2, max_tokens=4, temperature=1.0, seed=100, min_policy_version=3,
        reward_model="", timeout_s=10, retry=Retry(attempts=3, first_backoff_s=0.01), repair=repair,
    ).run()
    keys = [(r.prompt_index, r.sample_index) for r in collected.rollouts]
    assert keys == [(i, j) for i in range(6) for j in range(2)]
    # Seeds follow the global prompt index whichever replica drew the sample.
    assert [r.response_ids[0] for r in collected.rollouts] == [100 + k for k in range(12)]
    # The flaky replica delivered prompt 0 and half of prompt 1, then failed; the steady one
    # (repaired first) drew prompts 1-2 again (seed of prompt 1) and served its own shard.
    assert repaired == ["b:1"]
    assert steady.requests == [(["p3", "p4", "p5"], 106), (["p1", "p2"], 102)]
    assert sorted(reward.scored) == sorted(f"p{i}/{100 + i * 2 + j}" for i in range(6) for j in range(2))
    assert [r.score for r in collected.rollouts] == [float(len(f"p{i}/{100 + i * 2 + j}"))
                                                      for i in range(6) for j in range(2)]


async def test_a_replica_that_stays_down_fails_the_step_after_the_retries():
    from rlhf_mesh.services.learner.errors import LearnerError
    from rlhf_mesh.services.learner.retry import Retry
    from rlhf_mesh.services.learner.rollouts import RolloutCollector

    with pytest.raises(LearnerError, match="reward service reward:1: UNAVAILABLE: down"):
        await RolloutCollector([_FlakyGenerator("a:1")], _Reward(failures=99), ["p"], n=1, max_tokens=4,
                               temperature=1.0, seed=0, min_policy_version=0, reward_model="", timeout_s=10,
                               retry=Retry(attempts=2, first_backoff_s=0.01)).run()


async def test_a_weight_push_is_retried_on_the_replicas_that_failed_while_they_restart(monkeypatch, tiny_models):
    from rlhf_mesh.clients.push import ReplicaResult
    from rlhf_mesh.services.learner import publisher as publisher_module
    from rlhf_mesh.services.learner.errors import LearnerError
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.v1 import generation_pb2

    def error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    outcomes = {"b:1": [error(grpc.StatusCode.UNAVAILABLE, "connection refused"), None],
                "c:1": [error(grpc.StatusCode.INVALID_ARGUMENT, "bad manifest")],
                "d:1": [error(grpc.StatusCode.INTERNAL, "a server bug")]}
    calls = []

    def fake_push(replicas, update, timeout_s, **_):
        calls.append((list(replicas), update.snapshot.version))
        response = generation_pb2.PushWeightsResponse(received_bytes=update.full.sent_bytes)
        return [ReplicaResult(a, error=error) if (error := outcomes.get(a, [None]).pop(0)) else
                ReplicaResult(a, response=response) for a in replicas]

    async def no_wait(seconds):
        pass

    monkeypatch.setattr(publisher_module, "send_update", fake_push)
    monkeypatch.setattr(publisher_module.asyncio, "sleep", no_wait)
    settings = LearnerSettings(policy=str(tiny_models["policy"]), generation=["a:1", "b:1"], reward="r:1",
                               prompts=tiny_models["prompts"])
    publisher = publisher_module.PolicyPublisher(settings, _weights_of(tiny_models["policy"]), keep_snapshots=False)
    report = await publisher.publish(1)
    assert calls == [(["a:1", "b:1"], 1), (["b:1"], 1)]  # only the replica that failed is pushed again
    assert report.sent_bytes == report.full_bytes == 2 * sum(t.numel() * 4 for t in publisher.weights()[0].values())
    assert publisher.published.version == 1
    publisher.replicas = ["a:1", "c:1"]
    with pytest.raises(LearnerError, match="c:1: INVALID_ARGUMENT: bad manifest"):
        await publisher.publish(2)  # a refusal is not retried
    assert calls[2:] == [(["a:1", "c:1"], 2)]
    publisher.replicas = ["d:1"]
    with pytest.raises(LearnerError, match="d:1: INTERNAL: a server bug"):
        await publisher.publish(3)  # nor is a server bug
    assert calls[3:] == [(["d:1"], 3)] and publisher.published.version == 1


async def test_a_replica_the_autoscaler_adds_gets_the_next_push_and_generates(monkeypatch, tiny_models):
    """resolve_replicas: every publish looks the headless name up again; a replica that appeared
    (and caught up from a peer) is pushed the new version, as a delta when it holds the last one,
    and joins the generators. A replica missing from DNS for a while (restarting) is kept."""
    from rlhf_mesh.clients.push import ReplicaResult
    from rlhf_mesh.services.learner import publisher as publisher_module
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.v1 import generation_pb2

    behind = [["10.0.0.1:50051"], ["10.0.0.1:50051", "10.0.0.2:50051"], ["10.0.0.2:50051"]]
    calls = []

    def fake_push(replicas, update, timeout_s, **_):
        calls.append((list(replicas), update.snapshot.version, update.delta is not None))
        response = generation_pb2.PushWeightsResponse(received_bytes=1)
        return [ReplicaResult(a, response=response, delta=update.delta is not None) for a in replicas]

    monkeypatch.setattr(publisher_module, "send_update", fake_push)
    monkeypatch.setattr(publisher_module, "resolve", lambda name: behind[0])
    settings = LearnerSettings(policy=str(tiny_models["policy"]), generation=["generation:50051"], reward="r:1",
                               prompts=tiny_models["prompts"], resolve_replicas=True)
    publisher = publisher_module.PolicyPublisher(settings, _weights_of(tiny_models["policy"]), keep_snapshots=False)
    publisher.replicas = list(behind[0])  # as connect() found them
    await publisher.publish(1)
    for found in behind[1:]:
        monkeypatch.setattr(publisher_module, "resolve", lambda name, found=found: found)
        await publisher.publish(publisher.published.version + 1)
    assert calls == [(["10.0.0.1:50051"], 1, False),
                     (["10.0.0.1:50051", "10.0.0.2:50051"], 2, True),
                     (["10.0.0.1:50051", "10.0.0.2:50051"], 3, True)]
    assert [g.address for g in publisher.generators] == ["10.0.0.2:50051"]  # connect() opens the first ones
    await publisher.close()


def _train_as_rank(rank: int, world_size: int, port: int, settings: dict, steps: list, out: str) -> None:
    """One rank of a data-parallel learner (torchrun's environment) training on fixed rollouts:
    rank 0 writes each step's scalars and pushed weights, and the checkpoint after the last."""
    import os

    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.services.learner.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun sets it: the same kernels in the 1- and 2-process runs
    trainer = Trainer(LearnerSettings(**settings))
    if rank > 0:
        trainer.follow()
        return
    scalars, pushed = [], []
    for rollouts in steps:
        scalars.append(trainer.train(rollouts))
        trainer.step += 1
        weights, _ = trainer.push_weights()  # unsharded, views of the live parameters: copied
        pushed.append({name: t.clone() for name, t in weights.items()})
    checkpoint = trainer.save_checkpoint()
    trainer.close()
    torch.save({"scalars": scalars, "pushed": pushed, "policy": pushed[-1], "checkpoint": str(checkpoint),
                "rng": torch.load(checkpoint / "trainer.pt", weights_only=False)["rng"]}, out)


def _fixed_steps(count: int, seed: int = 0, policy: Path | None = None, lengths: range = range(1, 12)) -> list[list]:
    """`count` steps of 16 made-up rollouts (4 prompts x 4 samples, scores from a Gaussian). With
    `policy`, their sampler log-probs are its own (the first step's) plus noise of 0.05, as a sampler
    in another precision would give them; else -5.0 everywhere."""
    import random

    from rlhf_mesh.services.learner.rollouts import Rollout

    rng = random.Random(seed)

    def rollout(i: int) -> Rollout:
        response = [rng.randrange(5, 200) for _ in range(rng.choice(lengths))]
        return Rollout(prompt_index=i // 4, sample_index=i % 4, prompt_ids=[1] + [rng.randrange(5, 200)] * (i % 5 + 1),
                       response_ids=response, sampler_logprobs=[-5.0] * len(response), text="", finished=i % 3 > 0,
                       policy_version_start=0, policy_version_end=0, score=rng.gauss(0, 1))

    steps = [[rollout(i) for i in range(16)] for _ in range(count)]
    if policy is not None:
        model = AutoModelForCausalLM.from_pretrained(policy).eval()
        noise = torch.Generator().manual_seed(seed)
        for rollouts in steps:
            batch = make_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], 0)
            with torch.no_grad():
                logprobs = forward(model, batch, 1.0).logprobs
            logprobs += 0.05 * torch.randn(logprobs.shape, generator=noise)
            for r, row in zip(rollouts, logprobs, strict=True):
                r.sampler_logprobs = row[:len(r.response_ids)].tolist()
    return steps


def _trainer_settings(tiny_models, **overrides) -> dict:
    return {**dict(policy=str(tiny_models["policy"]), generation=["localhost:1"], reward="localhost:2",
                   prompts=str(tiny_models["prompts"]), batch_size=4, num_samples_per_prompt=4, num_ppo_epochs=2,
                   num_mini_batches=2, learning_rate=1e-3, seed=3), **overrides}


@pytest.mark.parametrize("critic", ["critic model", "value head", "grpo"])
def test_two_ranks_train_like_one_process(tiny_models, tmp_path, critic):
    """DDP over 2 gloo ranks, each taking half of every mini-batch's micro-batches, equals one
    process taking them all: the same micro-batches, gradients summed in another order."""
    steps = _fixed_steps(3, policy=tiny_models["policy"])
    settings = _trainer_settings(tiny_models, gradient_accumulation_steps=2, value_head=critic == "value head",
                                 advantage_estimator="grpo" if critic == "grpo" else "gae")
    one, two = (_spawn(world_size, settings, steps, tmp_path / str(world_size)) for world_size in (1, 2))
    assert len(two["rng"]) == 2  # each rank's RNG states are checkpointed
    for name, weight in one["policy"].items():
        torch.testing.assert_close(two["policy"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert not all(torch.equal(w, AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).state_dict()[n])
                   for n, w in one["policy"].items())  # training moved the weights
    for expected, got in zip(one["scalars"], two["scalars"], strict=True):
        for name, value in expected.items():
            if not name.startswith("time/"):
                assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_a_token_mean_update_is_the_same_for_any_split_of_the_mini_batch(tiny_models, tmp_path):
    """token-mean: one mini-batch of responses from 1 to 60 tokens, taken whole, as 4 micro-batches,
    or as 2 DDP ranks of one micro-batch each, gives the same weights after 2 steps of 2 epochs (the
    old per-micro-batch mean does not: tests/test_ppo_math.py shows its gradient changing)."""
    steps = _fixed_steps(2, seed=5, policy=tiny_models["policy"], lengths=range(1, 61))
    settings = _trainer_settings(tiny_models, num_mini_batches=1, advantage_estimator="grpo")
    runs = {name: _spawn(world, {**settings, "gradient_accumulation_steps": accumulate}, steps, tmp_path / name)
            for name, world, accumulate in (("whole", 1, 1), ("4 micro-batches", 1, 4), ("2 ranks", 2, 2))}
    initial = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).state_dict()
    assert not all(torch.equal(w, initial[n]) for n, w in runs["whole"]["policy"].items())  # training moved them
    for name in ("4 micro-batches", "2 ranks"):
        for key, weight in runs["whole"]["policy"].items():
            torch.testing.assert_close(runs[name]["policy"][key], weight, rtol=0, atol=1e-6, msg=f"{name}: {key}")
        for expected, got in zip(runs["whole"]["scalars"], runs[name]["scalars"], strict=True):
            assert got["losses/policy_loss"] == pytest.approx(expected["losses/policy_loss"], rel=1e-5, abs=1e-7)


def test_kl_coef_0_loads_and_runs_no_reference(tiny_models, tmp_path):
    """Without a KL term there is no reference model, no reference pass and no KL scalar; with one
    there is a reference copy."""
    from rlhf_mesh.services.learner.settings import LearnerSettings

    steps = _fixed_steps(1, policy=tiny_models["policy"])
    _, _, with_kl = _train(_trainer_settings(tiny_models, advantage_estimator="grpo"), steps, tmp_path / "kl")
    assert with_kl.models.reference is not None
    scalars, _, without = _train(_trainer_settings(tiny_models, advantage_estimator="grpo", kl_coef=0.0), steps,
                                 tmp_path / "no-kl")
    assert without.models.reference is None
    assert "objective/kl" not in scalars[0] and "losses/policy_loss" in scalars[0]
    with pytest.raises(ValueError, match="use_kl_loss needs kl_coef > 0"):
        LearnerSettings(**_trainer_settings(tiny_models, kl_coef=0.0, use_kl_loss=True, kl_estimator="k2"),
                        output_dir=tmp_path)


def test_bypass_mode_kl_in_the_loss_and_the_old_tis_cap(tiny_models, tmp_path):
    """rollout_correction_bypass: the sampler's log-probs are the old policy (there is no weight or
    mask), and the gap is measured on the first mini-batch; use_kl_loss puts the KL in the loss,
    not the reward; the deprecated tis_cap is token-level truncation at its cap."""
    from rlhf_mesh.services.learner.settings import LearnerSettings

    steps = _fixed_steps(1, policy=tiny_models["policy"])
    scalars, _, _ = _train(_trainer_settings(tiny_models, advantage_estimator="grpo", rollout_correction_bypass=True,
                                             use_kl_loss=True, kl_estimator="low_var_kl"), steps, tmp_path / "bypass")
    # the sampler's log-probs are the learner's plus noise of 0.05: k3 ≈ 0.05^2 / 2 per token
    assert 2e-4 < scalars[0]["rollout_correction/k3_kl"] < 5e-3
    assert "rollout_correction/masked_fraction" not in scalars[0]
    assert scalars[0]["losses/kl_loss"] >= 0  # low_var_kl is never negative
    with pytest.warns(FutureWarning, match="tis_cap"):
        old = LearnerSettings(**_trainer_settings(tiny_models, tis_cap=0.5), output_dir=tmp_path)
    assert (old.rollout_correction, old.rollout_correction_level, old.rollout_correction_max) == ("tis", "token", 0.5)
    with pytest.raises(ValueError, match="use_kl_loss: set kl_estimator"):
        LearnerSettings(**_trainer_settings(tiny_models, use_kl_loss=True), output_dir=tmp_path)


def _spawn(world_size: int, settings: dict, steps: list, output_dir) -> dict:
    """`_train_as_rank` on `world_size` processes; what rank 0 wrote."""
    import random

    import torch.multiprocessing as mp

    out = output_dir / "rank0.pt"
    port = 29500 + random.randrange(10000)
    mp.spawn(_train_as_rank, args=(world_size, port, {**settings, "output_dir": str(output_dir)}, steps, str(out)),
             nprocs=world_size)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("variant", ["critic model, gradient checkpointing", "LoRA, value head"])
def test_fsdp2_ranks_train_like_one_process_and_resume(tiny_models, tmp_path, variant):
    """fsdp: each of 2 gloo ranks keeps half of every parameter (fully_shard per decoder layer)
    and gathers each layer for its pass. Against one unsharded process on the same rollouts the
    same micro-batches are computed and only the order of the gradient sums differs, so the
    pushed weights (gathered from the shards) and every scalar agree to float32 rounding. The
    checkpoint, gathered too, is the pushed model, and 2 sharded ranks resumed from it after step 2
    end step 3 where the uninterrupted process does (a kill -9 loses nothing past a checkpoint)."""
    from peft import PeftModel

    from rlhf_mesh.weights import state_dict_of

    steps = _fixed_steps(3, seed=4, policy=tiny_models["policy"])
    lora = variant.startswith("LoRA")
    settings = _trainer_settings(tiny_models, gradient_accumulation_steps=2, value_head=lora, use_peft=lora,
                                 lora_r=4, lora_alpha=8, gradient_checkpointing=not lora,
                                 learning_rate=1e-2 if lora else 1e-3)
    one = _spawn(1, settings, steps, tmp_path / "one")
    two = _spawn(2, {**settings, "fsdp": True}, steps[:2], tmp_path / "two")
    resumed = _spawn(2, {**settings, "fsdp": True, "resume_from": two["checkpoint"]}, steps[2:], tmp_path / "resumed")

    close = {"rtol": 1e-5, "atol": 1e-6}  # as DDP's: float32 sums in another order
    for step, got in ((0, two["pushed"][0]), (1, two["pushed"][1]), (2, resumed["pushed"][0])):
        assert got.keys() == one["pushed"][step].keys()
        for name, expected in one["pushed"][step].items():
            torch.testing.assert_close(got[name], expected, **close, msg=f"step {step + 1} {name}")
    initial = state_dict_of(AutoModelForCausalLM.from_pretrained(tiny_models["policy"]))
    assert not all(torch.equal(one["policy"][n], t) for n, t in initial.items())  # training moved the weights
    for expected, got in zip(one["scalars"], two["scalars"] + resumed["scalars"], strict=True):
        for name, value in expected.items():
            if not name.startswith("time/"):
                assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert len(two["rng"]) == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    saved = Path(two["checkpoint"]) / "policy"
    loaded = PeftModel.from_pretrained(base, saved) if lora else AutoModelForCausalLM.from_pretrained(saved)
    for name, tensor in state_dict_of(loaded).items():  # the sharded checkpoint is the model it pushed
        assert torch.equal(tensor, two["pushed"][1][name]), name


def _train(settings: dict, steps: list, output_dir) -> tuple[list[dict], dict, object]:
    """Scalars of each step, the policy's weights after them, and the Trainer."""
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.services.learner.trainer import Trainer

    trainer = Trainer(LearnerSettings(**settings, output_dir=output_dir))
    scalars = []
    for rollouts in steps:
        scalars.append(trainer.train(rollouts))
        trainer.step += 1
    return scalars, {name: t.clone() for name, t in trainer.models.policy.state_dict().items()}, trainer


def test_bf16_and_gradient_checkpointing_train_like_float32(tiny_models, tmp_path):
    """Gradient checkpointing recomputes the same activations: the same weights, bit for bit.
    bf16 autocast rounds every activation to an 8-bit mantissa (relative error up to 2^-9) while
    the weights and AdamW's state stay float32: after 2 steps at lr 1e-4 the update has the same
    direction (cosine >= 0.999) and size (1%), no weight is 2e-3 away (measured: 4e-4), and the
    losses agree within 1e-3 (the KL, a sum over tokens, within 1e-3 per token)."""
    steps = _fixed_steps(2, policy=tiny_models["policy"])
    settings = _trainer_settings(tiny_models, learning_rate=1e-4, steps=2)
    initial = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).state_dict()
    runs = {name: _train({**settings, **extra}, steps, tmp_path / name)[:2] for name, extra in {
        "float32": {}, "checkpointing": {"gradient_checkpointing": True}, "bf16": {"dtype": "bfloat16"},
        "bf16 + checkpointing": {"dtype": "bfloat16", "gradient_checkpointing": True},
    }.items()}
    scalars, weights = runs["float32"]
    for name, tensor in runs["checkpointing"][1].items():
        assert torch.equal(tensor, weights[name]), name
    assert runs["checkpointing"][0][-1]["losses/policy_loss"] == scalars[-1]["losses/policy_loss"]

    def change(w: dict) -> torch.Tensor:
        return torch.cat([(w[name] - initial[name]).flatten() for name in initial])

    for run in ("bf16", "bf16 + checkpointing"):
        got_scalars, got = runs[run]
        assert torch.nn.functional.cosine_similarity(change(got), change(weights), dim=0) >= 0.999, run
        assert change(got).norm() / change(weights).norm() == pytest.approx(1, rel=0.01), run
        assert max(float((got[n] - weights[n]).abs().max()) for n in initial) < 2e-3, run
        for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl"):
            assert got_scalars[-1][key] == pytest.approx(scalars[-1][key], abs=1e-3), (run, key)
        # The KL is a sum over each response's tokens: within 1e-3 per token (CI's CPU differed by 2e-4).
        tokens = sum(len(r.response_ids) for r in steps[-1]) / len(steps[-1])
        assert got_scalars[-1]["objective/kl"] == pytest.approx(scalars[-1]["objective/kl"], abs=1e-3 * tokens), run
    assert not torch.equal(runs["bf16"][1]["lm_head.weight"], weights["lm_head.weight"])  # bf16 did compute


def test_a_schedule_weight_decay_and_bf16_resume_exactly(tiny_models, tmp_path):
    """Linear warm-up then decay over the run's optimizer steps (steps x epochs x mini-batches),
    and a run resumed from its step-1 checkpoint ends where the uninterrupted one does."""
    steps = _fixed_steps(3, seed=1, policy=tiny_models["policy"])
    settings = _trainer_settings(tiny_models, steps=3, lr_scheduler_type="linear", warmup_steps=3,
                                 weight_decay=0.1, dtype="bfloat16", gradient_checkpointing=True)
    scalars, weights, _ = _train(settings, steps, tmp_path / "whole")
    # 12 optimizer steps: warm-up 0, 1/3, 2/3 of lr, then down to 0; each step's scalar is its mean.
    lrs = [1e-3 * x for x in (0, 1 / 3, 2 / 3, 1, 8 / 9, 7 / 9, 6 / 9, 5 / 9, 4 / 9, 3 / 9, 2 / 9, 1 / 9)]
    for step, expected in enumerate(zip(*[iter(lrs)] * 4, strict=True)):
        assert scalars[step]["charts/learning_rate"] == pytest.approx(sum(expected) / 4), step

    _, _, first = _train(settings, steps[:1], tmp_path / "resumed")
    checkpoint = first.save_checkpoint()
    resumed, got, trainer = _train({**settings, "resume_from": checkpoint}, steps[1:], tmp_path / "resumed")
    assert trainer.step == 3
    for name, tensor in got.items():
        assert torch.equal(tensor, weights[name]), name
    assert [s["charts/learning_rate"] for s in resumed] == [s["charts/learning_rate"] for s in scalars[1:]]


def test_lora_trains_the_adapter_alone_against_the_base_and_resumes_exactly(tiny_models, tmp_path):
    """use_peft: only the adapter's parameters train; the reference is the policy with the
    adapter disabled (no copy; the KL of the first step, with lora_B still 0, is exactly 0); the
    checkpoint is PEFT's adapter, which PeftModel.from_pretrained loads onto the base to the
    weights the replicas are pushed (the merge); and a resumed run ends where an uninterrupted one does."""
    from peft import PeftModel

    from rlhf_mesh.weights import state_dict_of

    steps = _fixed_steps(3, seed=2, policy=tiny_models["policy"])
    settings = _trainer_settings(tiny_models, steps=3, use_peft=True, lora_r=4, lora_alpha=8, learning_rate=1e-2,
                                 value_head=True, lora_dropout=0.1)
    scalars, weights, trainer = _train(settings, steps, tmp_path / "whole")
    assert trainer.models.reference is None
    assert scalars[0]["objective/kl"] == 0.0 and scalars[-1]["objective/kl"] != 0.0
    trainable = {name for name, p in trainer.models.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    initial = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).state_dict()
    base = trainer.models.policy.get_base_model().state_dict()
    for name, tensor in initial.items():  # the base weights never move
        assert torch.equal(base.get(name, base.get(name.replace(".weight", ".base_layer.weight"))), tensor), name
    merged = state_dict_of(trainer.models.policy)
    assert set(merged) == set(state_dict_of(AutoModelForCausalLM.from_pretrained(tiny_models["policy"])))
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           initial["model.layers.0.self_attn.q_proj.weight"])

    checkpoint = trainer.save_checkpoint()
    assert {p.name for p in (checkpoint / "policy").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["policy"]),
                                       checkpoint / "policy")
    for name, tensor in state_dict_of(loaded).items():
        assert torch.equal(tensor, merged[name]), name

    _, _, first = _train(settings, steps[:1], tmp_path / "resumed")
    resumed, got, _ = _train({**settings, "resume_from": first.save_checkpoint()}, steps[1:], tmp_path / "resumed")
    for name, tensor in got.items():
        assert torch.equal(tensor, weights[name]), name
    assert resumed[-1]["losses/policy_loss"] == scalars[-1]["losses/policy_loss"]


@pytest.mark.parametrize("bad", [{}, {"use_peft": True, "weight_transport": "collective"}])
def test_adapter_pushes_need_lora_and_the_in_band_transport(tiny_models, bad):
    from pydantic import ValidationError

    from rlhf_mesh.services.learner.settings import LearnerSettings

    with pytest.raises(ValidationError, match="lora_publish adapter needs use_peft and weight_transport grpc"):
        LearnerSettings(**_trainer_settings(tiny_models, lora_publish="adapter", **bad))


def test_the_reporter_writes_every_step_to_tensorboard_and_to_wandb_offline(tmp_path, monkeypatch):
    """W&B with no network (WANDB_MODE=offline): its run folder holds each step's scalars under
    the TensorBoard names, and a resumed run goes on in the same W&B run. Logged samples go to
    samples.jsonl, a TensorBoard text table and a W&B table."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf_mesh.services.learner.report import Reporter

    from support import wait_for, wandb_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    logged = {1: {"charts/reward_mean": 0.25, "objective/kl": 0.5},
              2: {"charts/reward_mean": 0.75, "objective/kl": 1.5}}
    reporter = Reporter(tmp_path, total_steps=3, report_to=["tensorboard", "wandb"], config={"learning_rate": 1e-5})
    samples = [{"step": 2, "prompt": "2 + 2 =", "response": " 4 | four\nfive", "score": 1.0,
                "components": {"math": 1.0}, "advantage": 0.5, "finish": "stop", "policy_versions": [1, 2]}]
    for step, scalars in logged.items():
        reporter.step(step, scalars)
    reporter.samples(2, samples)
    reporter.close()
    run_id = (tmp_path / "wandb-run-id").read_text()
    first, = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}*")  # W&B adds -1 to a name taken in the same second

    def scalars_and_table():
        history = wandb_history(first)
        tables = {step: {k.removeprefix("samples/"): h.pop(k) for k in list(h) if k.startswith("samples/")}
                  for step, h in history.items()}
        return history == logged and tables[2]["_type"] == "table-file" and tables[2]["nrows"] == 1 and not tables[1]

    # W&B's own process writes the file; finish() has returned, its last bytes may follow
    wait_for(scalars_and_table, timeout_s=30, what="the W&B history")
    assert [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == samples
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    text, = events.Tensors("samples/text_summary")
    assert text.step == 2 and "| 2 + 2 = |  4 \\| four<br>five |" in text.tensor_proto.string_val[0].decode()
    assert {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]} == {
        name: [(step, logged[step][name]) for step in logged] for name in logged[1]}

    resumed = Reporter(tmp_path, total_steps=3, first_step=2, report_to=["wandb"])
    assert resumed.wandb.id == run_id  # the same W&B run goes on
    resumed.step(3, {"charts/reward_mean": 1.0})
    resumed.close()
    assert (tmp_path / "wandb-run-id").read_text() == run_id


CHECKPOINT_FOREVER = """
import sys
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.services.learner.trainer import Trainer

trainer = Trainer(LearnerSettings(policy=sys.argv[1], generation=["localhost:1"], reward="localhost:2",
                                  prompts=sys.argv[2], output_dir=sys.argv[3]))
while True:
    trainer.step += 1
    trainer.history.append({"step": float(trainer.step)})
    trainer.save_checkpoint()
"""


def test_a_learner_killed_mid_checkpoint_leaves_the_last_complete_one_usable(tiny_models, tmp_path):
    """kill -9 a learner while it writes checkpoints, three times, each time as soon as a
    half-written `.partial` folder exists: the newest complete checkpoint still loads, a rerun
    resumes from it, and the next checkpoint replaces the half-written one."""
    import signal

    from rlhf_mesh.services.learner.checkpoints import latest_checkpoint
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.services.learner.trainer import Trainer

    checkpoints = tmp_path / "checkpoints"
    policy = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).state_dict()  # the writer never trains it

    def kill_mid_checkpoint() -> None:
        """Start a writer, let it complete two more checkpoints, kill it in the middle of the next one."""
        done_before = len(list(checkpoints.glob("step-*"))) if checkpoints.is_dir() else 0
        writer = subprocess.Popen([PYTHON, "-c", CHECKPOINT_FOREVER, str(tiny_models["policy"]),
                                   str(tiny_models["prompts"]), str(tmp_path)], cwd=ROOT, stderr=subprocess.DEVNULL)

        def mid_checkpoint() -> bool:
            assert writer.poll() is None, "the checkpoint writer exited"
            return (checkpoints.is_dir() and len(list(checkpoints.glob("step-*"))) >= done_before + 2
                    and any(checkpoints.glob(".step-*.partial")))

        wait_for(mid_checkpoint, timeout_s=120, what="a checkpoint half-written after two more complete ones")
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)

    resumed_steps, half_written = [], []
    for _ in range(3):
        kill_mid_checkpoint()
        for name in half_written:  # the rerun wrote the step it had been killed in, whole
            assert (checkpoints / name.removeprefix(".").removesuffix(".partial") / "trainer.pt").is_file()
        half_written = [p.name for p in checkpoints.glob(".step-*.partial")]
        newest = latest_checkpoint(tmp_path)
        trainer = Trainer(LearnerSettings(policy=str(tiny_models["policy"]), generation=["localhost:1"],
                                          reward="localhost:2", prompts=tiny_models["prompts"], output_dir=tmp_path))
        assert trainer.step == int(newest.name.removeprefix("step-")) and trainer.history[-1]["step"] == trainer.step
        restored = AutoModelForCausalLM.from_pretrained(newest / "policy").state_dict()
        assert restored.keys() == policy.keys() and all(torch.equal(restored[k], t) for k, t in policy.items())
        resumed_steps.append(trainer.step)
    assert resumed_steps == sorted(resumed_steps) and len(set(resumed_steps)) == 3  # each rerun went on
