"""Weight push: in-band gRPC and collective (gloo) pushes into a running GenerationService.

    python benchmarks/weight_push.py [--model DIR] [--pushes 3]

Without --model it builds the ~100M-parameter `base` policy; the service serves it in
bfloat16 and every push carries all its tensors in bfloat16. Measured in this one run:
- in-band: `PushWeights` over gRPC, effective GB/s = bytes / whole call (transfer,
  verification and apply included);
- collective: `PushWeightsCollective` with the bytes broadcast over gloo, whole call;
- raw gloo: a plain broadcast of the same tensors to one other process (the baseline).
Prints bytes, seconds, GB/s, the split between transfer, verification and apply, and how
long generation was paused per update.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlhf_mesh.clients.generation import GenerationClient
from rlhf_mesh.clients.push import CollectiveSender
from rlhf_mesh.weights import gloo_group

from common import free_port, server


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
    with server([sys.executable, "-m", "rlhf_mesh", "serve", "generation", "--model", model, "--dtype", "bfloat16",
                 "--max-model-len", "512", "--metrics-port", "0", "--log-level", "WARNING"]) as address, \
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
    gloo = raw_gloo(list(weights.values()), args.pushes)

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


if __name__ == "__main__":
    main()
