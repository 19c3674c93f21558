"""`rlhf-mesh train-rm`: a reward model from (prompt, chosen, rejected) pairs.

Bradley–Terry, as TRL's RewardTrainer: loss = -log sigmoid(r(chosen) - r(rejected) - margin)
(margin: a pair's optional "margin" field, else 0) on a `*ForSequenceClassification` model
with one label, initialised from `base` (a reward model, or a causal LM whose new score
head starts at random). The output is that standard format (pad_token_id set, tokenizer and
chat template saved), loadable by transformers, TRL and the RewardService. Inputs are tokenized by the
RewardService's own rule (services/reward/reward_model.py), so the model is trained on exactly
what it will score. A seeded share of the pairs is held out; the accuracy on it (chosen
scored above rejected) is printed and written beside the model in `train_rm.json`. Loss and
accuracy go to TensorBoard under `OUT/tensorboard`; a progress bar shows on a terminal.
Settings as for every command: flags, RLHF_MESH_TRAIN_RM_* variables, `--config FILE`.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from pydantic import Field, FilePath
from pydantic_settings import SettingsConfigDict
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_mesh.services.reward.reward_model import InvalidSample, Tokenization, right_padded
from rlhf_mesh.settings import FileSettings
from rlhf_mesh.v1 import reward_pb2

log = logging.getLogger(__name__)


class TrainRmSettings(FileSettings):
    """Train a reward model (Bradley-Terry). Settings: flags, RLHF_MESH_TRAIN_RM_* variables, --config FILE."""

    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_TRAIN_RM_")

    preferences: FilePath = Field(
        description="JSONL of {prompt, chosen, rejected[, margin]} (`rlhf-mesh feedback export`)")
    base: str = Field(description="model folder to start from (a reward model or a causal LM)")
    out: Path = Field(description="folder for the trained reward model")
    epochs: int = Field(3, ge=1, description="passes over the training pairs")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate")
    batch_size: int = Field(16, ge=1, description="pairs per optimizer step")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of pairs held out")
    max_length: int | None = Field(None, gt=0, description="longest input in tokens; default: the model's")
    seed: int = Field(0, description="the held-out split, the order of the pairs and torch")


def read_pairs(path: Path) -> list[tuple[str, str, str, float]]:
    """(prompt, chosen, rejected, margin) per JSONL line, as `rlhf-mesh feedback export` writes them."""
    pairs = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((row["prompt"], row["chosen"], row["rejected"], float(row.get("margin", 0.0))))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a {{prompt, chosen, rejected}} object ({err})") from None
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


Pair = tuple[list[int], list[int], float]  # chosen ids, rejected ids, margin


def _margins(model, pairs: list[Pair], pad_id: int) -> torch.Tensor:
    """r(chosen) - r(rejected) for each pair, in one forward over both."""
    ids, mask = right_padded([c for c, _, _ in pairs] + [r for _, r, _ in pairs], pad_id)
    scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    return scores[: len(pairs)] - scores[len(pairs):]


def accuracy(model, pairs: list[Pair], pad_id: int, batch_size: int) -> float:
    if not pairs:
        return float("nan")
    with torch.no_grad():
        wins = sum(int((_margins(model, pairs[i : i + batch_size], pad_id) > 0).sum())
                   for i in range(0, len(pairs), batch_size))
    return wins / len(pairs)


def train(s: TrainRmSettings) -> dict[str, float]:
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    tokenizer = AutoTokenizer.from_pretrained(s.base)
    model = AutoModelForSequenceClassification.from_pretrained(s.base, num_labels=1, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad_id = model.config.pad_token_id
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    tokenization = Tokenization(tokenizer, min(s.max_length or limit, limit), "left")

    def encode(prompt: str, response: str) -> list[int]:
        sample = reward_pb2.ScoreSample(text=reward_pb2.PromptResponse(prompt=prompt, response=response))
        return tokenization.encode(0, sample).ids

    try:
        encoded = [(encode(p, c), encode(p, r), m) for p, c, r, m in read_pairs(s.preferences)]
    except InvalidSample as err:
        raise ValueError(f"{s.preferences}: {err.problem}") from None
    random.shuffle(encoded)
    held = int(len(encoded) * s.eval_fraction)
    held_out, train_pairs = encoded[:held], encoded[held:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.learning_rate)
    model.train()
    started = time.perf_counter()
    writer = SummaryWriter(str(s.out / "tensorboard"))
    batches = s.epochs * -(-len(train_pairs) // s.batch_size)
    bar = tqdm(total=batches, desc="train-rm", unit="batch", disable=not sys.stderr.isatty())
    losses: list[float] = []
    for epoch in range(s.epochs):
        random.shuffle(train_pairs)
        for i in range(0, len(train_pairs), s.batch_size):
            batch = train_pairs[i : i + s.batch_size]
            margins = _margins(model, batch, pad_id) - torch.tensor([m for _, _, m in batch])
            loss = -torch.nn.functional.logsigmoid(margins).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            writer.add_scalar("train/loss", losses[-1], len(losses))
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update(1)
        model.eval()
        held_out_accuracy = accuracy(model, held_out, pad_id, s.batch_size)
        model.train()
        writer.add_scalar("eval/accuracy", held_out_accuracy, epoch + 1)
        log.info("epoch %d/%d: loss %.4f, held-out accuracy %.3f", epoch + 1, s.epochs,
                 sum(losses[-10:]) / len(losses[-10:]), held_out_accuracy)
    bar.close()
    writer.close()
    model.eval()
    metrics = {
        "pairs": len(encoded), "train_pairs": len(train_pairs), "held_out_pairs": len(held_out),
        "train_accuracy": accuracy(model, train_pairs, pad_id, s.batch_size),
        "held_out_accuracy": accuracy(model, held_out, pad_id, s.batch_size),
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "seconds": time.perf_counter() - started,
    }
    s.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(s.out)
    tokenizer.save_pretrained(s.out)
    (s.out / "train_rm.json").write_text(json.dumps({**metrics, "base": s.base, "preferences": str(s.preferences),
                                                     "epochs": s.epochs, "learning_rate": s.learning_rate,
                                                     "seed": s.seed}, indent=2) + "\n")
    return metrics
