"""Checkpoint folders of a run: written whole or not at all, and the newest one found again.

A checkpoint is output_dir/checkpoints/step-N: the policy (and critic) as `save_pretrained`
writes them, trainer.pt (step, optimizer, KL coefficient, every rank's RNG states) and
history.json. It is written under a hidden `.step-N.partial` name, fsynced, then renamed, so a
learner killed while it writes leaves the previous checkpoint as the newest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under output_dir/checkpoints (half-written ones are hidden `.partial`)."""
    done = sorted(p for p in (output_dir / "checkpoints").glob("step-*") if (p / "trainer.pt").is_file())
    return done[-1] if done else None


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """`write(folder)` into a fresh hidden folder, fsync every file, then rename it to `final`."""
    root = final.parent
    partial = root / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    for path in partial.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    directory = os.open(root, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return final
