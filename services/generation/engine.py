"""vLLM's AsyncLLM behind the GenerationService: token ids in, finished samples out.

Each sample is its own engine request (n=1), as vLLM fans out n>1 itself; that lets
every sample stream the moment it finishes. vLLM labels every
generated token with the weight version that produced it; those labels give a sample's
policy_version_start and policy_version_end. With LoRA enabled, a pushed adapter is loaded as
its own vLLM LoRA request (id = its policy version): new samples use the newest one, a running
sample keeps the one it started with, and an adapter no sample uses any more is unloaded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge, Histogram
from vllm import SamplingParams
from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput, WeightVersionSpan
from vllm.platforms import current_platform
from vllm.utils.async_utils import merge_async_iterators
from vllm.v1.engine.async_llm import AsyncLLM

from rlhf_mesh.services.generation.prompts import Limits, Plan
from rlhf_mesh.services.generation.settings import GenerationSettings
from rlhf_mesh.services.generation.staging import WeightRejected
from rlhf_mesh.services.generation.weight_transfer import REJECTED
from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import TORCH_DTYPES, CheckpointNames

log = logging.getLogger(__name__)

PROMPT_TOKENS = Counter("rlhf_mesh_generation_prompt_tokens_total", "Prompt tokens of admitted samples.")
GENERATED_TOKENS = Counter("rlhf_mesh_generation_generated_tokens_total", "Tokens of streamed samples.")
SAMPLES = Counter("rlhf_mesh_generation_samples_total", "Samples streamed, by finish reason.", ["finish_reason"])
FIRST_SAMPLE_SECONDS = Histogram(
    "rlhf_mesh_generation_time_to_first_sample_seconds", "From admission to the first finished sample.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
QUEUED = Gauge("rlhf_mesh_generation_queued_samples", "Samples admitted and not finished.")
WAITING = Gauge("rlhf_mesh_generation_waiting_calls", "Generate calls waiting for their min_policy_version.")
POLICY_VERSION = Gauge("rlhf_mesh_generation_policy_version", "Policy version being served.")

_FINISH = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "abort": generation_pb2.FINISH_REASON_ABORT,
}


class QueueFull(Exception):
    """More samples than max_queued_samples would be in flight."""


class PolicyEngine:
    """The served policy: the vLLM engine, its policy version and the admission bound."""

    def __init__(self, settings: GenerationSettings, path: str) -> None:
        self.settings = settings
        self.path = path  # the policy's local folder (settings.model may be a hub id)
        self.llm: AsyncLLM | None = None
        self.version = 0
        self.version_changed = asyncio.Condition()
        self.in_group = False  # the workers joined a sender's gloo group (join_group)
        self.queued = 0
        self.update_lock = asyncio.Lock()  # one weight update at a time
        self._session: asyncio.Future[tuple[float, float, float]] | None = None  # the vLLM update session
        self.broken = ""  # why the weights can no longer be trusted (a failed apply)
        self.adapter: LoRARequest | None = None  # the pushed LoRA adapter new samples use
        self._adapter_users: collections.Counter[int] = collections.Counter()  # running samples per adapter
        self._unloading: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Start the engine (in a thread: it blocks for the whole load) and run one warm-up generation."""
        kwargs = self.settings.engine_kwargs(self.path)
        if current_platform.is_cpu():
            # A seeded request whose prefill is split over steps kills vLLM's CPU worker (it rewinds
            # the request's torch.Generator by an offset, which CPU generators do not have): prefill
            # each prompt whole.
            kwargs.setdefault("enable_chunked_prefill", False)
        args = AsyncEngineArgs(**kwargs)
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        await self.llm.update_weight_version(str(self.version))
        POLICY_VERSION.set(self.version)
        config = self.llm.model_config
        self.dtype = config.dtype
        self.workers = self.llm.vllm_config.parallel_config.world_size
        self.names = CheckpointNames(self.path)  # what a push may name its tensors
        self.layout = self.names.layout
        self.tokenizer = self.llm.get_tokenizer()
        self.limits = Limits(
            max_model_len=config.max_model_len, vocab_size=config.get_vocab_size(),
            max_samples_per_prompt=self.settings.max_samples_per_prompt,
            max_request_prompts=self.settings.max_request_prompts,
            max_prompt_bytes=self.settings.max_prompt_bytes,
        )
        warm = Plan([[self.tokenizer.bos_token_id or 0] * 4], 1, 0, SamplingParams(max_tokens=4, logprobs=0))
        self.admit(warm)
        async for _ in self.generate(warm, stream_tokens=False):
            pass

    async def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
        if self.adapter is not None:  # an older one still in use is left to remove_orphans at the next start
            shutil.rmtree(self.adapter.lora_path, ignore_errors=True)

    def info(self) -> generation_pb2.GetModelInfoResponse:
        tok = self.tokenizer
        config_eos = self.llm.model_config.hf_config.eos_token_id  # an id, a list of ids or None
        eos = {tok.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])} - {None}
        return generation_pb2.GetModelInfoResponse(
            model_id=self.settings.model, policy_version=self.version,
            max_model_len_tokens=self.limits.max_model_len, vocab_size=self.limits.vocab_size,
            eos_token_ids=sorted(eos), pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, has_chat_template=bool(getattr(tok, "chat_template", None)),
            dtype=str(self.llm.model_config.dtype).removeprefix("torch."),
            max_samples_per_prompt=self.settings.max_samples_per_prompt, worker_count=self.workers,
            max_lora_rank=self.max_lora_rank,
        )

    @property
    def max_lora_rank(self) -> int:
        """The largest adapter rank served; 0 without LoRA."""
        return self.settings.max_lora_rank if self.settings.enable_lora else 0

    async def wait_for_version(self, version: int, timeout_s: float) -> bool:
        """Whether `version` or a newer one is served within `timeout_s`."""
        if self.version >= version:
            return True
        with WAITING.track_inprogress():
            async with self.version_changed:
                try:
                    await asyncio.wait_for(self.version_changed.wait_for(lambda: self.version >= version), timeout_s)
                except TimeoutError:
                    return False
        return True

    @property
    def updating(self) -> bool:
        """An update holds the lock, or its vLLM session is still running after its caller left."""
        return self.update_lock.locked() or (self._session is not None and not self._session.done())

    async def join_group(self, master_address: str, master_port: int, world_size: int, rank_offset: int,
                         timeout_s: float) -> None:
        """Every worker joins the sender's gloo group (services/generation/weight_transfer.py)."""
        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=dict(
            master_address=master_address, master_port=master_port, world_size=world_size,
            rank_offset=rank_offset, timeout_s=timeout_s)))
        self.in_group = True

    async def apply_staged(self, path: str, load_as: dict[str, str], version: int) -> tuple[float, float, float]:
        """Serve the verified tensors of a staging file as `version` (see `_run_update`)."""
        return await self._run_update({"path": path, "load_as": load_as}, version)

    async def receive_collective(self, manifest: generation_pb2.WeightManifest, load_as: dict[str, str]
                                 ) -> tuple[float, float, float]:
        """Receive the manifest's tensors by broadcast in the workers, check them, serve them (see `_run_update`)."""
        specs = manifest.tensors
        return await self._run_update(dict(
            names=[t.name for t in specs], shapes=[list(t.shape) for t in specs],
            dtypes=[str(TORCH_DTYPES[t.dtype]).removeprefix("torch.") for t in specs],
            digests=[t.blake3_digest.hex() for t in specs], load_as=load_as), manifest.policy_version)

    async def _run_update(self, update_info: dict, version: int) -> tuple[float, float, float]:
        """Stage an update in the workers, then pause, apply, label it `version` and resume.

        Hold `update_lock`. Staging can fail (WeightRejected for the caller's tensors) and
        leaves the served weights as they were. The session runs to its end even when the
        caller is cancelled: vLLM's workers would otherwise keep it open and refuse every later
        update ("start_weight_update called while a weight update is already active"), and a
        push that got this far has all its bytes. Returns (stage_ms, apply_ms, paused_ms).
        """
        self._session = asyncio.ensure_future(self._update(update_info, version))
        return await asyncio.shield(self._session)

    async def _update(self, update_info: dict, version: int) -> tuple[float, float, float]:
        started = time.perf_counter()
        await self.llm.start_weight_update()
        try:
            await self.llm.update_weights(WeightTransferUpdateRequest(update_info))
        except Exception as err:
            if REJECTED in str(err):
                raise WeightRejected(str(err).split(REJECTED, 1)[1].splitlines()[0]) from None
            raise
        staged = time.perf_counter()
        paused_ms = await self._commit(version)
        return (staged - started) * 1000, (time.perf_counter() - staged) * 1000, paused_ms

    async def _commit(self, version: int) -> float:
        """In-flight samples freeze and resume on the new weights (their KV cache is recomputed)."""
        await self.llm.pause_generation(mode="keep", clear_cache=True)
        paused = time.perf_counter()
        try:
            await self.llm.finish_weight_update(str(version))
        except Exception as err:  # the model may be half-written: stay paused, refuse generation
            self.broken = f"applying policy version {version} failed: {err}"
            raise
        await self.llm.resume_generation()
        async with self.version_changed:
            self.version = version
            self.version_changed.notify_all()
        POLICY_VERSION.set(version)
        return (time.perf_counter() - paused) * 1000

    async def serve_adapter(self, folder: str, version: int) -> float:
        """Load the adapter in `folder` (adapter_folder) in every worker and serve it as `version`
        to new samples; the previous one is unloaded once no sample uses it. Hold `update_lock`.
        Raises WeightRejected when vLLM refuses it (nothing changed then). Returns the load's ms."""
        started = time.perf_counter()
        request = LoRARequest(f"policy-v{version}", version, folder)
        try:
            await self.llm.add_lora(request)
        except Exception as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise WeightRejected(f"the adapter does not load: {err}") from None
        previous = self.adapter
        async with self.version_changed:
            self.adapter, self.version = request, version
            self.version_changed.notify_all()
        POLICY_VERSION.set(version)
        self._release_adapter(previous, 0)
        return (time.perf_counter() - started) * 1000

    def _release_adapter(self, adapter: LoRARequest | None, samples: int) -> None:
        """`samples` samples are done with `adapter`; an old one nothing uses is unloaded."""
        if adapter is None:
            return
        self._adapter_users[adapter.lora_int_id] -= samples
        if adapter is not self.adapter and self._adapter_users[adapter.lora_int_id] <= 0:
            del self._adapter_users[adapter.lora_int_id]
            task = asyncio.ensure_future(self._unload(adapter))
            self._unloading.add(task)
            task.add_done_callback(self._unloading.discard)

    async def _unload(self, adapter: LoRARequest) -> None:
        try:
            await self.llm.remove_lora(adapter.lora_int_id)
        except Exception:  # the engine is shutting down: the folder goes with the process (remove_orphans)
            log.warning("could not unload the adapter of policy version %d", adapter.lora_int_id, exc_info=True)
        shutil.rmtree(adapter.lora_path, ignore_errors=True)

    def admit(self, plan: Plan) -> None:
        """Reserve queue room for the plan's samples (released by generate); raises QueueFull."""
        if self.queued + plan.num_samples > self.settings.max_queued_samples:
            raise QueueFull(
                f"{self.queued} samples queued, {plan.num_samples} more exceed "
                f"max_queued_samples={self.settings.max_queued_samples}"
            )
        self.queued += plan.num_samples
        QUEUED.set(self.queued)
        PROMPT_TOKENS.inc(sum(len(ids) for ids in plan.prompt_ids) * plan.n)

    async def generate(self, plan: Plan, stream_tokens: bool) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Every sample of an admitted plan, each as it finishes (with deltas when stream_tokens).

        Closing the iterator (a cancelled call) aborts the samples still running in the engine.
        """
        progress: dict[tuple[int, int], SampleProgress] = {}
        async for prompt_index, sample_index, output in self.outputs(plan):
            sample = progress.setdefault((prompt_index, sample_index), SampleProgress())
            completion = output.outputs[0]
            new = sample.add(completion)
            if stream_tokens and new:
                yield generation_pb2.GenerateResponse(delta=generation_pb2.TokenDelta(
                    prompt_index=prompt_index, sample_index=sample_index, token_ids=new, text=completion.text))
            if output.finished:
                start, end = sample.version_span()
                yield generation_pb2.GenerateResponse(sample=generation_pb2.Sample(
                    prompt_index=prompt_index, sample_index=sample_index,
                    prompt_token_ids=plan.prompt_ids[prompt_index],
                    completion_token_ids=sample.token_ids, completion_logprobs=sample.logprobs, text=sample.text,
                    finish_reason=_FINISH.get(completion.finish_reason, generation_pb2.FINISH_REASON_UNSPECIFIED),
                    policy_version_start=start, policy_version_end=end,
                ))

    async def outputs(self, plan: Plan) -> AsyncIterator[tuple[int, int, RequestOutput]]:
        """vLLM's outputs of every sample of an admitted plan (one engine request each), as they
        come, with the sample's prompt and sample index; the plan's params say whether they are
        deltas or final only. Each sample's last output has the policy versions of its tokens
        (`SampleProgress.versions`). Closing the iterator aborts the samples still running."""
        request_id = uuid.uuid4().hex
        inputs = self.llm.renderer.render_cmpl([{"prompt_token_ids": ids} for ids in plan.prompt_ids])
        adapter = self.adapter  # every sample of the call keeps it to its end
        samples = [
            self._sample(f"{request_id}-{p}-{s}", engine_input, plan.sample_params(p, s), p, s, adapter)
            for p, engine_input in enumerate(inputs)
            for s in range(plan.n)
        ]
        started, first = time.perf_counter(), True
        remaining = len(samples)
        if adapter is not None:
            self._adapter_users[adapter.lora_int_id] += len(samples)
        try:
            async for _, event in merge_async_iterators(*samples):
                if event[2].finished:
                    remaining -= 1
                    self._release(1)
                    if first:
                        FIRST_SAMPLE_SECONDS.observe(time.perf_counter() - started)
                        first = False
                yield event
        finally:
            self._release(remaining)
            self._release_adapter(adapter, len(samples))

    def _release(self, count: int) -> None:
        self.queued -= count
        QUEUED.set(self.queued)

    async def _sample(self, request_id: str, engine_input: dict, params: SamplingParams, prompt_index: int,
                      sample_index: int, adapter: LoRARequest | None) -> AsyncIterator[tuple[int, int, RequestOutput]]:
        tokens = 0
        async for output in self.llm.generate(engine_input, params, request_id, lora_request=adapter):
            completion: CompletionOutput = output.outputs[0]
            tokens += len(completion.token_ids)  # deltas add up; a final-only output is the whole
            if output.finished:
                spans = completion.weight_versions or []
                if adapter is not None:  # full pushes are refused while an adapter is served
                    spans = [WeightVersionSpan(str(adapter.lora_int_id), 0, tokens)]
                elif not spans:
                    spans = [WeightVersionSpan(str(self.version), 0, tokens)]
                completion.weight_versions = spans
                GENERATED_TOKENS.inc(tokens)
                SAMPLES.labels(completion.finish_reason).inc()
            yield prompt_index, sample_index, output


class SampleProgress:
    """One sample's tokens, log-probs of its sampled tokens and text so far, from vLLM's outputs
    (deltas or final), their log-probs where asked for (logprobs >= 0), and the policy version of
    each token."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, Logprob]] = []
        self.text = ""
        self.versions: list[int] = []

    def add(self, completion: CompletionOutput) -> list[int]:
        """Take one output of the sample; returns its new token ids."""
        new = list(completion.token_ids)
        self.token_ids += new
        if completion.logprobs is not None:  # asked for (an OpenAI call that records nothing may not)
            self.logprobs += [step[token].logprob for token, step in zip(new, completion.logprobs, strict=True)]
            self.top_logprobs += completion.logprobs
        self.text += completion.text
        for span in completion.weight_versions or []:
            self.versions += [int(span.version)] * (span.end - span.start)
        return new

    def version_span(self) -> tuple[int, int]:
        """The policy versions of the sample's first and last token."""
        return (self.versions[0], self.versions[-1]) if self.versions else (0, 0)
