"""A PPO run with its controls: the loop behind `rlhf-mesh train` and the LearnerService.

A step is collect -> train -> publish: rollouts from every generation replica, scored as they
arrive (rollouts.py); the PPO update (trainer.py); the new weights to every replica
(publisher.py). Steps run under a lock, so a checkpoint requested mid-step is written right
after that step and a pause takes effect between steps. Every step's scalars go to
TensorBoard, the console and whoever watches them (WatchMetrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

import grpc

from rlhf_mesh.clients.environment import AsyncEnvironmentClient
from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.services.learner.data import PromptDataset
from rlhf_mesh.services.learner.episodes import EpisodeCollector, SessionCollector
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.services.learner.publisher import PolicyPublisher
from rlhf_mesh.services.learner.report import Reporter, write_report
from rlhf_mesh.services.learner.retry import Retry, failure, learner_client
from rlhf_mesh.services.learner.rollouts import Collected, Rollout, RolloutCollector, component_means
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.services.learner.trainer import Trainer
from rlhf_mesh.v1 import learner_pb2

log = logging.getLogger(__name__)

STOPPED_EXIT_CODE = 143  # 128 + SIGTERM: not done, so a Job restarts it and the rerun resumes


class Run:
    """One PPO run: its steps (collect -> train -> publish), its controls, and its state as the
    LearnerService reports it."""

    def __init__(self, settings: LearnerSettings) -> None:
        self.settings = s = settings
        self.state = learner_pb2.LEARNER_STATE_STARTING
        self.message = ""
        self.dataset: PromptDataset | None = None
        self.eval_set: PromptDataset | None = None
        self.max_lag = s.max_policy_lag if s.async_generation else 0
        self.trainer: Trainer | None = None
        self.publisher: PolicyPublisher | None = None
        self.reward: AsyncRewardClient | None = None
        self.environment: AsyncEnvironmentClient | None = None
        self._prefetched: asyncio.Task[Collected] | None = None  # the next step's rollouts, in async mode
        self.samples: list[dict] = []  # the last step's samples to log (log_samples_steps)
        self._tokenizer = None
        self.metrics: list[learner_pb2.WatchMetricsResponse] = []
        self.last_checkpoint: tuple[Path, int] | None = None
        self.changed = asyncio.Condition()  # notified on every new step and state change
        self.running = asyncio.Event()  # cleared while paused
        if not settings.start_paused:
            self.running.set()
        self.stopping = asyncio.Event()  # SIGTERM: checkpoint after the step in progress and end
        self._lock = asyncio.Lock()

    def stop(self) -> None:
        """End the loop after the step in progress, with a checkpoint to resume from (SIGTERM)."""
        self.stopping.set()
        self.running.set()  # a paused run stops at once

    @property
    def stopped(self) -> bool:
        """Ended by stop() before its last step: the process should exit non-zero (143) to be rerun."""
        return self.stopping.is_set() and self.step < self.settings.steps

    @property
    def step(self) -> int:
        return self.trainer.step if self.trainer is not None else 0

    @property
    def version(self) -> int:
        """The policy version of the learner's current weights, as the replicas serve it."""
        return self.publisher.version(self.step) if self.publisher is not None else 0

    @property
    def done(self) -> bool:
        """Finished, failed, or stopped with its checkpoint written."""
        return self.state in (learner_pb2.LEARNER_STATE_FINISHED, learner_pb2.LEARNER_STATE_FAILED,
                              learner_pb2.LEARNER_STATE_STOPPED)

    async def start(self) -> None:
        """Load the models and connect to the services; every replica serves the learner's weights then."""
        s = self.settings
        s.output_dir.mkdir(parents=True, exist_ok=True)
        if s.environment is not None:  # every row is a task
            self.dataset = await asyncio.to_thread(PromptDataset.load_tasks, s.prompts, s.seed)
            if s.eval_prompts is not None:
                self.eval_set = await asyncio.to_thread(PromptDataset.load_tasks, s.eval_prompts, s.seed)
        else:
            if s.prompts is not None:  # none with rollout_source sessions
                self.dataset = await asyncio.to_thread(PromptDataset.load, s.prompts, s.prompt_field,
                                                       s.messages_field, s.seed, s.reference_field)
            if s.eval_prompts is not None:
                self.eval_set = await asyncio.to_thread(PromptDataset.load, s.eval_prompts, s.prompt_field,
                                                        s.messages_field, s.seed, s.reference_field)
        self.trainer = await asyncio.to_thread(Trainer, s)
        self.metrics = [  # a resumed run replays the steps of its checkpoint too
            learner_pb2.WatchMetricsResponse(step=int(h["step"]), policy_version=int(h["policy/version"]),
                                             scalars={k: v for k, v in h.items() if k != "step"})
            for h in self.trainer.history
        ]
        self.publisher = PolicyPublisher(s, self.trainer.push_weights, keep_snapshots=self.max_lag > 0)
        if s.environment_service is not None:
            self.environment = learner_client(AsyncEnvironmentClient, s.environment_service, s)
            try:
                served = await self.environment.list_environments(timeout_s=s.services_wait_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as err:
                raise LearnerError(f"cannot use the environment service {s.environment_service}: "
                                   f"{failure(err)}") from None
            names = [e.name for e in served.environments]
            if s.environment is not None and s.environment not in names:
                raise LearnerError(f"environment: {s.environment!r} is not served by {s.environment_service} "
                                   f"(it serves {', '.join(names)})")
        if s.environment is None and s.reward is not None:
            self.reward = learner_client(AsyncRewardClient, s.reward, s)
            try:
                await self.reward.list_models(timeout_s=s.services_wait_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as err:
                raise LearnerError(f"cannot use the reward service {s.reward}: {failure(err)}") from None
        await self.publisher.connect(self.step)

    async def run_step(self) -> dict[str, float]:
        """Collect, train, publish version step+1; returns the step's scalars.

        Async mode starts collecting the next step's rollouts before this step trains, so
        they come from the policy this step starts from (one version behind the one they
        train): generation overlaps training, and no rollout is more than max_policy_lag
        versions older than the step that trains on it (the generator enforces it too).
        """
        s = self.settings
        started = time.perf_counter()
        pending = self._prefetched or self._collect(self.step)
        self._prefetched = None
        collected = await pending
        waited = time.perf_counter() - started
        lags = [self.version - r.policy_version_start for r in collected.rollouts]
        if max(lags) > self.max_lag or min(lags) < 0:  # never train on what the bound excludes
            versions = sorted({r.policy_version_start for r in collected.rollouts})
            raise LearnerError(f"rollouts of policy versions {versions} at version {self.version}: "
                               f"outside max_policy_lag={self.max_lag}")
        if s.async_generation and self.step + 1 < s.steps:
            self._prefetched = self._collect(self.step + 1)
        scalars = await asyncio.to_thread(self.trainer.train, collected.rollouts)
        if s.log_samples_steps and (self.step + 1) % s.log_samples_steps == 0:
            try:
                self.samples = await asyncio.to_thread(self._samples, collected.rollouts, self.step + 1)
            except Exception:  # what is only logged never fails the step
                log.exception("the step's samples could not be logged")
        pushed = time.perf_counter()
        push_report = await self.publisher.publish(self.version + 1)
        self.trainer.step += 1
        done = time.perf_counter()
        if s.eval_steps and self.step % s.eval_steps == 0:
            scalars.update(await self._evaluate())
        scalars.update({
            **collected.scalars,
            "time/generate_s": collected.generate_s, "time/score_s": collected.score_tail_s,
            "time/wait_rollouts_s": waited, "time/push_s": done - pushed, "time/step_s": done - started,
            "charts/samples_per_s": len(collected.rollouts) / (done - started),
            "policy/version": float(self.version),
            "push/sent_bytes": float(push_report.sent_bytes),
            "push/sent_fraction": push_report.sent_bytes / max(1, push_report.full_bytes),
            "push/delta_replicas": float(len(push_report.delta_replicas)),
            "async/lag_mean": sum(lags) / len(lags), "async/lag_max": float(max(lags)),
            **{f"async/lag_{k}_share": lags.count(k) / len(lags) for k in range(self.max_lag + 1)},
        })
        self.trainer.history.append({"step": float(self.step), **scalars})
        return scalars

    def _samples(self, rollouts: list[Rollout], step: int) -> list[dict]:
        """The first log_samples rollouts of a step as people read them: the prompt and the response
        as the model saw them (decoded, template and all), scores, advantage, end, policy versions."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.trainer.policy_path)
        chosen = list(zip(rollouts, self.trainer.sequence_advantages, strict=True))[:self.settings.log_samples]
        return [{"step": step, "prompt": self._tokenizer.decode(r.prompt_ids),
                 "response": self._tokenizer.decode(r.response_ids), "score": r.score, "components": r.components,
                 "advantage": advantage, "finish": "stop" if r.finished else "length",
                 "policy_versions": [r.policy_version_start, r.policy_version_end]} for r, advantage in chosen]

    async def _evaluate(self) -> dict[str, float]:
        """eval/*: one sample of every held-out prompt from the policy just published (with the same
        seeds each time, so evaluations differ only by the policy), scored like the rollouts."""
        s, started = self.settings, time.perf_counter()
        temperature = s.temperature if s.eval_temperature is None else s.eval_temperature
        collected = await self._collector(self.eval_set.prompts, self.eval_set.references, n=1, seed=s.seed,
                                          temperature=temperature, min_policy_version=self.version,
                                          prefix="eval/episodes").run()
        rollouts = collected.rollouts
        kl = {"eval/kl": await asyncio.to_thread(self.trainer.kl, rollouts)} if s.eval_kl and s.uses_reference else {}
        count = len(rollouts)
        return {
            **collected.scalars,
            "eval/reward_mean": sum(r.score for r in rollouts) / count, **kl,
            "eval/response_length": sum(len(r.response_ids) for r in rollouts) / count,
            "eval/eos_rate": sum(r.finished for r in rollouts) / count,
            **{f"eval/{name}": value for name, value in component_means(rollouts).items()},
            "time/eval_s": time.perf_counter() - started,
        }

    def _collect(self, step: int) -> asyncio.Task[Collected]:
        """Rollouts for `step` from a policy no older than the staleness bound allows."""
        return asyncio.create_task(self._gather(step))

    async def _gather(self, step: int) -> Collected:
        """The step's groups; with filter_groups (DAPO's dynamic sampling) only those whose metric
        varies, sampling batch_size more prompts a round (up to max_sampling_rounds) until
        batch_size are kept. A batch still short is filled with dropped groups that train nothing."""
        s, n = self.settings, self.settings.num_samples_per_prompt
        if s.rollout_source == "sessions":
            return await SessionCollector(
                self.environment, s.batch_size, wait_s=s.sessions_wait_s,
                min_policy_version=self.publisher.min_version(step, self.max_lag), reward_model=s.reward_model,
                timeout_s=s.rpc_timeout_s).run()
        seed = s.seed * 1_000_003 + step * s.rollouts_per_step
        options = dict(n=n, temperature=s.temperature,
                       min_policy_version=self.publisher.min_version(step, self.max_lag))
        collected = await self._collector(self.dataset.batch(step, s.batch_size),
                                          self.dataset.batch_references(step, s.batch_size), seed=seed,
                                          **options).run()
        if s.filter_groups is None:
            return collected
        if s.filter_groups != "score" and not any(s.filter_groups in r.components for r in collected.rollouts):
            names = sorted({name for r in collected.rollouts for name in r.components})
            raise LearnerError(f"filter_groups: no sample has a reward component {s.filter_groups!r} (there are: "
                               f"{', '.join(['score', *names])})")
        kept, dropped, seen, rounds, first = [], [], 0, 0, collected.scalars
        generate_s = score_s = 0.0
        while True:
            groups = [collected.rollouts[i:i + n] for i in range(0, len(collected.rollouts), n)]
            for group in groups:
                (kept if _varies(group, s.filter_groups) else dropped).append(group)
            seen, rounds = seen + len(groups), rounds + 1
            generate_s, score_s = generate_s + collected.generate_s, score_s + collected.score_tail_s
            if len(kept) >= s.batch_size or rounds == s.max_sampling_rounds:
                break
            prompts, references = self.dataset.more(step, rounds, s.batch_size)
            collected = await self._collector(prompts, references, seed=seed + rounds * 1_000_000_007,
                                              **options).run()
        filled = max(0, s.batch_size - len(kept))
        if filled:
            log.warning("filter_groups: %d of %d groups varied in %d rounds; %d dropped groups fill the batch "
                        "and train nothing", len(kept), seen, rounds, filled)
        rollouts = []
        for index, group in enumerate(kept[:s.batch_size] + dropped[:filled]):
            for rollout in group:
                rollout.prompt_index = index
                rollout.trains = index < s.batch_size - filled
                rollouts.append(rollout)
        return Collected(rollouts, generate_s=generate_s, score_tail_s=score_s, scalars={
            **first, "sampling/rounds": float(rounds), "sampling/kept_group_rate": len(kept) / seen,
            "sampling/filled_groups": float(filled)})

    def _collector(self, prompts: list, references: list, *, n: int, seed: int, temperature: float,
                   min_policy_version: int, prefix: str = "episodes") -> RolloutCollector | EpisodeCollector:
        """Single-turn samples scored by the reward service, or an environment's episodes."""
        s = self.settings
        if s.environment is not None:
            return EpisodeCollector(
                self.environment, s.environment, prompts, n=n, max_tokens=s.response_length, temperature=temperature,
                seed=seed, min_policy_version=min_policy_version, max_turns=s.max_turns,
                max_episode_tokens=s.max_episode_tokens, reward_model=s.reward_model, timeout_s=s.rpc_timeout_s,
                retry=Retry(attempts=s.replica_retries), prefix=prefix)
        return RolloutCollector(
            self.publisher.generators, self.reward, prompts, n=n, max_tokens=s.response_length,
            temperature=temperature, seed=seed, min_policy_version=min_policy_version, reward_model=s.reward_model,
            timeout_s=s.rpc_timeout_s, references=references, retry=Retry(attempts=s.replica_retries),
            repair=self.publisher.repair)

    async def loop(self) -> None:
        """Every step, then a final checkpoint, the plot and the summary; FAILED on an error."""
        s = self.settings
        reporter = Reporter(s.output_dir, s.steps, self.step, s.report_to, s.wandb_project, s.run_name,
                            config=s.model_dump(mode="json"))
        try:
            while self.step < s.steps:
                if not self.running.is_set():
                    await self._set_state(learner_pb2.LEARNER_STATE_PAUSED)
                    await self.running.wait()
                if self.stopping.is_set():
                    path, step = await self.checkpoint()
                    log.warning("stopped at step %d (checkpoint %s); rerun the command to go on", step, path)
                    await self._set_state(learner_pb2.LEARNER_STATE_STOPPED, f"stopped at step {step}; rerun to resume")
                    return
                await self._set_state(learner_pb2.LEARNER_STATE_RUNNING)
                if self._evaluate_first():
                    scalars = {**await self._evaluate(), "policy/version": float(self.version)}
                    self.trainer.history.append({"step": 0.0, **scalars})
                    reporter.log(0, scalars)
                    await self._record(scalars)
                async with self._lock:
                    scalars = await self.run_step()
                reporter.step(self.step, scalars)
                if self.samples:
                    reporter.samples(self.step, self.samples)
                    self.samples = []
                await self._record(scalars)
                if s.save_steps and self.step % s.save_steps == 0:
                    await self.checkpoint()
            await self.checkpoint()
            png, table = await asyncio.to_thread(write_report, self.trainer.history, s.output_dir)
            print(table, flush=True)
            print(f"plot: {png}\ntensorboard: {s.output_dir / 'tensorboard'}\n"
                  f"checkpoint: {self.last_checkpoint[0]}", flush=True)
            await self._set_state(learner_pb2.LEARNER_STATE_FINISHED)
        except LearnerError as err:
            log.error("training failed at step %d: %s", self.step + 1, err)
            await self._set_state(learner_pb2.LEARNER_STATE_FAILED, f"step {self.step + 1}: {err}")
            raise
        except Exception as err:
            log.exception("training failed at step %d", self.step + 1)
            await self._set_state(learner_pb2.LEARNER_STATE_FAILED, f"step {self.step + 1}: {err}")
            raise
        finally:
            reporter.close()

    def _evaluate_first(self) -> bool:
        """Whether the starting policy is evaluated now: before the first step, once (a run resumed
        from a checkpoint taken at step 0 has it in its history)."""
        s = self.settings
        return (s.eval_before_training and bool(s.eval_steps) and self.eval_set is not None and self.step == 0
                and not any(h["step"] == 0 for h in self.trainer.history))

    async def checkpoint(self) -> tuple[Path, int]:
        """Write a checkpoint between steps; returns its path and step."""
        async with self._lock:
            if self.last_checkpoint is None or self.last_checkpoint[1] != self.step:
                path = await asyncio.to_thread(self.trainer.save_checkpoint)
                self.last_checkpoint = (path, self.step)
                log.info("checkpoint: %s", path)
            return self.last_checkpoint

    async def close(self) -> None:
        """Release the clients, and the follower ranks: the run has ended."""
        if self._prefetched is not None:
            self._prefetched.cancel()
            with contextlib.suppress(asyncio.CancelledError, LearnerError):
                await self._prefetched
        if self.trainer is not None:
            await asyncio.to_thread(self.trainer.close)
        for client in (self.publisher, self.reward, self.environment):
            if client is not None:
                await client.close()

    async def _record(self, scalars: dict[str, float]) -> None:
        self.metrics.append(learner_pb2.WatchMetricsResponse(
            step=self.step, policy_version=self.version, scalars=scalars, wall_time_unix_s=time.time(),
        ))
        async with self.changed:
            self.changed.notify_all()

    async def _set_state(self, state: learner_pb2.LearnerState, message: str = "") -> None:
        if state != self.state or message != self.message:
            self.state, self.message = state, message
            async with self.changed:
                self.changed.notify_all()


def _varies(group: list[Rollout], metric: str) -> bool:
    """Whether a group's samples scored differently on `metric` (the raw score, or a component)."""
    values = [r.score if metric == "score" else r.components.get(metric) for r in group]
    values = [v for v in values if v is not None]
    return len(values) > 1 and max(values) > min(values)


def follow(settings: LearnerSettings) -> int:
    """A rank other than 0 under torchrun: trains its shares of the leader's steps until the run ends."""
    Trainer(settings).follow()
    return 0


async def train(settings: LearnerSettings) -> int:
    """`rlhf-mesh train`: the run without a server."""
    run = Run(settings)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, run.stop)
    try:
        await run.start()
        await run.loop()
    finally:
        await run.close()
    return STOPPED_EXIT_CODE if run.stopped else 0
