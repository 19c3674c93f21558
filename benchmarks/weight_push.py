"""Weight push: in-band gRPC, delta and collective (gloo) pushes into a running GenerationService.

    python benchmarks/weight_push.py [--model DIR] [--pushes 3]

Without --model it builds the ~100M-parameter `base` policy; the service serves it in
bfloat16 and every push carries all its tensors in bfloat16. Measured in this one run:
- in-band: `PushWeights` over gRPC, effective GB/s = bytes / whole call (transfer,
  verification and apply included);
- collective: `PushWeightsCollective` with the bytes broadcast over gloo, whole call;
- raw gloo: a plain broadcast of the same tensors to one other process (the baseline);
- delta: the weights after one real AdamW step (lr 1e-6, then 1e-5) on a language-model loss,
  pushed as a delta against the version before (hashing and encoding included), against a
  full in-band push of the same weights (hashing included) in the same run;
- catch-up: a second replica started with `--catch-up-from` the first pulls its weights
  (FetchWeights, verified and applied as a push), against a full in-band push of the same
  weights from this process to a third, fresh replica (how the learner repairs one);
- fan-out: the sender's CPU-seconds (every thread of this process: hashing, gRPC, gloo) for a
  full push to 3 replicas, against a push to 1, in-band and collective;
- adapter: a LoRA adapter (r 16 on every linear layer, as `lora_publish: adapter` sends it) to a
  replica started with `--enable-lora`, whole call (vLLM's add_lora included), against the
  full in-band push above (what `lora_publish: merged` sends).
Prints bytes, seconds, GB/s, the split between transfer, verification and apply, and how
long generation was paused per update.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlhf_mesh.clients.generation import GenerationClient
from rlhf_mesh.clients.push import CollectiveSender, send_update
from rlhf_mesh.weights import Snapshot, Update, gloo_group, prepare

from common import free_port, scrape_metric, server


def _receive(port: int, shapes: list[tuple[int, ...]], pushes: int) -> None:
    group = gloo_group("127.0.0.1", port, 1, 2, 120)
    for _ in range(pushes):
        for shape in shapes:
            group.broadcast(torch.empty(shape, dtype=torch.bfloat16), 0).wait()


def raw_gloo(tensors: list[torch.Tensor], pushes: int) -> list[float]:
    """Seconds per broadcast of all tensors from this process to one receiver."""
    port = free_port()
    receiver = multiprocessing.get_context("spawn").Process(
        target=_receive, args=(port, [tuple(t.shape) for t in tensors], pushes + 1))
    receiver.start()
    group = gloo_group("127.0.0.1", port, 0, 2, 120)
    seconds = []
    for i in range(pushes + 1):  # the first pass warms the connections
        started = time.perf_counter()
        for tensor in tensors:
            group.broadcast(tensor, 0).wait()
        if i:
            seconds.append(time.perf_counter() - started)
    receiver.join()
    return seconds


def perturbed(weights: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {name: t + (k * 1e-3) for name, t in weights.items()}


def optimizer_step(model_dir: str, base: dict[str, torch.Tensor], lr: float, seed: int) -> dict[str, torch.Tensor]:
    """The bf16 policy holding `base`, after one AdamW step on a next-token loss over random tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.load_state_dict(base, strict=False)  # a tied head is the embedding
    ids = torch.randint(5, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(model.parameters(), lr=lr).step()
    return {name: t.detach().clone() for name, t in model.state_dict().items() if name in base}


def delta_rows(client: GenerationClient, model_dir: str, weights: dict[str, torch.Tensor], version: int
               ) -> tuple[list[tuple[float, int, int, float, float, float]], Update]:
    """(lr, delta bytes, full bytes, delta seconds, full seconds, paused ms) after one optimizer step each;
    and the last push (a full one)."""
    first = prepare(weights, version)
    client.push(first.full)
    base: Snapshot = first.snapshot
    rows = []
    for seed, lr in enumerate((1e-6, 1e-5)):
        stepped = optimizer_step(model_dir, base.tensors, lr, seed)
        version += 1
        started = time.perf_counter()
        update = prepare(stepped, version, base)
        reply = client.push(update.delta)
        delta_s = time.perf_counter() - started
        version += 1
        started = time.perf_counter()
        full = prepare(stepped, version)  # the baseline: hashes every tensor and sends every byte
        client.push(full.full)
        full_s = time.perf_counter() - started
        rows.append((lr, update.delta.sent_bytes, full.full.sent_bytes, delta_s, full_s, reply.timings.paused_ms))
        base = full.snapshot
    return rows, full


def replica_args(model: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_mesh", "serve", "generation", "--model", model, "--dtype", "bfloat16",
            "--max-model-len", "512", "--log-level", "WARNING", *flags]


def fan_out(clients: list[GenerationClient], weights: dict[str, torch.Tensor], version: int, pushes: int
            ) -> tuple[dict[str, tuple[tuple[float, float], tuple[float, float]]], int]:
    """Median sender CPU-seconds (user, system) of a push (hashed once) to the first replica and to all
    of them, in-band (alternately) and collective (a group of one, then of all); and the next free
    version. On loopback the system part holds the receiver's half of TCP too."""
    cpu: dict[tuple[str, int], list[tuple[float, float]]] = {}

    def timed(transport: str, targets: list[GenerationClient], push) -> None:
        nonlocal version
        version += 1
        tensors = perturbed(weights, version)
        started = os.times()
        push(tensors, version)
        ended = os.times()
        cpu.setdefault((transport, len(targets)), []).append((ended.user - started.user, ended.system - started.system))

    def in_band(targets: list[GenerationClient]):
        def push(tensors, v):
            results = send_update([c.address for c in targets], prepare(tensors, v), 600)
            assert all(r.ok for r in results), [r.error for r in results]
        return push

    for _ in range(pushes):
        for targets in (clients[:1], clients):
            timed("in-band", targets, in_band(targets))
    for targets in (clients[:1], clients):
        version += 1  # above what the replicas left out of the last push serve
        sender = CollectiveSender(targets, "127.0.0.1", free_port(), 120)
        try:
            for _ in range(pushes):
                timed("collective", targets, sender.push)
        finally:
            sender.close()
    def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
        return min(runs, key=lambda r: abs(sum(r) - statistics.median(sum(x) for x in runs)))

    n = len(clients)
    return {t: (median(cpu[t, 1]), median(cpu[t, n])) for t in ("in-band", "collective")}, version


def adapter_pushes(model: str, pushes: int) -> list[tuple[int, float]]:
    """Bytes and seconds of each adapter push to a fresh LoRA-enabled replica (a new adapter each time)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_mesh.weights import full_push, lora_adapter_of

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    runs = []
    with server(replica_args(model, "--enable-lora", "--max-lora-rank", "16", "--metrics-port", "0")) as address, \
            GenerationClient(address, timeout_s=600) as client:
        for version in range(1, pushes + 2):  # the first warms the engine's LoRA path
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if "lora_B" in name:
                        parameter.normal_(0, 1e-3)
            started = time.perf_counter()
            tensors, adapter = lora_adapter_of(peft_model)  # as the learner's publisher: in the replica's dtype
            reply = client.push(full_push({n: t.to(torch.bfloat16) for n, t in tensors.items()}, version,
                                          adapter=adapter))
            runs.append((reply.received_bytes, time.perf_counter() - started))
    return runs[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="policy folder (default: build the `base` preset)")
    parser.add_argument("--pushes", type=int, default=3)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from rlhf_mesh.tiny_models import build

        model = str(build(Path(tempfile.mkdtemp()) / "models", preset="base")["policy"])
    from transformers import AutoModelForCausalLM

    weights = {k: v.to(torch.bfloat16) for k, v in AutoModelForCausalLM.from_pretrained(model).state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in weights.values())
    params = sum(t.numel() for t in weights.values())
    print(f"model {model}: {params / 1e6:.0f}M parameters, {size / 1e6:.0f} MB per push (bfloat16)", flush=True)

    rows = []
    with server(replica_args(model, "--metrics-port", "0")) as address, \
            GenerationClient(address, timeout_s=600) as client:
        version = 0
        for transport in ("grpc", "collective"):
            sender = CollectiveSender([client], "127.0.0.1", free_port(), 120) if transport == "collective" else None
            runs = []
            for _ in range(args.pushes):
                version += 1
                update = perturbed(weights, version)
                started = time.perf_counter()
                reply = sender.push(update, version)[0] if sender else client.push_weights(update, version)
                runs.append((time.perf_counter() - started, reply.timings))
            if sender:
                sender.close()
            rows.append((transport, runs))
        deltas, served = delta_rows(client, model, weights, version + 1)  # a full in-band push last: the peer keeps it
        metrics_port = free_port()
        with server(replica_args(model, "--catch-up-from", address, "--metrics-port", str(metrics_port))) as second, \
                server(replica_args(model, "--metrics-port", "0")) as third:
            catch_up_s = scrape_metric(metrics_port, "rlhf_mesh_generation_catch_up_seconds")
            with GenerationClient(second) as peer, GenerationClient(third, timeout_s=600) as other:
                caught_up = peer.model_info().policy_version == served.snapshot.version
                started = time.perf_counter()  # the baseline: the learner repairs a fresh replica (digests known)
                other.push(served.full)
                repair_s = time.perf_counter() - started
                sender_cpu, _ = fan_out([client, peer, other], weights, served.snapshot.version + 1, args.pushes)
    gloo = raw_gloo(list(weights.values()), args.pushes)
    adapters = adapter_pushes(model, args.pushes)

    print("| push | MB | seconds | GB/s | transfer ms | verify ms | apply ms | paused ms |")
    print("|---|---|---|---|---|---|---|---|")
    rates = {}
    for transport, runs in rows:
        seconds = statistics.median(s for s, _ in runs)
        t = runs[[s for s, _ in runs].index(seconds)][1]
        rates[transport] = size / seconds / 1e9
        print(f"| {transport} | {size / 1e6:.0f} | {seconds:.2f} | {rates[transport]:.2f} | {t.transfer_ms:.0f} | "
              f"{t.verify_ms:.0f} | {t.apply_ms:.0f} | {t.paused_ms:.0f} |")
    gloo_s = statistics.median(gloo)
    rates["gloo"] = size / gloo_s / 1e9
    print(f"| raw gloo broadcast (baseline) | {size / 1e6:.0f} | {gloo_s:.2f} | {rates['gloo']:.2f} | - | - | - | - |")
    print(f"in-band: {rates['grpc']:.2f} GB/s effective (target >= 0.4)")
    print(f"collective / raw gloo = {rates['collective'] / rates['gloo']:.2f} (target >= 0.5)")
    collective = [t.transfer_ms / 1000 for _, t in dict(rows)["collective"]]
    print(f"collective transfer phase (received and digests checked) / raw gloo = "
          f"{gloo_s / statistics.median(collective):.2f}")
    print(f"paused per update: max {max(t.paused_ms for _, runs in rows for _, t in runs):.0f} ms (target <= 1000)")
    print("\n| delta after one AdamW step | MB sent | of a full push | seconds | full push s | speed-up | "
          "effective GB/s | paused ms |")
    print("|---|---|---|---|---|---|---|---|")
    for lr, sent, full, delta_s, full_s, paused in deltas:
        print(f"| lr {lr:g} | {sent / 1e6:.1f} | {sent / full:.3f}x | {delta_s:.2f} | {full_s:.2f} | "
              f"{full_s / delta_s:.1f}x | {full / delta_s / 1e9:.2f} | {paused:.0f} |")
    lr, sent, full, delta_s, full_s, _ = deltas[0]
    print(f"delta at lr {lr:g}: {sent / full:.3f}x the bytes (target <= 0.05), {full_s / delta_s:.1f}x faster than a "
          "full in-band push (target >= 3)")
    in_band_s = size / rates["grpc"] / 1e9
    print(f"\ncatch-up of a fresh replica from its peer: {catch_up_s:.2f} s (it serves the peer's version: "
          f"{caught_up}); the learner's full in-band push to a fresh replica {repair_s:.2f} s: "
          f"{repair_s / catch_up_s:.2f}x (target >= 0.8); to a warm one {in_band_s:.2f} s: "
          f"{in_band_s / catch_up_s:.2f}x")
    for transport, (one, three) in sender_cpu.items():
        print(f"sender CPU-seconds of a full {transport} push (user + system): {sum(one):.2f} ({one[0]:.2f} + "
              f"{one[1]:.2f}) to 1 replica, {sum(three):.2f} ({three[0]:.2f} + {three[1]:.2f}) to 3: "
              f"{sum(three) / sum(one):.2f}x (target <= 1.5)")
    adapter_bytes, adapter_s = adapters[0][0], statistics.median(s for _, s in adapters)
    print(f"\nLoRA adapter push (r 16, every linear layer): {adapter_bytes / 1e6:.1f} MB, {adapter_s:.2f} s; "
          f"merged (a full in-band push) {size / 1e6:.0f} MB, {in_band_s:.2f} s: {adapter_bytes / size:.3f}x the "
          f"bytes (target <= 0.05), {adapter_s / in_band_s:.2f}x the seconds")


if __name__ == "__main__":
    main()
