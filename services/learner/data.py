"""The prompt dataset: JSONL or Parquet rows, a prompt text or chat messages per row.

The prompts of step k are a pure function of (seed, k): each pass over the data is its own
seeded permutation, so a resumed run draws exactly the prompts an uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_mesh.services.learner.errors import LearnerError

Prompt = str | list[dict[str, str]]


class DatasetError(LearnerError):
    """A dataset that cannot be used, with the file and row at fault."""


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"prompts: {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open() as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise DatasetError(f"{path}:{line_number}: not JSON ({err})") from None
    return rows


def _prompt(row: dict[str, Any], field: str, chat: bool, where: str) -> Prompt:
    if field not in row:
        raise DatasetError(f"{where}: no field {field!r} (fields: {sorted(row)})")
    value = row[field]
    if chat:
        if not (isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)):
            raise DatasetError(f"{where}: {field!r} must be a non-empty list of {{role, content}} messages")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: {field!r} must be a non-empty string")
    return value


def _reference(row: dict[str, Any], field: str, where: str) -> str | None:
    if field not in row:
        raise DatasetError(f"{where}: no field {field!r} (fields: {sorted(row)})")
    value = row[field]
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
        raise DatasetError(f"{where}: {field!r} must be a string or a number")
    return None if value is None else str(value)


class PromptDataset:
    """Prompts in file order, and the seeded batches of each step."""

    def __init__(self, prompts: Sequence[Prompt], seed: int = 0,
                 references: Sequence[str | None] | None = None) -> None:
        if not prompts:
            raise DatasetError("the prompt dataset is empty")
        self.prompts = list(prompts)
        self.references = list(references) if references is not None else [None] * len(self.prompts)
        self.seed = seed
        self._epoch, self._order = -1, np.arange(0)

    @classmethod
    def load(cls, path: Path, prompt_field: str = "prompt", messages_field: str | None = None,
             seed: int = 0, reference_field: str | None = None) -> PromptDataset:
        field = messages_field or prompt_field
        rows = _rows(path)
        references = None if reference_field is None else [
            _reference(row, reference_field, f"{path} row {i}") for i, row in enumerate(rows)]
        return cls([_prompt(row, field, messages_field is not None, f"{path} row {i}")
                    for i, row in enumerate(rows)], seed, references)

    @classmethod
    def load_tasks(cls, path: Path, seed: int = 0) -> PromptDataset:
        """An environment's tasks: each row whole, as JSON."""
        return cls([json.dumps(row) for row in _rows(path)], seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, step: int, batch_size: int) -> list[Prompt]:
        """The prompts of step `step` (0-based): positions step*batch_size onwards of the
        endless sequence of per-pass permutations."""
        return [self.prompts[i] for i in self._indices(step, batch_size)]

    def batch_references(self, step: int, batch_size: int) -> list[str | None]:
        """The reference answers of `batch(step, batch_size)`, None where a row has none."""
        return [self.references[i] for i in self._indices(step, batch_size)]

    def more(self, step: int, round_: int, count: int) -> tuple[list[Prompt], list[str | None]]:
        """`count` more prompts (and their references) for round `round_` of step `step`'s
        over-sampling: a seeded draw without replacement, a pure function of (seed, step, round)
        like the step's own batch."""
        rng = np.random.default_rng([self.seed, step, round_, 1])
        indices = rng.choice(len(self.prompts), size=min(count, len(self.prompts)), replace=False)
        return [self.prompts[i] for i in indices], [self.references[i] for i in indices]

    def _indices(self, step: int, batch_size: int) -> list[int]:
        start = step * batch_size
        return [self._index(position) for position in range(start, start + batch_size)]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.prompts))
        if self._epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
            self._epoch = epoch
        return int(self._order[offset])
